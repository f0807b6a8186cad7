//! Published reference values, error contracts, finite differences and property tests against a
//! loss composed from plain candle ops.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_xent::{cross_entropy, CrossEntropyLoss, Reduction};
use common::{assert_close, flat_f64};
use proptest::prelude::*;

const SEED_X: [[f32; 5]; 3] = [
    [0., 0.2, 0.7, 0.1, 0.],
    [0., 0.9, 0.2, 0.2, 1.],
    [1., 0.2, 0.7, 0.9, 1.],
];

fn seed() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    (
        Tensor::new(&SEED_X, &dev).unwrap(),
        Tensor::new(&[2i64, 1, 0], &dev).unwrap(),
    )
}

fn scalar(t: &Tensor) -> f64 {
    flat_f64(t)[0]
}

/// Reference values computed with PyTorch 2.15 (`F.cross_entropy`) and the seed thread's
/// formulas.
#[test]
fn seed_thread_and_reference_table() {
    let (x, y) = seed();
    let at = |eps: f64| scalar(&cross_entropy(&x, &y, eps).unwrap());
    assert!((at(0.0) - 1.2702861).abs() < 1e-6);
    // The seed thread's Option 2: tensor(1.3883).
    assert!((at(0.3) - 1.3883).abs() < 5e-5);
    assert!((at(0.3) - 1.3882861).abs() < 1e-6);
    assert!((at(0.5) - 1.4669528).abs() < 1e-6);
    // The seed's Option 1 (eps / (C - 1) off-target mass, 1.4178 at 0.3) is a different
    // smoothing, equal to PyTorch's at eps * C / (C - 1).
    assert!((at(0.375) - 1.4178).abs() < 5e-5);

    let none = CrossEntropyLoss::new()
        .label_smoothing(0.3)
        .reduction(Reduction::None)
        .forward(&x, &y)
        .unwrap();
    assert_close(
        &flat_f64(&none),
        &[1.29693, 1.38617, 1.48176],
        0.0,
        5e-6,
        "none",
    );
    let sum = CrossEntropyLoss::new()
        .label_smoothing(0.3)
        .reduction(Reduction::Sum)
        .forward(&x, &y)
        .unwrap();
    assert!((scalar(&sum) - 4.1648584).abs() < 1e-6);

    let w = Tensor::new(&[1f32, 2., 3., 4., 5.], &Device::Cpu).unwrap();
    let wl = CrossEntropyLoss::new()
        .label_smoothing(0.3)
        .weight(w.clone());
    assert!((scalar(&wl.forward(&x, &y).unwrap()) - 1.5881652).abs() < 1e-6);
    let wn = wl
        .clone()
        .reduction(Reduction::None)
        .forward(&x, &y)
        .unwrap();
    assert_close(
        &flat_f64(&wn),
        &[3.89679, 3.20258, 2.42962],
        0.0,
        5e-6,
        "weighted none",
    );

    let yi = Tensor::new(&[2i64, -100, 0], &Device::Cpu).unwrap();
    assert!((scalar(&cross_entropy(&x, &yi, 0.3).unwrap()) - 1.3893466).abs() < 1e-6);
    assert!((scalar(&wl.forward(&x, &yi).unwrap()) - 1.5816029).abs() < 1e-6);

    let v = Var::from_tensor(&x).unwrap();
    let grads = cross_entropy(v.as_tensor(), &y, 0.3)
        .unwrap()
        .backward()
        .unwrap();
    let g0 = flat_f64(&grads.get(v.as_tensor()).unwrap().i(0).unwrap());
    let want = [0.032574, 0.044213, -0.147463, 0.038103, 0.032574];
    assert_close(&g0, &want, 0.0, 1e-6, "gradient row 0");
}

#[test]
fn matches_candle_nn_without_smoothing() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 3., (64, 1000), &dev).unwrap();
    let y = Tensor::arange(0u32, 64, &dev)
        .unwrap()
        .affine(13., 5.)
        .unwrap();
    let ours = scalar(&cross_entropy(&x, &y, 0.0).unwrap());
    let theirs = scalar(&candle_nn::loss::cross_entropy(&x, &y).unwrap());
    assert!(
        (ours - theirs).abs() < 1e-5 * theirs.abs(),
        "{ours} vs {theirs}"
    );
}

