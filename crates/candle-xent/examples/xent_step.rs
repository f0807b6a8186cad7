//! One training step's worth of cross-entropy (forward + backward) at a given shape, timed, with
//! the process's peak resident memory. Used by `cargo xtask bench-xent` (one process per mode, so
//! the peak RSS belongs to that mode alone).
//!
//! ```text
//! cargo run --release -p candle-xent --example xent_step -- 8192 32000 fused 3
//! ```
//! Modes: `fused` (CrossEntropyLoss + Tensor::backward), `fused-grad`
//! (CrossEntropyLoss::forward_with_grad, no autograd), `composed` (the same loss from candle-nn
//! ops: log_softmax, nll, mean, + backward), `accumulate` (candle's autograd accumulating one
//! logits-sized gradient: zeros, then an add; no loss), `bound` (the memory traffic the fused kernels cannot
//! avoid, measured on this machine: one read of the logits for the forward, then a copy of the
//! logits into a gradient-sized buffer for the backward's read and write; the sum of the two is
//! the time a kernel limited only by memory bandwidth would take).

use candle_core::{DType, Device, Tensor, Var, D};
use candle_xent::CrossEntropyLoss;
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn composed(x: &Tensor, y: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
    let nll = candle_nn::loss::nll(&logp, y)?;
    let smooth = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    (nll * (1.0 - eps))? + (smooth * eps)?
}

/// The median of `reps` timings of `f`, in milliseconds.
fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The memory-bandwidth bound of a fused forward + backward over `x`: a parallel read of every
/// element (the forward's one pass from memory) plus a parallel copy into a buffer of the same
/// size, faulted in beforehand (the backward reads the logits and writes the gradient).
fn bound(x: &Tensor, reps: usize) -> anyhow::Result<()> {
    use rayon::prelude::*;
    let src = x.flatten_all()?.to_vec1::<f32>()?;
    let mut dst = vec![1f32; src.len()];
    const CHUNK: usize = 1 << 16;
    let mut sink = 0u32;
    // An integer fold: it vectorises (a float max or sum in order would not), so the read is
    // limited by memory, not by the fold.
    let read_ms = median_ms(reps, || {
        sink ^= src
            .par_chunks(CHUNK)
            .map(|c| c.iter().fold(0u32, |a, &v| a ^ v.to_bits()))
            .reduce(|| 0, |a, b| a ^ b);
    });
    let copy_ms = median_ms(reps, || {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    });
    let gib = |ms: f64, bytes: usize| bytes as f64 / (1u64 << 30) as f64 / (ms / 1e3);
    let bytes = std::mem::size_of_val(src.as_slice());
    println!(
        "{{\"mode\":\"bound\",\"rows\":{},\"classes\":{},\"threads\":{},\"median_ms\":{:.1},\"read_ms\":{read_ms:.1},\"copy_ms\":{copy_ms:.1},\"read_gib_s\":{:.1},\"copy_gib_s\":{:.1},\"peak_rss_mib\":{:.0},\"sink\":{}}}",
        x.dim(0)?,
        x.dim(1)?,
        rayon::current_num_threads(),
        read_ms + copy_ms,
        gib(read_ms, bytes),
        gib(copy_ms, 2 * bytes),
        peak_rss_mib(),
        sink,
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(Ok(4096), |s| s.parse())?;
    let classes: usize = args.get(2).map_or(Ok(32000), |s| s.parse())?;
    let mode = args.get(3).map_or("fused", |s| s.as_str()).to_string();
    let reps: usize = args.get(4).map_or(Ok(3), |s| s.parse())?;
    let eps = 0.1;
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 2., (rows, classes), &dev)?)?;
    let y = Tensor::arange(0u32, rows as u32, &dev)?
        .affine(7919.0, 0.0)?
        .to_dtype(DType::F64)?
        .broadcast_div(&Tensor::new(classes as f64, &dev)?)?;
    // y mod C, computed with tensor ops so it is cheap for big N.
    let y = ((&y - y.floor()?)? * classes as f64)?
        .round()?
        .to_dtype(DType::U32)?;
    // Reset the peak-RSS counter so it covers the steps only (plus the inputs held).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let base_rss = peak_rss_mib();
    let ce = CrossEntropyLoss::new().label_smoothing(eps);
    if mode == "bound" {
        return bound(x.as_tensor(), reps);
    }
    let mut times = Vec::new();
    let mut last = 0f32;
    for _ in 0..reps {
        let t0 = Instant::now();
        let (loss, grad) = match mode.as_str() {
            "fused" => {
                let loss = ce.forward(x.as_tensor(), &y)?;
                let g = loss.backward()?;
                (loss, g.get(x.as_tensor()).cloned())
            }
            "forward" => (ce.forward(x.as_tensor(), &y)?, Some(x.as_tensor().clone())),
            "fused-grad" => {
                let (loss, g) = ce.forward_with_grad(x.as_tensor(), &y)?;
                (loss, Some(g))
            }
            // What candle's autograd adds to any op's gradient of a tensor it has not seen
            // yet (`GradStore::or_insert` + `add` in candle-core's backprop.rs): a zeroed
            // tensor of the logits' shape, then a sum into a third one. Timed alone here, on a
            // gradient-sized tensor made outside the clock.
            "accumulate" => {
                let g = x.as_tensor().affine(1.0, 0.0)?;
                let t0 = Instant::now();
                let acc = x.as_tensor().zeros_like()?.add(&g)?;
                let dt = t0.elapsed();
                drop((acc, g));
                times.push(dt.as_secs_f64() * 1e3);
                continue;
            }
            "composed" => {
                let loss = composed(x.as_tensor(), &y, eps)?;
                let g = loss.backward()?;
                (loss, g.get(x.as_tensor()).cloned())
            }
            other => anyhow::bail!("unknown mode {other}"),
        };
        let grad = grad.ok_or_else(|| anyhow::anyhow!("no gradient"))?;
        last = loss.to_scalar::<f32>()?;
        drop(grad);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"mode\":\"{mode}\",\"rows\":{rows},\"classes\":{classes},\"threads\":{},\"median_ms\":{:.1},\"min_ms\":{:.1},\"peak_rss_mib\":{:.0},\"inputs_rss_mib\":{:.0},\"loss\":{last}}}",
        rayon::current_num_threads(),
        times[times.len() / 2],
        times[0],
        peak_rss_mib(),
        base_rss,
    );
    Ok(())
}
