//! Training: optimizers with saveable state, learning-rate schedules, checkpoints and the
//! fine-tuning loop.

mod accumulate;
mod checkpoint;
mod ema;
mod fused;
mod observe;
mod optim;
mod run;
mod schedule;

pub use accumulate::GradAccumulator;
pub use checkpoint::{Checkpoint, CheckpointMeta, DataSignature, PartialEpoch};
pub use ema::Ema;
pub use observe::{
    BatchProgress, CheckpointEvent, CheckpointKind, EpochEnd, EpochStart, Notice, Observer,
    Settings, Silent, StepEvent,
};
pub use optim::{Group, Optimizer, Rule};
pub use schedule::{Decay, Schedule};

use crate::data::Loader;
use crate::eval::{Accumulator, EvalResult};
use candle_core::{bail, DType, Device, ModuleT, Result, Tensor};
use candle_nn::VarMap;
use candle_resnet::ops::conv::Backend;
use candle_resnet::params::ParamGroups;
use candle_resnet::resnet::ResNet;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Optimizer choice of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum OptimizerKind {
    /// SGD with momentum (the torchvision recipe).
    #[default]
    Sgd,
    /// AdamW.
    #[cfg_attr(feature = "clap", value(name = "adamw"))]
    AdamW,
}

/// Precision of the training forward and backward (`--amp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Amp {
    /// Everything in `f32`.
    #[default]
    F32,
    /// Mixed precision: the images and the convolutions and batch norms of the training
    /// forward and backward in `bf16` against `f32` master weights (cast per step, the
    /// gradient arriving in `f32`), batch-norm statistics, pooled features, head, loss, optimizer
    /// and evaluation in `f32`. On a CPU whose oneDNN runs bf16 natively (the `onednn` feature,
    /// AMX or AVX512-BF16) the tensors stay `f32` and only the convolutions' arithmetic is bf16
    /// ([`Amp::conv_backend`]).
    Bf16,
}

impl Amp {
    /// The dtype the training images are cast to (but see [`Classifier::input_dtype`]).
    pub fn dtype(self) -> DType {
        match self {
            Amp::F32 => DType::F32,
            Amp::Bf16 => DType::BF16,
        }
    }

    /// The convolution backend for this precision on `device`: on a CPU whose oneDNN runs bf16
    /// natively (the `onednn` feature; AMX or AVX512-BF16), `Bf16` keeps the tensors in f32 and
    /// computes inside the convolutions in bf16 ([`Backend::OneDnnBf16`]): candle's bf16
    /// element-wise ops on CPU are slower than its f32 ones, so bf16 tensors around the
    /// convolutions cost more than they save. Otherwise [`Backend::Auto`].
    ///
    /// ```
    /// use candle_finetune::train::Amp;
    /// use candle_resnet::ops::conv::Backend;
    /// assert_eq!(Amp::F32.conv_backend(&candle_core::Device::Cpu), Backend::Auto);
    /// ```
    pub fn conv_backend(self, device: &candle_core::Device) -> Backend {
        match self {
            Amp::Bf16 if device.is_cpu() && Backend::OneDnnBf16.bf16_arithmetic() => {
                Backend::OneDnnBf16
            }
            _ => Backend::Auto,
        }
    }

    /// Whether this precision trains slower than f32 on the CPU here: `Bf16` without oneDNN's
    /// native bf16 convolutions (the `onednn` feature on a CPU with AMX or AVX512-BF16) runs
    /// bf16 tensors through candle's CPU ops, several times slower than f32 (a ResNet-18 step
    /// at 224 px measured 0.09x PyTorch's autocast step on a Xeon with AMX). The CLI warns.
    ///
    /// ```
    /// use candle_finetune::train::Amp;
    /// assert!(!Amp::F32.slower_than_f32_on_cpu());
    /// ```
    pub fn slower_than_f32_on_cpu(self) -> bool {
        self == Amp::Bf16 && self.conv_backend(&candle_core::Device::Cpu) != Backend::OneDnnBf16
    }
}

/// The learning-rate decay after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ScheduleKind {
    /// Multiply by [`TrainConfig::gamma`] every [`TrainConfig::step_epochs`] epochs (the
    /// torchvision anchor recipe: /10 every 30).
    #[default]
    Step,
    /// Cosine to [`TrainConfig::min_lr`] over the run.
    Cosine,
}

// `clap` takes each default from `TrainConfig::default()`: the defaults are written once.
#[cfg(feature = "clap")]
fn defaults() -> TrainConfig {
    TrainConfig::default()
}

