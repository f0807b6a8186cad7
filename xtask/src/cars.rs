//! `cargo xtask train-cars | eval-cars | predict | download-cars | publish-cars`: thin command
//! lines over `candle_finetune::recipe` and the library.

use anyhow::{Context, Result};
use candle_core::Device;
use candle_finetune::data::{
    Dataset, Loader, LoaderConfig, Split, DEFAULT_DATASET_REPO, DEFAULT_DATASET_REVISION,
};
use candle_finetune::hub::HubOptions;
use candle_finetune::pretrained::{
    self, WeightsSource, DEFAULT_FILE, DEFAULT_REPO, DEFAULT_REVISION,
};
use candle_finetune::recipe::{DataSource, DeviceKind, ScheduleKind, TrainCars};
use candle_finetune::train::{self, OptimizerKind};
use candle_resnet::resnet::Arch;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the images come from (shared by train-cars, eval-cars and download-cars).
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Hub dataset repo (parquet shards in the `datasets` layout).
    #[arg(long, default_value = DEFAULT_DATASET_REPO)]
    dataset_repo: String,
    /// Revision of the dataset repo (pinned commit by default).
    #[arg(long, default_value = DEFAULT_DATASET_REVISION)]
    dataset_revision: String,
    /// Local data instead: a folder with `train-*.parquet` and `test-*.parquet` (directly or
    /// under `data/`), or with `train/` and `test/` image folders (one sub-folder per class).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Name of the dataset for the model card (default: Stanford Cars for its Hub mirror, the
    /// `name` of DATA_DIR/dataset.json, else the folder's or repo's name).
    #[arg(long)]
    dataset_name: Option<String>,
    /// Licence of the dataset for the model card (a Hub licence id such as cc-by-4.0; default:
    /// Stanford Cars' terms for its mirror, the `license` of DATA_DIR/dataset.json, else unknown).
    #[arg(long)]
    dataset_license: Option<String>,
}

impl DataArgs {
    fn source(&self) -> DataSource {
        match &self.data_dir {
            Some(d) => DataSource::Dir(d.clone()),
            None => DataSource::Hub {
                repo: self.dataset_repo.clone(),
                revision: self.dataset_revision.clone(),
            },
        }
    }

    fn load(&self, opts: &HubOptions, split: Split) -> Result<Dataset> {
        Ok(self.source().load(opts, split)?)
    }
}

/// train-cars' output folder.
const DEFAULT_OUT: &str = "out/resnet18-stanford-cars";

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
    /// Epochs (anchor recipe: 90).
    #[arg(long, default_value_t = 90)]
    epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accum_steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimizerKind,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Nesterov momentum.
    #[arg(long)]
    nesterov: bool,
    /// Weight decay (not on batch norms and biases).
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f64,
    /// Learning-rate decay: step (divide by 10 every --step-epochs, the anchor recipe) or cosine.
    #[arg(long, value_enum, default_value = "step")]
    schedule: ScheduleKind,
    /// Epochs between learning-rate divisions of the step schedule.
    #[arg(long, default_value_t = 30)]
    step_epochs: usize,
    /// Linear warmup epochs.
    #[arg(long, default_value_t = 0.0)]
    warmup_epochs: f64,
    /// Learning-rate multiplier of the backbone.
    #[arg(long, default_value_t = 1.0)]
    backbone_lr_mult: f64,
    /// Train only the new head.
    #[arg(long)]
    freeze_backbone: bool,
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
    /// Seed of the data order, augmentations and head.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// Output folder (the Hub-ready model folder).
    #[arg(long, default_value = DEFAULT_OUT)]
    out: PathBuf,
    /// Continue from OUT/checkpoint-last.safetensors.
    #[arg(long)]
    resume: bool,
    /// Stop every epoch after this many batches.
    #[arg(long)]
    max_batches_per_epoch: Option<usize>,
    /// Evaluate on the test split every N epochs (and after the last one).
    #[arg(long, default_value_t = 1)]
    eval_every: usize,
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
    /// The recipe these flags describe.
    fn recipe(&self) -> TrainCars {
        TrainCars {
            hub: HubOptions::from_env(),
            data: self.data.source(),
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
            epochs: self.epochs,
            batch_size: self.batch_size,
            accum_steps: self.accum_steps,
            lr: self.lr,
            optimizer: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            label_smoothing: self.label_smoothing,
            schedule: self.schedule,
            step_epochs: self.step_epochs,
            warmup_epochs: self.warmup_epochs,
            backbone_lr_mult: self.backbone_lr_mult,
            freeze_backbone: self.freeze_backbone,
            image_size: self.image_size,
            preprocess: candle_finetune::data::PreprocessOverrides {
                size: None,
                crop_pct: self.crop_pct,
                interpolation: self.interpolation,
                mean: self.mean,
                std: self.std,
            },
            seed: self.seed,
            device: self.device,
            out: self.out.clone(),
            resume: self.resume,
            max_batches_per_epoch: self.max_batches_per_epoch,
            eval_every: self.eval_every,
            smoke: false,
        }
    }
}

pub fn train_cars(a: TrainArgs) -> Result<()> {
    let recipe = a.recipe();
    let report = if a.smoke {
        let (recipe, _cache) = recipe.smoke()?; // the cache lives until the run ends
        recipe.run()?
    } else {
        recipe.run()?
    };
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
    #[arg(long, default_value = "out/resnet18-stanford-cars")]
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
    #[arg(long, default_value = "out/resnet18-stanford-cars")]
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
    for split in [Split::Train, Split::Test] {
        let ds = a.data.load(&opts, split)?;
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
    #[arg(long, default_value = "out/resnet18-stanford-cars")]
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
    /// HF_HUB_DOWNLOAD_TIMEOUT, else 60).
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
    let p = candle_finetune::publish::publish_folder(&hub, &a.dir, &opts)?;
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

/// `cargo xtask ablate-smoothing`: the train-cars recipe once per smoothing value, compared.
pub fn ablate_smoothing(a: AblateArgs) -> Result<()> {
    let mut base = a.train.recipe();
    if base.out == std::path::Path::new(DEFAULT_OUT) {
        base.out = PathBuf::from("out/ablate-smoothing");
    }
    let out = base.out.clone();
    let (base, _cache) = if a.train.smoke {
        let (b, c) = base.smoke()?; // the cache lives until the runs end
        (b, Some(c))
    } else {
        (base, None)
    };
    let ablation = candle_finetune::ablation::ablate_smoothing(&base, &a.eps)?;
    println!("{}", candle_finetune::ablation::markdown(&ablation));
    eprintln!(
        "ablation written to {} (ablation.md, ablation.json, ablation-reliability.png, ablation-curves.png)",
        out.display()
    );
    Ok(())
}
