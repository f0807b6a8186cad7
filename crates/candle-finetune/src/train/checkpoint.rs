//! Training checkpoints: weights, optimizer state and run metadata in one safetensors file,
//! written atomically.

use super::{EpochMetrics, Optimizer, TrainConfig};
use crate::eval::EvalResult;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Run metadata stored with a checkpoint. The data order and augmentations derive from
/// `(config.seed, epoch, sample index)`, so `epoch` and `step` are the whole RNG state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Completed epochs.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// The chosen epoch so far (1-based): best on validation, or the last without one.
    pub best_epoch: usize,
    /// Its validation evaluation.
    pub best: Option<EvalResult>,
    /// Metrics of every completed epoch.
    pub history: Vec<EpochMetrics>,
    /// The run's configuration.
    pub config: TrainConfig,
    /// The training data the run saw (absent in checkpoints written before it was recorded).
    #[serde(default)]
    pub data: Option<DataSignature>,
    /// Where in epoch `epoch + 1` a recovery checkpoint was taken (`None`: at an epoch's end).
    #[serde(default)]
    pub partial: Option<PartialEpoch>,
    /// The chosen epoch's model is the weight EMA (`ema.*`), not the trained weights.
    #[serde(default)]
    pub best_is_ema: bool,
}

/// The state of an epoch interrupted at an optimizer step: what resuming it needs to continue
/// exactly as the uninterrupted epoch would (the data order and augmentations derive from the
/// seed, the epoch and the sample index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Micro-batches of the epoch done (the loader skips them).
    pub batches: usize,
    /// Sum of the step losses so far this epoch.
    pub loss_sum: f64,
    /// Optimizer steps so far this epoch.
    pub steps: usize,
    /// Training images so far this epoch.
    pub images: usize,
    /// Undecodable training images skipped so far this epoch.
    pub skipped: usize,
    /// Seconds spent in the epoch so far (for its images/s).
    pub seconds: f64,
}

/// What identifies a run's training data for `--resume`: its image count and class names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSignature {
    /// Training images.
    pub images: usize,
    /// Class names in index order.
    pub classes: Vec<String>,
}

impl TrainConfig {
    /// The settings in which `self` (a checkpoint's) and `now` differ such that resuming would
    /// not continue the same run: every field but the learning rate (lowering it after a
    /// divergence is what the non-finite-loss error suggests), `eval_every` and
    /// `stop_after_epoch` and the checkpoint intervals. Each as `name: checkpoint -> now`.
    ///
    /// ```
    /// use candle_finetune::train::TrainConfig;
    /// let a = TrainConfig::default();
    /// let b = TrainConfig { label_smoothing: 0.2, lr: 0.01, eval_every: 5, ..a.clone() };
    /// assert_eq!(a.resume_differences(&b), ["label_smoothing: 0.1 -> 0.2"]);
    /// ```
    pub fn resume_differences(&self, now: &TrainConfig) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(now).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["the configuration".into()];
        };
        a.iter()
            .filter(|(k, _)| {
                ![
                    "lr",
                    "eval_every",
                    "stop_after_epoch",
                    "checkpoint_every_steps",
                    "checkpoint_every_minutes",
                    "keep_checkpoints",
                ]
                .contains(&k.as_str())
            })
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                let w = b.get(k.as_str()).cloned().unwrap_or_default();
                format!("{k}: {v} -> {w}")
            })
            .collect()
    }
}

/// Weights (`model.*`), optimizer state (`optim.*`) and [`CheckpointMeta`] (`meta`, JSON bytes).
pub struct Checkpoint {
    /// Metadata.
    pub meta: CheckpointMeta,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Captures the current state and the weight EMA's values (`ema.*`), if any.
    pub fn capture_with_ema(
        varmap: &VarMap,
        opt: &Optimizer,
        meta: CheckpointMeta,
        ema: Option<&super::Ema>,
    ) -> Result<Self> {
        let mut ck = Self::capture(varmap, opt, meta)?;
        if let Some(e) = ema {
            for (k, v) in e.values() {
                ck.tensors.insert(format!("ema.{k}"), v.clone());
            }
        }
        Ok(ck)
    }

    /// The weight EMA's values stored in the checkpoint (empty: none).
    pub fn ema_values(&self) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("ema.").map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    /// Puts the chosen model into `varmap`: the EMA's values when
    /// [`CheckpointMeta::best_is_ema`], else the trained weights.
    pub fn restore_chosen(&self, varmap: &VarMap) -> Result<()> {
        if self.meta.best_is_ema {
            let v = self.ema_values();
            if v.is_empty() {
                bail!("checkpoint: the chosen model is the EMA, but no ema.* values are stored");
            }
            super::ema::set(varmap, &v)
        } else {
            self.restore_weights(varmap)
        }
    }

    /// Captures the current state.
    pub fn capture(varmap: &VarMap, opt: &Optimizer, meta: CheckpointMeta) -> Result<Self> {
        let mut tensors = HashMap::new();
        for (k, v) in varmap.data().lock().expect("VarMap lock poisoned").iter() {
            tensors.insert(
                format!("model.{k}"),
                v.as_tensor()
                    .detach()
                    .to_device(&Device::Cpu)?
                    .copy()?
                    .detach(),
            );
        }
        for (k, v) in opt.state()? {
            tensors.insert(format!("optim.{k}"), v.detach().to_device(&Device::Cpu)?);
        }
        Ok(Self { meta, tensors })
    }

    /// Writes the checkpoint atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(&self.meta).map_err(candle_core::Error::wrap)?;
        let mut all = self.tensors.clone();
        let n = json.len();
        all.insert("meta".into(), Tensor::from_vec(json, n, &Device::Cpu)?);
        crate::files::atomic_write(path, |tmp| candle_core::safetensors::save(&all, tmp))
    }

    /// Reads a checkpoint; a truncated or foreign file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(format!("checkpoint {}: {e}", path.display())))?;
        let Some(meta) = tensors.remove("meta") else {
            bail!(
                "checkpoint {}: no `meta` entry (not a candle-finetune checkpoint)",
                path.display()
            )
        };
        if meta.dtype() != DType::U8 {
            bail!(
                "checkpoint {}: `meta` has dtype {:?}",
                path.display(),
                meta.dtype()
            );
        }
        let meta: CheckpointMeta = serde_json::from_slice(&meta.to_vec1::<u8>()?).map_err(|e| {
            candle_core::Error::Msg(format!("checkpoint {}: metadata: {e}", path.display()))
        })?;
        Ok(Self { meta, tensors })
    }

    /// Puts the weights back (not the optimizer state): e.g. the chosen epoch's, to evaluate
    /// it on the test split. Every model variable must be in the checkpoint.
    pub fn restore_weights(&self, varmap: &VarMap) -> Result<()> {
        for (k, v) in varmap.data().lock().expect("VarMap lock poisoned").iter() {
            let Some(t) = self.tensors.get(&format!("model.{k}")) else {
                bail!("checkpoint: model variable {k} is missing");
            };
            v.set(&t.detach().to_dtype(v.dtype())?.to_device(v.device())?)?;
        }
        Ok(())
    }

    /// Puts weights and optimizer state back. Every model variable must be in the checkpoint.
    pub fn restore(&self, varmap: &VarMap, opt: &mut Optimizer) -> Result<()> {
        self.restore_weights(varmap)?;
        let state: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("optim.").map(|k| (k.to_string(), v.clone())))
            .collect();
        opt.load_state(&state)
    }
}
