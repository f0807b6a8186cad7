//! FusedLinearCrossEntropy against the materialised path (matmul, fused loss, autograd) in f64.

mod common;

use candle_core::{Device, Tensor, Var};
use candle_xent::{CrossEntropyLoss, FusedLinearCrossEntropy, Reduction};
use common::{assert_close, assert_close_scaled, flat_f64};

#[test]
fn chunked_equals_materialised_for_every_option() {
    let dev = Device::Cpu;
    let (n, h, v) = (13, 7, 23);
    let configs: Vec<(CrossEntropyLoss, bool, usize)> = vec![
        (CrossEntropyLoss::new(), false, 4),
        (CrossEntropyLoss::new().label_smoothing(0.1), true, 5),
        (
            CrossEntropyLoss::new()
                .label_smoothing(0.2)
                .reduction(Reduction::Sum),
            true,
            13,
        ),
        (
            CrossEntropyLoss::new()
                .weight(Tensor::rand(0.5f64, 2.0, v, &dev).unwrap())
                .label_smoothing(0.1),
            true,
            3,
        ),
        (
            CrossEntropyLoss::new()
                .z_loss(1e-2)
                .softcap(5.0)
                .label_smoothing(0.1),
            false,
            6,
        ),
        (
            CrossEntropyLoss::new().ignore_index(-1).z_loss(1e-3),
            true,
            1,
        ),
    ];
    for (i, (ce, with_bias, chunk)) in configs.into_iter().enumerate() {
        let hid = Var::from_tensor(&Tensor::randn(0f64, 1., (n, h), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 0.5, (v, h), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f64, 0.5, v, &dev).unwrap()).unwrap();
        let ys: Vec<i64> = (0..n)
            .map(|k| {
                if k % 5 == 2 {
                    -1
                } else {
                    ((k * 7 + i) % v) as i64
                }
            })
            .collect();
        let ys: Vec<i64> = ys
            .into_iter()
            .map(|y| if y == -1 && i != 5 { 0 } else { y })
            .collect();
        let y = Tensor::new(ys.as_slice(), &dev).unwrap();
        let bias = with_bias.then_some(b.as_tensor());
        let fused = FusedLinearCrossEntropy::new(ce.clone())
            .chunk(chunk)
            .forward(hid.as_tensor(), w.as_tensor(), bias, &y)
            .unwrap();
        let gf = fused.backward().unwrap();
        let mut logits = hid.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        if with_bias {
            logits = logits.broadcast_add(b.as_tensor()).unwrap();
        }
        let plain = ce.forward(&logits, &y).unwrap();
        let gp = plain.backward().unwrap();
        let what = format!("config {i}");
        assert_close(
            &flat_f64(&fused),
            &flat_f64(&plain),
            1e-12,
            1e-12,
            &format!("{what} loss"),
        );
        assert_close(
            &flat_f64(gf.get(hid.as_tensor()).unwrap()),
            &flat_f64(gp.get(hid.as_tensor()).unwrap()),
            1e-10,
            1e-12,
            &format!("{what} d hidden"),
        );
        assert_close(
            &flat_f64(gf.get(w.as_tensor()).unwrap()),
            &flat_f64(gp.get(w.as_tensor()).unwrap()),
            1e-10,
            1e-12,
            &format!("{what} d weight"),
        );
        if with_bias {
            assert_close(
                &flat_f64(gf.get(b.as_tensor()).unwrap()),
                &flat_f64(gp.get(b.as_tensor()).unwrap()),
                1e-10,
                1e-12,
                &format!("{what} d bias"),
            );
        }
        // Without autograd: the same numbers.
        let r = FusedLinearCrossEntropy::new(ce.clone())
            .chunk(chunk)
            .forward_with_grad(hid.as_tensor(), w.as_tensor(), bias, &y)
            .unwrap();
        assert_eq!(flat_f64(&r.loss), flat_f64(&fused), "{what}");
        assert_eq!(
            flat_f64(&r.grad_weight),
            flat_f64(gf.get(w.as_tensor()).unwrap())
        );
        assert_eq!(
            flat_f64(&r.grad_hidden),
            flat_f64(gf.get(hid.as_tensor()).unwrap())
        );
        assert_eq!(r.grad_bias.is_some(), with_bias);
        // An upstream gradient other than 1 scales every gradient.
        let scaled = (FusedLinearCrossEntropy::new(ce.clone())
            .chunk(chunk)
            .forward(hid.as_tensor(), w.as_tensor(), bias, &y)
            .unwrap()
            * 3.0)
            .unwrap();
        let gs = scaled.backward().unwrap();
        let want: Vec<f64> = flat_f64(gp.get(w.as_tensor()).unwrap())
            .iter()
            .map(|g| 3.0 * g)
            .collect();
        assert_close(
            &flat_f64(gs.get(w.as_tensor()).unwrap()),
            &want,
            1e-10,
            1e-12,
            &format!("{what} 3 x d weight"),
        );
    }
}