fn err_of(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_the_problem() {
    let dev = Device::Cpu;
    let (x, y) = seed();
    let ce = CrossEntropyLoss::new;

    let e = err_of(ce().forward(&x, &Tensor::new(&[2i64, 5, 0], &dev).unwrap()));
    assert!(
        e.contains("target class 5") && e.contains("[1]") && e.contains("5 classes"),
        "{e}"
    );
    let e = err_of(ce().forward(&x, &Tensor::new(&[2i64, 1, -1], &dev).unwrap()));
    assert!(e.contains("target class -1") && e.contains("[2]"), "{e}");
    // Position in a K-dim target is a full index.
    let xk = Tensor::zeros((2, 3, 2, 2), DType::F32, &dev).unwrap();
    let mut tk = vec![0u32; 8];
    tk[6] = 3;
    let tk = Tensor::from_vec(tk, (2, 2, 2), &dev).unwrap();
    let e = err_of(ce().forward(&xk, &tk));
    assert!(
        e.contains("target class 3") && e.contains("[1, 1, 0]"),
        "{e}"
    );

    for eps in [-0.1, 1.5, f64::NAN] {
        let e = err_of(ce().label_smoothing(eps).forward(&x, &y));
        assert!(e.contains("label_smoothing must be in [0, 1]"), "{e}");
        // Only a negative value earns the note on PyTorch ignoring negatives.
        assert_eq!(e.contains("negative"), eps < 0.0, "{e}");
    }
    // Float class indices: said so, not "probability target must have the input's shape".
    let yf = Tensor::new(&[2f32, 1., 0.], &dev).unwrap();
    let e = err_of(ce().forward(&x, &yf));
    assert!(e.contains("class indices must be integers"), "{e}");
    // (B, T, V) logits with (B, T) targets: the error points to class_dim.
    let lm = Tensor::zeros((2, 3, 7), DType::F32, &dev).unwrap();
    let e = err_of(ce().forward(&lm, &Tensor::zeros((2, 3), DType::U32, &dev).unwrap()));
    assert!(e.contains("class_dim(2)"), "{e}");
    assert!(ce()
        .class_dim(2)
        .forward(&lm, &Tensor::zeros((2, 3), DType::U32, &dev).unwrap())
        .is_ok());
    let e = err_of(ce().forward(&x, &Tensor::new(&[2i64, 1], &dev).unwrap()));
    assert!(e.contains("must have shape [3]"), "{e}");
    let e = err_of(ce().forward(&x.to_dtype(DType::U32).unwrap(), &y));
    assert!(e.contains("input must be f16, bf16, f32 or f64"), "{e}");
    let e = err_of(
        ce().weight(Tensor::ones(4, DType::F32, &dev).unwrap())
            .forward(&x, &y),
    );
    assert!(e.contains("weight must have shape (5,)"), "{e}");
    let e = err_of(
        ce().weight(Tensor::ones(5, DType::U32, &dev).unwrap())
            .forward(&x, &y),
    );
    assert!(e.contains("weight must be a float tensor"), "{e}");
    let soft = Tensor::ones((3, 5), DType::F32, &dev).unwrap();
    let e = err_of(ce().ignore_index(0).forward(&x, &soft));
    assert!(
        e.contains("ignore_index (0) is only supported with class-index targets"),
        "{e}"
    );
    let e = err_of(ce().forward(&x, &soft.to_dtype(DType::F64).unwrap()));
    assert!(e.contains("must have the input's dtype"), "{e}");
    let e = err_of(ce().forward(&x, &Tensor::ones((3, 4), DType::F32, &dev).unwrap()));
    assert!(e.contains("must have the input's shape"), "{e}");
    let empty = Tensor::zeros((3, 0), DType::F32, &dev).unwrap();
    let e = err_of(ce().forward(&empty, &y));
    assert!(
        e.contains("class dimension 1") && e.contains("is empty"),
        "{e}"
    );
    let e = err_of(ce().forward(&Tensor::new(1f32, &dev).unwrap(), &y));
    assert!(e.contains("at least one dimension"), "{e}");
    let e = err_of(ce().forward(&x, &y.to_dtype(DType::F32).unwrap().i(0).unwrap()));
    assert!(e.contains("probability target"), "{e}");
    let e = err_of(ce().class_dim(2).forward(&x, &y));
    assert!(e.contains("class_dim 2 is out of range"), "{e}");
}

#[test]
fn ignore_index_may_be_out_of_range_and_is_not_a_class() {
    let dev = Device::Cpu;
    let (x, _) = seed();
    // 255 (a segmentation "void" label) with u8 targets; a row with class 4 too.
    let y = Tensor::new(&[255u8, 4, 255], &dev).unwrap();
    let l = CrossEntropyLoss::new()
        .ignore_index(255)
        .forward(&x, &y)
        .unwrap();
    let only = cross_entropy(
        &x.i(1..2).unwrap(),
        &Tensor::new(&[4u8], &dev).unwrap(),
        0.0,
    )
    .unwrap();
    assert!((scalar(&l) - scalar(&only)).abs() < 1e-7);
}

#[test]
fn empty_batch_follows_pytorch() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((0, 5), DType::F32, &dev).unwrap();
    let y = Tensor::zeros(0, DType::I64, &dev).unwrap();
    assert!(scalar(&cross_entropy(&x, &y, 0.1).unwrap()).is_nan());
    let s = CrossEntropyLoss::new()
        .reduction(Reduction::Sum)
        .forward(&x, &y)
        .unwrap();
    assert_eq!(scalar(&s), 0.0);
    let n = CrossEntropyLoss::new()
        .reduction(Reduction::None)
        .forward(&x, &y)
        .unwrap();
    assert_eq!(n.dims(), &[0]);
}

