//! The train-cars recipe as one value: where the data and the weights come from, the
//! hyper-parameters, the device and the output folder. [`TrainCars::run`] does everything
//! `cargo xtask train-cars` does (load, fine-tune, evaluate, write the Hub-ready model folder);
//! the command line, its `--smoke` mode and the tests all go through it.

use crate::card::{write_model_folder, Provenance};
use crate::config::ModelConfig;
use crate::data::{
    Dataset, DatasetInfo, Loader, LoaderConfig, Preprocess, PreprocessOverrides, Split, Transform,
    DEFAULT_DATASET_REPO, DEFAULT_DATASET_REVISION,
};
use crate::hub::HubOptions;
use crate::pretrained::{WeightsSource, DEFAULT_FILE, DEFAULT_REPO, DEFAULT_REVISION};
use crate::train::{self, Decay, FitSummary, OptimizerKind, TrainConfig};
use candle_core::{bail, Device, Result};
use candle_resnet::resnet::Arch;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A Hub dataset repo with two parquet shards per split in the `datasets` layout
    /// (`data/{train,test}-0000{0,1}-of-00002.parquet`, as the Stanford Cars mirror).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
    },
    /// A local folder with `train-*.parquet` and `test-*.parquet` (directly or under `data/`),
    /// or with `train/` and `test/` image folders (one sub-folder per class).
    Dir(PathBuf),
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource::Hub {
            repo: DEFAULT_DATASET_REPO.into(),
            revision: DEFAULT_DATASET_REVISION.into(),
        }
    }
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

impl DataSource {
    /// Reads one split.
    ///
    /// ```
    /// use candle_finetune::{data::Split, hub::HubOptions, recipe::DataSource};
    /// let dir = tempfile::tempdir().unwrap();
    /// let e = DataSource::Dir(dir.path().into()).load(&HubOptions::default(), Split::Test).unwrap_err();
    /// assert!(e.to_string().contains("no test-*.parquet files and no test/ image folder"));
    /// ```
    pub fn load(&self, opts: &HubOptions, split: Split) -> Result<Dataset> {
        match self {
            DataSource::Dir(dir) => {
                let shards = list_parquet(dir, split.name());
                if !shards.is_empty() {
                    Dataset::from_parquet(&shards)
                } else if dir.join(split.name()).is_dir() {
                    Dataset::from_image_folder(&dir.join(split.name()))
                } else {
                    bail!(
                        "{}: no {}-*.parquet files and no {}/ image folder",
                        dir.display(),
                        split.name(),
                        split.name()
                    )
                }
            }
            DataSource::Hub { repo, revision } => {
                Dataset::from_hub(opts, repo, revision, &split.stanford_cars_shards())
            }
        }
    }

    /// What the model card says about this data, before flags override it.
    pub fn info(&self) -> Result<DatasetInfo> {
        Ok(match self {
            DataSource::Dir(d) => DatasetInfo::from_dir(d)?,
            DataSource::Hub { repo, revision } if repo == DEFAULT_DATASET_REPO => DatasetInfo {
                revision: Some(revision.clone()),
                ..DatasetInfo::stanford_cars()
            },
            DataSource::Hub { repo, revision } => DatasetInfo::hub(repo, revision),
        })
    }

    /// `owner/name@revision` or the folder, for logs (not for the card).
    pub fn describe(&self) -> String {
        match self {
            DataSource::Dir(d) => d.display().to_string(),
            DataSource::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }
}

/// The learning-rate decay after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ScheduleKind {
    /// Divide by 10 every [`TrainCars::step_epochs`] epochs (the torchvision anchor recipe).
    #[default]
    Step,
    /// Cosine to 0 over the run.
    Cosine,
}

/// Where the model trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DeviceKind {
    /// The CPU (fused CPU kernels).
    #[default]
    Cpu,
    /// The first CUDA GPU (build with the `cuda` feature).
    Cuda,
    /// The first Metal GPU (build with the `metal` feature).
    Metal,
}

