//! Times one ResNet training step (train-mode forward, label-smoothed loss, backward, SGD update)
//! on random images. Prints one JSON line. Used by `cargo xtask bench-resnet`. The last argument
//! picks the body's layout (default `nhwc`: channels-last where the convolutions allow it); `ab`
//! alternates the two layouts step by step, `backward` candle's `loss.backward()` and
//! `candle_resnet::backward` (channels-last), `direct` im2col + GEMM and the direct AVX-512
//! convolution kernels (`CANDLE_RESNET_DIRECT=0` or not), each printing the two medians.
//!
//! ```text
//! cargo run --release -p candle-resnet --example resnet_step -- [BATCH] [SIZE] [STEPS] [ARCH] [nhwc|nchw|ab|backward|direct]
//! ```

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use candle_resnet::params::ParamGroups;
use candle_resnet::resnet::Arch;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // As the xtask commands do; CANDLE_RESNET_SYSTEM_MALLOC=1 measures without it.
    if std::env::var_os("CANDLE_RESNET_SYSTEM_MALLOC").is_none() {
        candle_resnet::alloc::reuse_freed_memory();
    }
    candle_resnet::threads::quiet_candle_pool();
    let a: Vec<String> = std::env::args().collect();
    let batch: usize = a.get(1).map_or(Ok(32), |s| s.parse())?;
    let size: usize = a.get(2).map_or(Ok(224), |s| s.parse())?;
    let steps: usize = a.get(3).map_or(Ok(3), |s| s.parse())?;
    let arch: Arch = a
        .get(4)
        .map_or("resnet18", |s| s.as_str())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let channels_last = match a.get(5).map(String::as_str) {
        None | Some("nhwc") => true,
        Some("nchw") => false,
        Some("ab") => return alternate(batch, size, steps, arch, Ab::Layout),
        Some("backward") => return alternate(batch, size, steps, arch, Ab::Backward),
        Some("direct") => return alternate(batch, size, steps, arch, Ab::Direct),
        Some(other) => anyhow::bail!("layout {other:?}: nhwc, nchw, ab, backward or direct"),
    };
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model = arch
        .build(196, VarBuilder::from_varmap(&vm, DType::F32, &dev))?
        .with_channels_last(channels_last);
    let mut opt = SGD::new(ParamGroups::from_varmap(&vm).trainable(false), 0.01)?;
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
    let y = Tensor::arange(0u32, batch as u32, &dev)?;
    let layout = if model.runs_channels_last(&x) {
        "nhwc"
    } else {
        "nchw"
    };
    let mut times = Vec::new();
    for step in 0..=steps {
        let t0 = Instant::now();
        let logits = model.forward_t(&x, true)?;
        let loss = candle_xent::cross_entropy(&logits, &y, 0.1)?;
        opt.step(&candle_resnet::backward(&loss)?)?;
        let dt = t0.elapsed().as_secs_f64();
        if step > 0 {
            times.push(dt); // step 0 is a warm-up
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    // The process's highest resident set (VmHWM), comparable with PyTorch's ru_maxrss.
    let peak_mib = candle_resnet::alloc::resident_mib().map_or(0.0, |(_, peak)| peak);
    println!(
        "{{\"impl\":\"candle\",\"arch\":\"{arch}\",\"batch\":{batch},\"size\":{size},\"threads\":{},\"median_step_s\":{med:.3},\"images_per_s\":{:.2},\"peak_rss_mib\":{peak_mib:.0},\"conv\":\"{}\",\"layout\":\"{layout}\"}}",
        candle_core::utils::get_num_threads(),
        batch as f64 / med,
        candle_resnet::ops::conv::Backend::Auto.describe()
    );
    Ok(())
}

/// Two variants of the step on the same weights, alternating step by step so that slow drifts
/// of a shared machine's speed fall on both; prints their medians. `Ab::Layout`: `(N, C, H, W)`
/// then channels-last; `Ab::Backward`: candle's `loss.backward()` then `candle_resnet::backward`
/// (both channels-last).
#[derive(Clone, Copy, PartialEq)]
enum Ab {
    Layout,
    Backward,
    Direct,
}

fn alternate(batch: usize, size: usize, steps: usize, arch: Arch, ab: Ab) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let nhwc = arch.build(196, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let first = nhwc.clone().with_channels_last(ab != Ab::Layout);
    let mut opt = SGD::new(ParamGroups::from_varmap(&vm).trainable(false), 0.01)?;
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
    let y = Tensor::arange(0u32, batch as u32, &dev)?;
    let mut times = [Vec::new(), Vec::new()];
    for step in 0..=steps {
        for (i, model) in [&first, &nhwc].into_iter().enumerate() {
            if ab == Ab::Direct {
                // Variant 0: im2col + GEMM for every pass; variant 1: the direct kernels where they run.
                match i {
                    0 => std::env::set_var("CANDLE_RESNET_DIRECT", "0"),
                    _ => std::env::remove_var("CANDLE_RESNET_DIRECT"),
                }
            }
            let t0 = Instant::now();
            let logits = model.forward_t(&x, true)?;
            let loss = candle_xent::cross_entropy(&logits, &y, 0.1)?;
            let grads = if ab == Ab::Direct || ab == Ab::Backward && i == 1 {
                candle_resnet::backward(&loss)?
            } else {
                loss.backward()?
            };
            opt.step(&grads)?;
            if step > 0 {
                times[i].push(t0.elapsed().as_secs_f64());
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (med(&mut times[0]), med(&mut times[1]));
    let (na, nb) = match ab {
        Ab::Layout => ("nchw", "nhwc"),
        Ab::Backward => ("loss.backward()", "candle_resnet::backward"),
        Ab::Direct => ("im2col + GEMM", "direct"),
    };
    println!(
        "{arch} batch {batch} size {size}: {na} {a:.4} s, {nb} {b:.4} s, time ratio {:.3}",
        b / a
    );
    Ok(())
}
