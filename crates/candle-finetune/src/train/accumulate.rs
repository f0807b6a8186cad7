//! Gradient accumulation over micro-batches, detached from the autograd graph.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;

/// Sums the gradients of several micro-batches per variable name, for one optimizer step.
///
/// The sums are detached: a gradient returned by `backward` references the activations of its
/// micro-batch through candle's graph, so summing the raw tensors would keep every micro-batch's
/// activations alive until the step (and, in an optimizer buffer, beyond it).
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_finetune::train::GradAccumulator;
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
/// let mut acc = GradAccumulator::new(vec![("w".into(), w.clone())]);
/// for _ in 0..3 {
///     let loss = w.as_tensor().sqr()?.sum_all()?; // gradient 2w
///     acc.add(&loss.backward()?)?;
/// }
/// assert_eq!(acc.micro_batches(), 3);
/// let g = acc.take();
/// assert_eq!(g["w"].to_vec1::<f32>()?, vec![6., 12.]);
/// assert_eq!(acc.micro_batches(), 0);
/// # Ok(()) }
/// ```
pub struct GradAccumulator {
    vars: Vec<(String, Var)>,
    sums: HashMap<String, Tensor>,
    micro: usize,
}

impl GradAccumulator {
    /// An empty accumulator over `(name, variable)` pairs.
    pub fn new(vars: Vec<(String, Var)>) -> Self {
        Self {
            vars,
            sums: HashMap::new(),
            micro: 0,
        }
    }

    /// Adds one micro-batch's gradients (variables without one are left as they are).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (name, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.detach();
                let sum = match self.sums.remove(name) {
                    Some(s) => (s + g)?.detach(),
                    None => g,
                };
                self.sums.insert(name.clone(), sum);
            }
        }
        self.micro += 1;
        Ok(())
    }

    /// Micro-batches added since the last [`GradAccumulator::take`].
    pub fn micro_batches(&self) -> usize {
        self.micro
    }

    /// The summed gradients by variable name; the accumulator starts over.
    pub fn take(&mut self) -> HashMap<String, Tensor> {
        self.micro = 0;
        std::mem::take(&mut self.sums)
    }
}