#[test]
fn non_contiguous_input_is_handled() {
    let dev = Device::Cpu;
    let xt = Tensor::randn(0f32, 1., (7, 4), &dev).unwrap();
    let x = xt.t().unwrap(); // (4, 7), strided
    let y = Tensor::new(&[0u32, 6, 3, 2], &dev).unwrap();
    let a = scalar(&cross_entropy(&x, &y, 0.2).unwrap());
    let b = scalar(&cross_entropy(&x.contiguous().unwrap(), &y, 0.2).unwrap());
    assert_eq!(a, b);
}

#[test]
fn non_finite_logits_propagate() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[0f32, f32::NAN, 1.0], [0.0, 1.0, 2.0]], &dev).unwrap();
    let y = Tensor::new(&[0u32, 1], &dev).unwrap();
    let l = CrossEntropyLoss::new()
        .reduction(Reduction::None)
        .forward(&x, &y)
        .unwrap();
    let v = flat_f64(&l);
    assert!(v[0].is_nan() && v[1].is_finite());
    // A masked (-inf) logit is fine without smoothing, infinite with it (as in PyTorch).
    let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &dev).unwrap();
    let y = Tensor::new(&[2u32], &dev).unwrap();
    let plain = scalar(&cross_entropy(&x, &y, 0.0).unwrap());
    assert!((plain - (1.0 + (-1f64).exp()).ln()).abs() < 1e-6);
    assert_eq!(scalar(&cross_entropy(&x, &y, 0.1).unwrap()), f64::INFINITY);
}

