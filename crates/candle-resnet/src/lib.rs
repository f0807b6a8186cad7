//! # candle-resnet
//!
//! Trainable torchvision ResNet-18/34/50 for [Candle](https://github.com/huggingface/candle):
//! torchvision's tensor names (load and export `model.safetensors` that timm and torchvision
//! read), a [`BatchNorm2d`] with PyTorch's train/eval semantics and running statistics, a
//! differentiable 3x3/stride-2 max-pool, and fused CPU kernels for the ops candle 0.11 cannot
//! train fast or at all ([`ops`]: convolution, max-pool, batch norm, each with its backward).
//! Parameter groups ([`params`]) split weights that take weight decay from batch-norm and bias
//! parameters, and backbone from head.
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let model = candle_resnet::resnet18(10, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! let images = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu)?;
//! let logits = model.forward_t(&images, true)?; // train mode: batch statistics
//! let target = Tensor::new(&[3u32, 7], &Device::Cpu)?;
//! let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
//! // `loss.backward()` works; this gives the same gradients without candle's zero-fill of each
//! // convolution weight's gradient (see `backward`).
//! let grads = candle_resnet::backward(&loss)?;
//! assert!(grads.get(varmap.data().lock().unwrap()["conv1.weight"].as_tensor()).is_some());
//! # Ok(()) }
//! ```

pub mod alloc;
pub mod backward;
pub mod batchnorm;
pub mod export;
pub mod init;
pub mod ops;
pub mod params;
pub mod resnet;
pub mod threads;

pub use backward::backward;
pub use batchnorm::BatchNorm2d;
pub use ops::maxpool::MaxPool2d;
pub use params::ParamGroups;
pub use resnet::{resnet18, resnet34, resnet50, Arch, ResNet};
