//! Times one ResNet training step (train-mode forward, label-smoothed loss, backward, SGD update)
//! on random images. Prints one JSON line. Used by `cargo xtask bench-resnet`. The last argument
//! picks the body's layout (default `nhwc`: channels-last where the convolutions allow it).
//!
//! ```text
//! cargo run --release -p candle-resnet --example resnet_step -- [BATCH] [SIZE] [STEPS] [ARCH] [nhwc|nchw]
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
        Some("ab") => return alternate(batch, size, steps, arch),
        Some(other) => anyhow::bail!("layout {other:?}: nhwc, nchw or ab"),
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
        opt.backward_step(&loss)?;
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

/// `ab`: both layouts on the same weights, steps alternating, medians side by side (slow drifts
/// of a shared machine's speed fall on both).
fn alternate(batch: usize, size: usize, steps: usize, arch: Arch) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let nhwc = arch.build(196, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let nchw = nhwc.clone().with_channels_last(false);
    let mut opt = SGD::new(ParamGroups::from_varmap(&vm).trainable(false), 0.01)?;
    let x = Tensor::randn(0f32, 1., (batch, 3, size, size), &dev)?;
    let y = Tensor::arange(0u32, batch as u32, &dev)?;
    let mut times = [Vec::new(), Vec::new()];
    for step in 0..=steps {
        for (i, model) in [&nchw, &nhwc].into_iter().enumerate() {
            let t0 = Instant::now();
            let logits = model.forward_t(&x, true)?;
            let loss = candle_xent::cross_entropy(&logits, &y, 0.1)?;
            opt.backward_step(&loss)?;
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
    println!(
        "{arch} batch {batch} size {size}: nchw {a:.3} s, nhwc {b:.3} s, nhwc/nchw time {:.3}",
        b / a
    );
    Ok(())
}