impl DeviceKind {
    /// The candle device, or an error saying which feature to build with.
    ///
    /// ```
    /// assert!(candle_finetune::recipe::DeviceKind::Cpu.device().unwrap().is_cpu());
    /// ```
    pub fn device(self) -> Result<Device> {
        let with = |feature: &'static str| {
            move |e: candle_core::Error| {
                candle_core::Error::Msg(format!(
                    "no {feature} device ({e}); build with --features {feature}"
                ))
            }
        };
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => Device::new_cuda(0).map_err(with("cuda")),
            DeviceKind::Metal => Device::new_metal(0).map_err(with("metal")),
        }
    }
}

/// Everything a train-cars run needs. [`Default`] is the real job: ImageNet ResNet-18 from
/// `timm/resnet18.tv_in1k`, Stanford Cars from the Hub, the torchvision anchor recipe (SGD 0.1,
/// momentum 0.9, wd 1e-4, batch 128, 90 epochs, /10 every 30) with label smoothing 0.1, on the
/// CPU, into `out/resnet18-stanford-cars`.
///
/// ```no_run
/// use candle_finetune::recipe::TrainCars;
/// let report = TrainCars { epochs: 30, ..Default::default() }.run().unwrap();
/// println!("test top-1 {:.2}%", 100.0 * report.fit.best.top1);
/// ```
#[derive(Debug, Clone)]
pub struct TrainCars {
    /// How to reach the Hub (and its cache).
    pub hub: HubOptions,
    /// The images.
    pub data: DataSource,
    /// Name of the dataset for the card (overrides [`DataSource::info`]).
    pub dataset_name: Option<String>,
    /// Licence of the dataset for the card (overrides [`DataSource::info`]).
    pub dataset_license: Option<String>,
    /// A complete description of the data for the card (overrides everything else).
    pub dataset_info: Option<DatasetInfo>,
    /// The initial weights (`Hub` also reads the repo's timm `config.json` for preprocessing).
    pub weights: WeightsSource,
    /// The architecture (must match the weights).
    pub arch: Arch,
    /// Epochs.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Batches per optimizer step.
    pub accum_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay (not on batch norms and biases).
    pub weight_decay: f64,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f64,
    /// Decay after the warmup.
    pub schedule: ScheduleKind,
    /// Epochs between divisions of the step schedule.
    pub step_epochs: usize,
    /// Linear warmup epochs.
    pub warmup_epochs: f64,
    /// Learning-rate multiplier of the backbone.
    pub backbone_lr_mult: f64,
    /// Train only the new head.
    pub freeze_backbone: bool,
    /// Input side (default: the weights' config, else 224).
    pub image_size: Option<u32>,
    /// Replacements for the base model's preprocessing (crop fraction, filter, mean, std); the
    /// rest comes from its `config.json` (`pretrained_cfg`).
    pub preprocess: PreprocessOverrides,
    /// Seed of the data order, augmentations and head.
    pub seed: u64,
    /// Device.
    pub device: DeviceKind,
    /// Output folder (the Hub-ready model folder).
    pub out: PathBuf,
    /// Continue from `out/checkpoint-last.safetensors`.
    pub resume: bool,
    /// Stop every epoch after this many batches.
    pub max_batches_per_epoch: Option<usize>,
    /// Evaluate every N epochs (and after the last).
    pub eval_every: usize,
    /// Marks the card as a smoke run (set by [`TrainCars::smoke`]).
    pub smoke: bool,
}

impl Default for TrainCars {
    fn default() -> Self {
        Self {
            hub: HubOptions::from_env(),
            data: DataSource::default(),
            dataset_name: None,
            dataset_license: None,
            dataset_info: None,
            weights: WeightsSource::Hub {
                repo: DEFAULT_REPO.into(),
                revision: DEFAULT_REVISION.into(),
                file: DEFAULT_FILE.into(),
            },
            arch: Arch::ResNet18,
            epochs: 90,
            batch_size: 128,
            accum_steps: 1,
            lr: 0.1,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            label_smoothing: 0.1,
            schedule: ScheduleKind::Step,
            step_epochs: 30,
            warmup_epochs: 0.0,
            backbone_lr_mult: 1.0,
            freeze_backbone: false,
            image_size: None,
            preprocess: PreprocessOverrides::default(),
            seed: 0,
            device: DeviceKind::Cpu,
            out: PathBuf::from("out/resnet18-stanford-cars"),
            resume: false,
            max_batches_per_epoch: None,
            eval_every: 1,
            smoke: false,
        }
    }
}