/// A row whose first 1,100 logits are masked (-inf, more than one 1,024-element block of the CPU
/// kernel and more than one thread's share of a GPU row) still gives the loss and gradient of
/// its finite part, in every float dtype.
#[test]
fn leading_masked_logits_are_exact_zeros() {
    let dev = Device::Cpu;
    let masked = 1100;
    let finite = [0.5f64, -1.0, 2.0, 0.25];
    let mut row = vec![f64::NEG_INFINITY; masked];
    row.extend_from_slice(&finite);
    let y = masked + 2;
    let lse = finite.iter().map(|v| v.exp()).sum::<f64>().ln();
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let x = Tensor::new(row.as_slice(), &dev)
            .unwrap()
            .reshape((1, row.len()))
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let t = Tensor::new(&[y as u32], &dev).unwrap();
        let (loss, grad) = CrossEntropyLoss::new().forward_with_grad(&x, &t).unwrap();
        let tol = if dtype == DType::F64 { 1e-12 } else { 2e-2 };
        assert!((scalar(&loss) - (lse - 2.0)).abs() < tol, "{dtype:?} loss");
        let g = flat_f64(&grad);
        assert!(
            g[..masked].iter().all(|&v| v == 0.0),
            "{dtype:?} masked grad"
        );
        for (i, v) in finite.iter().enumerate() {
            let want = (v - lse).exp() - if i == 2 { 1.0 } else { 0.0 };
            assert!((g[masked + i] - want).abs() < tol, "{dtype:?} grad {i}");
        }
    }
}

