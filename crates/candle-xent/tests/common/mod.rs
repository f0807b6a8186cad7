//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod fixtures;
pub mod precision;
pub mod reference;

use candle_core::{DType, Tensor};

/// Every element of `got` is within `rtol * |want| + atol` of `want`; NaN matches NaN and an
/// infinity matches the same infinity.
pub fn assert_close(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{what}[{i}]: got {g}, want NaN");
            continue;
        }
        if w.is_infinite() {
            assert_eq!(g, w, "{what}[{i}]");
            continue;
        }
        let err = (g - w).abs();
        let tol = rtol * w.abs() + atol;
        assert!(
            err <= tol,
            "{what}[{i}]: got {g}, want {w}, error {err:e} > tolerance {tol:e}"
        );
        if err / tol > worst.1 {
            worst = (i, err / tol);
        }
    }
}

/// `got` against `want` to `rtol` of each value plus `rtol` of the largest one: sums of many
/// terms taken in another order differ by rounding relative to the terms, not to the result.
pub fn assert_close_scaled(got: &Tensor, want: &Tensor, rtol: f64, what: &str) {
    let w = flat_f64(want);
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert_close(&flat_f64(got), &w, rtol, rtol * scale, what);
}

/// A tensor of any float dtype flattened to f64.
pub fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Relative tolerance matching the rounding of one value to `dtype` (plus accumulation slack).
pub fn rtol_for(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 1e-5,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
        _ => unreachable!(),
    }
}

pub fn eps_for(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => 9.77e-4,
        DType::BF16 => 7.8e-3,
        _ => unreachable!(),
    }
}
