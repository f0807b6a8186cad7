//! The three passes of a channels-last convolution (`x (N, H, W, Ci)`, `y (N, OH, OW, Co)`) as
//! im2col + GEMM with the pixels as the GEMM's rows.
//!
//! With the channels innermost, a kernel row `ky` of one output pixel reads `kw * Ci` values that
//! lie next to each other in the input (a 3x3 tap of a 64-channel map: 192 floats), so im2col and
//! col2im are a handful of block copies per pixel however small the map is, and a group of images
//! is already one matrix (`cnt * P` rows): no regrouping on either side of the GEMM. The GEMM's
//! operands are then all row-major with the reduction innermost on the im2col side, the layout in
//! which the gemm crate runs fastest (on an Ice Lake Xeon, layer1 of a 224 px ResNet-18:
//! 150-170 GFLOP/s on one core against 110-135 for the channels-first product).
//!
//! - forward: `Y (cnt*P, Co) = col (cnt*P, K) x W^T (K, Co)`, `K = kh * kw * Ci` in
//!   `(ky, kx, ci)` order, the weight rearranged from `(Co, Ci, kh, kw)` once per pass;
//! - input gradient: `dcol (cnt*P, K) = dY (cnt*P, Co) x W (Co, K)`, then col2im;
//! - weight gradient: `dW (Co, K) = sum dY^T (Co, cnt*P) x col (cnt*P, K)` over a fixed
//!   partition of the batch, then back to `(Co, Ci, kh, kw)`.
//!
//! Grouping, threading and scratch buffers are those of the channels-first path (see the parent
//! module), so the results are bit-identical for any thread count here too.

use super::{for_each_group, gemm_into, gemm_view_into, sized, split, Geo, Scratch, View};
use crate::ops::chunks;
use candle_core::WithDType;
use rayon::prelude::*;

/// `w (Co, Ci, kh, kw)` as the `(Co, K)` matrix of the passes, `K` in `(ky, kx, ci)` order: per
/// output channel, a `(Ci, taps)` block transposed to `(taps, Ci)` (a few kilobytes, in cache).
/// The input gradient's right-hand side.
pub(super) fn weight_cok<T: WithDType>(g: &Geo, w: &[T]) -> Vec<T> {
    let (taps, k) = (g.kh * g.kw, g.k());
    let mut out = vec![T::zero(); g.co * k];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
        let src = &w[o * k..][..k];
        for (t, dst) in row.chunks_exact_mut(g.ci).enumerate() {
            for (c, d) in dst.iter_mut().enumerate() {
                *d = src[c * taps + t];
            }
        }
    });
    out
}

/// `w (Co, Ci, kh, kw)` as the `(K, Co)` matrix `W^T` of the forward, row-major, `K` in
/// `(ky, kx, ci)` order.
pub(super) fn weight_kco<T: WithDType>(g: &Geo, w: &[T]) -> Vec<T> {
    let (taps, k, co) = (g.kh * g.kw, g.k(), g.co);
    let mut out = vec![T::zero(); k * co];
    if co == 0 {
        return out;
    }
    out.par_chunks_mut(co).enumerate().for_each(|(r, row)| {
        let (t, c) = (r / g.ci, r % g.ci);
        for (o, d) in row.iter_mut().enumerate() {
            *d = w[o * k + c * taps + t];
        }
    });
    out
}

/// For output position `o` along one axis, the kernel offsets `k` whose source `o * stride + k -
/// padding` lies in `0..len`, as `(first k, last k + 1, source of the first k)`; `(0, 0, 0)` when none.
#[inline]
fn taps_inside(
    o: usize,
    stride: usize,
    padding: usize,
    kernel: usize,
    len: usize,
) -> (usize, usize, usize) {
    let start = (o * stride) as isize - padding as isize;
    let k0 = (-start).clamp(0, kernel as isize) as usize;
    let k1 = (len as isize - start).clamp(k0 as isize, kernel as isize) as usize;
    if k0 == k1 {
        // No tap reads inside (padding wider than the kernel's reach): nothing to copy, and
        // `start` may lie past the end.
        return (0, 0, 0);
    }
    (k0, k1, (start + k0 as isize) as usize)
}

