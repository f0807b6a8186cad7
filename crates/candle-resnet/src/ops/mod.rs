//! Training ops candle 0.11 lacks or runs slowly on the CPU, each a custom op with its CPU
//! kernel and backward side by side: convolution as im2col + GEMM ([`conv::conv2d`]), the
//! torchvision stem max-pool ([`maxpool::MaxPool2d`], with a tensor-op form for other devices),
//! train-mode batch norm (used by [`crate::BatchNorm2d`]), and ReLU with the residual add
//! ([`relu::relu`], [`relu::add_relu`]).

pub(crate) mod batchnorm;
pub mod conv;
pub mod maxpool;
pub mod relu;
mod storage;
