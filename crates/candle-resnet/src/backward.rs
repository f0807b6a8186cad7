//! [`backward`]: candle's backward, with the weight gradients of the fused training segments
//! filed in the [`GradStore`] directly instead of through candle's accumulation.
//!
//! Candle's backward files every gradient it receives by adding it into a zero-filled tensor of
//! the input's shape (`zeros_like` + `add`), even when it is the only one. For a weight that is
//! two passes over the weight's size and one allocation per weight and step that do no
//! arithmetic of the model: ResNet-18's 11.7 M parameters are 45 MB in f32, ~5 % of a 32 px step
//! on 2 cores. Inside [`backward`], the convolution weights of the fused segments
//! ([`crate::ops`]'s residual blocks and stem, which train channels-last on the CPU) skip that:
//! their gradients are collected on the side and filed afterwards, added to whatever candle
//! filed for the same variable (a weight also used outside its block).
//!
//! The result is the [`GradStore`] of [`Tensor::backward`], gradient for gradient. The values
//! are the same except in the sign of a zero: candle's `+0.0 + g` turns a `-0.0` gradient
//! into `+0.0`, which no optimiser tells apart.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use std::cell::RefCell;

/// Weight gradients collected while [`backward`] runs on this thread; `None`: not collecting.
type Collected = Option<Vec<(Tensor, Tensor)>>;

thread_local! {
    static COLLECTED: RefCell<Collected> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the fused segments' weight gradients filed directly (see the module
/// documentation). Any graph is accepted; without fused segments this is [`Tensor::backward`].
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let varmap = VarMap::new();
/// let model = candle_resnet::resnet18(10, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
/// let images = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu)?;
/// let target = Tensor::new(&[3u32, 7], &Device::Cpu)?;
/// let loss = candle_nn::loss::cross_entropy(&model.forward_t(&images, true)?, &target)?;
/// let grads = candle_resnet::backward(&loss)?;
/// let w = varmap.data().lock().unwrap()["layer1.0.conv1.weight"].as_tensor().clone();
/// assert_eq!(grads.get(&w).map(|g| g.dims().to_vec()), Some(w.dims().to_vec()));
/// # Ok(()) }
/// ```
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    /// Puts back what was collecting before (nothing, unless called from inside a backward),
    /// also when candle's backward panics.
    struct Restore(Collected);
    impl Drop for Restore {
        fn drop(&mut self) {
            COLLECTED.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let restore = Restore(COLLECTED.with(|c| c.replace(Some(Vec::new()))));
    let grads = loss.backward();
    let collected = COLLECTED.with(|c| c.borrow_mut().take());
    drop(restore);
    let mut grads = grads?;
    for (weight, g) in collected.unwrap_or_default() {
        let g = match grads.remove(&weight) {
            Some(other) => (other + g)?,
            None => g,
        };
        grads.insert(&weight, g);
    }
    Ok(grads)
}

/// A fused segment's gradient `g` of `weight`: kept for [`backward`] to file when it is running
/// on this thread and `weight` is a variable (`None` back), else returned for candle to file.
pub(crate) fn hand_over(weight: &Tensor, g: Tensor) -> Option<Tensor> {
    if !weight.is_variable() {
        return Some(g);
    }
    COLLECTED.with(|c| match c.borrow_mut().as_mut() {
        Some(kept) => {
            kept.push((weight.clone(), g));
            None
        }
        None => Some(g),
    })
}