/// The im2col matrix of `cnt` channels-last images: `cnt*P` rows of `K` values, row `(i, oy, ox)`
/// holding kernel row `ky` as `kw * Ci` values copied in one block (zeros where the taps read
/// padding). Rows are independent: filled in parallel when `parallel`.
fn im2col<T: WithDType>(g: &Geo, imgs: &[T], col: &mut [T], parallel: bool) {
    let (k, ci) = (g.k(), g.ci);
    let run = g.kw * ci;
    // Rows of one output row of pixels per task: enough work to amortise the task.
    chunks(col, g.ow * k, parallel, |r, rows| {
        let (i, oy) = (r / g.oh, r % g.oh);
        let img = &imgs[i * g.in_len()..][..g.in_len()];
        let (ky0, ky1, iy0) = taps_inside(oy, g.stride, g.padding, g.kh, g.h);
        for (ox, row) in rows.chunks_exact_mut(k).enumerate() {
            let (kx0, kx1, ix0) = taps_inside(ox, g.stride, g.padding, g.kw, g.w);
            row[..ky0 * run].fill(T::zero());
            row[ky1 * run..].fill(T::zero());
            for ky in ky0..ky1 {
                let seg = &mut row[ky * run..][..run];
                let src = &img[((iy0 + ky - ky0) * g.w + ix0) * ci..][..(kx1 - kx0) * ci];
                seg[..kx0 * ci].fill(T::zero());
                seg[kx0 * ci..kx1 * ci].copy_from_slice(src);
                seg[kx1 * ci..].fill(T::zero());
            }
        }
    });
}

/// Adds an im2col-shaped gradient (`cnt*P x K`) back into `cnt` channels-last image gradients
/// (`dx`, zero on entry), one image per task (in parallel when `parallel`), pixels and taps in a
/// fixed order.
fn col2im<T: WithDType>(g: &Geo, col: &[T], dx: &mut [T], parallel: bool) {
    let (p, k, ci) = (g.p(), g.k(), g.ci);
    let run = g.kw * ci;
    chunks(dx, g.in_len(), parallel, |i, img| {
        for (po, row) in col[i * p * k..][..p * k].chunks_exact(k).enumerate() {
            let (oy, ox) = (po / g.ow, po % g.ow);
            let (ky0, ky1, iy0) = taps_inside(oy, g.stride, g.padding, g.kh, g.h);
            let (kx0, kx1, ix0) = taps_inside(ox, g.stride, g.padding, g.kw, g.w);
            for ky in ky0..ky1 {
                let src = &row[ky * run + kx0 * ci..][..(kx1 - kx0) * ci];
                let dst = &mut img[((iy0 + ky - ky0) * g.w + ix0) * ci..][..(kx1 - kx0) * ci];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d += v;
                }
            }
        }
    });
}

/// The GEMM's left-hand side for images `first..first + cnt`: their im2col matrix, or the images
/// themselves for a pointwise convolution (no copy).
fn columns<'a, T: WithDType>(
    g: &Geo,
    x: &'a [T],
    (first, cnt): (usize, usize),
    col: &'a mut Vec<T>,
    parallel: bool,
) -> &'a [T] {
    let imgs = &x[first * g.in_len()..(first + cnt) * g.in_len()];
    if g.pointwise() {
        return imgs;
    }
    let col = sized(col, cnt * g.p() * g.k());
    im2col(g, imgs, col, parallel);
    col
}

/// `y (N, OH, OW, Co)` from `x (N, H, W, Ci)` and the `(K, Co)` weight matrix `wkc` at `wv`
/// ([`weight_kco`]'s matrix, or a single tap's `(Co, Ci)` block read transposed).
pub(super) fn forward<T: WithDType>(g: &Geo, x: &[T], wkc: &[T], wv: View) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let mut y = vec![T::zero(); g.n * p * g.co];
    for_each_group(&mut y, ng * p * g.co, |gi, yg, par, s| {
        let rows = yg.len() / g.co;
        let Scratch { col, .. } = s;
        let a = columns(g, x, (gi * ng, rows / p.max(1)), col, split(par));
        gemm_into(
            (rows, g.co, k),
            a,
            View::rows(k),
            wkc,
            wv,
            yg,
            g.co,
            false,
            par,
        );
    });
    y
}

