//! # candle-xent
//!
//! PyTorch-exact cross-entropy for [Candle](https://github.com/huggingface/candle), as one fused
//! custom op: label smoothing, class weights, `ignore_index`, `none`/`sum`/`mean` reductions,
//! K-dimensional inputs and probability ("soft") targets, in f16, bf16, f32 and f64, with a fused
//! backward.
//!
//! ```
//! use candle_core::{Device, Tensor, Var, DType};
//! use candle_xent::{cross_entropy, CrossEntropyLoss, Reduction};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let logits = Var::randn(0f32, 1., (8, 196), &dev)?;
//! let target = Tensor::new(&[3u32, 17, 0, 195, 42, 42, 7, 100], &dev)?;
//!
//! // One line instead of candle_nn::loss::cross_entropy(&logits, &target):
//! let loss = cross_entropy(&logits, &target, 0.1)?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(&logits).unwrap().dims(), &[8, 196]);
//!
//! // Every PyTorch option, builder style:
//! let weight = Tensor::ones(196, DType::F32, &dev)?;
//! let per_sample = CrossEntropyLoss::new()
//!     .label_smoothing(0.1)
//!     .weight(weight)
//!     .ignore_index(-100)
//!     .reduction(Reduction::None)
//!     .forward(&logits, &target)?;
//! assert_eq!(per_sample.dims(), &[8]);
//! # Ok(()) }
//! ```
//!
//! The loss, per element `i` with target class `y`, smoothing `eps`, class weights `w` (all 1
//! when absent) and `l = log_softmax(x_i)`, is
//! `(1 - eps) * (-w_y * l_y) + (eps / C) * (-sum_c w_c * l_c)`, zero for ignored elements; the
//! mean divides by `sum_i w_{y_i}` over non-ignored elements. Probability targets `t` use
//! `-sum_c w_c * ((1 - eps) * t_c + eps / C) * l_c` and the mean divides by the element count.
//!
//! Exactness, layout and error contracts are documented on [`CrossEntropyLoss`].

mod bce;
mod buffer;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
// The GPU kernels' launch geometry and parameter block: internal, public only for the host
// emulator of the kernel sources (crates/xent-kernel-emu), which enables `kernel-abi`.
#[cfg(feature = "kernel-abi")]
#[doc(hidden)]
pub mod launch;
#[cfg(not(feature = "kernel-abi"))]
#[allow(dead_code)] // the Metal parameter block is used by the metal feature and the emulator
mod launch;
mod linear;
mod loss;
mod math;
#[cfg(feature = "metal")]
mod metal;
mod op;
mod reduction;
mod spec;
mod sum;

pub use bce::BinaryCrossEntropyWithLogits;
pub use buffer::free_grad_buffer;
pub use linear::{FusedLinearCrossEntropy, LinearGrads};
pub use loss::{cross_entropy, CrossEntropyLoss, Smoothing};
pub use reduction::Reduction;
