//! `cargo xtask train-cars | eval-cars | predict | download-cars`: the Stanford Cars jobs.

use anyhow::{bail, Context, Result};
use candle_core::{Device, ModuleT, Tensor};
use candle_finetune::card::{ModelConfig, Provenance};
use candle_finetune::data::{
    Dataset, DatasetInfo, Loader, LoaderConfig, Preprocess, Split, Transform, DEFAULT_DATASET_REPO,
    DEFAULT_DATASET_REVISION,
};
use candle_finetune::hub::{
    self, HubOptions, WeightsSource, DEFAULT_FILE, DEFAULT_REPO, DEFAULT_REVISION,
};
use candle_finetune::train::{self, Decay, OptimizerKind, TrainConfig};
use candle_resnet::resnet::Arch;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the images come from.
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

fn list_parquet(dir: &Path, split: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = [dir.to_path_buf(), dir.join("data")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "parquet")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{split}-")))
        })
        .collect();
    v.sort();
    v
}

impl DataArgs {
    fn load(&self, opts: &HubOptions, split: Split) -> Result<Dataset> {
        Ok(match &self.data_dir {
            Some(dir) => {
                let shards = list_parquet(dir, split.name());
                if !shards.is_empty() {
                    Dataset::from_parquet(&shards)?
                } else if dir.join(split.name()).is_dir() {
                    Dataset::from_image_folder(&dir.join(split.name()))?
                } else {
                    bail!(
                        "{}: no {}-*.parquet files and no {}/ image folder",
                        dir.display(),
                        split.name(),
                        split.name()
                    )
                }
            }
            None if self.dataset_repo == DEFAULT_DATASET_REPO => Dataset::from_hub(
                opts,
                &self.dataset_repo,
                &self.dataset_revision,
                &split.stanford_cars_shards(),
            )?,
            None => {
                // Other repos: the same two-shard layout is assumed; pass --data-dir otherwise.
                Dataset::from_hub(
                    opts,
                    &self.dataset_repo,
                    &self.dataset_revision,
                    &split.stanford_cars_shards(),
                )?
            }
        })
    }

    /// What the model card says about the data.
    fn info(&self) -> Result<DatasetInfo> {
        let info = match &self.data_dir {
            Some(d) => DatasetInfo::from_dir(d)?,
            None if self.dataset_repo == DEFAULT_DATASET_REPO => DatasetInfo {
                revision: Some(self.dataset_revision.clone()),
                ..DatasetInfo::stanford_cars()
            },
            None => DatasetInfo::hub(&self.dataset_repo, &self.dataset_revision),
        };
        Ok(info.with_overrides(
            self.dataset_name.as_deref(),
            self.dataset_license.as_deref(),
        ))
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Run the whole pipeline offline in a couple of minutes: a generated dataset and random
    /// weights are written into a temporary Hub cache and read back with HF_HUB_OFFLINE=1.
    #[arg(long)]
    smoke: bool,
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
    /// resnet18, resnet34 or resnet50 (must match the weights).
    #[arg(long, default_value = "resnet18")]
    arch: String,
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
    /// sgd or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
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
    /// step (divide by 10 every --step-epochs, the anchor recipe) or cosine.
    #[arg(long, default_value = "step")]
    schedule: String,
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
    /// Seed of the data order, augmentations and head.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output folder (the Hub-ready model folder).
    #[arg(long, default_value = "out/resnet18-stanford-cars")]
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

pub fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("CUDA device (build xtask with --features cuda)")?,
        "metal" => {
            Device::new_metal(0).context("Metal device (build xtask with --features metal)")?
        }
        other => bail!("unknown device {other:?} (cpu, cuda, metal)"),
    })
}

