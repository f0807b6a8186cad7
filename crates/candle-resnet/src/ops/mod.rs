//! Training ops candle 0.11 lacks or runs slowly on the CPU, each a custom op with its CPU
//! kernel and backward side by side: convolution as im2col + GEMM ([`conv::conv2d`]), the
//! torchvision stem max-pool ([`maxpool::MaxPool2d`], with a tensor-op form for other devices),
//! train-mode batch norm (used by [`crate::BatchNorm2d`]), and ReLU with the residual add
//! ([`relu::relu`], [`relu::add_relu`]). In training, [`crate::ResNet`] runs its stem and each
//! residual block as one graph node built from these kernels (the crate-private `block` module:
//! the same values, a backward without candle's per-op gradient accumulation).

pub(crate) mod batchnorm;
pub(crate) mod block;
pub mod conv;
pub mod maxpool;
pub mod relu;
mod storage;
mod taps;

// Helpers the batch-norm and ReLU kernels share, kept here so neither module depends on the
// other.

/// Whether the fused kernels apply (CPU, f32 or f64).
pub(crate) fn fused_applies(x: &candle_core::Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// `max(v, 0)` with NaN passing through, as PyTorch's ReLU (`NaN <= 0` is false).
#[inline]
pub(crate) fn relu1<T: candle_core::WithDType>(v: T) -> T {
    if v <= T::zero() {
        T::zero()
    } else {
        v
    }
}

/// Runs `f(index, chunk)` over `out.chunks_mut(chunk)`, in parallel when `parallel`.
pub(crate) fn chunks<T: candle_core::WithDType>(
    out: &mut [T],
    chunk: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        use rayon::prelude::*;
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            f(i, c);
        }
    }
}
