//! The batch-norm kernels for an `(M, C)` matrix (planes of one value: a 1x1 map, or a
//! channels-last tensor seen as `(N*H*W, C, 1, 1)`): every pass walks rows of `C` channels, the
//! per-channel work a vector across the row, where the plane-wise kernels would loop over planes
//! of a single value.
//!
//! Sums run in the tensor's dtype over runs of [`RUN`] rows (one vector add per row and channel
//! group, at the dtype's full SIMD width) and in f64 across runs and tasks, over fixed blocks of
//! rows added in order: the same bits for any thread count. The input gradient is evaluated in the
//! tensor's dtype from f64 coefficients (as PyTorch's f32 kernels do); the normalisation computes
//! exactly what the plane-wise kernel does.

use super::{masked, Coef, Geo, TASK};
use candle_core::WithDType;
use rayon::prelude::*;

/// Rows per parallel task and per partial sum: about [`TASK`] values, fixed by the geometry.
fn rows_per_task(g: &Geo) -> usize {
    (TASK / g.c.max(1)).max(1)
}

/// Rows summed in the tensor's dtype before their sums join the f64 totals: short enough that the
/// dtype's rounding stays far below the statistics' own noise (f32: at most 16 terms).
const RUN: usize = 16;

/// Per-channel sums over blocks of rows: `f(x row, dy row, run sums)` adds one row into `2C`
/// sums in `T`, which join f64 totals every [`RUN`] rows; the blocks' totals are then added in
/// order.
fn block_sums<T: WithDType>(
    g: &Geo,
    x: &[T],
    dy: &[T],
    f: impl Fn(&[T], &[T], &mut [T]) + Sync + Send,
) -> Vec<f64> {
    let (c, per) = (g.c, rows_per_task(g) * g.c);
    let parts: Vec<Vec<f64>> = x
        .par_chunks(per)
        .zip(dy.par_chunks(per))
        .map(|(xs, ds)| {
            let mut acc = vec![0.0; 2 * c];
            let mut run = vec![T::zero(); 2 * c];
            for (xr, dr) in xs.chunks(RUN * c).zip(ds.chunks(RUN * c)) {
                run.fill(T::zero());
                for (xr, dr) in xr.chunks_exact(c).zip(dr.chunks_exact(c)) {
                    f(xr, dr, &mut run);
                }
                for (a, r) in acc.iter_mut().zip(&run) {
                    *a += r.to_f64();
                }
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
    let shift: Vec<T> = match x.get(..c) {
        Some(first) => first.to_vec(),
        None => vec![T::zero(); c],
    };
    let tot = block_sums(g, x, x, |row, _, run| {
        let (s, s2) = run.split_at_mut(c);
        for (((&v, &sh), s), s2) in row.iter().zip(&shift).zip(s).zip(s2) {
            let d = v - sh;
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
        .map(|(sh, mu)| T::from_f64(sh.to_f64() + mu))
        .chain(var)
        .collect()
}

/// `y = x * scale + shift` per channel (`coef`), plus `residual` where given, then ReLU when
/// `relu`.
pub(super) fn normalize<T: WithDType>(
    g: &Geo,
    relu: bool,
    x: &[T],
    coef: &[(T, T)],
    residual: Option<&[T]>,
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    if g.c == 0 {
        return y;
    }
    let per = rows_per_task(g) * g.c;
    let tail = |v: T| if relu { super::super::relu1(v) } else { v };
    match residual {
        None => y
            .par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(out, xs)| {
                for (o, xr) in out.chunks_exact_mut(g.c).zip(xs.chunks_exact(g.c)) {
                    for ((o, &v), &(a, b)) in o.iter_mut().zip(xr).zip(coef) {
                        *o = tail(v * a + b);
                    }
                }
            }),
        Some(res) => y
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(res.par_chunks(per)))
            .for_each(|(out, (xs, rs))| {
                let rows = out.chunks_exact_mut(g.c).zip(xs.chunks_exact(g.c));
                for ((o, xr), rr) in rows.zip(rs.chunks_exact(g.c)) {
                    for (((o, &v), &(a, b)), &r) in o.iter_mut().zip(xr).zip(coef).zip(rr) {
                        *o = tail((v * a + b) + r);
                    }
                }
            }),
    }
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
    let mean = &pk[..c];
    let aff: Vec<(T, T)> = (0..c)
        .map(|j| super::channel_affine(eps, pk[j], pk[c + j], pk[2 * c + j], pk[3 * c + j]))
        .collect();
    let tot = block_sums(g, x, dy, |xr, dr, run| {
        let (sg, sb) = run.split_at_mut(c);
        let it = xr.iter().zip(dr).zip(mean).zip(&aff).zip(sg).zip(sb);
        for (((((&v, &d), &mu), &af), sg), sb) in it {
            let d = masked(relu, v, d, af);
            *sg += d * (v - mu);
            *sb += d;
        }
    });
    (0..c)
        .map(|j| T::from_f64(tot[j] * (1.0 / (pk[c + j].to_f64() + eps).sqrt())))
        .chain(tot[c..].iter().map(|&v| T::from_f64(v)))
        .collect()
}

/// `dx = a * dy + cx * x + b` per channel (`coef`, with the forward's affine for the mask),
/// evaluated in the tensor's dtype as `a * dy + cx * (x - mean) + (b + cx * mean)`: centred
/// first, so that a mean far above the spread does not cancel away the result's digits.
pub(super) fn input_grad<T: WithDType>(
    g: &Geo,
    relu: bool,
    x: &[T],
    dy: &[T],
    coef: &[(Coef, (T, T))],
    mean: &[T],
) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    if g.c == 0 {
        return dx;
    }
    let per = rows_per_task(g) * g.c;
    let abc: Vec<(T, T, T)> = coef
        .iter()
        .zip(mean)
        .map(|(&((a, cx, b), _), &mu)| {
            let b = b + cx * mu.to_f64();
            (T::from_f64(a), T::from_f64(cx), T::from_f64(b))
        })
        .collect();
    dx.par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(dy.par_chunks(per)))
        .for_each(|(out, (xs, ds))| {
            let rows = out
                .chunks_exact_mut(g.c)
                .zip(xs.chunks_exact(g.c).zip(ds.chunks_exact(g.c)));
            for (o, (xr, dr)) in rows {
                let it = o.iter_mut().zip(xr).zip(dr).zip(&abc).zip(coef).zip(mean);
                for (((((o, &v), &d), &(a, cx, b)), &(_, af)), &mu) in it {
                    *o = a * masked(relu, v, d, af) + cx * (v - mu) + b;
                }
            }
        });
    dx
}
