//! The CUDA kernel source on the host: wide rows in every reduction mode, unaligned rows, masked
//! logits, out-of-range targets and the strided (K-dim) kernels, against candle-xent's CPU op.

#[path = "../../candle-xent/tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor, WithDType};
use candle_xent::{CrossEntropyLoss, Reduction};
use common::{assert_close, flat_f64};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xent_kernel_emu::{BadTarget, Elem, Problem, Source, Targets, COL_LOSS, STATS};

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            // Box-Muller.
            let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            scale * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        })
        .collect()
}

/// Per-row loss and the gradient of the summed loss from the CPU op, for (outer, C, inner) data.
fn cpu_reference(p: &Problem, dims: &[usize], x: &Tensor, target: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let mut f = CrossEntropyLoss::new()
        .label_smoothing(p.smoothing)
        .ignore_index(p.ignore_index)
        .z_loss(p.z_loss);
    if let Some(c) = p.softcap {
        f = f.softcap(c);
    }
    if let Some(w) = &p.weight {
        f = f.weight(Tensor::new(w.as_slice(), &Device::Cpu).unwrap());
    }
    let x = x.reshape(dims).unwrap();
    let loss = f
        .clone()
        .reduction(Reduction::None)
        .forward(&x, target)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let (_, grad) = f
        .reduction(Reduction::Sum)
        .forward_with_grad(&x, target)
        .unwrap();
    (flat_f64(&loss), flat_f64(&grad))
}

struct Run {
    loss: Vec<f64>,
    grad: Vec<f64>,
}

/// Emulated forward (per-row loss, in the logits' dtype like `Reduction::None`) and backward of
/// the summed loss. `offset` shifts the logits in memory to break 16-byte alignment.
fn emulate<T: Elem>(p: &Problem, x64: &[f64], t: Targets<'_, T>, offset: usize) -> Run
where
    T::Acc: Into<f64>,
{
    let mut buf = vec![T::round_from(0.0); offset];
    buf.extend(x64.iter().map(|&v| T::round_from(v)));
    let x = &buf[offset..];
    let stats = p.forward(x, t).unwrap();
    let rows = p.rows();
    let loss = (0..rows)
        .map(|r| T::round_from(stats[r * STATS + COL_LOSS].into()).as_f64())
        .collect();
    let b = p.backward_stats(&stats, |_| T::acc(1.0));
    let grad = p.backward(x, t, &b).unwrap();
    Run {
        loss,
        grad: grad.iter().map(|v| v.as_f64()).collect(),
    }
}

fn tol(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-12, 1e-12),
        DType::F32 => (2e-5, 2e-6),
        DType::F16 => (2e-3, 2e-4),
        _ => (1e-2, 2e-3),
    }
}

fn check_rows<T: Elem + WithDType>(p: &Problem, seed: u64, u32_targets: bool)
where
    T::Acc: Into<f64>,
{
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (rows, c) = (p.rows(), p.classes);
    let x64 = randn(&mut rng, rows * c, 3.0);
    let y: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 5 == 3 {
                p.ignore_index
            } else {
                rng.random_range(0..c as i64)
            }
        })
        .collect();
    let x = Tensor::new(x64.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(T::DTYPE)
        .unwrap();
    let yt = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
    let (want_loss, want_grad) = cpu_reference(p, &[rows, c], &x, &yt);
    // The kernels see the same rounded logits as the CPU op.
    let xr = flat_f64(&x);
    let y32: Vec<u32> = y.iter().map(|&v| v as u32).collect();
    let (rtol, atol) = tol(T::DTYPE);
    let sources: &[Source] = if T::DTYPE == DType::F64 {
        &[Source::Cuda]
    } else {
        &[Source::Cuda, Source::Metal]
    };
    for (&source, offset) in sources.iter().flat_map(|s| [0, 1].map(move |o| (s, o))) {
        let mut p = p.clone();
        p.source = source;
        let p = &p;
        let run = if u32_targets {
            emulate::<T>(p, &xr, Targets::U32(&y32), offset)
        } else {
            emulate::<T>(p, &xr, Targets::I64(&y), offset)
        };
        let what = format!(
            "{source:?} {:?} C={c} group {:?} offset {offset}",
            T::DTYPE,
            p.group
        );
        assert_close(&run.loss, &want_loss, rtol, atol, &format!("{what} loss"));
        assert_close(&run.grad, &want_grad, rtol, atol, &format!("{what} grad"));
    }
}

