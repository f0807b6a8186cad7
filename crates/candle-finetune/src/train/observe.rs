//! What a run tells its caller while it runs: the [`Observer`] trait and its events.
//!
//! The library prints nothing and draws no progress bar: [`super::fit_with`] and
//! [`crate::recipe::FineTune::run_with`] hand every event to an observer, and the command line
//! (`cargo xtask train`) draws its bars and lines from them. Every method has a default that does
//! nothing, so an observer implements only what it shows; a closure over [`StepEvent`] is an
//! observer of steps (a time budget, a stop flag, memory sampling).
//!
//! ```
//! use candle_finetune::train::{EpochEnd, Observer, StepEvent};
//! use std::ops::ControlFlow;
//!
//! /// Stops after 100 steps and keeps the epochs' validation accuracy.
//! #[derive(Default)]
//! struct Log {
//!     top1: Vec<Option<f64>>,
//! }
//!
//! impl Observer for Log {
//!     fn step(&mut self, e: &StepEvent) -> ControlFlow<()> {
//!         if e.step >= 100 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
//!     }
//!     fn epoch_end(&mut self, e: &EpochEnd) {
//!         self.top1.push(e.metrics.val_top1);
//!     }
//! }
//! let mut log = Log::default();
//! let _: &mut dyn Observer = &mut log;
//! ```

use super::EpochMetrics;
use crate::data::EpochReport;
use std::ops::ControlFlow;
use std::path::Path;

/// Receives a run's events (see the module docs). In a data-parallel run the events of
/// [`Observer::settings`], [`Observer::epoch_end`] and [`Observer::checkpoint`] reach rank 0
/// only; the others reach every rank.
pub trait Observer {
    /// The run's settings, once, before training starts.
    fn settings(&mut self, _settings: &Settings) {}
    /// Something the caller may want to know that is not an error (see [`Notice`]).
    fn notice(&mut self, _notice: &Notice) {}
    /// An epoch starts (or continues, after a resume, from batch `first_batch`).
    fn epoch_start(&mut self, _e: &EpochStart) {}
    /// A batch was trained on (every micro-batch).
    fn batch(&mut self, _e: &BatchProgress) {}
    /// An optimizer step was taken. `ControlFlow::Break` ends the run after this step: a
    /// recovery checkpoint holds its state and [`super::FitSummary::interrupted`] is set.
    fn step(&mut self, _e: &StepEvent) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    /// An epoch ended (evaluated on validation when it was due).
    fn epoch_end(&mut self, _e: &EpochEnd) {}
    /// A checkpoint file was written.
    fn checkpoint(&mut self, _e: &CheckpointEvent) {}
}

/// A closure over step events is an observer of steps.
impl<F: FnMut(&StepEvent) -> ControlFlow<()>> Observer for F {
    fn step(&mut self, e: &StepEvent) -> ControlFlow<()> {
        self(e)
    }
}

/// The observer that ignores every event ([`super::fit`], [`crate::recipe::FineTune::run`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// What [`Observer::step`] sees after every optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    /// 1-based epoch.
    pub epoch: usize,
    /// Optimizer steps taken so far in the run (this one included).
    pub step: u64,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Loss of this step (mean over its micro-batches).
    pub loss: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// Seconds since this invocation started training.
    pub elapsed_s: f64,
}

/// [`Observer::epoch_start`].
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStart {
    /// 1-based epoch.
    pub epoch: usize,
    /// Epochs of the run.
    pub epochs: usize,
    /// Batches in this epoch.
    pub batches: usize,
    /// Batches already done (a resumed epoch), 0 otherwise.
    pub first_batch: usize,
}

/// [`Observer::batch`]: the epoch's progress after a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchProgress {
    /// 1-based epoch.
    pub epoch: usize,
    /// Batches done in this epoch.
    pub batch: usize,
    /// Batches in this epoch.
    pub batches: usize,
    /// Mean loss of the epoch's optimizer steps so far.
    pub mean_loss: f64,
    /// Current learning rate.
    pub lr: f64,
    /// Training images per second in this epoch.
    pub images_per_s: f64,
    /// Seconds left in the run at the rate of this invocation's steps (`None` before its first
    /// step).
    pub run_eta_s: Option<f64>,
}

