//! Loss values and gradients against PyTorch fixtures (tests/fixtures/gen_fixtures.py).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_xent::CrossEntropyLoss;
use common::fixtures::{dtype_of, fixtures, inputs, run, tolerances};
use common::{assert_close, flat_f64};

#[test]
fn fixtures_cover_what_the_issue_asks() {
    let (meta, _) = fixtures();
    let c = &meta.cases;
    assert!(c.len() >= 30, "{} cases", c.len());
    for dt in ["f16", "bf16", "f32", "f64"] {
        assert!(c.iter().any(|k| k.dtype == dt), "no {dt} case");
    }
    for red in ["none", "sum", "mean"] {
        assert!(c.iter().any(|k| k.reduction == red && k.soft));
        assert!(c
            .iter()
            .any(|k| k.reduction == red && !k.soft && k.weighted && k.eps > 0.0));
    }
    assert!(c.iter().any(|k| k.name.starts_with("kdim")));
    assert!(c.iter().any(|k| k.name.starts_with("unbatched")));
    assert!(c.iter().any(|k| k.name.starts_with("huge")));
    assert!(c.iter().any(|k| k.name.starts_with("all_ignored")));
    assert!(
        c.iter()
            .filter(|k| k.z_loss > 0.0 && k.softcap.is_some())
            .count()
            >= 3
    );
}

#[test]
fn loss_and_gradient_match_pytorch() {
    let (meta, t) = fixtures();
    // The precision set has its own, tighter check (tests/precision.rs).
    for case in meta.cases.iter().filter(|c| !c.precision) {
        let inp = inputs(case, &t);
        let (loss, grad) = run(&inp.loss_fn, &inp.input, &inp.target, &inp.upstream);
        let (rtol, atol) = tolerances(case, &inp.input);
        let name = &case.name;
        assert_close(
            &flat_f64(&loss),
            &inp.want_loss,
            rtol,
            atol,
            &format!("{name} loss"),
        );
        // Gradient elements are rounded one by one to the dtype.
        assert_close(
            &flat_f64(&grad),
            &inp.want_grad,
            rtol,
            atol,
            &format!("{name} grad"),
        );
    }
}

#[test]
fn forward_with_grad_matches_autograd_and_pytorch() {
    let (meta, t) = fixtures();
    for case in meta
        .cases
        .iter()
        .filter(|c| c.reduction != "none" && !c.precision)
    {
        let inp = inputs(case, &t);
        let (loss, grad) = inp
            .loss_fn
            .forward_with_grad(&inp.input, &inp.target)
            .unwrap();
        let (rtol, atol) = tolerances(case, &inp.input);
        let name = &case.name;
        assert_close(
            &flat_f64(&loss),
            &inp.want_loss,
            rtol,
            atol,
            &format!("{name} loss"),
        );
        assert_close(
            &flat_f64(&grad),
            &inp.want_grad,
            rtol,
            atol,
            &format!("{name} grad"),
        );
    }
}

#[test]
fn matches_pytorch_in_its_own_dtype() {
    // PyTorch run in f32/f64 (not the float64 reference): agreement to the dtype's precision.
    let (meta, t) = fixtures();
    let mut checked = 0;
    for case in meta.cases.iter().filter(|c| c.torch_native && !c.precision) {
        let dtype = dtype_of(&case.dtype);
        if !matches!(dtype, DType::F32 | DType::F64) {
            continue;
        }
        let inp = inputs(case, &t);
        let loss = inp.loss_fn.forward(&inp.input, &inp.target).unwrap();
        let want = flat_f64(&t[&format!("{}.torch_loss", case.name)]);
        let (rtol, atol) = tolerances(case, &inp.input);
        assert_close(&flat_f64(&loss), &want, rtol, atol, &case.name);
        checked += 1;
    }
    assert!(checked >= 30, "{checked}");
}

#[test]
fn f16_stays_finite_where_pytorch_overflows() {
    let (meta, t) = fixtures();
    let case = meta
        .cases
        .iter()
        .find(|c| c.name == "f16_c50000_mean")
        .unwrap();
    let torch_f16 = flat_f64(&t["f16_c50000_mean.torch_loss"]);
    assert!(
        torch_f16[0].is_infinite(),
        "PyTorch f16 overflows in this case"
    );
    let inp = inputs(case, &t);
    let loss = inp.loss_fn.forward(&inp.input, &inp.target).unwrap();
    assert_eq!(loss.dtype(), DType::F16);
    let got = flat_f64(&loss)[0];
    assert!(got.is_finite());
    assert_close(&[got], &inp.want_loss, 1e-3, 0.0, "f16 C=50000");
}

#[test]
fn class_dim_reads_btv_layout_in_place() {
    let (_, t) = fixtures();
    // Stored as (B, V, T) for PyTorch; (B, T, V) with class_dim(2) must give the same loss.
    let bvt = &t["class_dim2_mean.input"];
    let btv = bvt.permute((0, 2, 1)).unwrap().contiguous().unwrap();
    let target = &t["class_dim2_mean.target"];
    let want = flat_f64(&t["class_dim2_mean.loss"]);
    let want_grad = flat_f64(
        &t["class_dim2_mean.grad"]
            .permute((0, 2, 1))
            .unwrap()
            .contiguous()
            .unwrap(),
    );
    let loss_fn = CrossEntropyLoss::new().label_smoothing(0.1).class_dim(2);
    let up = Tensor::new(1f32, &Device::Cpu).unwrap();
    let (loss, grad) = run(&loss_fn, &btv, target, &up);
    assert_close(&flat_f64(&loss), &want, 1e-5, 1e-7, "class_dim 2 loss");
    assert_close(&flat_f64(&grad), &want_grad, 1e-5, 1e-7, "class_dim 2 grad");
}

#[test]
fn inplace_gradient_matches_pytorch() {
    let (meta, t) = fixtures();
    // The precision set has its own, tighter check (tests/precision.rs).
    for case in meta.cases.iter().filter(|c| !c.precision) {
        let inp = inputs(case, &t);
        let var = Var::from_tensor(&inp.input).unwrap();
        // A fresh buffer the loss may overwrite (the output of a layer, in a model).
        let logits = (var.as_tensor() * 1.0).unwrap();
        let loss_fn = inp.loss_fn.clone().inplace_grad(true);
        let loss = loss_fn.forward(&logits, &inp.target).unwrap();
        let total = (&loss * &inp.upstream.to_dtype(loss.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = total.backward().unwrap();
        let grad = grads.get(var.as_tensor()).unwrap();
        let (rtol, atol) = tolerances(case, &inp.input);
        assert_close(
            &flat_f64(&loss),
            &inp.want_loss,
            rtol,
            atol,
            &format!("{} loss", case.name),
        );
        assert_close(
            &flat_f64(grad),
            &inp.want_grad,
            rtol,
            atol,
            &format!("{} inplace grad", case.name),
        );
        // The logits buffer now holds the gradient.
        assert_close(
            &flat_f64(&logits),
            &inp.want_grad,
            rtol,
            atol,
            &format!("{} logits buffer", case.name),
        );
    }
}