#[test]
fn bad_shapes_and_reduction_none_are_errors() {
    let dev = Device::Cpu;
    let h = Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((5, 2), candle_core::DType::F32, &dev).unwrap();
    let y = Tensor::zeros(4, candle_core::DType::U32, &dev).unwrap();
    let f = FusedLinearCrossEntropy::new(CrossEntropyLoss::new());
    assert!(f
        .forward(&h, &w, None, &y)
        .unwrap_err()
        .to_string()
        .contains("features"));
    let w = Tensor::zeros((5, 3), candle_core::DType::F32, &dev).unwrap();
    let none = FusedLinearCrossEntropy::new(CrossEntropyLoss::new().reduction(Reduction::None));
    assert!(none
        .forward(&h, &w, None, &y)
        .unwrap_err()
        .to_string()
        .contains("None"));
    let soft = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
    assert!(f
        .forward(&h, &w, None, &soft)
        .unwrap_err()
        .to_string()
        .contains("class indices"));
    let dim0 = FusedLinearCrossEntropy::new(CrossEntropyLoss::new().class_dim(0));
    assert!(dim0
        .forward(&h, &w, None, &y)
        .unwrap_err()
        .to_string()
        .contains("class_dim(0)"));
    assert!(
        FusedLinearCrossEntropy::new(CrossEntropyLoss::new().class_dim(1))
            .forward(&h, &w, None, &y)
            .is_ok()
    );
    let bad_y = Tensor::new(&[0u32, 9, 0, 0], &dev).unwrap();
    assert!(f
        .forward(&h, &w, None, &bad_y)
        .unwrap_err()
        .to_string()
        .contains("target class 9"));
}

/// Materialised reference in f64: loss and the gradients of hidden and weight through autograd.
fn materialised_f64(
    ce: &CrossEntropyLoss,
    hid: &Tensor,
    w: &Tensor,
    y: &Tensor,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let hv = Var::from_tensor(&hid.to_dtype(candle_core::DType::F64).unwrap()).unwrap();
    let wv = Var::from_tensor(&w.to_dtype(candle_core::DType::F64).unwrap()).unwrap();
    let loss = ce
        .forward(
            &hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap(),
            y,
        )
        .unwrap();
    let g = loss.backward().unwrap();
    (
        flat_f64(&loss),
        flat_f64(g.get(hv.as_tensor()).unwrap()),
        flat_f64(g.get(wv.as_tensor()).unwrap()),
    )
}

