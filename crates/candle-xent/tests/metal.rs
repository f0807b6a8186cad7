//! The Metal kernels on an Apple GPU (bodies in `common/gpu.rs`, shared with `tests/cuda.rs`):
//! every PyTorch fixture case but the f64 ones against the fixture values and the CPU op, wide
//! rows, K-dim, in-place gradients, error reporting, fused linear and binary cross-entropy.
//! Built only with `--features metal`.

mod common;
#[path = "common/gpu.rs"]
mod gpu;

use candle_core::Device;

fn dev() -> Device {
    Device::new_metal(0).expect("a Metal device (this test is built with --features metal)")
}

#[test]
fn fixtures_match_pytorch_and_the_cpu_op_on_metal() {
    gpu::fixtures_match_pytorch_and_the_cpu_op(&dev(), false);
}

#[test]
fn wide_rows_match_the_cpu_op_on_metal() {
    gpu::wide_rows_match_the_cpu_op(&dev(), false);
}

#[test]
fn kdim_soft_targets_and_u8_targets_on_metal() {
    gpu::kdim_soft_targets_and_u8_targets(&dev());
}

#[test]
fn out_of_range_targets_are_errors_on_metal() {
    gpu::out_of_range_targets_are_errors(&dev());
}

#[test]
fn fused_linear_and_binary_match_the_cpu_on_metal() {
    gpu::fused_linear_and_binary_match_the_cpu(&dev(), false);
}