/// `dx (N, H, W, Ci)` from the `(Co, K)` weight matrix `wck` at `wv` ([`weight_cok`] lays it
/// out row-major) and `dy (N, OH, OW, Co)`.
pub(super) fn grad_input<T: WithDType>(g: &Geo, wck: &[T], wv: View, dy: &[T]) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let mut dx = vec![T::zero(); g.n * g.in_len()];
    for_each_group(&mut dx, ng * g.in_len(), |gi, dxg, par, s| {
        let cnt = dxg.len() / g.in_len();
        let rows = cnt * p;
        let d = &dy[gi * ng * p * g.co..][..rows * g.co];
        if g.pointwise() {
            let dims = (rows, g.ci, g.co);
            gemm_into(dims, d, View::rows(g.co), wck, wv, dxg, g.ci, false, par);
            return;
        }
        let c = sized(&mut s.col, rows * k);
        gemm_into(
            (rows, k, g.co),
            d,
            View::rows(g.co),
            wck,
            wv,
            c,
            k,
            false,
            par,
        );
        col2im(g, c, dxg, split(par));
    });
    dx
}

/// Up to this many output channels the weight gradient is accumulated column-major (see
/// [`grad_weight`]).
const COL_MAJOR_DW_MAX_CO: usize = 64;

/// `dw (Co, Ci, kh, kw)` from `x (N, H, W, Ci)` and `dy (N, OH, OW, Co)`.
pub(super) fn grad_weight<T: WithDType>(g: &Geo, x: &[T], dy: &[T]) -> Vec<T> {
    // The gemm crate packs the operand on the row side of a column-major result into panels:
    // for a row-major dW that is the whole im2col matrix, copied once more. With few output
    // channels dW is accumulated column-major instead, `(K, Co)` in memory, so that the packed
    // side is dY (Ci * taps / Co times smaller) and the im2col matrix is read in place; with
    // more than two panels of channels the gemm crate packs both, and row-major stays faster
    // (backward of ResNet-18's 3x3 layers, 224 px, batch 32, on an Ice Lake Xeon: 64 channels
    // 88-106 -> 83-94 ms, 128 even, 256 and 512 68 -> 81 ms).
    let col_major = g.co <= COL_MAJOR_DW_MAX_CO;
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let ranges = g.wgrad_ranges();
    let mut partials = vec![T::zero(); ranges.len() * g.co * k];
    for_each_group(&mut partials, g.co * k, |ri, acc, par, s| {
        let (a, b) = ranges[ri];
        for (j, first) in (a..b).step_by(ng).enumerate() {
            let cnt = ng.min(b - first);
            let rows = cnt * p;
            let cols = columns(g, x, (first, cnt), &mut s.col, split(par));
            let d = &dy[first * p * g.co..][..rows * g.co];
            // dW (Co, K) += dY^T (Co, rows) x cols (rows, K).
            let (dims, dt) = ((g.co, k, rows), View::transposed(g.co));
            let out = if col_major { dt } else { View::rows(k) };
            let (dv, cv) = ((d, dt), (cols, View::rows(k)));
            gemm_view_into(dims, dv, cv, (acc, out), j > 0, par);
        }
    });
    // The partials in order; each output channel's (taps, Ci) block back to (Ci, taps).
    let (taps, n_parts) = (g.kh * g.kw, ranges.len());
    let mut out = vec![T::zero(); g.co * k];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k).enumerate().for_each(|(o, dst)| {
        for part in partials.chunks(g.co * k).take(n_parts) {
            if col_major {
                for (r, row) in part.chunks_exact(g.co).enumerate() {
                    let (t, c) = (r / g.ci, r % g.ci);
                    dst[c * taps + t] += row[o];
                }
            } else {
                for (t, src) in part[o * k..][..k].chunks_exact(g.ci).enumerate() {
                    for (c, &v) in src.iter().enumerate() {
                        dst[c * taps + t] += v;
                    }
                }
            }
        }
    });
    out
}
