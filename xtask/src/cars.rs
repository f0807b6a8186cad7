//! `cargo xtask train | train-cars | eval-cars | predict | download-cars | publish-cars`: thin
//! command lines over `candle_finetune::recipe` and the library.

use anyhow::{Context, Result};
use candle_core::Device;
use candle_finetune::data::features::{read_class_names, ColumnChoice};
use candle_finetune::data::{
    DataSource, Dataset, Loader, LoaderConfig, Split, DEFAULT_DATASET_REPO,
    DEFAULT_DATASET_REVISION,
};
use candle_finetune::hub::HubOptions;
use candle_finetune::pretrained::{
    self, WeightsSource, DEFAULT_FILE, DEFAULT_REPO, DEFAULT_REVISION,
};
use candle_finetune::recipe::{cars, DeviceKind, FineTune, DEFAULT_VALIDATION_FRACTION};
use candle_finetune::train::{self, TrainConfig};
use candle_resnet::resnet::Arch;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the images come from (shared by train, train-cars, eval-cars and download-cars).
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Hub dataset repo OWNER/NAME: any image-classification dataset with parquet files (or
    /// the Hub's parquet conversion of it). Splits come from its card's `configs:` or the
    /// Hub's file names; the image and class columns from its features. train-cars: Stanford
    /// Cars.
    #[arg(long)]
    dataset_repo: Option<String>,
    /// Revision of the dataset repo: branch, tag or commit (train-cars: the pinned commit of
    /// Stanford Cars; otherwise main).
    #[arg(long)]
    dataset_revision: Option<String>,
    /// Configuration (subset) of the dataset repo (default: the card's default, or the only
    /// one).
    #[arg(long)]
    dataset_config: Option<String>,
    /// Local data instead: a folder with parquet files (`train-*.parquet`, `validation-*`,
    /// `test-*`, directly, under `data/` or as its README's `configs:` say) or with `train/`,
    /// `validation/` and `test/` image folders (one sub-folder per class).
    #[arg(long, conflicts_with = "dataset_repo")]
    data_dir: Option<PathBuf>,
    /// Column of the encoded images (default: the one Image feature, or the one image-like
    /// column).
    #[arg(long)]
    image_column: Option<String>,
    /// Column of the class (default: the one ClassLabel feature, else `label`).
    #[arg(long)]
    label_column: Option<String>,
    /// Class names in label order, for integer labels without names: a JSON list or one name
    /// per line.
    #[arg(long)]
    class_names: Option<PathBuf>,
    /// Name of the dataset for the model card (default: Stanford Cars for its Hub mirror, the
    /// `name` of DATA_DIR/dataset.json, else the folder's or repo's name).
    #[arg(long)]
    dataset_name: Option<String>,
    /// Licence of the dataset for the model card (a Hub licence id such as cc-by-4.0; default:
    /// Stanford Cars' terms for its mirror, the `license` of DATA_DIR/dataset.json or of the
    /// dataset card, else unknown).
    #[arg(long)]
    dataset_license: Option<String>,
}

impl DataArgs {
    /// The data these flags name; `cars`: Stanford Cars unless told otherwise.
    fn source(&self, cars: bool) -> Result<DataSource> {
        Ok(match (&self.data_dir, &self.dataset_repo) {
            (Some(d), _) => DataSource::Dir(d.clone()),
            (None, Some(repo)) => DataSource::Hub {
                repo: repo.clone(),
                revision: self.dataset_revision.clone().unwrap_or_else(|| {
                    if cars && repo == DEFAULT_DATASET_REPO {
                        DEFAULT_DATASET_REVISION.into()
                    } else {
                        "main".into()
                    }
                }),
                config: self.dataset_config.clone(),
            },
            (None, None) if cars => DataSource::Hub {
                repo: DEFAULT_DATASET_REPO.into(),
                revision: self
                    .dataset_revision
                    .clone()
                    .unwrap_or_else(|| DEFAULT_DATASET_REVISION.into()),
                config: self.dataset_config.clone(),
            },
            (None, None) => anyhow::bail!(
                "no data: give --dataset-repo OWNER/NAME (a Hub dataset) or --data-dir DIR (a \
                 local folder)"
            ),
        })
    }

