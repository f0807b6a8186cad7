//! The fine-tuning recipe as one value, [`FineTune`]: where the data and the weights come from,
//! the hyper-parameters ([`TrainConfig`]), how the validation split is made, the device and the
//! output folder. [`FineTune::run`] does everything `cargo xtask train` does (open the data,
//! fine-tune, choose the epoch on validation, evaluate it once on test, write the Hub-ready model
//! folder); [`cars`] is the Stanford Cars preset behind `cargo xtask train-cars`. Command lines,
//! `--smoke` runs and the tests all go through it.

pub mod cars;

use crate::card::{write_model_folder, Outcome, Provenance};
use crate::config::ModelConfig;
use crate::data::features::ColumnChoice;
use crate::data::{
    holdout, DataSource, Dataset, DatasetInfo, Loader, LoaderConfig, Preprocess,
    PreprocessOverrides, Transform,
};
use crate::eval::EvalResult;
use crate::hub::HubOptions;
use crate::pretrained::WeightsSource;
use crate::train::{
    self, Checkpoint, FitSummary, Notice, Observer, RunPaths, Settings, TrainConfig,
};
use candle_core::{bail, Device, Result};
use candle_resnet::resnet::Arch;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The share of the training images held out for validation when the data has no validation
/// split.
pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.1;

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
        self.device_at(0)
    }

    /// [`DeviceKind::device`] numbered `ordinal` among the machine's GPUs (the CPU is one).
    ///
    /// ```
    /// assert!(candle_finetune::recipe::DeviceKind::Cpu.device_at(3).unwrap().is_cpu());
    /// ```
    pub fn device_at(self, ordinal: usize) -> Result<Device> {
        let with = |feature: &'static str| {
            move |e: candle_core::Error| {
                // Past the first GPU, the likely cause is more ranks than GPUs on a machine.
                let per_rank = if ordinal > 0 {
                    "; one GPU per rank on a machine"
                } else {
                    ""
                };
                candle_core::Error::Msg(format!(
                    "no {feature} device {ordinal} ({e}){per_rank}; build with --features {feature}"
                ))
            }
        };
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => Device::new_cuda(ordinal).map_err(with("cuda")),
            DeviceKind::Metal => Device::new_metal(ordinal).map_err(with("metal")),
        }
    }
}

/// Everything a fine-tuning run needs. [`Default`] is the Stanford Cars job of [`cars`]:
/// ImageNet ResNet-18 from `timm/resnet18.tv_in1k`, Stanford Cars from the Hub, the
/// [`TrainConfig`] defaults (the torchvision anchor recipe with label smoothing 0.1), 10 % of
/// train held out for validation, on the CPU, into `out/resnet18-stanford-cars`.
///
/// ```no_run
/// use candle_finetune::{data::DataSource, recipe::FineTune, train::TrainConfig};
/// let run = FineTune {
///     data: DataSource::Hub { repo: "me/flowers".into(), revision: "main".into(), config: None },
///     out: "out/flowers".into(),
///     train: TrainConfig { epochs: 30, ..Default::default() },
///     ..Default::default()
/// };
/// let report = run.run().unwrap();
/// if let Some(t) = &report.test { println!("test top-1 {:.2}%", 100.0 * t.top1) }
/// ```
#[derive(Debug, Clone)]
pub struct FineTune {
    /// How to reach the Hub (and its cache).
    pub hub: HubOptions,
    /// The images.
    pub data: DataSource,
    /// Image / class columns and class names, when the data's own declarations do not do.
    pub columns: ColumnChoice,
    /// Share of the training images held out for validation when the data has no validation
    /// split (stratified by class, seeded by [`TrainConfig::seed`]); 0: train on all of train
    /// and keep the last epoch. Must lie in [0, 1).
    pub validation_fraction: f64,
    /// Bound in bytes of the cache of parquet images read as training needs them (see
    /// [`crate::data::stream`]); resident memory does not grow with the dataset past it.
    pub parquet_cache_bytes: usize,
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
    /// Input side (default: the weights' config, else 224).
    pub image_size: Option<u32>,
    /// Replacements for the base model's preprocessing (crop fraction, filter, mean, std); the
    /// rest comes from its `config.json` (`pretrained_cfg`).
    pub preprocess: PreprocessOverrides,
    /// The hyper-parameters.
    pub train: TrainConfig,
    /// Device.
    pub device: DeviceKind,
    /// Output folder (the Hub-ready model folder).
    pub out: PathBuf,
    /// Continue from `out/checkpoint-last.safetensors`.
    pub resume: bool,
    /// Marks the card as a smoke run (set by [`FineTune::smoke`]).
    pub smoke: bool,
    /// Set to ask the run to stop (e.g. from a SIGTERM handler): it writes a recovery
    /// checkpoint at the next optimizer step and returns ([`FitSummary::interrupted`]);
    /// `resume` continues it.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The data-parallel world this process is a rank of (`None`: one process). Every rank
    /// runs the recipe with the same settings; rank 0 prints, evaluates test and writes the
    /// folder, the others train and return after the fit.
    pub world: Option<World>,
    /// The command that reproduces the run, for the card (`cargo xtask train-cars` for the
    /// preset, `cargo xtask train` otherwise).
    pub command: String,
}

