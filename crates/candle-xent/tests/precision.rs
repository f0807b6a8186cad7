//! Exactness at every logit scale (the `prec_*` and `lin_*` fixtures of
//! fixtures/gen_fixtures.py): loss and gradient within a few ulps of the accumulation type of
//! PyTorch's float64 result, for logits up to 1e30 (f16: 65504), ties at the maximum, one huge
//! logit among small ones and rows masked to -inf but one, through every entry point.
//!
//! The bound, per element: half an ulp of the output dtype (the final rounding) plus
//! [`ULPS`] units of the accumulation type (f32 for f16/bf16/f32, f64 for f64) times a scale:
//! `|loss| + rows` for a loss (a row's log-sum-exp is a logarithm of a sum in [1, C], so its own
//! error is absolute), the largest |gradient| of the tensor for a gradient. The other fixture
//! tests allow `|x| * eps` on top, the error of rounding the log-sum-exp; these do not.

mod common;

use candle_core::{DType, Tensor, Var};
use candle_xent::{CrossEntropyLoss, FusedLinearCrossEntropy};
use common::fixtures::{dtype_of, fixtures, inputs, Case};
use common::flat_f64;
use common::precision::{
    acc_eps, assert_all_within, check, check_grad, check_loss, rows_of, ulp, worse, ULPS,
};
use std::collections::HashMap;

fn precision_cases() -> (Vec<Case>, HashMap<String, Tensor>) {
    let (meta, t) = fixtures();
    let cases: Vec<Case> = meta.cases.into_iter().filter(|c| c.precision).collect();
    (cases, t)
}

#[test]
fn the_precision_set_covers_what_it_claims() {
    let (cases, _) = precision_cases();
    for dt in ["f16", "bf16", "f32", "f64"] {
        let of = |p: &str| {
            cases
                .iter()
                .filter(|c| c.dtype == dt && c.name.contains(p))
                .count()
        };
        assert!(
            of("_mean") >= 4 && of("_soft_") >= 4 && of("_kdim_") >= 4,
            "{dt}"
        );
        assert!(of("_z_") >= 4 && of("_cap_") >= 4 && of("_w_") >= 4, "{dt}");
        assert!(
            of("_ties_") >= 2 && of("_one_huge_") >= 2 && of("_masked_") >= 4,
            "{dt}"
        );
    }
    for big in [
        "prec_f32_1e+30",
        "prec_f64_1e+30",
        "prec_bf16_1e+30",
        "prec_f16_65504",
    ] {
        assert!(cases.iter().any(|c| c.name.starts_with(big)), "{big}");
    }
}