/// What [`TrainCars::run`] returns.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The training summary (losses, history, best evaluation).
    pub fit: FitSummary,
    /// The model folder's config.
    pub config: ModelConfig,
    /// The folder written.
    pub out: PathBuf,
}

/// A smoke run's temporary Hub cache; keep it alive while the run reads from it.
pub struct SmokeCache {
    dir: tempfile::TempDir,
}

impl SmokeCache {
    /// The cache root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl TrainCars {
    /// Turns this run into the offline smoke run: a generated dataset (96 train / 36 test JPEGs,
    /// six classes) and random weights written into a temporary Hub cache under the real names,
    /// read back offline; 2 epochs at 64 px (or `image_size`), batch <= 16, cosine, lr 0.01;
    /// output `out/smoke` unless an output folder was set.
    pub fn smoke(mut self) -> Result<(Self, SmokeCache)> {
        let dir = tempfile::tempdir()?;
        let size = self.image_size.unwrap_or(64);
        let (ntrain, ntest) = crate::smoke::seed_dataset(dir.path(), 16, 6)?;
        crate::smoke::seed_weights(dir.path(), size)?;
        eprintln!(
            "smoke: {ntrain} train / {ntest} test generated images and random weights in the Hub cache {}",
            dir.path().display()
        );
        self.hub = HubOptions {
            cache_dir: Some(dir.path().to_path_buf()),
            offline: true,
            ..Default::default()
        };
        self.data = DataSource::default();
        self.weights = WeightsSource::default();
        // Generated pictures stored under the mirror's name: not Stanford Cars.
        self.dataset_info = Some(DatasetInfo::local("generated smoke-test shapes"));
        self.epochs = 2;
        self.batch_size = self.batch_size.min(16);
        self.lr = 0.01;
        self.schedule = ScheduleKind::Cosine;
        self.image_size = Some(size);
        if self.out == TrainCars::default().out {
            self.out = "out/smoke".into();
        }
        self.smoke = true;
        Ok((self, SmokeCache { dir }))
    }

    /// The card's description of the data.
    pub fn dataset_info(&self) -> Result<DatasetInfo> {
        if let Some(i) = &self.dataset_info {
            return Ok(i.clone());
        }
        Ok(self.data.info()?.with_overrides(
            self.dataset_name.as_deref(),
            self.dataset_license.as_deref(),
        ))
    }