/// A shared handle on a data-parallel world ([`candle_ddp::Collective`]).
#[derive(Clone)]
pub struct World(pub Arc<dyn candle_ddp::Collective>);

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.world_size())
    }
}

impl Default for FineTune {
    fn default() -> Self {
        cars::stanford_cars()
    }
}

/// What [`FineTune::run`] returns.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The training summary (losses, history, the chosen epoch and its validation figures).
    pub fit: FitSummary,
    /// The chosen model on the test split, evaluated once (`None`: the data has no test split).
    pub test: Option<EvalResult>,
    /// The model folder's config.
    pub config: ModelConfig,
    /// The folder written.
    pub out: PathBuf,
}

impl RunReport {
    /// The figures a run reports: test when the data has a test split, else validation.
    pub fn reported(&self) -> Option<&EvalResult> {
        self.test.as_ref().or(self.fit.best.as_ref())
    }
}

/// A smoke run's temporary Hub cache; keep it alive while the run reads from it.
pub struct SmokeCache {
    dir: tempfile::TempDir,
    /// Generated training and test images.
    pub train_images: usize,
    pub test_images: usize,
}

impl SmokeCache {
    /// The cache root.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The training and validation images of a run, and where the validation images came from.
#[derive(Debug, Clone)]
pub struct TrainValidation {
    /// Images trained on.
    pub train: Dataset,
    /// Images that choose the epoch (`None`: keep the last epoch).
    pub validation: Option<Dataset>,
    /// For the card and `eval.json`: "the dataset's validation split", "10% of train held
    /// out ...", or "none".
    pub source: String,
}

/// Splits off the validation images: the data's own validation split when it has one, else
/// `fraction` of `train` held out by [`holdout::stratified`] with `seed`.
///
/// ```
/// use candle_finetune::data::{Dataset, ImageData, Sample};
/// let samples = (0..20).map(|i| Sample { image: ImageData::Encoded(vec![].into()), label: i % 2 }).collect();
/// let train = Dataset { samples, class_names: vec!["a".into(), "b".into()] };
/// let tv = candle_finetune::recipe::train_validation(train, None, 0.1, 0).unwrap();
/// assert_eq!((tv.train.len(), tv.validation.unwrap().len()), (18, 2));
/// ```
pub fn train_validation(
    train: Dataset,
    validation: Option<Dataset>,
    fraction: f64,
    seed: u64,
) -> Result<TrainValidation> {
    if !(0.0..1.0).contains(&fraction) {
        bail!("validation fraction {fraction} is outside [0, 1)");
    }
    if let Some(v) = validation {
        if v.is_empty() {
            bail!("the data's validation split has no images");
        }
        let source = format!("the dataset's validation split ({} images)", v.len());
        return Ok(TrainValidation {
            train,
            validation: Some(v),
            source,
        });
    }
    if fraction == 0.0 {
        return Ok(TrainValidation {
            train,
            validation: None,
            source: "none (validation fraction 0: the last epoch is kept)".into(),
        });
    }
    let (t, v) = holdout::stratified(&train, fraction, seed)?;
    if v.is_empty() {
        bail!(
            "holding out {fraction} of {} training images leaves no validation image; raise \
             `validation_fraction` or set it to 0 to keep the last epoch",
            train.len()
        );
    }
    let source = format!(
        "{} % of the training images held out (stratified by class, seed {seed}; {} images)",
        100.0 * fraction,
        v.len()
    );
    Ok(TrainValidation {
        train: t,
        validation: Some(v),
        source,
    })
}

impl FineTune {
    /// Turns this run into the offline smoke run: a generated dataset (96 train / 36 test JPEGs,
    /// six classes) and random weights written into a temporary Hub cache under the real names,
    /// read back offline; 2 epochs at 64 px (or `image_size`), batch <= 16, cosine, lr 0.01;
    /// output `out/smoke` unless an output folder was set.
    pub fn smoke(mut self) -> Result<(Self, SmokeCache)> {
        let dir = tempfile::tempdir()?;
        let size = self.image_size.unwrap_or(64);
        let (train_images, test_images) = crate::smoke::seed_dataset(dir.path(), 16, 6)?;
        crate::smoke::seed_weights(dir.path(), size)?;
        self.hub = HubOptions {
            cache_dir: Some(dir.path().to_path_buf()),
            offline: true,
            ..Default::default()
        };
        self.data = DataSource::default();
        self.weights = WeightsSource::default();
        // Generated pictures stored under the mirror's name: not Stanford Cars.
        self.dataset_info = Some(DatasetInfo::local("generated smoke-test shapes"));
        self.train.epochs = 2;
        self.train.batch_size = self.train.batch_size.min(16);
        self.train.lr = 0.01;
        self.train.schedule = train::ScheduleKind::Cosine;
        self.image_size = Some(size);
        if self.out == cars::stanford_cars().out {
            self.out = "out/smoke".into();
        }
        self.smoke = true;
        Ok((
            self,
            SmokeCache {
                dir,
                train_images,
                test_images,
            },
        ))
    }