    fn columns(&self) -> Result<ColumnChoice> {
        Ok(ColumnChoice {
            image: self.image_column.clone(),
            label: self.label_column.clone(),
            class_names: self
                .class_names
                .as_deref()
                .map(read_class_names)
                .transpose()?,
        })
    }

    fn load(&self, opts: &HubOptions, split: Split) -> Result<Dataset> {
        Ok(self.source(true)?.load(opts, &self.columns()?, split)?)
    }
}

/// The flags of a fine-tuning run (train, train-cars, ablate-smoothing).
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Run the whole pipeline offline in a couple of minutes: a generated dataset and random
    /// weights are written into a temporary Hub cache and read back offline.
    #[arg(long)]
    smoke: bool,
    /// Also write the loss of every optimizer step to this JSON file (a list of numbers), e.g.
    /// to compare runs of the same seed on two devices.
    #[arg(long)]
    step_losses: Option<PathBuf>,
    /// Add the comparison of this `ablate-smoothing` output folder (its ablation.json and
    /// plots) to the model card.
    #[arg(long)]
    ablation: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Share of the training images held out (stratified by class, seeded by --seed) to choose
    /// the epoch when the data has no validation split; 0: train on all of them and keep the
    /// last epoch.
    #[arg(long, default_value_t = DEFAULT_VALIDATION_FRACTION)]
    validation_fraction: f64,
    /// MiB of parquet images kept in memory while training reads them (row groups are read
    /// as needed; memory stays flat however large the dataset).
    #[arg(long, default_value_t = candle_finetune::data::stream::DEFAULT_CACHE_BYTES >> 20)]
    parquet_cache_mb: usize,
    /// Hub repo of the pretrained weights.
    #[arg(long, default_value = DEFAULT_REPO)]
    weights_repo: String,
    /// Revision of the weights repo.
    #[arg(long, default_value = DEFAULT_REVISION)]
    weights_revision: String,
    /// A local safetensors file instead of the Hub weights.
    #[arg(long)]
    weights_file: Option<PathBuf>,
    /// Architecture (must match the weights).
    #[arg(long, default_value = "resnet18", value_parser = parse_arch)]
    arch: Arch,
    /// Image size (default: the weights' config, 224).
    #[arg(long)]
    image_size: Option<u32>,
    /// Eval crop fraction (default: the weights' config.json, 0.875).
    #[arg(long)]
    crop_pct: Option<f64>,
    /// Resize filter: bilinear, bicubic or nearest (default: the weights' config.json).
    #[arg(long)]
    interpolation: Option<candle_finetune::data::Interpolation>,
    /// Normalisation mean R,G,B (default: the weights' config.json).
    #[arg(long, value_parser = parse_triple)]
    mean: Option<[f32; 3]>,
    /// Normalisation std R,G,B (default: the weights' config.json).
    #[arg(long, value_parser = parse_triple)]
    std: Option<[f32; 3]>,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// Output folder, the Hub-ready model folder (train-cars: out/resnet18-stanford-cars;
    /// train: out/train).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from OUT/checkpoint-last.safetensors.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    train: TrainConfig,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
}

/// `R,G,B` as three numbers.
fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>().map_err(|e| format!("{x:?}: {e}")))
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|v: Vec<f32>| format!("expected 3 comma-separated values, got {}", v.len()))
}

impl TrainArgs {
    /// The recipe these flags describe: the Stanford Cars preset (`cars`) or the general one.
    fn recipe(&self, cars: bool) -> Result<FineTune> {
        let base = cars::stanford_cars();
        // --smoke replaces the data; it needs none named.
        let data = self.data.source(cars || self.smoke)?;
        Ok(FineTune {
            hub: HubOptions::from_env(),
            data,
            columns: self.data.columns()?,
            validation_fraction: self.validation_fraction,
            parquet_cache_bytes: self.parquet_cache_mb.max(1) << 20,
            dataset_name: self.data.dataset_name.clone(),
            dataset_license: self.data.dataset_license.clone(),
            dataset_info: None,
            weights: match &self.weights_file {
                Some(f) => WeightsSource::File(f.clone()),
                None => WeightsSource::Hub {
                    repo: self.weights_repo.clone(),
                    revision: self.weights_revision.clone(),
                    file: DEFAULT_FILE.into(),
                },
            },
            arch: self.arch,
            image_size: self.image_size,
            preprocess: candle_finetune::data::PreprocessOverrides {
                size: None,
                crop_pct: self.crop_pct,
                interpolation: self.interpolation,
                mean: self.mean,
                std: self.std,
            },
            train: self.train.clone(),
            world: None,
            device: self.device,
            out: self.out.clone().unwrap_or_else(|| {
                if cars {
                    base.out.clone()
                } else {
                    PathBuf::from("out/train")
                }
            }),
            resume: self.resume,
            smoke: false,
            stop: None,
            command: if cars {
                "cargo xtask train-cars".into()
            } else {
                "cargo xtask train".into()
            },
        })
    }
}