    /// The training configuration for a training set of `train_len` images.
    pub fn train_config(&self, train_len: usize) -> TrainConfig {
        let per_epoch = train_len
            .div_ceil(self.batch_size.max(1))
            .min(self.max_batches_per_epoch.unwrap_or(usize::MAX))
            .div_ceil(self.accum_steps.max(1))
            .max(1);
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            accum_steps: self.accum_steps,
            lr: self.lr,
            optimizer: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            decoupled_wd: false,
            label_smoothing: self.label_smoothing,
            warmup_epochs: self.warmup_epochs,
            decay: match self.schedule {
                ScheduleKind::Cosine => Decay::Cosine { min_lr: 0.0 },
                ScheduleKind::Step => Decay::Step {
                    every: (self.step_epochs * per_epoch) as u64,
                    gamma: 0.1,
                },
            },
            backbone_lr_mult: self.backbone_lr_mult,
            freeze_backbone: self.freeze_backbone,
            seed: self.seed,
            max_batches_per_epoch: self.max_batches_per_epoch,
            stop_after_epoch: None,
            eval_every: self.eval_every,
        }
    }

    /// The weights file, its preprocessing and the card's name for it (never a local path).
    fn resolve_weights(&self) -> Result<(PathBuf, Preprocess, String, Option<String>)> {
        match &self.weights {
            WeightsSource::File(f) => Ok((
                self.hub.resolve(&self.weights)?,
                // timm's config.json beside the weights, as in a Hub snapshot; else ImageNet's.
                match f
                    .parent()
                    .map(|d| d.join("config.json"))
                    .filter(|c| c.is_file())
                {
                    Some(c) => Preprocess::from_timm_config(&std::fs::read_to_string(&c)?)
                        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", c.display())))?,
                    None => Preprocess::default(),
                },
                format!(
                    "local file {}",
                    f.file_name().unwrap_or_default().to_string_lossy()
                ),
                None,
            )),
            WeightsSource::Hub { repo, revision, .. } => {
                let w = self.hub.resolve(&self.weights)?;
                let pre = match self.hub.model_file(repo, revision, "config.json") {
                    Ok(c) => Preprocess::from_timm_config(&std::fs::read_to_string(c)?)
                        .map_err(candle_core::Error::Msg)?,
                    Err(e) => {
                        eprintln!("note: no config.json in {repo} ({e}); using ImageNet defaults");
                        Preprocess::default()
                    }
                };
                Ok((w, pre, format!("{repo}@{revision}"), Some(repo.clone())))
            }
        }
    }

    /// Runs the recipe: loads data and weights, fine-tunes with [`train::fit`], and writes the
    /// model folder (`model.safetensors`, `config.json`, `README.md`, `eval.json`,
    /// `metrics.jsonl`, plots, `training_args.json`, checkpoints) into [`TrainCars::out`].
    pub fn run(&self) -> Result<RunReport> {
        let dev = self.device.device()?;
        let (weights, pre, base, base_hub) = self.resolve_weights()?;
        let overrides = PreprocessOverrides {
            size: self.image_size.or(self.preprocess.size),
            ..self.preprocess.clone()
        };
        let pre = pre
            .with_overrides(&overrides)
            .map_err(candle_core::Error::Msg)?;
        let train_ds = Arc::new(self.data.load(&self.hub, Split::Train)?);
        let test_ds = Arc::new(self.data.load(&self.hub, Split::Test)?);
        if train_ds.class_names != test_ds.class_names {
            bail!("train and test splits have different class names");
        }
        let cfg = self.train_config(train_ds.len());
        let info = self.dataset_info()?;
        eprintln!("train-cars settings:");
        eprintln!(
            "  data     {} ({}): {} train / {} test images, {} classes",
            info.name,
            self.data.describe(),
            train_ds.len(),
            test_ds.len(),
            train_ds.num_classes()
        );
        eprintln!("  weights  {base} ({}), preprocessing {pre:?}", self.arch);
        eprintln!(
            "  device   {:?}, output {}",
            self.device,
            self.out.display()
        );
        eprintln!(
            "  recipe   {}",
            serde_json::to_string(&cfg).map_err(candle_core::Error::wrap)?
        );
        let (varmap, model) =
            crate::pretrained::pretrained(self.arch, train_ds.num_classes(), &weights, &dev)?;
        train::reinit_head(&varmap, self.seed)?;
        let lcfg = LoaderConfig {
            batch_size: self.batch_size,
            shuffle: true,
            drop_last: false,
            seed: self.seed,
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
        let fit = train::fit(
            &model,
            &varmap,
            &train_loader,
            &test_loader,
            &cfg,
            &dev,
            &self.out,
            self.resume,
        )?;
        let config = ModelConfig::new(self.arch, &train_ds.class_names, &pre)
            .with_license(info.license.clone());
        let prov = Provenance {
            base_model: base,
            base_model_hub_id: base_hub,
            dataset: info,
        };
        let mut args = serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?;
        args["arch"] = serde_json::json!(self.arch.name());
        args["image_size"] = serde_json::json!(pre.size);
        // The preprocessing trained and evaluated with (the base model's, then the flags').
        args["preprocess"] = serde_json::json!(pre);
        args["smoke"] = serde_json::json!(self.smoke);
        write_model_folder(&self.out, &config, &prov, &args, &fit)?;
        eprintln!(
            "best epoch {}: test top-1 {:.2}%, top-5 {:.2}%, ECE {:.2}%; model folder {}",
            fit.best_epoch,
            100.0 * fit.best.top1,
            100.0 * fit.best.top5,
            100.0 * fit.best.ece,
            self.out.display()
        );
        Ok(RunReport {
            fit,
            config,
            out: self.out.clone(),
        })
    }
}
