//! Times the convolution op of each distinct ResNet-18 layer shape (forward, and forward plus
//! input and weight gradients) and prints GFLOP/s, to see which passes fall short of the GEMM.
//! The stem's input is the image, which needs no gradient: as in the network, its backward is
//! the weight gradient alone.
//!
//! ```text
//! cargo run --release -p candle-resnet --example conv_layers -- [BATCH] [SIZE] [nchw|nhwc]
//! ```
//!
//! `nhwc` times the channels-last op (`conv2d_nhwc`) the network uses on the im2col + GEMM path.

use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn best<F: FnMut() -> anyhow::Result<()>>(mut f: F) -> anyhow::Result<f64> {
    let mut t = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        f()?;
        t = t.min(t0.elapsed().as_secs_f64());
    }
    Ok(t)
}

fn main() -> anyhow::Result<()> {
    candle_resnet::alloc::reuse_freed_memory();
    candle_resnet::threads::quiet_candle_pool();
    let a: Vec<String> = std::env::args().collect();
    let batch: usize = a.get(1).map_or(Ok(32), |s| s.parse())?;
    let size: usize = a.get(2).map_or(Ok(224), |s| s.parse())?;
    let nhwc = match a.get(3).map(String::as_str) {
        None | Some("nchw") => false,
        Some("nhwc") => true,
        Some(other) => anyhow::bail!("layout {other:?}: nchw or nhwc"),
    };
    let conv = |x: &Tensor, w: &Tensor, s: usize, p: usize| {
        if nhwc {
            candle_resnet::ops::conv::conv2d_nhwc(x, w, s, p)
        } else {
            candle_resnet::ops::conv::conv2d(x, w, s, p)
        }
    };
    let s1 = size.div_ceil(2);
    let s2 = s1.div_ceil(2);
    // (Ci, H, Co, k, stride, padding, how many in ResNet-18)
    let layers = [
        (3, size, 64, 7, 2, 3, 1),
        (64, s2, 64, 3, 1, 1, 4),
        (64, s2, 128, 3, 2, 1, 1),
        (128, s2.div_ceil(2), 128, 3, 1, 1, 3),
        (128, s2.div_ceil(2), 256, 3, 2, 1, 1),
        (256, s2.div_ceil(4), 256, 3, 1, 1, 3),
        (256, s2.div_ceil(4), 512, 3, 2, 1, 1),
        (512, s2.div_ceil(8), 512, 3, 1, 1, 3),
        (64, s2, 128, 1, 2, 0, 1),
    ];
    let dev = Device::Cpu;
    let (mut tf, mut tb) = (0.0, 0.0);
    println!("| Ci | H | Co | k | s | fwd GFLOP/s | fwd+bwd GFLOP/s | fwd+bwd s (x count) |");
    println!("|---|---|---|---|---|---|---|---|");
    for (ci, h, co, k, s, p, count) in layers {
        let dims = if nhwc {
            (batch, h, h, ci)
        } else {
            (batch, ci, h, h)
        };
        let image = Tensor::randn(0f32, 1., dims, &dev)?;
        let stem = ci == 3;
        // A Var's gradient is computed; the image's is not.
        let x = if stem {
            image
        } else {
            Var::from_tensor(&image)?.as_tensor().clone()
        };
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, ci, k, k), &dev)?)?;
        let oh = (h + 2 * p - k) / s + 1;
        let flop = 2.0 * (batch * co * oh * oh * ci * k * k) as f64;
        let passes = if stem { 2.0 } else { 3.0 };
        let f = best(|| {
            conv(&x, &w, s, p)?;
            Ok(())
        })?;
        let b = best(|| {
            let y = conv(&x, &w, s, p)?;
            y.sum_all()?.backward()?;
            Ok(())
        })?;
        tf += f * count as f64;
        tb += b * count as f64;
        println!(
            "| {ci} | {h} | {co} | {k} | {s} | {:.0} | {:.0} | {:.3} (x{count}) |",
            flop / f / 1e9,
            passes * flop / b / 1e9,
            b
        );
    }
    println!("total conv time per step: forward {tf:.3} s, forward+backward {tb:.3} s");
    Ok(())
}
