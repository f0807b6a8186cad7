//! Forward + backward time and peak device memory of the fused loss on CUDA.
//!
//! ```text
//! cargo run --release -p candle-xent --features cuda --example xent_cuda_bench -- \
//!     [ROWSxCLASSES,...] [DTYPE,...] [ITERS]
//! ```
//!
//! Defaults: `16384x32768,16384x131072`, `f32,bf16`, 20 timed iterations after 3 warm-ups;
//! label smoothing 0.1, mean reduction. Prints one JSON object per (shape, dtype, mode):
//! `fused` is `forward_with_grad` (loss and gradient, no autograd), `autograd` is a `Var` +
//! `forward` + `backward` (candle adds its own gradient accumulation). `extra_peak_bytes` is the
//! device memory pool's high-water mark during one call minus what was in use before it (the
//! logits and targets), read from the driver's `USED_MEM_HIGH` pool attribute.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{DType, Device, Tensor, Var};
use candle_xent::CrossEntropyLoss;
use std::time::Instant;

/// Used bytes of the device's default memory pool: (current, high-water mark).
fn pool_usage() -> (u64, u64) {
    // SAFETY: plain driver queries on the current context's device; the out-params are valid.
    unsafe {
        let mut dev = 0;
        let mut pool = std::ptr::null_mut();
        assert_eq!(sys::cuCtxGetDevice(&mut dev), sys::CUresult::CUDA_SUCCESS);
        assert_eq!(
            sys::cuDeviceGetDefaultMemPool(&mut pool, dev),
            sys::CUresult::CUDA_SUCCESS
        );
        let mut cur = 0u64;
        let mut high = 0u64;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
            (&mut cur as *mut u64).cast(),
        );
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut high as *mut u64).cast(),
        );
        (cur, high)
    }
}

/// Resets the pool's high-water mark to the current use.
fn reset_high() {
    // SAFETY: as in `pool_usage`; setting USED_MEM_HIGH to 0 resets it.
    unsafe {
        let mut dev = 0;
        let mut pool = std::ptr::null_mut();
        sys::cuCtxGetDevice(&mut dev);
        sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
        let mut zero = 0u64;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        );
    }
}

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let shapes: Vec<(usize, usize)> = args
        .get(1)
        .map_or("16384x32768,16384x131072", |s| s.as_str())
        .split(',')
        .map(|s| {
            let (r, c) = s.split_once('x').expect("shape ROWSxCLASSES");
            (r.parse().unwrap(), c.parse().unwrap())
        })
        .collect();
    let dtypes: Vec<DType> = args
        .get(2)
        .map_or("f32,bf16", |s| s.as_str())
        .split(',')
        .map(|s| match s {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => panic!("dtype {other}"),
        })
        .collect();
    let iters: usize = args.get(3).map_or(20, |s| s.parse().unwrap());
    let dev = Device::new_cuda(0)?;
    let loss_fn = CrossEntropyLoss::new().label_smoothing(0.1);
    for &(rows, classes) in &shapes {
        for &dtype in &dtypes {
            let x = Tensor::randn(0f32, 2.0, (rows, classes), &dev)?.to_dtype(dtype)?;
            let y = Tensor::rand(0f32, classes as f32, rows, &dev)?
                .floor()?
                .clamp(0f32, (classes - 1) as f32)?
                .to_dtype(DType::U32)?;
            dev.synchronize()?;
            for mode in ["fused", "autograd"] {
                let step = |x: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
                    if mode == "fused" {
                        loss_fn.forward_with_grad(x, &y)
                    } else {
                        let v = Var::from_tensor(x)?;
                        let loss = loss_fn.forward(v.as_tensor(), &y)?;
                        let g = loss.backward()?;
                        let grad = g.get(v.as_tensor()).expect("gradient").clone();
                        Ok((loss, grad))
                    }
                };
                for _ in 0..3 {
                    step(&x)?;
                }
                dev.synchronize()?;
                let (before, _) = pool_usage();
                reset_high();
                let kept = step(&x)?;
                dev.synchronize()?;
                let (_, high) = pool_usage();
                drop(kept);
                let t0 = Instant::now();
                let mut last = None;
                for _ in 0..iters {
                    last = Some(step(&x)?);
                }
                dev.synchronize()?;
                let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
                let loss = last.unwrap().0.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let elem = dtype.size_in_bytes();
                let logits = (rows * classes * elem) as u64;
                println!(
                    "{{\"impl\": \"candle-xent\", \"mode\": \"{mode}\", \"rows\": {rows}, \
                     \"classes\": {classes}, \"dtype\": \"{dtype:?}\", \"ms\": {ms:.4}, \
                     \"extra_peak_bytes\": {}, \"logits_bytes\": {logits}, \"loss\": {loss}}}",
                    high.saturating_sub(before)
                );
            }
        }
    }
    Ok(())
}
