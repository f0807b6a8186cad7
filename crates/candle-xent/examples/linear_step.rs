//! One step of a language-model head: loss of `hidden (N, H) x weight (V, H)^T` with label
//! smoothing 0.1, forward + backward: fused and chunked through autograd (`fused`), fused without
//! autograd (`fused-grad`: `forward_with_grad`), or materialised (`materialised`: matmul, fused
//! loss, autograd). Prints the median time of REPS (default 3), the peak RSS, and the exact peak
//! of live heap bytes beyond the inputs and the gradients themselves (`extra_heap_peak_mib`,
//! counted by a wrapping global allocator), one process per mode.
//!
//! ```text
//! cargo run --release -p candle-xent --example linear_step -- N H V MODE [CHUNK] [REPS]
//! # CHUNK 0 or absent: FusedLinearCrossEntropy::chunk_rows
//! cargo run --release -p candle-xent --example linear_step -- 8192 1024 32000 fused-grad
//! ```

use candle_core::{Device, Tensor, Var};
use candle_xent::{CrossEntropyLoss, FusedLinearCrossEntropy};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts live heap bytes and their high-water mark: exact, unlike RSS, which also shows the
/// allocator's retained and fragmented pages.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static HIGH: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            HIGH.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a.get(1).map_or(Ok(2048), |s| s.parse())?;
    let h: usize = a.get(2).map_or(Ok(1024), |s| s.parse())?;
    let v: usize = a.get(3).map_or(Ok(32000), |s| s.parse())?;
    let mode = a.get(4).cloned().unwrap_or_else(|| "fused".into());
    // 0: the default, FusedLinearCrossEntropy::chunk_rows.
    let chunk: usize = a.get(5).map_or(Ok(0), |s| s.parse())?;
    let reps: usize = a.get(6).map_or(Ok(3), |s| s.parse())?;
    let dev = Device::Cpu;
    let hid = Var::randn(0f32, 1., (n, h), &dev)?;
    let w = Var::randn(0f32, 0.02, (v, h), &dev)?;
    let ys: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % v as u32).collect();
    let y = Tensor::new(ys.as_slice(), &dev)?;
    let ce = CrossEntropyLoss::new().label_smoothing(0.1);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let base = peak_rss_mib();
    let live_base = LIVE.load(Ordering::Relaxed);
    HIGH.store(live_base, Ordering::Relaxed);
    let mut times = Vec::new();
    let mut last = 0f32;
    let flce = |ce: &CrossEntropyLoss| match chunk {
        0 => FusedLinearCrossEntropy::new(ce.clone()),
        c => FusedLinearCrossEntropy::new(ce.clone()).chunk(c),
    };
    let chunk = match chunk {
        0 => FusedLinearCrossEntropy::chunk_rows(n, h, v),
        c => c,
    };
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        let loss = match mode.as_str() {
            "fused-grad" => {
                let r = flce(&ce).forward_with_grad(hid.as_tensor(), w.as_tensor(), None, &y)?;
                anyhow::ensure!(r.grad_weight.dims() == [v, h] && r.grad_hidden.dims() == [n, h]);
                r.loss
            }
            mode => {
                let loss = match mode {
                    "fused" => flce(&ce).forward(hid.as_tensor(), w.as_tensor(), None, &y)?,
                    "materialised" => {
                        ce.forward(&hid.as_tensor().matmul(&w.as_tensor().t()?)?, &y)?
                    }
                    m => anyhow::bail!("unknown mode {m}"),
                };
                let g = loss.backward()?;
                anyhow::ensure!(g.get(w.as_tensor()).is_some() && g.get(hid.as_tensor()).is_some());
                loss
            }
        };
        last = loss.to_scalar::<f32>()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let elems = |n: usize| mib(n * 4);
    let (logits_mib, grads_mib) = (elems(n * v), elems(n * h + v * h));
    let peak = peak_rss_mib();
    let heap_extra = mib(HIGH.load(Ordering::Relaxed) - live_base) - grads_mib;
    println!(
        "{{\"mode\":\"{mode}\",\"n\":{n},\"h\":{h},\"v\":{v},\"chunk\":{chunk},\"median_s\":{:.3},\"peak_rss_mib\":{peak:.0},\"inputs_rss_mib\":{base:.0},\"grads_mib\":{grads_mib:.0},\"extra_heap_peak_mib\":{heap_extra:.1},\"logits_mib\":{logits_mib:.0},\"loss\":{last}}}",
        times[times.len() / 2],
    );
    Ok(())
}