/// Central finite differences of the f64 loss against the fused gradient.
#[test]
fn gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let configs: Vec<(Vec<usize>, bool, bool, Reduction)> = vec![
        (vec![4, 6], false, true, Reduction::Mean),
        (vec![3, 5, 4], true, true, Reduction::Sum),
        (vec![2, 4, 3, 2], true, false, Reduction::Mean),
        (vec![7], false, true, Reduction::None),
        (vec![4, 6], true, false, Reduction::None),
    ];
    for (i, (dims, soft, weighted, red)) in configs.into_iter().enumerate() {
        let c = if dims.len() == 1 { dims[0] } else { dims[1] };
        let x = Tensor::randn(0f64, 2., dims.as_slice(), &dev).unwrap();
        let mut tdims = dims.clone();
        tdims.remove(if dims.len() == 1 { 0 } else { 1 });
        let target = if soft {
            candle_nn::ops::softmax(
                &Tensor::randn(0f64, 1., dims.as_slice(), &dev).unwrap(),
                if dims.len() == 1 { 0 } else { 1 },
            )
            .unwrap()
        } else {
            let n: usize = tdims.iter().product();
            let v: Vec<i64> = (0..n)
                .map(|k| {
                    if k % 5 == 3 {
                        -100
                    } else {
                        ((k * 7 + i) % c) as i64
                    }
                })
                .collect();
            Tensor::from_vec(v, tdims.as_slice(), &dev).unwrap()
        };
        let mut ce = CrossEntropyLoss::new().label_smoothing(0.15).reduction(red);
        if weighted {
            ce = ce.weight(Tensor::rand(0.5f64, 2., c, &dev).unwrap());
        }
        let up = Tensor::randn(0f64, 1., ce.forward(&x, &target).unwrap().shape(), &dev).unwrap();
        let f = |x: &Tensor| {
            scalar(
                &(ce.forward(x, &target).unwrap() * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
        };
        let v = Var::from_tensor(&x).unwrap();
        let grads = (ce.forward(v.as_tensor(), &target).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = flat_f64(grads.get(v.as_tensor()).unwrap());
        let xs = flat_f64(&x);
        let h = 1e-6;
        let mut fd = Vec::with_capacity(xs.len());
        for k in 0..xs.len() {
            let mut p = xs.clone();
            p[k] += h;
            let mut m = xs.clone();
            m[k] -= h;
            let tp = Tensor::from_vec(p, dims.as_slice(), &dev).unwrap();
            let tm = Tensor::from_vec(m, dims.as_slice(), &dev).unwrap();
            fd.push((f(&tp) - f(&tm)) / (2.0 * h));
        }
        assert_close(&g, &fd, 1e-6, 1e-8, &format!("config {i}"));
    }
}

/// The loss written with plain candle ops in f64, as a user would compose it.
fn composed(
    x: &Tensor,
    y: &Tensor,
    w: Option<&Tensor>,
    eps: f64,
    ignore: i64,
    red: Reduction,
) -> Tensor {
    let dev = x.device();
    let x = x.to_dtype(DType::F64).unwrap();
    let (n, c) = x.dims2().unwrap();
    let logp = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
    let yv = y.to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap();
    let mask: Vec<f64> = yv
        .iter()
        .map(|&t| if t == ignore { 0. } else { 1. })
        .collect();
    let safe: Vec<u32> = yv
        .iter()
        .map(|&t| if t == ignore { 0 } else { t as u32 })
        .collect();
    let mask = Tensor::from_vec(mask, n, dev).unwrap();
    let safe = Tensor::from_vec(safe, (n, 1), dev).unwrap();
    let w = match w {
        Some(w) => w.to_dtype(DType::F64).unwrap(),
        None => Tensor::ones(c, DType::F64, dev).unwrap(),
    };
    let wy = w
        .index_select(&safe.squeeze(1).unwrap(), 0)
        .unwrap()
        .mul(&mask)
        .unwrap();
    let nll = logp
        .gather(&safe, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .neg()
        .unwrap()
        .mul(&wy)
        .unwrap();
    let smooth = logp
        .broadcast_mul(&w)
        .unwrap()
        .sum(1)
        .unwrap()
        .neg()
        .unwrap()
        .mul(&mask)
        .unwrap();
    let per = ((nll * (1.0 - eps)).unwrap() + (smooth * (eps / c as f64)).unwrap()).unwrap();
    match red {
        Reduction::None => per,
        Reduction::Sum => per.sum_all().unwrap(),
        Reduction::Mean => per.sum_all().unwrap().div(&wy.sum_all().unwrap()).unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn fused_equals_composed(
        n in 1usize..12,
        c in 1usize..70,
        eps in 0.0f64..=1.0,
        weighted in any::<bool>(),
        red in prop_oneof![Just(Reduction::None), Just(Reduction::Sum), Just(Reduction::Mean)],
        seed in any::<u64>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::F64)],
    ) {
        let dev = Device::Cpu;
        // A deterministic pseudo-random stream per case.
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let xs: Vec<f64> = (0..n * c).map(|_| (next() % 20001) as f64 / 1000.0 - 10.0).collect();
        let ys: Vec<i64> = (0..n).map(|_| { let r = next(); if r % 4 == 0 { -100 } else { (r / 4 % c as u64) as i64 } }).collect();
        let ws: Vec<f64> = (0..c).map(|_| 0.1 + (next() % 1000) as f64 / 250.0).collect();
        let x = Tensor::from_vec(xs, (n, c), &dev).unwrap().to_dtype(dtype).unwrap();
        let y = Tensor::from_vec(ys, n, &dev).unwrap();
        let w = Tensor::from_vec(ws, c, &dev).unwrap();
        let mut ce = CrossEntropyLoss::new().label_smoothing(eps).reduction(red);
        if weighted { ce = ce.weight(w.clone()); }
        let got = flat_f64(&ce.forward(&x, &y).unwrap());
        let want = flat_f64(&composed(&x, &y, weighted.then_some(&w), eps, -100, red));
        let rtol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
        assert_close(&got, &want, rtol, rtol, "fused vs composed");
    }
}

#[test]
fn every_dtype_backpropagates_into_a_var() {
    let dev = Device::Cpu;
    for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64] {
        let x = Var::from_tensor(
            &Tensor::randn(0f32, 1., (5, 9), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let y = Tensor::new(&[0u32, 8, 4, 4, 1], &dev).unwrap();
        let loss = cross_entropy(x.as_tensor(), &y, 0.1).unwrap();
        assert_eq!(loss.dtype(), dtype);
        let g = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        assert_eq!(g.dtype(), dtype);
        // Each row of softmax - smoothed one-hot sums to zero.
        let rows = flat_f64(&g.to_dtype(DType::F64).unwrap().sum(1).unwrap());
        assert_close(&rows, &[0.0; 5], 0.0, 2e-3, &format!("{dtype:?} row sums"));
        assert!(flat_f64(&g).iter().any(|v| v.abs() > 1e-3));
    }
}
