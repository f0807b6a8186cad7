//! Optimizers with saveable state over parameter groups: SGD (momentum, Nesterov, L2 or
//! decoupled weight decay) and AdamW, with PyTorch's update rules.

use super::fused;
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor, Var};
use std::collections::HashMap;

/// A group of variables sharing a weight decay and a learning-rate multiplier.
#[derive(Debug, Clone)]
pub struct Group {
    /// `(name, variable)` pairs; names key the optimizer state.
    pub vars: Vec<(String, Var)>,
    /// Weight decay of the group.
    pub weight_decay: f64,
    /// Multiplier of the scheduled learning rate (e.g. 0.1 for a backbone).
    pub lr_mult: f64,
}

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `torch.optim.SGD`: `momentum`, `nesterov`; weight decay added to the gradient (L2) or,
    /// with `decoupled`, applied to the weights as `p *= 1 - lr * wd`.
    Sgd {
        /// Momentum factor (0: none).
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// Decoupled weight decay instead of L2.
        decoupled: bool,
    },
    /// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments).
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
    },
}

/// An optimizer over [`Group`]s. Its state (momentum buffers, moments, step count) is exported
/// and restored by [`Optimizer::state`] / [`Optimizer::load_state`] for exact resumption.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_finetune::train::{Group, Optimizer, Rule};
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, -2.], &Device::Cpu)?;
/// let groups = vec![Group { vars: vec![("w".into(), w.clone())], weight_decay: 0.0, lr_mult: 1.0 }];
/// let mut opt = Optimizer::new(Rule::Sgd { momentum: 0.9, nesterov: false, decoupled: false }, groups)?;
/// let loss = w.as_tensor().sqr()?.sum_all()?; // gradient 2w
/// opt.step(&loss.backward()?, 0.1)?;
/// assert_eq!(w.as_tensor().to_vec1::<f32>()?, vec![0.8, -1.6]);
/// # Ok(()) }
/// ```
pub struct Optimizer {
    rule: Rule,
    groups: Vec<Group>,
    state: HashMap<String, Tensor>,
    steps: u64,
    /// The in-place CPU pass where it applies (off only in the tests comparing the two paths).
    fused: bool,
}