#[test]
fn long_chunks_split_the_weight_gradient_into_bands_that_cover_every_class() {
    // 4096 rows in one chunk: the weight-gradient GEMM runs over 64-class bands (200 = 3 x 64 + 8).
    let dev = Device::Cpu;
    let (n, h, v) = (4096, 3, 200);
    let ce = CrossEntropyLoss::new().label_smoothing(0.1);
    let ys: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
    let y = Tensor::new(ys.as_slice(), &dev).unwrap();
    for dtype in [candle_core::DType::F64, candle_core::DType::F32] {
        let hid = Tensor::randn(0f64, 1., (n, h), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::randn(0f64, 1., (v, h), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (loss, gh, gw) = materialised_f64(&ce, &hid, &w, &y);
        let tol = if dtype == candle_core::DType::F64 {
            1e-10
        } else {
            2e-5
        };
        for chunk in [4096, 1000] {
            let r = FusedLinearCrossEntropy::new(ce.clone())
                .chunk(chunk)
                .forward_with_grad(&hid, &w, None, &y)
                .unwrap();
            let what = format!("{dtype:?} chunk {chunk}");
            assert_close(&flat_f64(&r.loss), &loss, tol, tol, &format!("{what} loss"));
            assert_close(
                &flat_f64(&r.grad_hidden),
                &gh,
                tol,
                tol,
                &format!("{what} d hidden"),
            );
            assert_close(
                &flat_f64(&r.grad_weight),
                &gw,
                tol,
                tol,
                &format!("{what} d weight"),
            );
        }
    }
}

#[test]
fn strided_inputs_and_default_chunks_give_the_same_gradients() {
    // A transposed (non-contiguous) weight takes the tensor-op path, a transposed hidden is made
    // contiguous for the GEMMs; the default chunking (chunk_rows: 256 rows here, so 3 chunks).
    // Every combination equals the materialised loss and gradients.
    let dev = Device::Cpu;
    let (n, h, v) = (600, 5, 70);
    let ce = CrossEntropyLoss::new().label_smoothing(0.05).z_loss(1e-3);
    let ys: Vec<i64> = (0..n as i64).map(|i| (i * 11) % v as i64).collect();
    let y = Tensor::new(ys.as_slice(), &dev).unwrap();
    let hid = Tensor::randn(0f64, 1., (h, n), &dev).unwrap().t().unwrap();
    let w_t = Tensor::randn(0f64, 1., (h, v), &dev).unwrap();
    let w = w_t.t().unwrap();
    assert!(!w.is_contiguous() && !hid.is_contiguous());
    assert_eq!(FusedLinearCrossEntropy::chunk_rows(n, h, v), 256);
    let (loss, gh, gw) = materialised_f64(&ce, &hid, &w, &y);
    let strided = [false, true];
    for (hs, ws) in strided
        .iter()
        .flat_map(|&a| strided.iter().map(move |&b| (a, b)))
    {
        let hidden = if hs {
            hid.clone()
        } else {
            hid.contiguous().unwrap()
        };
        let weight = if ws {
            w.clone()
        } else {
            w.contiguous().unwrap()
        };
        let r = FusedLinearCrossEntropy::new(ce.clone())
            .forward_with_grad(&hidden, &weight, None, &y)
            .unwrap();
        let what = format!("strided hidden {hs}, strided weight {ws}");
        assert_close(&flat_f64(&r.loss), &loss, 1e-12, 1e-12, &what);
        assert_close(&flat_f64(&r.grad_hidden), &gh, 1e-10, 1e-12, &what);
        assert_close(&flat_f64(&r.grad_weight), &gw, 1e-10, 1e-12, &what);
    }
}

#[test]
fn half_precision_matches_f64_within_its_rounding() {
    // bf16 / f16 take the tensor-op gradient path (the one GPUs use): chunks of 16 rows, a bias,
    // ignored rows, every option. Reference: the materialised loss in f64 on the same (rounded)
    // values; the tolerance is a few roundings of the largest value.
    let dev = Device::Cpu;
    let (n, h, v) = (37, 24, 301);
    let ce = CrossEntropyLoss::new()
        .label_smoothing(0.1)
        .z_loss(1e-3)
        .softcap(20.0);
    let mut ys: Vec<i64> = (0..n as i64).map(|i| (i * 53 + 7) % v as i64).collect();
    ys[5] = -100;
    let y = Tensor::new(ys.as_slice(), &dev).unwrap();
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let rand = |shape: &[usize], std: f64| {
            Tensor::randn(0f64, std, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (hid, w, b) = (rand(&[n, h], 1.0), rand(&[v, h], 0.3), rand(&[v], 1.0));
        let vars = [&hid, &w, &b]
            .map(|t| Var::from_tensor(&t.to_dtype(candle_core::DType::F64).unwrap()).unwrap());
        let logits = vars[0]
            .as_tensor()
            .matmul(&vars[1].as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(vars[2].as_tensor())
            .unwrap();
        let want_loss = ce.forward(&logits, &y).unwrap();
        let want = want_loss.backward().unwrap();
        let r = FusedLinearCrossEntropy::new(ce.clone())
            .chunk(16)
            .forward_with_grad(&hid, &w, Some(&b), &y)
            .unwrap();
        assert_eq!(r.grad_weight.dtype(), dtype);
        let eps = common::eps_for(dtype);
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            assert_close_scaled(got, want, 4.0 * eps, &format!("{dtype:?} {what}"))
        };
        close(&r.loss, &want_loss, "loss");
        close(
            &r.grad_hidden,
            want.get(vars[0].as_tensor()).unwrap(),
            "d hidden",
        );
        close(
            &r.grad_weight,
            want.get(vars[1].as_tensor()).unwrap(),
            "d weight",
        );
        close(
            r.grad_bias.as_ref().unwrap(),
            want.get(vars[2].as_tensor()).unwrap(),
            "d bias",
        );
    }
}