pub fn train_cars(mut a: TrainArgs) -> Result<()> {
    let _smoke_cache; // keeps the temporary cache alive for the whole run
    if a.smoke {
        let dir = tempfile::tempdir()?;
        let size = a.image_size.unwrap_or(64);
        let (ntrain, ntest) = candle_finetune::smoke::seed_dataset(dir.path(), 16, 6)?;
        candle_finetune::smoke::seed_weights(dir.path(), size)?;
        eprintln!("smoke: {ntrain} train / {ntest} test generated images and random weights in the Hub cache {}", dir.path().display());
        // The normal code path, offline, against that cache.
        std::env::set_var("HF_HUB_CACHE", dir.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        a.epochs = 2;
        a.batch_size = a.batch_size.min(16);
        a.lr = 0.01;
        a.schedule = "cosine".into();
        a.image_size = Some(size);
        if a.out == Path::new("out/resnet18-stanford-cars") {
            a.out = "out/smoke".into();
        }
        _smoke_cache = Some(dir);
    } else {
        _smoke_cache = None;
    }
    let opts = HubOptions::from_env();
    let arch: Arch = a.arch.parse().map_err(anyhow::Error::msg)?;
    let dev = device(&a.device)?;
    // Weights and their preprocessing config.
    let (weights, mut pre, base) = match &a.weights_file {
        // Only the file name: the card goes to the Hub, local paths stay here.
        Some(f) => (
            f.clone(),
            Preprocess::default(),
            format!(
                "local file {}",
                f.file_name().unwrap_or_default().to_string_lossy()
            ),
        ),
        None => {
            let src = WeightsSource::Hub {
                repo: a.weights_repo.clone(),
                revision: a.weights_revision.clone(),
                file: DEFAULT_FILE.into(),
            };
            let w = opts.resolve(&src)?;
            let pre = match opts.model_file(&a.weights_repo, &a.weights_revision, "config.json") {
                Ok(c) => Preprocess::from_timm_config(&std::fs::read_to_string(c)?)
                    .map_err(anyhow::Error::msg)?,
                Err(e) => {
                    eprintln!(
                        "note: no config.json in {} ({e}); using ImageNet defaults",
                        a.weights_repo
                    );
                    Preprocess::default()
                }
            };
            (w, pre, format!("{}@{}", a.weights_repo, a.weights_revision))
        }
    };
    if let Some(s) = a.image_size {
        pre.size = s;
    }
    let train_ds = Arc::new(a.data.load(&opts, Split::Train)?);
    let test_ds = Arc::new(a.data.load(&opts, Split::Test)?);
    if train_ds.class_names != test_ds.class_names {
        bail!("train and test splits have different class names");
    }
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        accum_steps: a.accum_steps,
        lr: a.lr,
        optimizer: match a.optimizer.as_str() {
            "sgd" => OptimizerKind::Sgd,
            "adamw" => OptimizerKind::AdamW,
            o => bail!("unknown optimizer {o:?} (sgd, adamw)"),
        },
        momentum: a.momentum,
        nesterov: a.nesterov,
        weight_decay: a.weight_decay,
        decoupled_wd: false,
        label_smoothing: a.label_smoothing,
        warmup_epochs: a.warmup_epochs,
        decay: match a.schedule.as_str() {
            "cosine" => Decay::Cosine { min_lr: 0.0 },
            "step" => {
                let per_epoch = train_ds
                    .len()
                    .div_ceil(a.batch_size)
                    .div_ceil(a.accum_steps)
                    .max(1);
                Decay::Step {
                    every: (a.step_epochs * per_epoch) as u64,
                    gamma: 0.1,
                }
            }
            s => bail!("unknown schedule {s:?} (step, cosine)"),
        },
        backbone_lr_mult: a.backbone_lr_mult,
        freeze_backbone: a.freeze_backbone,
        seed: a.seed,
        max_batches_per_epoch: a.max_batches_per_epoch,
        stop_after_epoch: None,
        eval_every: a.eval_every,
    };
    let info = if a.smoke {
        // Generated pictures stored under the mirror's name: not Stanford Cars.
        DatasetInfo::local("generated smoke-test shapes")
    } else {
        a.data.info()?
    };
    eprintln!("train-cars settings:");
    eprintln!(
        "  data     {} ({}): {} train / {} test images, {} classes",
        info.name,
        match &a.data.data_dir {
            Some(d) => d.display().to_string(),
            None => format!("{}@{}", a.data.dataset_repo, a.data.dataset_revision),
        },
        train_ds.len(),
        test_ds.len(),
        train_ds.num_classes()
    );
    eprintln!("  weights  {base} ({arch}), preprocessing {pre:?}");
    eprintln!("  device   {}, output {}", a.device, a.out.display());
    eprintln!("  recipe   {}", serde_json::to_string(&cfg)?);
    let (varmap, model) = hub::pretrained(arch, train_ds.num_classes(), &weights, &dev)?;
    train::reinit_head(&varmap, a.seed)?;
    let lcfg = LoaderConfig {
        batch_size: a.batch_size,
        shuffle: true,
        drop_last: false,
        seed: a.seed,
        prefetch: 3,
    };
    let train_loader = Loader::new(
        train_ds.clone(),
        Transform {
            pre: pre.clone(),
            train: true,
        },
        lcfg.clone(),
    )?;
    let test_loader = Loader::new(
        test_ds,
        Transform {
            pre: pre.clone(),
            train: false,
        },
        LoaderConfig {
            shuffle: false,
            ..lcfg
        },
    )?;
    let summary = train::fit(
        &model,
        &varmap,
        &train_loader,
        &test_loader,
        &cfg,
        &dev,
        &a.out,
        a.resume,
    )?;
    let mcfg = ModelConfig::new(arch, &train_ds.class_names, &pre);
    let prov = Provenance {
        base_model: base,
        base_model_hub_id: a.weights_file.is_none().then(|| a.weights_repo.clone()),
        dataset: info,
    };
    let mut args = serde_json::to_value(&cfg)?;
    args["arch"] = serde_json::json!(arch.name());
    args["image_size"] = serde_json::json!(pre.size);
    args["smoke"] = serde_json::json!(a.smoke);
    candle_finetune::card::write_model_folder(&a.out, &mcfg, &prov, &args, &summary)?;
    eprintln!(
        "best epoch {}: test top-1 {:.2}%, top-5 {:.2}%, ECE {:.2}%; model folder {}",
        summary.best_epoch,
        100.0 * summary.best.top1,
        100.0 * summary.best.top5,
        100.0 * summary.best.ece,
        a.out.display()
    );
    Ok(())
}

