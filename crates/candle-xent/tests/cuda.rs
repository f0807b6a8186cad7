//! The CUDA kernels on a GPU (bodies in `common/gpu.rs`, shared with `tests/metal.rs`): every
//! PyTorch fixture case against the fixture values and the CPU op, wide rows, K-dim, in-place
//! gradients, error reporting, fused linear and binary cross-entropy.
//!
//! Built only with `--features cuda`; it needs a CUDA device (it fails without one: a `cuda`
//! build is a request to check the GPU path). `cargo xtask gpu-check` builds it here and runs it
//! on a GPU machine. With `XENT_CUDA_DUMP=FILE` it also writes every case's CUDA loss and
//! gradient to a safetensors file, which `scripts/gpu_check.py` compares with PyTorch on CUDA.

mod common;
#[path = "common/gpu.rs"]
mod gpu;

use candle_core::Device;

fn dev() -> Device {
    Device::new_cuda(0).expect("a CUDA device (this test is built with --features cuda)")
}

#[test]
fn fixtures_match_pytorch_and_the_cpu_op_on_cuda() {
    gpu::fixtures_match_pytorch_and_the_cpu_op(&dev(), true);
}

#[test]
fn wide_rows_match_the_cpu_op_on_cuda() {
    gpu::wide_rows_match_the_cpu_op(&dev(), true);
}

#[test]
fn kdim_soft_targets_and_u8_targets_on_cuda() {
    gpu::kdim_soft_targets_and_u8_targets(&dev());
}

#[test]
fn out_of_range_targets_are_errors_on_cuda() {
    gpu::out_of_range_targets_are_errors(&dev());
}

#[test]
fn fused_linear_and_binary_match_the_cpu_on_cuda() {
    gpu::fused_linear_and_binary_match_the_cpu(&dev(), true);
}