/// The hyper-parameters of a run: the one place they and their defaults are declared. With the
/// `clap` feature it is a `clap::Args` (flags `--epochs`, `--lr`, ...) that command lines
/// flatten. Defaults: the torchvision ResNet anchor recipe (SGD 0.1, momentum 0.9, wd 1e-4,
/// batch 128, 90 epochs, /10 every 30, no warmup) with label smoothing 0.1.
///
/// ```
/// let cfg = candle_finetune::train::TrainConfig { epochs: 30, ..Default::default() };
/// assert_eq!((cfg.lr, cfg.step_epochs), (0.1, 30));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TrainConfig {
    /// Epochs.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().epochs))]
    pub epochs: usize,
    /// Images per micro-batch.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().batch_size))]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().accum_steps))]
    pub accum_steps: usize,
    /// Peak learning rate.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().lr))]
    pub lr: f64,
    /// Optimizer.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = defaults().optimizer))]
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().momentum))]
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    #[cfg_attr(feature = "clap", arg(long))]
    pub nesterov: bool,
    /// Weight decay (not on batch norms and biases).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().weight_decay))]
    pub weight_decay: f64,
    /// Decoupled weight decay for SGD (`w -= lr * wd * w` apart from the gradient, as AdamW).
    #[cfg_attr(feature = "clap", arg(long))]
    pub decoupled_wd: bool,
    /// AdamW's beta1.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().adam_beta1))]
    pub adam_beta1: f64,
    /// AdamW's beta2.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().adam_beta2))]
    pub adam_beta2: f64,
    /// AdamW's epsilon.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().adam_eps))]
    pub adam_eps: f64,
    /// Label smoothing of the cross-entropy, in [0, 1].
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().label_smoothing))]
    pub label_smoothing: f64,
    /// Linear warmup, in epochs.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().warmup_epochs))]
    pub warmup_epochs: f64,
    /// Learning-rate decay after the warmup.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = defaults().schedule))]
    pub schedule: ScheduleKind,
    /// Epochs between two decays of the step schedule.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().step_epochs))]
    pub step_epochs: usize,
    /// Factor of each decay of the step schedule.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().gamma))]
    pub gamma: f64,
    /// Final learning rate of the cosine schedule.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().min_lr))]
    pub min_lr: f64,
    /// Learning-rate multiplier of the backbone (1: same as the head).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().backbone_lr_mult))]
    pub backbone_lr_mult: f64,
    /// Train the new head only.
    #[cfg_attr(feature = "clap", arg(long))]
    pub freeze_backbone: bool,
    /// Seed of the data order, augmentations, the validation hold-out and the new head.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().seed))]
    pub seed: u64,
    /// Stop each epoch after this many micro-batches (smoke runs).
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_batches_per_epoch: Option<usize>,
    /// End this invocation after completing this epoch (1-based), keeping the schedule of the
    /// whole run: for time-boxed jobs continued later with `--resume`.
    #[cfg_attr(feature = "clap", arg(long))]
    pub stop_after_epoch: Option<usize>,
    /// Evaluate on the validation split every this many epochs (and always after the last
    /// one); the model is chosen among evaluated epochs.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().eval_every))]
    pub eval_every: usize,
    /// Also write a recovery checkpoint (`checkpoint-last`, mid-epoch) every this many
    /// optimizer steps.
    #[cfg_attr(feature = "clap", arg(long))]
    pub checkpoint_every_steps: Option<u64>,
    /// Write a recovery checkpoint when this many minutes have passed since the last
    /// checkpoint (0: only at epoch ends and every `checkpoint_every_steps`): a killed run loses
    /// at most about this much work.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().checkpoint_every_minutes))]
    pub checkpoint_every_minutes: f64,
    /// Mixup alpha (timm's `--mixup`); mixup is on when > 0.
    #[cfg_attr(feature = "clap", arg(long = "mixup", default_value_t = defaults().mixup_alpha))]
    pub mixup_alpha: f64,
    /// CutMix alpha (timm's `--cutmix`); CutMix is on when > 0.
    #[cfg_attr(feature = "clap", arg(long = "cutmix", default_value_t = defaults().cutmix_alpha))]
    pub cutmix_alpha: f64,
    /// CutMix box sides as MIN,MAX fractions of the image instead of from lambda (turns CutMix
    /// on; timm's `--cutmix-minmax`).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub cutmix_minmax: Option<Vec<f64>>,
    /// Probability of mixing a batch / pair / image (timm's `--mixup-prob`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().mixup_prob))]
    pub mixup_prob: f64,
    /// Probability of CutMix instead of mixup when both are on (timm's `--mixup-switch-prob`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().mixup_switch_prob))]
    pub mixup_switch_prob: f64,
    /// One mixing draw per batch, pair or image (timm's `--mixup-mode`).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = defaults().mixup_mode))]
    pub mixup_mode: crate::data::mixup::MixMode,
    /// Probability of randomly erasing a box of each training image (timm's `--reprob`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().reprob))]
    pub reprob: f64,
    /// Fill of erased boxes (timm's `--remode`).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = defaults().remode))]
    pub remode: crate::data::erasing::EraseMode,
    /// Boxes per erased image (timm's `--recount`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().recount))]
    pub recount: usize,
    /// Area range of the random resized crop as MIN,MAX fractions of the image (timm's
    /// `--scale`).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', num_args = 1, default_values_t = defaults().scale))]
    pub scale: Vec<f64>,
    /// Aspect-ratio range of the random resized crop as MIN,MAX (timm's `--ratio`).
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ',', num_args = 1, default_values_t = defaults().ratio))]
    pub ratio: Vec<f64>,
    /// Probability of a horizontal flip (timm's `--hflip`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().hflip))]
    pub hflip: f64,
    /// Auto-augment policy with torchvision's definitions (timm's `--aa`): `ta_wide`
    /// (TrivialAugmentWide), `ra` (RandAugment, 2 ops at magnitude 9) or `rand-mM-nN`.
    #[cfg_attr(feature = "clap", arg(long = "aa"))]
    pub auto_augment: Option<String>,
    /// Colour jitter (timm's `--color-jitter`): one value for brightness, contrast and
    /// saturation, or B,C,S or B,C,S,HUE; off unless given.
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    pub color_jitter: Option<Vec<f64>>,
    /// Precision of the training forward and backward: f32, or bf16 mixed precision with
    /// f32 master weights (timm's `--amp --amp-dtype bfloat16`).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = defaults().amp))]
    pub amp: Amp,
    /// Drop-path (stochastic depth) rate of the ResNet's last block, linear from 0 at the
    /// first (timm's `--drop-path`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().drop_path))]
    pub drop_path: f64,
    /// Keep an exponential moving average of the weights (timm's `--model-ema`, ModelEmaV3); it
    /// is evaluated beside the trained weights and chosen when better on validation.
    #[cfg_attr(feature = "clap", arg(long))]
    pub model_ema: bool,
    /// Decay of the weight EMA (timm's `--model-ema-decay`).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().model_ema_decay))]
    pub model_ema_decay: f64,
    /// Warm the EMA's decay up over the first steps (timm's `--model-ema-warmup`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub model_ema_warmup: bool,
    /// Clip the gradient to this global L2 norm before each step (timm's `--clip-grad`, norm
    /// mode).
    #[cfg_attr(feature = "clap", arg(long))]
    pub clip_grad: Option<f64>,
    /// Synchronised batch norm across data-parallel ranks (PyTorch's `SyncBatchNorm`,
    /// torchvision's `--sync-bn`): training statistics over the global batch instead of each
    /// rank's share. The recipe then drops each epoch's last incomplete batch, so that every
    /// rank's share is the same size. No effect in one process.
    #[cfg_attr(feature = "clap", arg(long))]
    pub sync_bn: bool,
    /// Besides `checkpoint-last`, keep the newest this many checkpoints as
    /// `checkpoint-step-NNNNNNNN.safetensors` (hard links, older ones pruned; 0: none).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = defaults().keep_checkpoints))]
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 90,
            batch_size: 128,
            accum_steps: 1,
            lr: 0.1,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            decoupled_wd: false,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            label_smoothing: 0.1,
            warmup_epochs: 0.0,
            schedule: ScheduleKind::Step,
            step_epochs: 30,
            gamma: 0.1,
            min_lr: 0.0,
            backbone_lr_mult: 1.0,
            freeze_backbone: false,
            seed: 0,
            max_batches_per_epoch: None,
            stop_after_epoch: None,
            eval_every: 1,
            checkpoint_every_steps: None,
            checkpoint_every_minutes: 5.0,
            keep_checkpoints: 0,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            cutmix_minmax: None,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            mixup_mode: crate::data::mixup::MixMode::Batch,
            scale: vec![0.08, 1.0],
            ratio: vec![3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.5,
            auto_augment: None,
            color_jitter: None,
            drop_path: 0.0,
            amp: Amp::F32,
            reprob: 0.0,
            remode: crate::data::erasing::EraseMode::Pixel,
            recount: 1,
            model_ema: false,
            model_ema_decay: 0.9998,
            model_ema_warmup: false,
            clip_grad: None,
            sync_bn: false,
        }
    }
}