/// A model folder, or a Hub repo holding one (`OWNER/NAME`).
/// A model folder or a Hub repo `OWNER/NAME`, through `hub::from_pretrained`.
fn load_model(
    spec: &str,
    revision: &str,
    dev: &Device,
) -> Result<(candle_resnet::resnet::ResNet, ModelConfig)> {
    let p = hub::from_pretrained(&HubOptions::from_env(), spec, Some(revision), dev)?;
    Ok((p.model, p.config))
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
    /// cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Where to write eval.json (default: print only).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn eval_cars(a: EvalArgs) -> Result<()> {
    let dev = device(&a.device)?;
    let (model, cfg) = load_model(&a.model, &a.revision, &dev)?;
    let test = Arc::new(
        a.data
            .load(&HubOptions::from_env(), Split::Test)?
            .remap_to(&cfg.class_names())?,
    );
    let loader = Loader::new(
        test,
        Transform {
            pre: cfg.preprocess(),
            train: false,
        },
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
    let (model, cfg) = load_model(&a.model, &a.revision, &Device::Cpu)?;
    let t = Transform {
        pre: cfg.preprocess(),
        train: false,
    };
    let names = cfg.class_names();
    let s = cfg.image_size as usize;
    for path in &a.images {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let img = candle_finetune::data::decode_rgb(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut buf = vec![0f32; 3 * s * s];
        t.apply(&img, 0, 0, 0, &mut buf)
            .map_err(anyhow::Error::msg)?;
        let x = Tensor::from_vec(buf, (1, 3, s, s), &Device::Cpu)?;
        let logits = model.forward_t(&x, false)?.squeeze(0)?.to_vec1::<f32>()?;
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|v| (v - m).exp()).sum();
        let p: Vec<f32> = logits.iter().map(|v| (v - m).exp() / z).collect();
        let mut idx: Vec<usize> = (0..p.len()).collect();
        idx.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
        println!("{}:", path.display());
        for &i in idx.iter().take(5) {
            println!("  {:6.2}%  {}", 100.0 * p[i], names[i]);
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
}

/// Uploads the model folder to the Hub in one commit; the token comes from HF_TOKEN,
/// HF_TOKEN_PATH or `huggingface-cli login`, and is never printed.
pub fn publish_cars(a: PublishArgs) -> Result<()> {
    let opts = candle_finetune::publish::PublishOptions {
        repo: a.repo.clone(),
        private: a.private,
        revision: a.revision.clone(),
        message: a.message.clone(),
    };
    eprintln!("publishing {} to {} ...", a.dir.display(), a.repo);
    let p = candle_finetune::publish::publish_folder(&HubOptions::from_env(), &a.dir, &opts)?;
    eprintln!("{} files: {}", p.files.len(), p.files.join(", "));
    println!("{}", p.commit_url.unwrap_or(p.repo_url));
    eprintln!(
        "load it back: candle_finetune::hub::from_pretrained(&opts, \"{}\", None, &device) or \
         cargo xtask predict --model {} IMAGE",
        a.repo, a.repo
    );
    Ok(())
}
