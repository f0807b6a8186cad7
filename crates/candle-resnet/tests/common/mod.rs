//! Shared by the parity tests.
#![allow(dead_code)]

use candle_core::Tensor;

/// The largest `|got - want|` relative to the largest `|want|` (test helper for parity checks).
pub fn max_rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let g = got
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let w = want
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f64, f64::max)
}
