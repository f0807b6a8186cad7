//! Criterion benchmarks of the fused op (forward + backward) at a few shapes, against the same
//! loss composed from candle-nn ops. The full-size comparison with PyTorch and the peak-memory
//! figures come from `cargo xtask bench-xent` (one process per measurement).

use candle_core::{DType, Device, Tensor, Var, D};
use candle_xent::CrossEntropyLoss;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn composed(x: &Tensor, y: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
    let nll = candle_nn::loss::nll(&logp, y)?;
    let smooth = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    (nll * (1.0 - eps))? + (smooth * eps)?
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("xent_fwd_bwd_f32_eps0.1");
    g.sample_size(10);
    for &(n, k) in &[(1024usize, 32000usize), (8192, 1000), (64, 196)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 2., (n, k), &dev).unwrap()).unwrap();
        let y = Tensor::arange(0u32, n as u32, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.0, 1.0)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let ce = CrossEntropyLoss::new().label_smoothing(0.1);
        g.throughput(Throughput::Bytes((n * k * 4) as u64));
        let id = format!("{n}x{k}");
        g.bench_function(BenchmarkId::new("fused_autograd", &id), |b| {
            b.iter(|| ce.forward(x.as_tensor(), &y).unwrap().backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("fused_forward_with_grad", &id), |b| {
            b.iter(|| ce.forward_with_grad(x.as_tensor(), &y).unwrap())
        });
        g.bench_function(BenchmarkId::new("composed_candle_nn", &id), |b| {
            b.iter(|| {
                composed(x.as_tensor(), &y, 0.1)
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