    /// The card's description of the data (`card` and `commit`: what opening the data found).
    pub fn dataset_info(
        &self,
        card: Option<&serde_json::Value>,
        commit: Option<&str>,
    ) -> Result<DatasetInfo> {
        if let Some(i) = &self.dataset_info {
            return Ok(i.clone());
        }
        Ok(self.data.info(card, commit)?.with_overrides(
            self.dataset_name.as_deref(),
            self.dataset_license.as_deref(),
        ))
    }

    /// The weights file, its preprocessing and the card's name for it (never a local path).
    fn resolve_weights(
        &self,
        observer: &mut dyn Observer,
    ) -> Result<(PathBuf, Preprocess, String, Option<String>)> {
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
                        observer.notice(&Notice::NoBaseConfig {
                            repo: repo.clone(),
                            reason: e.to_string(),
                        });
                        Preprocess::default()
                    }
                };
                Ok((w, pre, format!("{repo}@{revision}"), Some(repo.clone())))
            }
        }
    }

    /// The device this process trains on: its world's when the world is bound to one (an NCCL
    /// rank's GPU), else [`FineTune::device`], the GPU numbered by the rank's local rank when
    /// several ranks share a machine.
    fn run_device(&self) -> Result<Device> {
        let Some(world) = &self.world else {
            return self.device.device();
        };
        if let Some(d) = world.0.device() {
            let kind = match d {
                Device::Cpu => DeviceKind::Cpu,
                Device::Cuda(_) => DeviceKind::Cuda,
                Device::Metal(_) => DeviceKind::Metal,
            };
            if kind != self.device {
                bail!(
                    "recipe: the data-parallel world runs on {kind:?} but the run asks for \
                     {:?}; use the world's device",
                    self.device
                );
            }
            return Ok(d);
        }
        self.device.device_at(world.0.local_rank())
    }

    /// Runs the recipe: opens the data and the weights, fine-tunes with [`train::fit`] choosing
    /// the epoch on validation, evaluates that model once on the test split, and writes the
    /// model folder (`model.safetensors`, `config.json`, `README.md`, `eval.json`,
    /// `metrics.jsonl`, plots, `training_args.json`, checkpoints) into [`FineTune::out`].
    /// Prints nothing: [`FineTune::run_with`] reports the progress to an observer.
    pub fn run(&self) -> Result<RunReport> {
        self.run_with(&mut train::Silent)
    }

    /// [`FineTune::run`] reporting to `observer`: the settings, notices, and the training's
    /// epochs, batches, steps and checkpoints (see [`Observer`]); the result is the report
    /// returned. A [`FineTune::stop`] request ends the run as a `Break` from the observer does.
    pub fn run_with(&self, observer: &mut dyn Observer) -> Result<RunReport> {
        self.train.validate()?;
        let dev = self.run_device()?;
        let (weights, pre, base, base_hub) = self.resolve_weights(observer)?;
        let overrides = PreprocessOverrides {
            size: self.image_size.or(self.preprocess.size),
            ..self.preprocess.clone()
        };
        let pre = pre
            .with_overrides(&overrides)
            .map_err(candle_core::Error::Msg)?;
        let data = self
            .data
            .open_with_cache(&self.hub, &self.columns, self.parquet_cache_bytes)?;
        let test_ds = data.test.clone().map(Arc::new);
        let info = self.dataset_info(data.card.as_ref(), data.commit.as_deref())?;
        let tv = train_validation(
            data.train.clone(),
            data.validation.clone(),
            self.validation_fraction,
            self.train.seed,
        )?;
        let train_ds = Arc::new(tv.train);
        let val_ds = tv.validation.map(Arc::new);
        let cfg = &self.train;
        let (rank, ranks) = self
            .world
            .as_ref()
            .map_or((0, 1), |w| (w.0.rank(), w.0.world_size()));
        if rank == 0 {
            observer.settings(&Settings {
                data: info.name.clone(),
                origin: data.origin.clone(),
                train_images: train_ds.len(),
                validation_images: val_ds.as_ref().map_or(0, |v| v.len()),
                test_images: test_ds.as_ref().map_or(0, |t| t.len()),
                classes: train_ds.num_classes(),
                columns: data
                    .columns
                    .as_ref()
                    .map(|c| (c.image.clone(), c.label.clone())),
                validation: tv.source.to_string(),
                weights: base.clone(),
                arch: self.arch.name().to_string(),
                preprocessing: format!("{pre:?}"),
                device: format!("{:?}", self.device),
                out: self.out.clone(),
                recipe: serde_json::to_string(cfg).map_err(candle_core::Error::wrap)?,
                ranks,
            });
            for text in &data.notes {
                observer.notice(&Notice::Data { text: text.clone() });
            }
            if test_ds.is_none() {
                observer.notice(&Notice::NoTestSplit);
            }
        }
        let (varmap, model) =
            crate::pretrained::pretrained(self.arch, train_ds.num_classes(), &weights, &dev)?;
        let sync_bn = match &self.world {
            Some(w) if cfg.sync_bn && ranks > 1 => Some(w.0.clone()),
            _ => None,
        };
        let model = model
            .with_drop_path(cfg.drop_path)?
            .with_sync_batch_norm(sync_bn.clone())
            .with_conv_backend(cfg.amp.conv_backend(&dev));
        train::reinit_head(&varmap, cfg.seed)?;
        let lcfg = LoaderConfig {
            batch_size: cfg.batch_size,
            shuffle: true,
            drop_last: false,
            seed: cfg.seed,
            prefetch: 3,
            mixup: cfg.mixup(train_ds.num_classes()),
            erasing: cfg.erasing(),
            ..Default::default()
        };
        let eval_loader = |ds: Arc<Dataset>| {
            Loader::new(
                ds,
                Transform::for_eval(pre.clone()),
                LoaderConfig {
                    shuffle: false,
                    mixup: None,
                    erasing: None,
                    ..lcfg.clone()
                },
            )
        };
        // Validation by shards across data-parallel ranks (metrics reduced exactly).
        let sharded_eval_loader = |ds: Arc<Dataset>| {
            Loader::new(
                ds,
                Transform::for_eval(pre.clone()),
                LoaderConfig {
                    shuffle: false,
                    mixup: None,
                    erasing: None,
                    shard: crate::data::Shard { rank, world: ranks },
                    ..lcfg.clone()
                },
            )
        };
        let train_loader = Loader::new(
            train_ds.clone(),
            Transform::for_training(pre.clone()).with_augment(cfg.augment()?),
            LoaderConfig {
                shard: crate::data::Shard { rank, world: ranks },
                // Synchronised batch norm: equal shares on every rank, every step.
                drop_last: sync_bn.is_some(),
                ..lcfg.clone()
            },
        )?;
        let val_loader = val_ds.map(sharded_eval_loader).transpose()?;
        let stop = self.stop.clone();
        let single: Arc<dyn candle_ddp::Collective> = Arc::new(candle_ddp::Single);
        let world = self.world.as_ref().map_or(&single, |w| &w.0);
        let fit = train::fit_distributed(
            &model,
            &varmap,
            &train_loader,
            val_loader.as_ref(),
            cfg,
            &dev,
            &self.out,
            self.resume,
            world.as_ref(),
            &mut StopOn {
                stop: stop.as_deref(),
                inner: observer,
            },
        )?;
        let config = ModelConfig::new(self.arch, &train_ds.class_names, &pre)
            .with_license(info.license.clone());
        if rank != 0 {
            // Rank 0 evaluates test and writes the folder.
            return Ok(RunReport {
                fit,
                test: None,
                config,
                out: self.out.clone(),
            });
        }
        if fit.interrupted {
            // The caller says how to continue (`RunReport::fit.interrupted`; the state is in
            // `RunPaths::last`): `resume` set on the same folder.
            return Ok(RunReport {
                fit,
                test: None,
                config,
                out: self.out.clone(),
            });
        }
        if fit.best_epoch == 0 {
            bail!("train: no epoch completed");
        }
        let finished = fit.history.len() >= cfg.epochs;
        // The kept model, evaluated once on the test split.
        let paths = RunPaths {
            dir: self.out.clone(),
        };
        Checkpoint::load(&paths.best())?.restore_chosen(&varmap)?;
        let test = match (&test_ds, finished) {
            (Some(t), true) => {
                let (r, skipped) = train::evaluate(&model, &eval_loader(t.clone())?, &dev)?;
                if skipped > 0 {
                    observer.notice(&Notice::SkippedTest { images: skipped });
                }
                Some(r)
            }
            _ => None,
        };
        let outcome = Outcome {
            test: test.clone(),
            validation: fit.best.clone(),
            epoch: fit.best_epoch,
            selected_on: fit.selected_on,
            validation_source: tv.source.clone(),
        };
        if finished {
            outcome.write_eval_json(&paths.eval())?;
        }
        let prov = Provenance {
            base_model: base,
            base_model_hub_id: base_hub,
            dataset: info,
        };
        let mut args = serde_json::to_value(cfg).map_err(candle_core::Error::wrap)?;
        args["arch"] = serde_json::json!(self.arch.name());
        args["image_size"] = serde_json::json!(pre.size);
        // The preprocessing trained and evaluated with (the base model's, then the flags').
        args["preprocess"] = serde_json::json!(pre);
        // Never a local path: this goes to the Hub.
        args["data"] = serde_json::json!(match &self.data {
            DataSource::Dir(_) => format!("local data ({})", prov.dataset.name),
            DataSource::Hub { .. } => data.origin.clone(),
        });
        args["validation"] = serde_json::json!(tv.source);
        args["validation_fraction"] = serde_json::json!(self.validation_fraction);
        if let Some(c) = &data.columns {
            args["image_column"] = serde_json::json!(c.image);
            args["label_column"] = serde_json::json!(c.label);
        }
        args["command"] = serde_json::json!(self.command);
        args["smoke"] = serde_json::json!(self.smoke);
        write_model_folder(&self.out, &config, &prov, &args, &fit, &outcome)?;
        Ok(RunReport {
            fit,
            test,
            config,
            out: self.out.clone(),
        })
    }
}

/// The caller's observer, with [`FineTune::stop`] as a step observer: a set flag ends the run
/// after the step, as a `Break` from the caller's does.
struct StopOn<'a> {
    stop: Option<&'a std::sync::atomic::AtomicBool>,
    inner: &'a mut dyn Observer,
}

impl Observer for StopOn<'_> {
    fn settings(&mut self, s: &Settings) {
        self.inner.settings(s)
    }
    fn notice(&mut self, n: &Notice) {
        self.inner.notice(n)
    }
    fn epoch_start(&mut self, e: &train::EpochStart) {
        self.inner.epoch_start(e)
    }
    fn batch(&mut self, e: &train::BatchProgress) {
        self.inner.batch(e)
    }
    fn step(&mut self, e: &train::StepEvent) -> std::ops::ControlFlow<()> {
        let asked = self
            .stop
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        if asked {
            return std::ops::ControlFlow::Break(());
        }
        self.inner.step(e)
    }
    fn epoch_end(&mut self, e: &train::EpochEnd) {
        self.inner.epoch_end(e)
    }
    fn checkpoint(&mut self, e: &train::CheckpointEvent) {
        self.inner.checkpoint(e)
    }
}
