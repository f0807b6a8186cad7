//! Learning-rate schedules: linear warmup then cosine decay or step decay, per optimizer step.

use serde::{Deserialize, Serialize};

/// What follows the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Decay {
    /// Cosine from the base rate to `min_lr` at the last step.
    Cosine {
        /// Final learning rate.
        min_lr: f64,
    },
    /// Multiply by `gamma` every `every` steps (torchvision's "/10 every 30 epochs").
    Step {
        /// Steps between decays.
        every: u64,
        /// Factor.
        gamma: f64,
    },
}

/// A learning-rate schedule over `total` optimizer steps.
///
/// ```
/// use candle_finetune::train::{Decay, Schedule};
/// let s = Schedule { base_lr: 0.1, warmup: 10, total: 110, decay: Decay::Cosine { min_lr: 0.0 } };
/// assert!((s.lr(0) - 0.01).abs() < 1e-12);   // warmup starts at base / warmup
/// assert!((s.lr(9) - 0.1).abs() < 1e-12);
/// assert!((s.lr(60) - 0.05).abs() < 1e-12);  // half way through the cosine
/// let st = Schedule { base_lr: 0.1, warmup: 0, total: 90, decay: Decay::Step { every: 30, gamma: 0.1 } };
/// assert!((st.lr(65) - 0.001).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Linear warmup steps.
    pub warmup: u64,
    /// Total steps.
    pub total: u64,
    /// Decay after warmup.
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let s = step - self.warmup;
        match self.decay {
            Decay::Cosine { min_lr } => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                let t = (s as f64 / span).min(1.0);
                min_lr + 0.5 * (self.base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Decay::Step { every, gamma } => self.base_lr * gamma.powi((s / every.max(1)) as i32),
        }
    }
}