impl TrainConfig {
    /// The Mixup / CutMix of this configuration for `num_classes` classes (label smoothing
    /// folded into its soft targets); `None` when neither is on.
    ///
    /// ```
    /// use candle_finetune::train::TrainConfig;
    /// assert!(TrainConfig::default().mixup(10).is_none());
    /// let m = TrainConfig { mixup_alpha: 0.2, ..Default::default() }.mixup(10).unwrap();
    /// assert_eq!((m.label_smoothing, m.num_classes), (0.1, 10));
    /// ```
    pub fn mixup(&self, num_classes: usize) -> Option<crate::data::mixup::Mixup> {
        let m = crate::data::mixup::Mixup {
            mixup_alpha: self.mixup_alpha,
            cutmix_alpha: self.cutmix_alpha,
            cutmix_minmax: self
                .cutmix_minmax
                .as_ref()
                .filter(|v| v.len() == 2)
                .map(|v| [v[0], v[1]]),
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            mode: self.mixup_mode,
            correct_lam: true,
            label_smoothing: self.label_smoothing,
            num_classes,
        };
        m.enabled().then_some(m)
    }

    /// The random erasing of this configuration (`None` when `reprob` is 0).
    ///
    /// ```
    /// use candle_finetune::train::TrainConfig;
    /// assert!(TrainConfig::default().erasing().is_none());
    /// assert_eq!(TrainConfig { reprob: 0.25, ..Default::default() }.erasing().unwrap().count, 1);
    /// ```
    pub fn erasing(&self) -> Option<crate::data::erasing::RandomErasing> {
        (self.reprob > 0.0).then(|| {
            crate::data::erasing::RandomErasing::timm(self.reprob, self.remode, self.recount)
        })
    }

