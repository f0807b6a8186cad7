//! # candle-finetune
//!
//! Fine-tune ImageNet ResNets ([`candle_resnet`]) from the Hugging Face Hub on an
//! image-classification dataset with Candle: data ([`data`]), the training loop and optimizers
//! ([`train`]), evaluation ([`eval`]), Hub transport ([`hub`]), pretrained weights and fine-tuned
//! models loaded back ([`pretrained`]), the model folder's `config.json` ([`config`]) and card
//! ([`card`]), plots ([`plot`]) and publishing ([`publish`]).
//!
//! ```
//! use candle_core::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = candle_resnet::resnet::resnet18(196, vb)?;
//! let images = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu)?;
//! let logits = model.forward_t(&images, true)?;
//! let target = Tensor::new(&[3u32, 150], &Device::Cpu)?;
//! let loss = candle_xent::cross_entropy(&logits, &target, 0.1)?;
//! let grads = loss.backward()?;
//! # Ok(()) }
//! ```

pub mod ablation;
pub mod card;
pub mod config;
pub mod data;
pub mod eval;
pub mod files;
pub mod hub;
pub mod plot;
pub mod pretrained;
pub mod publish;
pub mod recipe;
pub mod smoke;
pub mod train;

/// The trainable ResNet this crate fine-tunes (re-exported for convenience).
pub use candle_resnet;
