//! # candle-finetune
//!
//! Fine-tune ImageNet ResNets from the Hugging Face Hub with Candle: a trainable ResNet with
//! torchvision's names ([`resnet`]), weights from the Hub or a file ([`hub`]), parameter groups
//! for optimizers ([`params`]) and a PyTorch-loadable export ([`export`]).
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = candle_finetune::resnet::resnet18(196, vb)?;
//! let images = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu)?;
//! let logits = model.forward_t(&images, true)?;
//! let target = Tensor::new(&[3u32, 150], &Device::Cpu)?;
//! let loss = candle_xent::cross_entropy(&logits, &target, 0.1)?;
//! let grads = loss.backward()?;
//! # Ok(()) }
//! ```

pub mod batchnorm;
mod batchnorm_op;
pub mod card;
pub mod conv;
pub mod data;
pub mod eval;
pub mod export;
pub mod hub;
pub mod maxpool;
pub mod params;
pub mod plot;
pub mod publish;
pub mod resnet;
pub mod smoke;
mod storage;
pub mod train;