/// `cargo xtask train` (`cars`: false) and `train-cars` (`cars`: true).
/// A flag SIGTERM and SIGINT (preemption, Ctrl-C) set: the run writes a recovery checkpoint at
/// its next optimizer step and exits; a second signal exits at once.
fn stop_on_signals() -> Result<Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        // Registered first: when the flag is already set (a second signal), exit now.
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(stop)
}

/// The data-parallel world when an MPI launcher (`mpirun`, `mpiexec`, `srun`) started this
/// process as one of several ranks; `None` for a plain start. With `--device cuda` and the
/// `nccl` feature the ranks' collectives run over NCCL (one GPU per rank, numbered by the rank
/// on its machine), MPI only carrying NCCL's id; otherwise over MPI. `CANDLE_DDP=nccl` on a
/// plain start makes a one-rank NCCL world (a check of the NCCL path on one GPU).
fn launched_world(
    device: candle_finetune::recipe::DeviceKind,
) -> Result<Option<candle_finetune::recipe::World>> {
    use candle_finetune::recipe::{DeviceKind, World};
    let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .unwrap_or(1);
    let nccl_asked = std::env::var("CANDLE_DDP").is_ok_and(|v| v == "nccl");
    if size <= 1 && !nccl_asked {
        return Ok(None);
    }
    let bootstrap: std::sync::Arc<dyn candle_ddp::Collective> = if size <= 1 {
        std::sync::Arc::new(candle_ddp::Single)
    } else {
        mpi_world(size)?
    };
    if device == DeviceKind::Cuda && (size > 1 || nccl_asked) {
        #[cfg(feature = "nccl")]
        {
            use candle_ddp::Collective;
            let gpu = device.device_at(bootstrap.local_rank())?;
            let nccl = candle_ddp::nccl::Nccl::over(bootstrap, &gpu)?;
            if nccl.rank() == 0 {
                eprintln!("data-parallel: NCCL, {} rank(s)", nccl.world_size());
            }
            return Ok(Some(World(std::sync::Arc::new(nccl))));
        }
        #[cfg(not(feature = "nccl"))]
        {
            if nccl_asked {
                anyhow::bail!(
                    "CANDLE_DDP=nccl, but this xtask was built without NCCL: build it with \
                     --features nccl"
                );
            }
            eprintln!(
                "note: CUDA ranks without the nccl feature: gradients go through host memory \
                 and MPI (build with --features mpi,nccl for NCCL)"
            );
        }
    } else if nccl_asked {
        anyhow::bail!("CANDLE_DDP=nccl needs --device cuda");
    }
    Ok((size > 1).then(|| World(bootstrap)))
}