    /// The training augmentation of this configuration: crop range, flip, auto-augment, colour
    /// jitter; an error names the value that is not valid.
    ///
    /// ```
    /// use candle_finetune::train::TrainConfig;
    /// let a = TrainConfig { auto_augment: Some("ta_wide".into()), ..Default::default() }.augment().unwrap();
    /// assert!(a.auto_augment.is_some() && a.color_jitter.is_none());
    /// assert!(TrainConfig { scale: vec![0.5], ..Default::default() }.augment().is_err());
    /// ```
    pub fn augment(&self) -> Result<crate::data::augment::Augment> {
        use crate::data::augment::{Augment, AutoAugment, ColorJitter};
        let pair = |name: &str, v: &[f64]| match *v {
            [a, b] => Ok([a, b]),
            _ => Err(candle_core::Error::Msg(format!(
                "train: {name} takes two values MIN,MAX, got {v:?}"
            ))),
        };
        let auto_augment = match &self.auto_augment {
            None => None,
            Some(s) if s.is_empty() || s == "none" => None,
            Some(s) => Some(
                s.parse::<AutoAugment>()
                    .map_err(|e| candle_core::Error::Msg(format!("train: {e}")))?,
            ),
        };
        let color_jitter = match &self.color_jitter {
            None => None,
            Some(v) => {
                ColorJitter::timm(v).map_err(|e| candle_core::Error::Msg(format!("train: {e}")))?
            }
        };
        let a = Augment {
            scale: pair("scale", &self.scale)?,
            ratio: pair("ratio", &self.ratio)?,
            hflip: self.hflip,
            auto_augment,
            color_jitter,
            fill: [0; 3],
        };
        a.validate()
            .map_err(|e| candle_core::Error::Msg(format!("train: {e}")))?;
        Ok(a)
    }

    /// The decay for epochs of `steps_per_epoch` optimizer steps.
    ///
    /// ```
    /// use candle_finetune::train::{Decay, TrainConfig};
    /// assert_eq!(TrainConfig::default().decay(10), Decay::Step { every: 300, gamma: 0.1 });
    /// ```
    pub fn decay(&self, steps_per_epoch: usize) -> Decay {
        match self.schedule {
            ScheduleKind::Cosine => Decay::Cosine {
                min_lr: self.min_lr,
            },
            ScheduleKind::Step => Decay::Step {
                every: (self.step_epochs.max(1) * steps_per_epoch.max(1)) as u64,
                gamma: self.gamma,
            },
        }
    }

    /// Checks the values: positive counts, finite rates, smoothing in [0, 1], betas in [0, 1).
    ///
    /// ```
    /// use candle_finetune::train::TrainConfig;
    /// assert!(TrainConfig::default().validate().is_ok());
    /// let e = TrainConfig { label_smoothing: 1.5, ..Default::default() }.validate().unwrap_err();
    /// assert!(e.to_string().contains("label_smoothing"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("accum_steps", self.accum_steps),
            ("eval_every", self.eval_every),
            ("step_epochs", self.step_epochs),
        ] {
            if v == 0 {
                bail!("train: {name} must be positive");
            }
        }
        for (name, v) in [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
            ("adam_eps", self.adam_eps),
            ("warmup_epochs", self.warmup_epochs),
            ("gamma", self.gamma),
            ("min_lr", self.min_lr),
            ("backbone_lr_mult", self.backbone_lr_mult),
            ("checkpoint_every_minutes", self.checkpoint_every_minutes),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("train: {name} must be a finite number >= 0, not {v}");
            }
        }
        if self.cutmix_minmax.as_ref().is_some_and(|v| v.len() != 2) {
            bail!("train: cutmix_minmax takes two numbers, MIN,MAX");
        }
        if let Some(m) = self.mixup(1) {
            m.validate()?;
        }
        if !(0.0..=1.0).contains(&self.reprob) || self.recount == 0 {
            bail!(
                "train: reprob must lie in [0, 1] and recount be at least 1, not {} and {}",
                self.reprob,
                self.recount
            );
        }
        self.augment()?;
        if !(0.0..1.0).contains(&self.drop_path) {
            bail!(
                "train: drop_path must lie in [0, 1), not {}",
                self.drop_path
            );
        }
        if self.checkpoint_every_steps == Some(0) {
            bail!("train: checkpoint_every_steps must be positive");
        }
        if !(0.0..=1.0).contains(&self.model_ema_decay) {
            bail!(
                "train: model_ema_decay must lie in [0, 1], not {}",
                self.model_ema_decay
            );
        }
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                bail!("train: clip_grad must be a positive number, not {c}");
            }
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            bail!(
                "train: label_smoothing must lie in [0, 1], not {}",
                self.label_smoothing
            );
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("train: {name} must lie in [0, 1), not {v}");
            }
        }
        Ok(())
    }
}