/// [`Observer::epoch_end`].
#[derive(Debug, Clone)]
pub struct EpochEnd<'a> {
    /// The epoch's figures (also written to `metrics.jsonl`).
    pub metrics: &'a EpochMetrics,
    /// Epochs of the run.
    pub epochs: usize,
    /// Seconds left in the run, as in [`BatchProgress::run_eta_s`].
    pub run_eta_s: Option<f64>,
    /// The training loader's report of the epoch (images, decoding time, skipped files).
    pub train_data: &'a EpochReport,
}

/// Which checkpoint [`Observer::checkpoint`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Mid-epoch recovery state (`--checkpoint-every-*`, or a stop request).
    Recovery,
    /// The end of an epoch (`checkpoint-last.safetensors`).
    Epoch,
    /// The chosen epoch so far (`checkpoint-best.safetensors` and `model.safetensors`).
    Best,
}

/// [`Observer::checkpoint`].
#[derive(Debug, Clone)]
pub struct CheckpointEvent<'a> {
    /// What was saved.
    pub kind: CheckpointKind,
    /// The file written.
    pub path: &'a Path,
    /// Optimizer steps the state includes.
    pub step: u64,
}

/// The settings a recipe run starts with ([`Observer::settings`]), for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The dataset's name and where it was read from (repository and revision, or folder).
    pub data: String,
    /// Where the data came from.
    pub origin: String,
    /// Images in the training, validation and test splits.
    pub train_images: usize,
    pub validation_images: usize,
    pub test_images: usize,
    /// Classes.
    pub classes: usize,
    /// The image and label columns of a Hub dataset, when columns were chosen.
    pub columns: Option<(String, String)>,
    /// Where the validation split comes from (the data's own, or held out from training).
    pub validation: String,
    /// The starting weights, the architecture and the preprocessing.
    pub weights: String,
    pub arch: String,
    pub preprocessing: String,
    /// The device and the output folder.
    pub device: String,
    pub out: std::path::PathBuf,
    /// The training configuration as JSON ([`super::TrainConfig`]).
    pub recipe: String,
    /// Ranks of a data-parallel run (1 otherwise).
    pub ranks: usize,
}

/// Remarks of a run that are not errors ([`Observer::notice`]); `Display` words them.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// `resume` was asked for but the output folder holds no checkpoint yet.
    NothingToResume { dir: std::path::PathBuf },
    /// The run continues inside an epoch (1-based) after `batch` batches, at optimizer `step`.
    Resumed {
        epoch: usize,
        batch: usize,
        step: u64,
    },
    /// The base model's repository has no usable `config.json`: ImageNet preprocessing is used.
    NoBaseConfig { repo: String, reason: String },
    /// The data has no test split: the validation figures are the ones reported.
    NoTestSplit,
    /// Undecodable images were skipped in an epoch's training data (the loader's report).
    SkippedTraining { report: String },
    /// Undecodable test images were skipped.
    SkippedTest { images: usize },
    /// Something about the data source (e.g. a Hub dataset read from its parquet conversion).
    Data { text: String },
    /// An ablation starts the run of one of its variants, written to `out`.
    Variant {
        name: String,
        out: std::path::PathBuf,
    },
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::NothingToResume { dir } => write!(
                f,
                "resume: no checkpoint in {} yet; starting from the beginning",
                dir.display()
            ),
            Notice::Resumed { epoch, batch, step } => {
                write!(
                    f,
                    "resume: epoch {epoch}, after batch {batch} (step {step})"
                )
            }
            Notice::NoBaseConfig { repo, reason } => write!(
                f,
                "no config.json in {repo} ({reason}); using ImageNet preprocessing defaults"
            ),
            Notice::NoTestSplit => write!(
                f,
                "the data has no test split; the validation figures are reported"
            ),
            Notice::SkippedTraining { report } => write!(f, "train data: {report}"),
            Notice::SkippedTest { images } => {
                write!(f, "{images} undecodable test images were skipped")
            }
            Notice::Data { text } => f.write_str(text),
            Notice::Variant { name, out } => write!(f, "ablation: {name} -> {}", out.display()),
        }
    }
}
