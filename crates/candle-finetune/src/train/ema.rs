//! An exponential moving average of the weights and buffers (timm's `ModelEmaV3`): after
//! optimizer step `s`, `ema = lerp(ema, model, 1 - decay(s))`, where `decay(s)` is 0 at the
//! first step (the EMA starts as the model), then `decay`, or with warm-up
//! `min(decay, 1 - (1 + (s - 1)) ^ -2/3)`. Batch-norm running statistics are averaged too.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;

/// The average, as f32 copies on the CPU, by variable name.
#[derive(Debug, Clone)]
pub struct Ema {
    /// Decay (timm's `--model-ema-decay`).
    pub decay: f64,
    /// Warm-up of the decay (timm's `--model-ema-warmup`).
    pub warmup: bool,
    values: Vec<(String, Tensor)>,
}

fn snapshot(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let d = varmap.data().lock().expect("VarMap lock poisoned");
    let mut v: Vec<(String, Tensor)> = d
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.as_tensor()
                    .detach()
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .copy()?,
            ))
        })
        .collect::<Result<_>>()?;
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

impl Ema {
    /// An average starting at the model's current values.
    pub fn new(varmap: &VarMap, decay: f64, warmup: bool) -> Result<Self> {
        if !(0.0..=1.0).contains(&decay) {
            candle_core::bail!("model EMA: decay must lie in [0, 1], not {decay}");
        }
        Ok(Self {
            decay,
            warmup,
            values: snapshot(varmap)?,
        })
    }

    /// The decay applied at optimizer step `step` (1-based), as timm's `get_decay`.
    ///
    /// ```
    /// let e = candle_finetune::train::Ema::from_values(0.999, true, vec![]);
    /// assert_eq!(e.decay_at(1), 0.0);
    /// assert!((e.decay_at(2) - (1.0 - 2f64.powf(-2.0 / 3.0))).abs() < 1e-15);
    /// assert_eq!(e.decay_at(1_000_000_000), 0.999);
    /// ```
    pub fn decay_at(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1);
        if s == 0 {
            return 0.0;
        }
        if self.warmup {
            (1.0 - (1.0 + s as f64).powf(-2.0 / 3.0)).clamp(0.0, self.decay)
        } else {
            self.decay
        }
    }

    /// An average with the given values (from a checkpoint).
    pub fn from_values(decay: f64, warmup: bool, mut values: Vec<(String, Tensor)>) -> Self {
        values.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            decay,
            warmup,
            values,
        }
    }

    /// The averaged values by name.
    pub fn values(&self) -> &[(String, Tensor)] {
        &self.values
    }

    /// Moves the average towards the model after optimizer step `step`: `lerp(ema, model, w)`
    /// with `w = 1 - decay_at(step)`, computed as torch's `lerp` does in f32.
    pub fn update(&mut self, varmap: &VarMap, step: u64) -> Result<()> {
        let w = 1.0 - self.decay_at(step);
        let model = snapshot(varmap)?;
        if model.len() != self.values.len() {
            candle_core::bail!(
                "model EMA: {} averaged variables, the model has {}",
                self.values.len(),
                model.len()
            );
        }
        for ((name, e), (m_name, m)) in self.values.iter_mut().zip(&model) {
            if name != m_name {
                candle_core::bail!("model EMA: variable {name} is not the model's {m_name}");
            }
            let diff = (m - &*e)?;
            *e = if w < 0.5 {
                (&*e + (diff * w)?)?
            } else {
                (m - (diff * (1.0 - w))?)?
            };
        }
        Ok(())
    }

    /// Puts the averaged values into the model's variables and returns what they held, for
    /// [`Ema::restore`].
    pub fn swap_in(&self, varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
        let saved = snapshot(varmap)?;
        set(varmap, &self.values)?;
        Ok(saved)
    }

    /// Puts `saved` (from [`Ema::swap_in`]) back.
    pub fn restore(varmap: &VarMap, saved: &[(String, Tensor)]) -> Result<()> {
        set(varmap, saved)
    }
}

/// Sets each variable of `varmap` named in `values` (dtype and device converted).
pub(crate) fn set(varmap: &VarMap, values: &[(String, Tensor)]) -> Result<()> {
    let d = varmap.data().lock().expect("VarMap lock poisoned");
    for (k, t) in values {
        let Some(v) = d.get(k) else {
            candle_core::bail!("model EMA: the model has no variable {k}");
        };
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    Ok(())
}