/// Metrics of one epoch (a line of `metrics.jsonl`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Validation top-1 (`None`: not evaluated this epoch, see [`TrainConfig::eval_every`], or
    /// no validation split).
    #[serde(default, alias = "top1")]
    pub val_top1: Option<f64>,
    /// Validation top-5.
    #[serde(default, alias = "top5")]
    pub val_top5: Option<f64>,
    /// Validation NLL.
    #[serde(default, alias = "nll")]
    pub val_nll: Option<f64>,
    /// Validation ECE.
    #[serde(default, alias = "ece")]
    pub val_ece: Option<f64>,
    /// Validation top-1 of the weight EMA (`None`: no EMA or not evaluated).
    #[serde(default)]
    pub ema_val_top1: Option<f64>,
    /// Training images per second.
    pub images_per_s: f64,
    /// Seconds the training loop waited for the loader's next batch this epoch (0 when loading
    /// fully overlaps the steps).
    #[serde(default)]
    pub data_wait_s: f64,
    /// CPU milliseconds the loader spent per training image (read, decode, transform).
    #[serde(default)]
    pub loader_ms_per_image: f64,
    /// Undecodable images skipped this epoch (train + validation).
    pub skipped_images: usize,
    /// Of those, training images.
    #[serde(default)]
    pub skipped_train: usize,
    /// Of those, validation images.
    #[serde(default, alias = "skipped_test")]
    pub skipped_validation: usize,
}

/// What chose the model a run keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// The evaluated epoch of best validation top-1.
    #[default]
    Validation,
    /// No validation split: the last epoch.
    LastEpoch,
}

impl Selection {
    /// `validation` or `last-epoch`, as `eval.json` and the card write it.
    ///
    /// ```
    /// assert_eq!(candle_finetune::train::Selection::LastEpoch.name(), "last-epoch");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Selection::Validation => "validation",
            Selection::LastEpoch => "last-epoch",
        }
    }
}

/// What [`fit`] returns.
#[derive(Debug, Clone, Default)]
pub struct FitSummary {
    /// The loss of every optimizer step run by this call.
    pub step_losses: Vec<f64>,
    /// Every epoch so far (including epochs restored from a checkpoint).
    pub history: Vec<EpochMetrics>,
    /// Validation evaluation of the chosen epoch (`None` without a validation split).
    pub best: Option<EvalResult>,
    /// The chosen epoch (1-based; 0 before any epoch completed).
    pub best_epoch: usize,
    /// What chose it.
    pub selected_on: Selection,
    /// The run stopped early (the observer asked, e.g. on SIGTERM): a recovery checkpoint holds
    /// its state, `--resume` continues it.
    pub interrupted: bool,
    /// The chosen model is the weight EMA.
    pub best_is_ema: bool,
}

/// Files of a run directory.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The directory.
    pub dir: PathBuf,
}

impl RunPaths {
    /// Latest checkpoint.
    pub fn last(&self) -> PathBuf {
        self.dir.join("checkpoint-last.safetensors")
    }
    /// Checkpoint of the chosen epoch (best validation top-1, or the last epoch).
    pub fn best(&self) -> PathBuf {
        self.dir.join("checkpoint-best.safetensors")
    }
    /// Exported chosen model (torchvision names).
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    /// Per-epoch metrics, one JSON object a line.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// Test evaluation of the chosen model (written by the recipe, once).
    pub fn eval(&self) -> PathBuf {
        self.dir.join("eval.json")
    }

    /// A kept checkpoint of step `step`.
    pub fn step(&self, step: u64) -> PathBuf {
        self.dir
            .join(format!("checkpoint-step-{step:08}.safetensors"))
    }

    /// Keeps [`RunPaths::last`] also as [`RunPaths::step`] (a hard link: `last` is replaced by
    /// rename, never rewritten in place; a copy where links are not possible) and deletes all
    /// but the newest `keep` of those; `keep` 0 deletes none and keeps none.
    pub fn keep_last(&self, step: u64, keep: usize) -> Result<()> {
        if keep == 0 {
            return Ok(());
        }
        let to = self.step(step);
        if !to.exists() && std::fs::hard_link(self.last(), &to).is_err() {
            crate::files::atomic_write(&to, |tmp| {
                std::fs::copy(self.last(), tmp)?;
                Ok(())
            })?;
        }
        let mut kept: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("checkpoint-step-") && n.ends_with(".safetensors")
                })
            })
            .collect();
        kept.sort();
        let drop = kept.len().saturating_sub(keep);
        for p in &kept[..drop] {
            std::fs::remove_file(p)?;
        }
        Ok(())
    }
}

