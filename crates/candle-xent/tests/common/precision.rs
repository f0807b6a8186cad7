//! The precision bound of the `prec_*` / `lin_*` fixtures (issue 17), shared by
//! tests/precision.rs (CPU), the GPU tests and the kernel emulator: per element, half an ulp of
//! the output dtype (the final rounding) plus [`ULPS`] units of the accumulation type times a
//! scale (`|loss| + rows` for a loss, the largest |gradient| of the tensor for a gradient).

use super::flat_f64;
use candle_core::{DType, Device, Tensor};

/// Units of the accumulation type allowed on top of the output rounding.
pub const ULPS: f64 = 8.0;

/// One unit of the accumulation type, as the bound counts it. The f64 cases' reference is
/// PyTorch in float64, rounded like our own f64 result (capped logits, log-sum-exp, ...): its
/// error, of the same size as ours, counts once more.
pub fn acc_eps(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 2.0 * f64::EPSILON,
        _ => f32::EPSILON as f64,
    }
}

/// One ulp of `v` in `dtype` (at least the dtype's smallest subnormal).
pub fn ulp(dtype: DType, v: f64) -> f64 {
    let (eps, tiny) = match dtype {
        DType::F64 => (f64::EPSILON, 4.9e-324),
        DType::F32 => (f32::EPSILON as f64, 1.4e-45),
        DType::F16 => (9.765625e-4, 5.960464477539063e-8),
        DType::BF16 => (7.8125e-3, 9.2e-41),
        _ => unreachable!(),
    };
    (eps * v.abs()).max(tiny)
}

/// `v` rounded to `dtype` (to compare infinities that only the rounding creates).
pub fn rounded(dtype: DType, v: &[f64]) -> Vec<f64> {
    flat_f64(
        &Tensor::new(v, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
}

/// The worst error of a check as a fraction of its bound, and where it was.
pub type Worst = (f64, String);

/// Checks `got` against the exact `want`; returns the worst error as a fraction of the bound.
/// `scale(i)` is the accumulation-type scale of element `i`.
pub fn check(
    dtype: DType,
    got: &[f64],
    want: &[f64],
    scale: impl Fn(usize) -> f64,
    what: &str,
) -> Worst {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let want_r = rounded(dtype, want);
    let mut worst = (0f64, String::new());
    for (i, ((&g, &w), &wr)) in got.iter().zip(want).zip(&want_r).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g}, want NaN");
            continue;
        }
        if wr.is_infinite() {
            assert_eq!(g, wr, "{what}[{i}]: want {w} (rounds to {wr})");
            continue;
        }
        let tol = 0.5 * ulp(dtype, w) + ULPS * acc_eps(dtype) * scale(i);
        let err = (g - w).abs();
        // NaN errors (a NaN where a number is wanted) count as infinitely wrong.
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else {
            err / tol
        };
        if ratio > worst.0 {
            worst = (
                ratio,
                format!(
                    "{what}[{i}]: got {g:e}, want {w:e}, error {err:e} = {:.1} ulps of the scale {:e}",
                    err / (acc_eps(dtype) * scale(i)),
                    scale(i)
                ),
            );
        }
    }
    worst
}

/// The worst of two results.
pub fn worse(a: Worst, b: Worst) -> Worst {
    if b.0 > a.0 {
        b
    } else {
        a
    }
}

/// Collects the cases over the bound and fails once with all of them.
pub fn assert_all_within(report: &mut [(Worst, String)], what: &str) {
    report.sort_by(|a, b| b.0 .0.total_cmp(&a.0 .0));
    let bad: Vec<String> = report
        .iter()
        .filter(|r| r.0 .0 > 1.0)
        .map(|r| format!("  {:.1}x the bound: {}", r.0 .0, r.0 .1))
        .collect();
    eprintln!(
        "{what}: {} cases, worst {:.2} of the bound ({})",
        report.len(),
        report[0].0 .0,
        report[0].0 .1
    );
    assert!(
        bad.is_empty(),
        "{what}: {} of {} cases over the bound:\n{}",
        bad.len(),
        report.len(),
        bad.join("\n")
    );
}

/// The loss bound's row term for a case of `reduction` on `input`: 1 for `none` and `mean` (a
/// mean of per-row errors is bounded by the largest), the row count for `sum` (it adds them).
pub fn rows_of(reduction: &str, input: &Tensor) -> f64 {
    let d = input.dims();
    let rows = if d.len() == 1 {
        1
    } else {
        d.iter().product::<usize>() / d[1]
    };
    match reduction {
        "none" | "mean" => 1.0,
        _ => rows as f64,
    }
}

/// A loss (`got`, flattened) against the exact `want`: scale `|loss| + rows`.
pub fn check_loss(
    name: &str,
    dtype: DType,
    got: &[f64],
    want: &[f64],
    rows: f64,
    what: &str,
) -> Worst {
    check(
        dtype,
        got,
        want,
        |i| want[i].abs() + rows,
        &format!("{name} {what} loss"),
    )
}

/// A gradient (`got`, flattened) against the exact `want`: scale the largest finite |want|.
pub fn check_grad(name: &str, dtype: DType, got: &[f64], want: &[f64], what: &str) -> Worst {
    let gmax = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()));
    check(dtype, got, want, |_| gmax, &format!("{name} {what} grad"))
}
