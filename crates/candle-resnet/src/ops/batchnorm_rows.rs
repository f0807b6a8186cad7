//! The batch-norm kernels for an `(M, C)` matrix (planes of one value: a 1x1 map, or a
//! channels-last tensor seen as `(N*H*W, C, 1, 1)`): every pass walks rows of `C` channels, the
//! per-channel work a vector across the row, where the plane-wise kernels would loop over planes
//! of a single value.
//!
//! Sums are f64 partials over fixed blocks of rows, added in order: the same bits for any thread
//! count. The element-wise passes compute exactly what the plane-wise ones do.

use super::{masked, Coef, Geo, TASK};
use candle_core::WithDType;
use rayon::prelude::*;

/// Rows per parallel task and per partial sum: about [`TASK`] values, fixed by the geometry.
fn rows_per_task(g: &Geo) -> usize {
    (TASK / g.c.max(1)).max(1)
}

/// Per-channel f64 sums over blocks of rows, each block's `2C` partials from `f(x row, dy row,
/// partials)`, then the blocks in order.
fn block_sums<T: WithDType>(
    g: &Geo,
    x: &[T],
    dy: &[T],
    f: impl Fn(&[T], &[T], &mut [f64]) + Sync + Send,
) -> Vec<f64> {
    let (c, per) = (g.c, rows_per_task(g) * g.c);
    let parts: Vec<Vec<f64>> = x
        .par_chunks(per)
        .zip(dy.par_chunks(per))
        .map(|(xs, ds)| {
            let mut acc = vec![0.0; 2 * c];
            for (xr, dr) in xs.chunks_exact(c).zip(ds.chunks_exact(c)) {
                f(xr, dr, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0; 2 * c];
    for p in &parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// `[mean..., biased var...]`, shifted sums as the plane-wise kernel (shift: the first row).
pub(super) fn stats<T: WithDType>(g: &Geo, x: &[T]) -> Vec<T> {
    let c = g.c;
    if c == 0 {
        return Vec::new();
    }
    let shift: Vec<f64> = match x.get(..c) {
        Some(first) => first.iter().map(|v| v.to_f64()).collect(),
        None => vec![0.0; c],
    };
    let tot = block_sums(g, x, x, |row, _, acc| {
        let (s, s2) = acc.split_at_mut(c);
        for (((&v, &sh), s), s2) in row.iter().zip(&shift).zip(s).zip(s2) {
            let d = v.to_f64() - sh;
            *s += d;
            *s2 += d * d;
        }
    });
    let m = g.m() as f64;
    let mean: Vec<f64> = tot[..c].iter().map(|s| s / m).collect();
    let var = tot[c..]
        .iter()
        .zip(&mean)
        .map(|(s2, mu)| T::from_f64((s2 / m - mu * mu).max(0.0)));
    shift
        .iter()
        .zip(&mean)
        .map(|(sh, mu)| T::from_f64(sh + mu))
        .chain(var)
        .collect()
}

/// `y = x * scale + shift` per channel (`coef`), then ReLU when `relu`.
pub(super) fn normalize<T: WithDType>(g: &Geo, relu: bool, x: &[T], coef: &[(T, T)]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    if g.c == 0 {
        return y;
    }
    let per = rows_per_task(g) * g.c;
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(out, xs)| {
            for (o, xr) in out.chunks_exact_mut(g.c).zip(xs.chunks_exact(g.c)) {
                let it = o.iter_mut().zip(xr).zip(coef);
                if relu {
                    it.for_each(|((o, &v), &(a, b))| *o = super::super::relu1(v * a + b));
                } else {
                    it.for_each(|((o, &v), &(a, b))| *o = v * a + b);
                }
            }
        });
    y
}

/// `[sum(dy * xhat)..., sum(dy)...]` per channel (dy masked by the fused ReLU).
pub(super) fn sums<T: WithDType>(
    g: &Geo,
    (eps, relu): (f64, bool),
    x: &[T],
    dy: &[T],
    pk: &[T],
) -> Vec<T> {
    let c = g.c;
    if c == 0 {
        return Vec::new();
    }
    let mean: Vec<f64> = pk[..c].iter().map(|v| v.to_f64()).collect();
    let aff: Vec<(T, T)> = (0..c)
        .map(|j| super::channel_affine(eps, pk[j], pk[c + j], pk[2 * c + j], pk[3 * c + j]))
        .collect();
    let tot = block_sums(g, x, dy, |xr, dr, acc| {
        let (sg, sb) = acc.split_at_mut(c);
        let it = xr.iter().zip(dr).zip(&mean).zip(&aff).zip(sg).zip(sb);
        for (((((&v, &d), &mu), &af), sg), sb) in it {
            let d = masked(relu, v, d, af).to_f64();
            *sg += d * (v.to_f64() - mu);
            *sb += d;
        }
    });
    (0..c)
        .map(|j| T::from_f64(tot[j] * (1.0 / (pk[c + j].to_f64() + eps).sqrt())))
        .chain(tot[c..].iter().map(|&v| T::from_f64(v)))
        .collect()
}

/// `dx = a * dy + cx * x + b` per channel (`coef`, with the forward's affine for the mask).
pub(super) fn input_grad<T: WithDType>(
    g: &Geo,
    relu: bool,
    x: &[T],
    dy: &[T],
    coef: &[(Coef, (T, T))],
) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    if g.c == 0 {
        return dx;
    }
    let per = rows_per_task(g) * g.c;
    dx.par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(dy.par_chunks(per)))
        .for_each(|(out, (xs, ds))| {
            let rows = out
                .chunks_exact_mut(g.c)
                .zip(xs.chunks_exact(g.c).zip(ds.chunks_exact(g.c)));
            for (o, (xr, dr)) in rows {
                for (((o, &v), &d), &((a, cx, b), af)) in o.iter_mut().zip(xr).zip(dr).zip(coef) {
                    let d = masked(relu, v, d, af);
                    *o = T::from_f64(a * d.to_f64() + cx * v.to_f64() + b);
                }
            }
        });
    dx
}
