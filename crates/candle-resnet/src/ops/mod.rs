//! Training ops candle 0.11 lacks or runs slowly on the CPU, each a custom op with its CPU
//! kernel and backward side by side: convolution as im2col + GEMM ([`conv::conv2d`]), the
//! torchvision stem max-pool ([`maxpool::MaxPool2d`], with a tensor-op form for other devices),
//! and train-mode batch norm (used by [`crate::BatchNorm2d`]).

pub(crate) mod batchnorm;
pub mod conv;
pub mod maxpool;
mod storage;