/// Loss and gradient through autograd, in place, and through `forward_with_grad`.
#[test]
fn exact_at_every_scale_through_every_entry_point() {
    let (cases, t) = precision_cases();
    assert!(cases.len() >= 100, "{} precision cases", cases.len());
    let mut report = Vec::new();
    for case in &cases {
        let dtype = dtype_of(&case.dtype);
        let inp = inputs(case, &t);
        let rows = rows_of(&case.reduction, &inp.input);
        // Autograd into a Var.
        let (loss, grad) =
            common::fixtures::run(&inp.loss_fn, &inp.input, &inp.target, &inp.upstream);
        let mut worst = check_loss(
            &case.name,
            dtype,
            &flat_f64(&loss),
            &inp.want_loss,
            rows,
            "autograd",
        );
        worst = worse(
            worst,
            check_grad(
                &case.name,
                dtype,
                &flat_f64(&grad),
                &inp.want_grad,
                "autograd",
            ),
        );
        // The gradient written over the logits.
        let var = Var::from_tensor(&inp.input).unwrap();
        let logits = (var.as_tensor() * 1.0).unwrap();
        let f = inp.loss_fn.clone().inplace_grad(true);
        let loss = f.forward(&logits, &inp.target).unwrap();
        let up = inp.upstream.to_dtype(loss.dtype()).unwrap();
        let g = (&loss * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        worst = worse(
            worst,
            check_loss(
                &case.name,
                dtype,
                &flat_f64(&loss),
                &inp.want_loss,
                rows,
                "in-place",
            ),
        );
        let gi = g.get(var.as_tensor()).unwrap();
        worst = worse(
            worst,
            check_grad(&case.name, dtype, &flat_f64(gi), &inp.want_grad, "in-place"),
        );
        // Without autograd (reduced losses only: the upstream gradient is 1).
        if case.reduction != "none" {
            let (l, gr) = inp
                .loss_fn
                .forward_with_grad(&inp.input, &inp.target)
                .unwrap();
            worst = worse(
                worst,
                check_loss(
                    &case.name,
                    dtype,
                    &flat_f64(&l),
                    &inp.want_loss,
                    rows,
                    "with_grad",
                ),
            );
            worst = worse(
                worst,
                check_grad(
                    &case.name,
                    dtype,
                    &flat_f64(&gr),
                    &inp.want_grad,
                    "with_grad",
                ),
            );
        }
        report.push((worst, case.name.clone()));
    }
    assert_all_within(&mut report, "cross-entropy");
}

/// FusedLinearCrossEntropy on exact logits up to ~1e31: the loss to the bound above, the
/// gradients to it plus the rounding a dot product of `n` terms may add (`n` ulps of the sum of
/// the terms' magnitudes, the standard bound), with |dlogits| bounded by its largest value.
#[test]
fn fused_linear_exact_at_every_scale() {
    let (meta, t) = fixtures();
    assert!(meta.linear_cases.len() >= 12);
    let mut report = Vec::new();
    for case in &meta.linear_cases {
        let dtype = dtype_of(&case.dtype);
        let get = |k: &str| t[&format!("{}.{k}", case.name)].clone();
        let (hid, w, b) = (get("hidden"), get("weight"), get("bias"));
        let y = get("target");
        let (n, hd) = hid.dims2().unwrap();
        let (v, _) = w.dims2().unwrap();
        let f = FusedLinearCrossEntropy::new(CrossEntropyLoss::new().label_smoothing(case.eps))
            .chunk(5);
        let r = f.forward_with_grad(&hid, &w, Some(&b), &y).unwrap();
        let want = flat_f64(&get("loss"));
        let what = |s: &str| format!("{} {s}", case.name);
        let mut worst = check(
            dtype,
            &flat_f64(&r.loss),
            &want,
            |_| want[0].abs() + 1.0,
            &what("loss"),
        );
        let gl = flat_f64(&get("dlogits"));
        let gmax = gl.iter().fold(0f64, |m, v| m.max(v.abs()));
        let (hv, wv) = (flat_f64(&hid), flat_f64(&w));
        // Products are summed in the hidden states' dtype at worst (half types), else in f32/f64:
        // `terms` of those ulps, expressed in units of the accumulation type's.
        let dot = |terms: usize| {
            let e = match dtype {
                DType::F16 | DType::BF16 => ulp(dtype, 1.0),
                _ => acc_eps(dtype),
            };
            1.0 + terms as f64 * e / (ULPS * acc_eps(dtype))
        };
        let colsum = |m: &[f64], rows: usize, j: usize| -> f64 {
            (0..rows).map(|r| m[r * hd + j].abs()).sum()
        };
        let (dv, dn) = (dot(v), dot(n));
        worst = worse(
            worst,
            check(
                dtype,
                &flat_f64(&r.grad_hidden),
                &flat_f64(&get("grad_hidden")),
                |i| dv * gmax * colsum(&wv, v, i % hd),
                &what("d hidden"),
            ),
        );
        worst = worse(
            worst,
            check(
                dtype,
                &flat_f64(&r.grad_weight),
                &flat_f64(&get("grad_weight")),
                |i| dn * gmax * colsum(&hv, n, i % hd),
                &what("d weight"),
            ),
        );
        worst = worse(
            worst,
            check(
                dtype,
                &flat_f64(r.grad_bias.as_ref().unwrap()),
                &flat_f64(&get("grad_bias")),
                |_| dn * gmax * n as f64,
                &what("d bias"),
            ),
        );
        report.push((worst, case.name.clone()));
    }
    assert_all_within(&mut report, "fused linear cross-entropy");
}