/// Re-draws the `fc` head from `seed` with PyTorch's `nn.Linear` initialisation, so a seeded run
/// starts from the same head every time.
pub fn reinit_head(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let w = data
        .get("fc.weight")
        .ok_or_else(|| candle_core::Error::Msg("no fc.weight".into()))?;
    let b = data
        .get("fc.bias")
        .ok_or_else(|| candle_core::Error::Msg("no fc.bias".into()))?;
    let bound = 1.0 / (w.dim(1)? as f64).sqrt();
    let mut rng = crate::data::sample_rng(seed, u64::MAX, u64::MAX);
    for v in [w, b] {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

/// What training and evaluation need of a model: logits for a batch of images (in train or
/// eval mode) and the number of classes. [`ResNet`] is one; a test or a user may bring another.
pub trait Classifier: Sync {
    /// Logits `(B, classes)` of images `(B, 3, H, W)`.
    fn logits(&self, images: &Tensor, train: bool) -> Result<Tensor>;
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// The key the next training forwards draw their randomness from (drop path); the trainer
    /// sets it before each micro-batch from the seed, the epoch and the batch, so a resumed run
    /// draws what the uninterrupted one would. Models without randomness ignore it.
    fn set_noise_key(&self, _key: u64) {}
    /// The dtype the training images enter the model in under `amp` (default
    /// [`Amp::dtype`]); a model that does its mixed precision inside f32 tensors answers f32.
    fn input_dtype(&self, amp: Amp) -> DType {
        amp.dtype()
    }
}

impl Classifier for ResNet {
    /// Eval mode runs [`ResNet::infer`] (no autograd graph: one stage's activations at a time).
    fn logits(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        match train {
            true => self.forward_t(images, true),
            false => self.infer(images),
        }
    }
    fn num_classes(&self) -> usize {
        ResNet::num_classes(self)
    }
    fn set_noise_key(&self, key: u64) {
        ResNet::set_noise_key(self, key)
    }
    /// f32 when the convolutions compute in bf16 themselves
    /// ([`candle_resnet::ops::conv::Backend::OneDnnBf16`], see [`Amp::conv_backend`]).
    fn input_dtype(&self, amp: Amp) -> DType {
        match amp {
            Amp::Bf16 if self.conv_backend().bf16_arithmetic() => DType::F32,
            _ => amp.dtype(),
        }
    }
}

/// The `index` stream of [`crate::data::sample_rng`] (at the epoch) the model's noise key of
/// micro-batch `b` comes from (`NOISE_STREAM + b`).
const NOISE_STREAM: u64 = 1 << 60;

/// Evaluates `model` (eval mode) on every batch of `loader` (its epoch 0).
pub fn evaluate<M: Classifier>(
    model: &M,
    loader: &Loader,
    device: &Device,
) -> Result<(EvalResult, usize)> {
    let (acc, skipped) = evaluate_shard(model, loader, device)?;
    Ok((acc.finish(), skipped))
}

/// The accumulator of `loader`'s images (its shard of them when sharded) and the skipped count.
fn evaluate_shard<M: Classifier>(
    model: &M,
    loader: &Loader,
    device: &Device,
) -> Result<(Accumulator, usize)> {
    let mut acc = Accumulator::new(model.num_classes());
    let mut epoch = loader.epoch(0);
    for b in epoch.by_ref() {
        let b = b?;
        if b.indices.is_empty() {
            continue; // a data-parallel rank's empty part of the last batch
        }
        let logits = candle_resnet::threads::on_cpu_worker(device, || {
            model.logits(&b.images.to_device(device)?, false)
        })?;
        acc.add(&logits, &b.labels.to_vec1::<u32>()?)?;
    }
    let report = epoch.finish();
    Ok((acc, report.skipped.len()))
}

/// [`evaluate`] across data-parallel ranks: with a sharded loader each rank evaluates its shard
/// and the counts and sums are added over the ranks ([`Accumulator::to_sums`]), so every rank
/// gets the metrics of the whole split; an unsharded loader is evaluated whole by each rank.
pub fn evaluate_distributed<M: Classifier>(
    model: &M,
    loader: &Loader,
    device: &Device,
    world: &dyn candle_ddp::Collective,
) -> Result<(EvalResult, usize)> {
    let shard = loader.shard();
    if shard.world == 1 {
        return evaluate(model, loader, device);
    }
    if shard.world != world.world_size() || shard.rank != world.rank() {
        bail!(
            "evaluate: the loader is shard {shard:?}, but this process is rank {} of {}",
            world.rank(),
            world.world_size()
        );
    }
    let (acc, skipped) = evaluate_shard(model, loader, device)?;
    let mut sums = acc.to_sums();
    sums.push(skipped as f64);
    world.all_reduce_sum_f64(&mut sums)?;
    let skipped = sums.pop().unwrap_or(0.0) as usize;
    Ok((
        Accumulator::from_sums(model.num_classes(), &sums)?.finish(),
        skipped,
    ))
}

fn optimizer(cfg: &TrainConfig, varmap: &VarMap) -> Result<Optimizer> {
    let g = ParamGroups::from_varmap(varmap);
    let mut groups = vec![
        Group {
            vars: g.head_decay.vars,
            weight_decay: cfg.weight_decay,
            lr_mult: 1.0,
        },
        Group {
            vars: g.head_no_decay.vars,
            weight_decay: 0.0,
            lr_mult: 1.0,
        },
    ];
    if !cfg.freeze_backbone {
        groups.push(Group {
            vars: g.backbone_decay.vars,
            weight_decay: cfg.weight_decay,
            lr_mult: cfg.backbone_lr_mult,
        });
        groups.push(Group {
            vars: g.backbone_no_decay.vars,
            weight_decay: 0.0,
            lr_mult: cfg.backbone_lr_mult,
        });
    }
    let rule = match cfg.optimizer {
        OptimizerKind::Sgd => Rule::Sgd {
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            decoupled: cfg.decoupled_wd,
        },
        OptimizerKind::AdamW => Rule::AdamW {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
        },
    };
    Optimizer::new(rule, groups)
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    f.sync_all()?;
    Ok(())
}

/// Fine-tunes `model` (variables in `varmap`) for `cfg.epochs` epochs, evaluating on
/// `validation` every [`TrainConfig::eval_every`] epochs and after the last; the kept model is
/// the evaluated epoch of best validation top-1, or the last epoch when `validation` is `None`.
/// The test split plays no part here: evaluate the kept model on it once, afterwards. Writes
/// into `out`: `checkpoint-last.safetensors` every epoch (atomic), `checkpoint-best.safetensors`
/// and `model.safetensors` (torchvision names) for the kept epoch, and `metrics.jsonl`. With `resume`, continues from `checkpoint-last.safetensors` so that the
/// remaining steps are exactly those of an uninterrupted run (on CPU). A non-finite loss stops the
/// run with an error and leaves the last checkpoint as it was.
#[allow(clippy::too_many_arguments)] // each argument is a distinct input of the run
pub fn fit<M: Classifier>(
    model: &M,
    varmap: &VarMap,
    train: &Loader,
    validation: Option<&Loader>,
    cfg: &TrainConfig,
    device: &Device,
    out: &Path,
    resume: bool,
) -> Result<FitSummary> {
    fit_with(
        model,
        varmap,
        train,
        validation,
        cfg,
        device,
        out,
        resume,
        &mut Silent,
    )
}

/// [`fit`] reporting to `observer` ([`Observer`]: epochs, batches, steps, checkpoints, notices).
/// `ControlFlow::Break` from [`Observer::step`] (a closure over [`StepEvent`] will do: a time
/// budget, a stop flag) ends the run after that step: a recovery checkpoint holds its state and
/// the summary says it was interrupted.
#[allow(clippy::too_many_arguments)] // each argument is a distinct input of the run
pub fn fit_with<M: Classifier>(
    model: &M,
    varmap: &VarMap,
    train: &Loader,
    validation: Option<&Loader>,
    cfg: &TrainConfig,
    device: &Device,
    out: &Path,
    resume: bool,
    observer: &mut dyn Observer,
) -> Result<FitSummary> {
    fit_distributed(
        model,
        varmap,
        train,
        validation,
        cfg,
        device,
        out,
        resume,
        &candle_ddp::Single,
        observer,
    )
}

/// [`fit_with`] as one rank of a data-parallel run over `world` (PyTorch DDP's semantics): every
/// rank starts from rank 0's parameters and buffers (also after a resume); the training loader
/// is sharded for this rank ([`crate::data::Shard`], `batch_size` the global batch); each step
/// averages the gradients over the ranks in ~25 MB buckets, weighted by each rank's images so
/// the step is that of the global batch; batch norms use each rank's own statistics, their
/// running statistics follow rank 0's; a sharded validation loader is evaluated by shards and
/// its counts and sums added over the ranks ([`evaluate_distributed`]; an unsharded one whole by
/// every rank), so all ranks choose alike; rank 0 alone writes checkpoints and metrics; the ranks' weights are compared
/// by checksum at the end of every epoch (an error if they differ). Gradient accumulation
/// groups `accum_steps` positions on every rank. With [`candle_ddp::Single`] this is
/// [`fit_with`].
#[allow(clippy::too_many_arguments)] // each argument is a distinct input of the run
pub fn fit_distributed<M: Classifier>(
    model: &M,
    varmap: &VarMap,
    train: &Loader,
    validation: Option<&Loader>,
    cfg: &TrainConfig,
    device: &Device,
    out: &Path,
    resume: bool,
    world: &dyn candle_ddp::Collective,
    observer: &mut dyn Observer,
) -> Result<FitSummary> {
    cfg.validate()?;
    let paths = RunPaths {
        dir: out.to_path_buf(),
    };
    let run = run::Run::new(model, varmap, train, validation, cfg, device, world, paths)?;
    let (mut st, start_epoch, mut partial) = run.start(resume, observer)?;
    let end = cfg
        .stop_after_epoch
        .map_or(cfg.epochs, |e| e.min(cfg.epochs));
    for epoch in start_epoch..end {
        let trained = run.train_epoch(&mut st, epoch, partial.take(), observer)?;
        let stop = trained.stop;
        if stop && !trained.epoch_done {
            // The recovery checkpoint of this step holds the run's state.
            st.summary.interrupted = true;
            return Ok(st.summary);
        }
        run.finish_epoch(&mut st, epoch, trained, observer)?;
        if stop {
            // Asked to stop at the epoch's last step: the epoch's checkpoint holds the run.
            st.summary.interrupted = epoch + 1 < cfg.epochs;
            return Ok(st.summary);
        }
    }
    Ok(st.summary)
}

/// Sum of every variable's values, in `f64`, in name order: equal on ranks whose variables
/// are equal bit for bit (and, in practice, different otherwise).
fn checksum(varmap: &VarMap) -> Result<f64> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut sum = 0f64;
    for (k, name) in names.into_iter().enumerate() {
        let v = data[name]
            .as_tensor()
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        // Weighted by position so that values swapped between tensors still change it.
        sum += v * (k + 1) as f64;
    }
    Ok(sum)
}

/// The variables at positions `only` of `vars` set to rank 0's values.
fn sync_from_rank0(
    world: &dyn candle_ddp::Collective,
    vars: &[(String, candle_core::Var)],
    only: &[usize],
) -> Result<()> {
    if only.is_empty() {
        return Ok(());
    }
    let values: Vec<Tensor> = only
        .iter()
        .map(|&i| vars[i].1.as_tensor().clone())
        .collect();
    let synced =
        candle_ddp::broadcast_tensors(world, &values, 0, candle_ddp::DEFAULT_BUCKET_BYTES)?;
    for (&i, t) in only.iter().zip(synced) {
        vars[i].1.set(&t)?;
    }
    Ok(())
}

/// One data-parallel step's reduction: with one small `f64` all-reduce the ranks learn the
/// global image count, the global loss sum and which variables have a gradient anywhere; then
/// those gradients (a zero where a rank has none) are averaged in buckets, each rank's weighted
/// by `images * world / total` so the result is the gradient of the global batch's mean loss.
/// Returns the global image count, the global mean loss and the positions (in the name-sorted
/// `vars`) of the variables without a gradient on any rank (buffers).
fn reduce_gradients(
    world: &dyn candle_ddp::Collective,
    vars: &[(String, candle_core::Var)],
    grads: &mut std::collections::HashMap<String, Tensor>,
    images: usize,
    loss_sum: f64,
) -> Result<(usize, f64, Vec<usize>)> {
    let mut meta = vec![images as f64, loss_sum];
    meta.extend(vars.iter().map(|(k, _)| grads.contains_key(k) as u8 as f64));
    world.all_reduce_sum_f64(&mut meta)?;
    let total = meta[0] as usize;
    let mean_loss = meta[1] / total.max(1) as f64;
    let weight = images as f64 * world.world_size() as f64 / total.max(1) as f64;
    let (mut ordered, mut at, mut no_grad) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (name, var)) in vars.iter().enumerate() {
        if meta[2 + i] == 0.0 {
            no_grad.push(i);
            continue;
        }
        ordered.push(match grads.get(name) {
            Some(g) if weight == 1.0 => g.clone(),
            Some(g) => (g * weight)?,
            None => var.as_tensor().zeros_like()?,
        });
        at.push(i);
    }
    let mean = candle_ddp::all_reduce_mean(world, &ordered, candle_ddp::DEFAULT_BUCKET_BYTES)?;
    grads.clear();
    for (i, g) in at.into_iter().zip(mean) {
        grads.insert(vars[i].0.clone(), g);
    }
    Ok((total, mean_loss, no_grad))
}