#[test]
fn wide_rows_in_every_reduction_mode_and_alignment() {
    // C odd: every row starts at a different alignment; 3001 > one warp's 16-byte vectors.
    for (group, c) in [
        (None, 3001),
        (Some(32), 3001),
        (Some(1024), 3001),
        (None, 40_000),
    ] {
        let mut p = Problem::new(6, c, 1);
        p.smoothing = 0.1;
        p.ignore_index = 7;
        p.group = group;
        check_rows::<f32>(&p, 1, false);
        check_rows::<bf16>(&p, 2, true);
    }
    let mut p = Problem::new(5, 2049, 1);
    p.smoothing = 0.2;
    p.z_loss = 1e-3;
    p.softcap = Some(6.0);
    p.ignore_index = 5;
    p.weight = Some((0..2049).map(|i| 0.5 + (i % 7) as f64 / 7.0).collect());
    check_rows::<f16>(&p, 3, false);
    check_rows::<f64>(&p, 4, true);
    p.group = Some(512);
    check_rows::<f32>(&p, 5, false);
}

#[test]
fn strided_rows_with_soft_targets_and_weights() {
    let (outer, c, inner) = (3, 37, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x64 = randn(&mut rng, outer * c * inner, 2.0);
    // Probabilities along the class dim of a (outer, C, inner) array.
    let mut t64 = randn(&mut rng, outer * c * inner, 1.0)
        .into_iter()
        .map(f64::exp)
        .collect::<Vec<_>>();
    for n in 0..outer {
        for d in 0..inner {
            let s: f64 = (0..c).map(|k| t64[n * c * inner + k * inner + d]).sum();
            for k in 0..c {
                t64[n * c * inner + k * inner + d] /= s;
            }
        }
    }
    let mut p = Problem::new(outer, c, inner);
    p.smoothing = 0.3;
    p.weight = Some((0..c).map(|i| 1.0 + i as f64 / c as f64).collect());
    p.softcap = Some(3.0);
    let x = Tensor::new(x64.as_slice(), &Device::Cpu).unwrap();
    let t = Tensor::new(t64.as_slice(), &Device::Cpu)
        .unwrap()
        .reshape((outer, c, inner))
        .unwrap();
    let (want_loss, want_grad) = cpu_reference(&p, &[outer, c, inner], &x, &t);
    let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
    let t32: Vec<f32> = t64.iter().map(|&v| v as f32).collect();
    for source in [Source::Cuda, Source::Metal] {
        p.source = source;
        let stats = p.forward(&x32, Targets::Soft(&t32)).unwrap();
        let loss: Vec<f64> = (0..p.rows()).map(|r| stats[r * STATS] as f64).collect();
        assert_close(
            &loss,
            &want_loss,
            2e-5,
            2e-6,
            &format!("{source:?} strided soft loss"),
        );
        let b = p.backward_stats(&stats, |_| 1.0);
        let grad: Vec<f64> = p
            .backward(&x32, Targets::Soft(&t32), &b)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert_close(
            &grad,
            &want_grad,
            2e-5,
            2e-6,
            &format!("{source:?} strided soft grad"),
        );
    }
}

#[test]
fn leading_masked_logits_in_every_layout() {
    let masked = 1100;
    let finite = [0.5f64, -1.0, 2.0, 0.25];
    let mut row = vec![f64::NEG_INFINITY; masked];
    row.extend_from_slice(&finite);
    let c = row.len();
    let lse = finite.iter().map(|v| v.exp()).sum::<f64>().ln();
    let y = [(masked + 2) as i64];
    for (source, group) in [Source::Cuda, Source::Metal]
        .into_iter()
        .flat_map(|s| [Some(32), Some(256), None].map(move |g| (s, g)))
    {
        let mut p = Problem::new(1, c, 1);
        p.group = group;
        p.source = source;
        let r = emulate::<f32>(&p, &row, Targets::I64(&y), 0);
        assert!(
            (r.loss[0] - (lse - 2.0)).abs() < 1e-6,
            "{group:?}: {}",
            r.loss[0]
        );
        assert!(r.grad[..masked].iter().all(|&g| g == 0.0));
        assert!((r.grad[masked + 2] - ((2.0 - lse).exp() - 1.0)).abs() < 1e-6);
    }
    // Strided: the same row along the class dim of a (1, C, 2) array (both columns equal).
    let p = Problem::new(1, c, 2);
    let x2: Vec<f32> = row.iter().flat_map(|&v| [v as f32, v as f32]).collect();
    let stats = p.forward(&x2, Targets::I64(&[y[0], y[0]])).unwrap();
    assert!((stats[0] as f64 - (lse - 2.0)).abs() < 1e-6);
    assert_eq!(stats[0], stats[STATS]);
    // A NaN logit makes the row's loss NaN; it must not be skipped.
    let mut nan_row = row.clone();
    nan_row[masked + 1] = f64::NAN;
    for group in [Some(32), Some(256)] {
        let mut p = Problem::new(1, c, 1);
        p.group = group;
        let stats = p
            .forward(
                &nan_row.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                Targets::I64(&y),
            )
            .unwrap();
        assert!(stats[0].is_nan(), "{group:?}");
    }
}

#[test]
fn out_of_range_targets_report_the_first_bad_row() {
    let (rows, c) = (40, 10);
    let x = vec![0.5f32; rows * c];
    for (source, group) in [Source::Cuda, Source::Metal]
        .into_iter()
        .flat_map(|s| [Some(32), Some(128)].map(move |g| (s, g)))
    {
        let mut p = Problem::new(rows, c, 1);
        p.group = group;
        p.source = source;
        let mut y = vec![1i64; rows];
        y[33] = 10;
        y[17] = -3;
        y[25] = -100; // ignore_index: fine
        assert_eq!(
            p.forward(&x, Targets::I64(&y)),
            Err(BadTarget { row: 17 }),
            "{group:?}"
        );
        let b = vec![0f32; rows * STATS];
        assert_eq!(
            p.backward(&x, Targets::I64(&y), &b).unwrap_err(),
            BadTarget { row: 17 }
        );
        let y32: Vec<u32> = (0..rows as u32)
            .map(|r| if r == 39 { 11 } else { 0 })
            .collect();
        assert_eq!(
            p.forward(&x, Targets::U32(&y32)),
            Err(BadTarget { row: 39 })
        );
    }
    for source in [Source::Cuda, Source::Metal] {
        let mut p = Problem::new(2, c, 3);
        p.source = source;
        let y = [0i64, 1, 2, 3, 99, 5];
        assert_eq!(
            p.forward(&vec![0f32; 2 * c * 3], Targets::I64(&y)),
            Err(BadTarget { row: 4 }),
            "{source:?}"
        );
    }
}

/// The defects the CPU fuzzer found (issue 34), on both kernel sources, row and strided
/// layouts, against the f64 reference within the README's bound: many equal exponentials,
/// ascending (ramp) rows, smoothing near 1, probability mass on a -inf logit, a NaN weight of
/// an untargeted class, a soft-cap past the quotient's range.
#[test]
fn fuzz_found_cases_on_the_kernels() {
    use common::precision::check;
    use common::reference::Ce;
    struct K {
        name: &'static str,
        c: usize,
        x: Vec<f64>,
        y: i64,
        soft: Option<Vec<f64>>,
        eps: f64,
        weight: Option<Vec<f64>>,
        cap: Option<f64>,
    }
    let big = 65_536;
    let mut equal = vec![0.0; big];
    equal[12_345] = 12.0;
    let ramp: Vec<f64> = (0..4099).map(|i| i as f64 * 1e-3).collect();
    let small: Vec<f64> = (0..7).map(|i| ((i * 37 % 11) as f64) * 0.7 - 3.0).collect();
    let cases = vec![
        K {
            name: "equal exps",
            c: big,
            x: equal.clone(),
            y: 7,
            soft: None,
            eps: 0.1,
            weight: None,
            cap: None,
        },
        K {
            name: "equal exps, target on the peak",
            c: big,
            x: equal,
            y: 12_345,
            soft: None,
            eps: 0.0,
            weight: None,
            cap: None,
        },
        K {
            name: "ramp",
            c: 4099,
            x: ramp,
            y: 5,
            soft: None,
            eps: 0.1,
            weight: None,
            cap: None,
        },
        K {
            name: "eps 0.99999",
            c: 7,
            x: small.clone(),
            y: 3,
            soft: None,
            eps: 0.99999,
            weight: None,
            cap: None,
        },
        K {
            name: "soft mass on -inf, eps 0",
            c: 3,
            x: vec![f64::NEG_INFINITY, 0.0, 1.0],
            y: 0,
            soft: Some(vec![0.5, 0.5, 0.0]),
            eps: 0.0,
            weight: None,
            cap: None,
        },
        K {
            name: "zero soft target on -inf, eps 0.1",
            c: 3,
            x: vec![f64::NEG_INFINITY, 0.0, 1.0],
            y: 0,
            soft: Some(vec![0.0, 0.5, 0.5]),
            eps: 0.1,
            weight: None,
            cap: None,
        },
        K {
            name: "NaN weight of an untargeted class",
            c: 7,
            x: small.clone(),
            y: 2,
            soft: None,
            eps: 0.0,
            weight: Some(vec![1.0, f64::NAN, 2.0, 1.0, 1.0, 0.5, 1.0]),
            cap: None,
        },
        K {
            name: "soft-cap past the quotient's range",
            c: 3,
            x: vec![1e30, 0.0, 1.0],
            y: 1,
            soft: None,
            eps: 0.0,
            weight: None,
            cap: Some(1e-9),
        },
    ];
    for k in cases {
        // One row in both layouts: (1, C) rows and (1, C, 1) strided.
        for inner_layout in [false, true] {
            let mut p = Problem::new(1, k.c, 1);
            p.smoothing = k.eps;
            p.weight = k.weight.clone();
            p.softcap = k.cap;
            // inner = 1 always picks the row kernels; the strided ones are reached with a
            // second (padding) position along `inner`, which the reference sees too.
            let (inner, x64, soft64) = if inner_layout {
                let mut x = vec![0.0; k.c * 2];
                let mut t = vec![0.0; k.c * 2];
                for c in 0..k.c {
                    x[c * 2] = k.x[c];
                    x[c * 2 + 1] = k.x[c];
                    if let Some(s) = &k.soft {
                        t[c * 2] = s[c];
                        t[c * 2 + 1] = s[c];
                    }
                }
                (2, x, k.soft.as_ref().map(|_| t))
            } else {
                (1, k.x.clone(), k.soft.clone())
            };
            p.inner = inner;
            let ys = vec![k.y; inner];
            let r = Ce {
                x: &x64,
                outer: 1,
                classes: k.c,
                inner,
                hard: k.soft.is_none().then_some(&ys[..]),
                soft: soft64.as_deref(),
                eps: k.eps,
                weight: k.weight.as_deref(),
                ignore_index: -100,
                z_loss: 0.0,
                softcap: k.cap,
            }
            .eval();
            let x32: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
            let t32: Vec<f32> = soft64.iter().flatten().map(|&v| v as f32).collect();
            for source in [Source::Cuda, Source::Metal] {
                p.source = source;
                let t = match &soft64 {
                    Some(_) => Targets::Soft(&t32),
                    None => Targets::I64(&ys),
                };
                let stats = p.forward(&x32, t).unwrap();
                let loss: Vec<f64> = (0..p.rows()).map(|r| stats[r * STATS] as f64).collect();
                let what = format!("{source:?} {} strided {inner_layout}", k.name);
                let (ratio, w) =
                    check(DType::F32, &loss, &r.loss, |i| r.loss[i].abs() + 1.0, &what);
                assert!(ratio <= 1.0, "{ratio:.1}x the bound: {w}");
                let b = p.backward_stats(&stats, |_| 1.0);
                let grad: Vec<f64> = p
                    .backward(&x32, t, &b)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let scale = r
                    .terms
                    .iter()
                    .chain(&r.dloss)
                    .map(|v| v.abs())
                    .filter(|v| v.is_finite())
                    .fold(0f64, f64::max);
                let (ratio, w) = check(DType::F32, &grad, &r.dloss, |_| scale, &what);
                assert!(ratio <= 1.0, "{ratio:.1}x the bound: {w}");
            }
        }
    }
}