impl Optimizer {
    /// An optimizer; variable names must be unique across groups.
    pub fn new(rule: Rule, groups: Vec<Group>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for g in &groups {
            for (n, _) in &g.vars {
                if !seen.insert(n.clone()) {
                    bail!("optimizer: variable {n} is in two groups");
                }
            }
        }
        Ok(Self {
            rule,
            groups,
            state: HashMap::new(),
            steps: 0,
            fused: true,
        })
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr` (times each group's multiplier). Variables without a
    /// gradient in `grads` are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let mut map = HashMap::new();
        for g in &self.groups {
            for (n, v) in &g.vars {
                if let Some(t) = grads.get(v.as_tensor()) {
                    map.insert(n.clone(), t.clone());
                }
            }
        }
        self.step_with(&map, lr)
    }

    /// One update from gradients keyed by variable name (used for gradient accumulation).
    pub fn step_with(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for g in &self.groups {
            let lr = lr * g.lr_mult;
            let wd = g.weight_decay;
            for (name, var) in &g.vars {
                let Some(grad) = grads.get(name) else {
                    continue;
                };
                // Every tensor of the update is detached: `var.as_tensor()` and the gradients
                // of `backward` carry candle's autograd graph (a weight gradient references the
                // step's activations), and a buffer built from them would keep every earlier
                // step's graph alive through the next one.
                let p = var.as_tensor().detach();
                let p = &p;
                let grad = grad.detach().to_dtype(p.dtype())?;
                match self.rule {
                    Rule::Sgd {
                        momentum,
                        nesterov,
                        decoupled,
                    } => {
                        let key = format!("{name}.momentum");
                        let buf = self.state.get(&key);
                        let buf_fits = buf.is_none_or(|b| fused::applies(b, p));
                        if self.fused && fused::applies(p, &grad) && buf_fits {
                            // CPU: one in-place pass (see `fused`), same formula as below.
                            let rule = fused::Sgd {
                                lr,
                                weight_decay: wd,
                                momentum,
                                nesterov,
                                decoupled,
                                first: buf.is_none(),
                            };
                            let buf = match (momentum != 0.0, buf) {
                                (false, _) => None,
                                (true, Some(b)) => Some(b.clone()),
                                (true, None) => {
                                    // Its own storage: the kernel writes it in place.
                                    let b = p.zeros_like()?;
                                    self.state.insert(key, b.clone());
                                    Some(b)
                                }
                            };
                            fused::sgd(var.as_tensor(), &grad, buf.as_ref(), rule)?;
                            continue;
                        }
                        let mut d = grad;
                        if wd != 0.0 && !decoupled {
                            d = (d + (p * wd)?)?;
                        }
                        if momentum != 0.0 {
                            let buf = match self.state.get(&key) {
                                Some(b) => ((b * momentum)? + &d)?,
                                None => d.clone(),
                            };
                            d = if nesterov {
                                (d + (&buf * momentum)?)?
                            } else {
                                buf.clone()
                            };
                            self.state.insert(key, buf.detach());
                        }
                        let base = if wd != 0.0 && decoupled {
                            (p * (1.0 - lr * wd))?
                        } else {
                            p.clone()
                        };
                        var.set(&(base - (d * lr)?)?)?;
                    }
                    Rule::AdamW { beta1, beta2, eps } => {
                        let (mk, vk) = (format!("{name}.exp_avg"), format!("{name}.exp_avg_sq"));
                        let m = match self.state.get(&mk) {
                            Some(m) => ((m * beta1)? + (&grad * (1.0 - beta1))?)?,
                            None => (&grad * (1.0 - beta1))?,
                        };
                        let v = match self.state.get(&vk) {
                            Some(v) => ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?,
                            None => (grad.sqr()? * (1.0 - beta2))?,
                        };
                        let bc1 = 1.0 - beta1.powi(t);
                        let bc2 = 1.0 - beta2.powi(t);
                        let denom = ((&v / bc2)?.sqrt()? + eps)?;
                        let upd = ((&m / bc1)? / denom)?;
                        let base = (p * (1.0 - lr * wd))?;
                        var.set(&(base - (upd * lr)?)?)?;
                        self.state.insert(mk, m.detach());
                        self.state.insert(vk, v.detach());
                    }
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (copies): the per-variable buffers and `steps` (a 0-d f64).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self
            .state
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.detach().copy()?)))
            .collect::<Result<_>>()?;
        out.insert(
            "steps".into(),
            Tensor::new(self.steps as f64, &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores [`Optimizer::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let steps = state
            .get("steps")
            .ok_or_else(|| candle_core::Error::Msg("optimizer state has no `steps`".into()))?;
        self.steps = steps.to_scalar::<f64>()? as u64;
        let mut device = candle_core::Device::Cpu;
        if let Some((_, v)) = self.groups.iter().flat_map(|g| g.vars.iter()).next() {
            device = v.device().clone();
        }
        self.state = state
            .iter()
            .filter(|(k, _)| k.as_str() != "steps")
            // Copies: the CPU update writes its buffers in place.
            .map(|(k, v)| Ok((k.clone(), v.detach().to_device(&device)?.copy()?)))
            .collect::<Result<_>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The fused CPU pass against the tensor-op path (what GPUs run), every SGD variant, with a
    /// save/restore of the state half way. The paths round differently (once per result here,
    /// after every tensor op there), so they agree to a few units of the stored type at the
    /// parameters' scale (values ~1; a difference near zero is cancellation, not error).
    #[test]
    fn fused_sgd_equals_the_tensor_op_path() -> Result<()> {
        let dev = Device::Cpu;
        let p0 = Tensor::randn(0f64, 1., 1000, &dev)?;
        let grads: Vec<Tensor> = (0..5)
            .map(|_| Tensor::randn(0f64, 1., 1000, &dev))
            .collect::<Result<_>>()?;
        for dtype in [DType::F64, DType::F32] {
            for (momentum, nesterov, decoupled, wd) in [
                (0.0, false, false, 0.0),
                (0.0, false, false, 1e-2),
                (0.9, false, false, 1e-2),
                (0.9, true, false, 1e-2),
                (0.9, false, true, 1e-2),
            ] {
                let rule = Rule::Sgd {
                    momentum,
                    nesterov,
                    decoupled,
                };
                let mut out = Vec::new();
                for fused in [true, false] {
                    let var = Var::from_tensor(&p0.to_dtype(dtype)?)?;
                    let groups = || {
                        vec![Group {
                            vars: vec![("p".into(), var.clone())],
                            weight_decay: wd,
                            lr_mult: 1.0,
                        }]
                    };
                    let mut opt = Optimizer::new(rule, groups())?;
                    opt.fused = fused;
                    for (k, g) in grads.iter().enumerate() {
                        if k == 2 {
                            let st = opt.state()?;
                            opt = Optimizer::new(rule, groups())?;
                            opt.fused = fused;
                            opt.load_state(&st)?;
                        }
                        let map = HashMap::from([("p".to_string(), g.to_dtype(dtype)?)]);
                        opt.step_with(&map, 0.1)?;
                    }
                    out.push(var.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?);
                }
                let ulp = if dtype == DType::F32 {
                    f64::from(f32::EPSILON)
                } else {
                    f64::EPSILON
                };
                // 5 steps of up to 6 roundings each on the op path.
                for (a, b) in out[0].iter().zip(&out[1]) {
                    assert!(
                        (a - b).abs() <= 16.0 * ulp * a.abs().max(1.0),
                        "{dtype:?} {rule:?} wd {wd}: fused {a} vs ops {b}"
                    );
                }
            }
        }
        Ok(())
    }
}