/// The MPI world of the launcher that started this process as one of `size` ranks.
#[cfg(feature = "mpi")]
fn mpi_world(_size: usize) -> Result<std::sync::Arc<dyn candle_ddp::Collective>> {
    Ok(std::sync::Arc::new(candle_ddp::mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(size: usize) -> Result<std::sync::Arc<dyn candle_ddp::Collective>> {
    anyhow::bail!(
        "an MPI launcher started this process as one of {size} ranks, but this xtask was built \
         without MPI: build it with `cargo build --release -p xtask --features mpi` (needs \
         `apt install libopenmpi-dev libclang-dev`) and launch that binary"
    )
}

pub fn train(a: TrainArgs, cars: bool) -> Result<()> {
    let mut recipe = a.recipe(cars)?;
    recipe.stop = Some(stop_on_signals()?);
    recipe.world = launched_world(recipe.device)?;
    let rank0 = recipe.world.as_ref().is_none_or(|w| w.0.rank() == 0);
    if rank0 && recipe.device == DeviceKind::Cpu && recipe.train.amp.slower_than_f32_on_cpu() {
        eprintln!(
            "warning: --amp bf16 on this CPU runs bf16 tensors through candle's CPU ops, several \
             times slower than f32; bf16 pays with oneDNN's native bf16 convolutions (a CPU with \
             AMX or AVX512-BF16 and `cargo run --release -p xtask --features onednn -- ...`)"
        );
    }
    let mut console = crate::console::Console::default();
    let report = if a.smoke {
        let (recipe, cache) = recipe.smoke()?; // the cache lives until the run ends
        eprintln!(
            "smoke: {} train / {} test generated images and random weights in the Hub cache {}",
            cache.train_images,
            cache.test_images,
            cache.path().display()
        );
        recipe.run_with(&mut console)?
    } else {
        recipe.run_with(&mut console)?
    };
    drop(console);
    if !rank0 {
        return Ok(());
    }
    if report.fit.interrupted {
        let paths = candle_finetune::train::RunPaths {
            dir: report.out.clone(),
        };
        eprintln!(
            "stopped; {} holds the run's state: continue it with --resume",
            paths.last().display()
        );
        return Ok(());
    }
    eprintln!("{}", crate::console::result_line(&report));
    if let Some(dir) = &a.ablation {
        candle_finetune::ablation::link_into_card(&report.out, dir)?;
        eprintln!(
            "model card: label smoothing ablation of {} added",
            dir.display()
        );
    }
    if let Some(p) = &a.step_losses {
        std::fs::write(p, serde_json::to_string(&report.fit.step_losses)?)?;
        eprintln!(
            "{} step losses written to {}",
            report.fit.step_losses.len(),
            p.display()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model folder or Hub repo OWNER/NAME.
    #[arg(long, default_value = cars::DEFAULT_OUT)]
    model: String,
    /// Revision when --model is a Hub repo.
    #[arg(long, default_value = "main")]
    revision: String,
    #[command(flatten)]
    data: DataArgs,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// Where to write eval.json (default: print only).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn eval_cars(a: EvalArgs) -> Result<()> {
    let dev = a.device.device()?;
    let p =
        pretrained::from_pretrained(&HubOptions::from_env(), &a.model, Some(&a.revision), &dev)?;
    let transform = p.transform();
    let (model, cfg) = (p.model, p.config);
    let test = Arc::new(
        a.data
            .load(&HubOptions::from_env(), Split::Test)?
            .remap_to(&cfg.class_names())?,
    );
    let loader = Loader::new(
        test,
        transform,
        LoaderConfig {
            batch_size: a.batch_size,
            shuffle: false,
            ..Default::default()
        },
    )?;
    let (r, skipped) = train::evaluate(&model, &loader, &dev)?;
    println!("test: {} images ({skipped} undecodable), top-1 {:.2}%, top-5 {:.2}%, NLL {:.4}, ECE {:.2}%", r.n, 100.0 * r.top1, 100.0 * r.top5, r.nll, 100.0 * r.ece);
    let names = cfg.class_names();
    for (t, p, c) in r.most_confused.iter().take(10) {
        println!("  {c:3} x  {} -> {}", names[*t], names[*p]);
    }
    if let Some(o) = a.out {
        std::fs::create_dir_all(&o)?;
        candle_finetune::files::atomic_write_bytes(
            &o.join("eval.json"),
            serde_json::to_string_pretty(&r)?.as_bytes(),
        )?;
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Model folder or Hub repo OWNER/NAME.
    #[arg(long, default_value = cars::DEFAULT_OUT)]
    model: String,
    /// Revision when --model is a Hub repo.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Images (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let p = pretrained::from_pretrained(
        &HubOptions::from_env(),
        &a.model,
        Some(&a.revision),
        &Device::Cpu,
    )?;
    for path in &a.images {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let top = p
            .predict(&[bytes], 5)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        println!("{}:", path.display());
        for (name, prob) in &top[0] {
            println!("  {:6.2}%  {name}", 100.0 * prob);
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DownloadArgs {
    #[command(flatten)]
    data: DataArgs,
}

pub fn download_cars(a: DownloadArgs) -> Result<()> {
    let opts = HubOptions::from_env();
    let data = a.data.source(true)?.open(&opts, &a.data.columns()?)?;
    println!("{}", data.origin);
    for split in [Split::Train, Split::Validation, Split::Test] {
        let Some(ds) = data.get(split) else {
            println!("{}: none", split.name());
            continue;
        };
        let bad: Vec<(usize, String)> = (0..ds.len())
            .into_par_iter()
            .filter_map(|i| ds.load_image(i).err().map(|e| (i, e)))
            .collect();
        println!(
            "{}: {} images, {} classes, {} undecodable",
            split.name(),
            ds.len(),
            ds.num_classes(),
            bad.len()
        );
        for (c, n) in ds.class_counts().iter().enumerate() {
            println!("  {n:4}  {}", ds.class_names[c]);
        }
        for (i, e) in bad {
            println!("  undecodable sample {i}: {e}");
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// Model repository OWNER/NAME (created if missing).
    #[arg(long)]
    repo: String,
    /// The model folder written by train-cars.
    #[arg(long, default_value = cars::DEFAULT_OUT)]
    dir: PathBuf,
    /// Create the repository private.
    #[arg(long)]
    private: bool,
    /// Branch to commit to (created from main if missing); default main.
    #[arg(long)]
    revision: Option<String>,
    /// Commit message.
    #[arg(long)]
    message: Option<String>,
    /// Files kept local, as glob patterns (repeatable; a pattern without `/` matches any path
    /// component). Default: the training checkpoints, temporary and hidden files. `--exclude ''`
    /// uploads everything.
    #[arg(long, default_values_t = candle_finetune::publish::DEFAULT_EXCLUDE.map(String::from))]
    exclude: Vec<String>,
    /// Seconds to wait for the Hub to connect or between two reads of an answer (default
    /// HF_HUB_DOWNLOAD_TIMEOUT, else 60); a request is retried once at most, so a silent
    /// server ends the command within twice this.
    #[arg(long)]
    timeout: Option<f64>,
}

/// Uploads the model folder to the Hub in one commit; the token comes from HF_TOKEN,
/// HF_TOKEN_PATH or `hf auth login`, and is never printed.
pub fn publish_cars(a: PublishArgs) -> Result<()> {
    let opts = candle_finetune::publish::PublishOptions {
        repo: a.repo.clone(),
        private: a.private,
        revision: a.revision.clone(),
        message: a.message.clone(),
        exclude: a
            .exclude
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect(),
    };
    let mut hub = HubOptions::from_env();
    if let Some(t) = a.timeout {
        anyhow::ensure!(
            t.is_finite() && t > 0.0,
            "--timeout must be a positive number of seconds"
        );
        hub.timeout = Some(std::time::Duration::from_secs_f64(t));
    }
    eprintln!("publishing {} to {} ...", a.dir.display(), a.repo);
    let p = crate::console::with_upload_bar(|progress| {
        candle_finetune::publish::publish_folder_with(&hub, &a.dir, &opts, progress)
    })?;
    eprintln!("{} files: {}", p.files.len(), p.files.join(", "));
    if let Some(t) = &p.transfer {
        eprintln!("large files ({t} transfer): {}", p.lfs_files.join(", "));
    }
    if !p.kept_local.is_empty() {
        eprintln!("kept local (--exclude): {}", p.kept_local.join(", "));
    }
    println!("{}", p.commit_url.unwrap_or(p.repo_url));
    eprintln!(
        "load it back: candle_finetune::pretrained::from_pretrained(&opts, \"{}\", None, &device) or \
         cargo xtask predict --model {} IMAGE",
        a.repo, a.repo
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct AblateArgs {
    /// Label smoothing values, comma-separated; one full run each.
    #[arg(long, value_delimiter = ',', default_values_t = candle_finetune::ablation::DEFAULT_EPS)]
    eps: Vec<f64>,
    /// The train-cars flags (data, weights, recipe; --smoke for the offline generated run).
    /// --out is the ablation folder here; it defaults to out/ablate-smoothing.
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Args, Debug)]
pub struct AblateRecipesArgs {
    /// Recipes, comma-separated; each joins ingredients with + (smoothing, mixup, cutmix, ema,
    /// ta, ra, jitter, erasing, droppath, clip) or is `none`. An ingredient runs at the value
    /// its flag gives (e.g. --mixup 0.8), else at its default. One full run each.
    #[arg(long, value_delimiter = ',', default_values_t = candle_finetune::ablation::DEFAULT_RECIPES.map(String::from))]
    recipes: Vec<String>,
    /// The train-cars flags (data, weights, recipe; --smoke for the offline generated run).
    /// --out is the ablation folder here; it defaults to out/ablate.
    #[command(flatten)]
    train: TrainArgs,
}

/// The recipe of the ablation commands: the train-cars flags, `default_out` unless --out is
/// given, the smoke data when --smoke (its cache lives as long as the returned guard).
fn ablation_base(train: &TrainArgs, default_out: &str) -> Result<(FineTune, Option<impl Sized>)> {
    let mut base = train.recipe(true)?;
    if train.out.is_none() {
        base.out = PathBuf::from(default_out);
    }
    Ok(if train.smoke {
        let (b, c) = base.smoke()?;
        (b, Some(c))
    } else {
        (base, None)
    })
}

/// `cargo xtask ablate`: the recipe once per named variant, compared.
pub fn ablate_recipes(a: AblateRecipesArgs) -> Result<()> {
    let (base, _cache) = ablation_base(&a.train, "out/ablate")?;
    let mut console = crate::console::Console::default();
    let ablation = candle_finetune::ablation::ablate_recipes(&base, &a.recipes, &mut console)?;
    println!("{}", candle_finetune::ablation::markdown(&ablation));
    eprintln!(
        "ablation written to {} (ablation.md, ablation.json, ablation-reliability.png, ablation-curves.png)",
        base.out.display()
    );
    Ok(())
}

/// `cargo xtask ablate-smoothing`: the train-cars recipe once per smoothing value, compared.
pub fn ablate_smoothing(a: AblateArgs) -> Result<()> {
    let (base, _cache) = ablation_base(&a.train, "out/ablate-smoothing")?;
    let out = base.out.clone();
    let mut console = crate::console::Console::default();
    let ablation = candle_finetune::ablation::ablate_smoothing(&base, &a.eps, &mut console)?;
    println!("{}", candle_finetune::ablation::markdown(&ablation));
    eprintln!(
        "ablation written to {} (ablation.md, ablation.json, ablation-reliability.png, ablation-curves.png)",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Line {
        #[command(flatten)]
        a: TrainArgs,
    }

    #[test]
    fn timm_flag_names_parse_into_the_train_config() {
        let l = Line::try_parse_from([
            "train",
            "--mixup",
            "0.2",
            "--cutmix",
            "1.0",
            "--cutmix-minmax",
            "0.2,0.8",
            "--mixup-mode",
            "elem",
            "--model-ema",
            "--model-ema-decay",
            "0.999",
            "--clip-grad",
            "1.5",
            "--checkpoint-every-steps",
            "50",
            "--aa",
            "rand-m7-n3",
            "--color-jitter",
            "0.4,0.3,0.2,0.1",
            "--scale",
            "0.35,1",
            "--ratio",
            "0.5,2",
            "--hflip",
            "0.25",
            "--drop-path",
            "0.05",
            "--amp",
            "bf16",
        ])
        .unwrap();
        let t = &l.a.train;
        let a = t.augment().unwrap();
        assert_eq!(
            a.auto_augment,
            Some(candle_finetune::data::augment::AutoAugment::RandAugment {
                num_ops: 3,
                magnitude: 7,
                bins: 31
            })
        );
        assert_eq!((a.scale, a.ratio, a.hflip), ([0.35, 1.0], [0.5, 2.0], 0.25));
        assert_eq!(a.color_jitter.unwrap().hue, Some([-0.1, 0.1]));
        assert_eq!(t.drop_path, 0.05);
        assert_eq!(t.amp, candle_finetune::train::Amp::Bf16);
        assert_eq!(
            (t.mixup_alpha, t.cutmix_alpha, t.cutmix_minmax.clone()),
            (0.2, 1.0, Some(vec![0.2, 0.8]))
        );
        assert_eq!(t.mixup_mode, candle_finetune::data::mixup::MixMode::Elem);
        assert!(t.model_ema && t.model_ema_decay == 0.999 && t.clip_grad == Some(1.5));
        assert_eq!(t.checkpoint_every_steps, Some(50));
        t.validate().unwrap();
        // The defaults are TrainConfig's own.
        let d = Line::try_parse_from(["train"]).unwrap();
        assert_eq!(d.a.train, TrainConfig::default());
        // One number is not a box range.
        let one = Line::try_parse_from(["train", "--cutmix-minmax", "0.2"]).unwrap();
        assert!(one.a.train.validate().is_err());
    }
}