/// What every rank of a data-parallel run must share from the start: whether it resumes (each
/// reads the checkpoint, so the run folder must be on a filesystem every rank sees) and the
/// kind of device. One all-reduce of counts; every rank gets the same error.
fn agree_on_start(
    world: &dyn candle_ddp::Collective,
    resume: bool,
    device: &Device,
    checkpoint: &Path,
) -> Result<()> {
    let kind = [device.is_cpu(), device.is_cuda(), device.is_metal()];
    let mut counts = vec![resume as u8 as f64];
    counts.extend(kind.iter().map(|&k| k as u8 as f64));
    world.all_reduce_sum_f64(&mut counts)?;
    let ranks = world.world_size() as f64;
    if counts[0] != 0.0 && counts[0] != ranks {
        bail!(
            "train: {} of {ranks} ranks found the checkpoint {} to resume from (this rank {} \
             it): every rank reads it, so the run folder must be on a filesystem all of them see",
            counts[0],
            checkpoint.display(),
            if resume { "found" } else { "did not find" },
        );
    }
    if counts[1..].iter().all(|&c| c != ranks) {
        bail!(
            "train: the ranks train on different kinds of device ({} CPU, {} CUDA, {} Metal); \
             every rank must use the same kind",
            counts[1],
            counts[2],
            counts[3]
        );
    }
    Ok(())
}

/// Scales `grads` so that their global L2 norm is at most `max` (torch's `clip_grad_norm_`:
/// coefficient `max / (norm + 1e-6)`, applied when below 1).
fn clip_grad_norm(grads: &mut std::collections::HashMap<String, Tensor>, max: f64) -> Result<()> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let coef = max / (sq.sqrt() + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

/// Deletes what writes killed mid-way left in a run folder: `.NAME.tmp-PID` files of this
/// crate's atomic writes (of other processes) and `.tmpXXXXXX` files of the safetensors
/// writer. A checkpoint of ~90 MB each, they would pile up under repeated preemption.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let ours = format!(".tmp-{}", std::process::id());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let atomic = name.starts_with('.') && name.contains(".tmp-") && !name.ends_with(&ours);
        let safetensors_tmp = name.len() == 10
            && name.starts_with(".tmp")
            && name[4..].chars().all(|c| c.is_ascii_alphanumeric());
        if (atomic || safetensors_tmp) && e.path().is_file() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Seconds left for `remaining` steps at the rate of the `done` steps taken in `secs` (`None`
/// before the first step).
fn eta(secs: f64, done: u64, remaining: u64) -> Option<f64> {
    (done > 0).then(|| secs / done as f64 * remaining as f64)
}
