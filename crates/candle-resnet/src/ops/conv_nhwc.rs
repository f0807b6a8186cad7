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
//! Where many groups share a small weight, each group's matrix is built and multiplied in
//! blocks of rows that stay in the L2 cache ([`block_rows`]). Grouping, threading and scratch
//! buffers are those of the channels-first path (see the parent module), and the blocks depend
//! on the geometry alone, so the results are bit-identical for any thread count here too.

use super::{for_each_group, gemm_into, gemm_view_into, sized, split, Geo, View};
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

/// Rows `first..` (as many as `col` holds) of the im2col matrix of channels-last images
/// `imgs`: `cnt*P` rows of `K` values, row `(i, oy, ox)` holding kernel row `ky` as `kw * Ci`
/// values copied in one block (zeros where the taps read padding). Rows are independent:
/// filled in parallel when `parallel`.
fn im2col_rows<T: WithDType>(g: &Geo, imgs: &[T], first: usize, col: &mut [T], parallel: bool) {
    let k = g.k();
    // One output row of pixels per task: enough work to amortise the task.
    chunks(col, g.ow * k, parallel, |t, rows| {
        for (j, row) in rows.chunks_exact_mut(k).enumerate() {
            im2col_row(g, imgs, first + t * g.ow + j, row);
        }
    });
}

/// `f(first row, row count, rows)` over the im2col matrix of `rows` rows of channels-last images `imgs`,
/// in blocks of `block` rows built in `col` (a pointwise convolution's matrix is `imgs` itself:
/// one call, no copy).
fn im2col_blocks<T: WithDType>(
    g: &Geo,
    imgs: &[T],
    (rows, block): (usize, usize),
    col: &mut Vec<T>,
    parallel: bool,
    mut f: impl FnMut(usize, usize, &[T]),
) {
    if g.pointwise() {
        return f(0, rows, &imgs[..rows * g.k()]);
    }
    let (k, block) = (g.k(), block.max(1));
    for first in (0..rows).step_by(block) {
        let n = block.min(rows - first);
        let c = sized(col, n * k);
        im2col_rows(g, imgs, first, c, parallel);
        f(first, n, c);
    }
}

/// Row `r` (pixel `(i, oy, ox)`) of [`im2col_rows`]'s matrix.
#[inline]
fn im2col_row<T: WithDType>(g: &Geo, imgs: &[T], r: usize, row: &mut [T]) {
    let ci = g.ci;
    let run = g.kw * ci;
    let (i, po) = (r / g.p(), r % g.p());
    let (oy, ox) = (po / g.ow, po % g.ow);
    let img = &imgs[i * g.in_len()..][..g.in_len()];
    let (ky0, ky1, iy0) = taps_inside(oy, g.stride, g.padding, g.kh, g.h);
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

/// Rows of the im2col matrix built and multiplied at a time, where the work is `groups`
/// independent groups: a block of about [`BLOCK_BYTES`] stays in the core's L2 between its copy
/// and the GEMM that reads it (a whole 56 x 56 image at 3x3 x 64 channels is 7 MB, written to
/// memory and read back). `None` (the whole matrix at once) for weights too large to be read
/// again for every block, and for fewer than [`BLOCK_MIN_GROUPS`] groups: those run one GEMM
/// at a time split across the threads, which small blocks would starve. Geometry alone
/// decides, so the sums (and their bits) do not depend on the thread count.
///
/// Measured per layer on an Ice Lake Xeon (2 threads, forward / forward + backward, ms): 224 px
/// batch 32, 56 x 56 x 64: 37 -> 30 / 84 -> 74; 28 x 28 x 128: 31 -> 29 / 69 -> 64; 32 px batch
/// 128, 8 x 8 x 64: 3.1 -> 2.8 / 7.0 -> 6.5 (4 x 4 x 128, two groups: 3.4 -> 4.2 blocked, so
/// not).
fn block_rows<T>(g: &Geo, groups: usize) -> Option<usize> {
    let size = std::mem::size_of::<T>();
    let weight = g.k() * g.co * size;
    if weight > BLOCK_MAX_WEIGHT || groups < BLOCK_MIN_GROUPS || g.pointwise() {
        return None;
    }
    Some((BLOCK_BYTES / (g.k().max(1) * size)).max(BLOCK_MIN_ROWS))
}

/// See [`block_rows`].
const BLOCK_BYTES: usize = 512 << 10;
const BLOCK_MAX_WEIGHT: usize = 1 << 20;
const BLOCK_MIN_ROWS: usize = 96;
const BLOCK_MIN_GROUPS: usize = 4;

/// Adds rows `first..` (as many as `col` holds) of an im2col-shaped gradient back into the
/// channels-last image gradients `dx` (zero on entry): one image per task (in parallel when
/// `parallel`), each pixel's taps in a fixed order, pixels in order.
fn col2im_rows<T: WithDType>(g: &Geo, col: &[T], first: usize, dx: &mut [T], parallel: bool) {
    let (p, k, len) = (g.p(), g.k(), g.in_len());
    let last = first + col.len() / k.max(1);
    if p == 0 || last == first {
        return;
    }
    let images = first / p..last.div_ceil(p);
    let dx = &mut dx[images.start * len..images.end * len];
    chunks(dx, len, parallel, |j, img| {
        let i = images.start + j;
        for r in (i * p).max(first)..((i + 1) * p).min(last) {
            col2im_pixel(g, &col[(r - first) * k..][..k], r - i * p, img);
        }
    });
}

/// Adds the im2col-shaped gradient `row` of output pixel `po` into its image's gradient `img`.
#[inline]
fn col2im_pixel<T: WithDType>(g: &Geo, row: &[T], po: usize, img: &mut [T]) {
    let ci = g.ci;
    let run = g.kw * ci;
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

/// `y (N, OH, OW, Co)` from `x (N, H, W, Ci)` and the `(K, Co)` weight matrix `wkc` at `wv`
/// ([`weight_kco`]'s matrix, or a single tap's `(Co, Ci)` block read transposed).
pub(super) fn forward<T: WithDType>(g: &Geo, x: &[T], wkc: &[T], wv: View) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let mut y = vec![T::zero(); g.n * p * g.co];
    let blocks = block_rows::<T>(g, g.n.div_ceil(ng));
    for_each_group(&mut y, ng * p * g.co, |gi, yg, par, s| {
        let rows = yg.len() / g.co;
        let imgs = &x[gi * ng * g.in_len()..][..(rows / p.max(1)) * g.in_len()];
        let block = blocks.unwrap_or(rows);
        im2col_blocks(
            g,
            imgs,
            (rows, block),
            &mut s.col,
            split(par),
            |first, n, c| {
                let yb = &mut yg[first * g.co..][..n * g.co];
                gemm_into(
                    (n, g.co, k),
                    c,
                    View::rows(k),
                    wkc,
                    wv,
                    yb,
                    g.co,
                    false,
                    par,
                );
            },
        );
    });
    y
}

/// `dx (N, H, W, Ci)` from the `(Co, K)` weight matrix `wck` at `wv` ([`weight_cok`] lays it
/// out row-major) and `dy (N, OH, OW, Co)`.
pub(super) fn grad_input<T: WithDType>(g: &Geo, wck: &[T], wv: View, dy: &[T]) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let mut dx = vec![T::zero(); g.n * g.in_len()];
    let blocks = block_rows::<T>(g, g.n.div_ceil(ng));
    for_each_group(&mut dx, ng * g.in_len(), |gi, dxg, par, s| {
        let cnt = dxg.len() / g.in_len();
        let rows = cnt * p;
        let d = &dy[gi * ng * p * g.co..][..rows * g.co];
        if g.pointwise() {
            let dims = (rows, g.ci, g.co);
            gemm_into(dims, d, View::rows(g.co), wck, wv, dxg, g.ci, false, par);
            return;
        }
        // Blocks of pixels in order: each pixel's taps are added in the same order whatever the
        // blocks.
        let block = blocks.unwrap_or(rows).max(1);
        for (b, db) in d.chunks(block * g.co).enumerate() {
            let n = db.len() / g.co;
            let c = sized(&mut s.col, n * k);
            gemm_into(
                (n, k, g.co),
                db,
                View::rows(g.co),
                wck,
                wv,
                c,
                k,
                false,
                par,
            );
            col2im_rows(g, c, b * block, dxg, split(par));
        }
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
    let blocks = block_rows::<T>(g, ranges.len());
    for_each_group(&mut partials, g.co * k, |ri, acc, par, s| {
        let (a, b) = ranges[ri];
        let dt = View::transposed(g.co);
        let out = if col_major { dt } else { View::rows(k) };
        let mut started = false;
        for first in (a..b).step_by(ng) {
            let cnt = ng.min(b - first);
            let rows = cnt * p;
            let d = &dy[first * p * g.co..][..rows * g.co];
            let imgs = &x[first * g.in_len()..][..cnt * g.in_len()];
            let block = blocks.unwrap_or(rows);
            // dW (Co, K) += dY^T (Co, rows) x cols (rows, K), block by block.
            im2col_blocks(
                g,
                imgs,
                (rows, block),
                &mut s.col,
                split(par),
                |r0, n, c| {
                    let (dv, cv) = ((&d[r0 * g.co..][..n * g.co], dt), (c, View::rows(k)));
                    gemm_view_into((g.co, k, n), dv, cv, (&mut *acc, out), started, par);
                    started = true;
                },
            );
        }
    });
    // The partials in order; each output channel's (taps, Ci) block back to (Ci, taps).
    let (taps, n_parts) = (g.kh * g.kw, ranges.len());
    let mut out = vec![T::zero(); g.co * k];
    if k == 0 {
        return out;
    }
    // Per output channel, element `(c, t)` of `dst` takes each partial's `(t, c)` in order.
    // Tap outer, channel inner: no division per element (a third of this loop's time at 32 px
    // in the column-major case, where the element index was split as `r / Ci, r % Ci`).
    out.par_chunks_mut(k).enumerate().for_each(|(o, dst)| {
        for part in partials.chunks(g.co * k).take(n_parts) {
            for t in 0..taps {
                // `(t, c)` of this channel: column `o` of row `t Ci + c` (column-major), or
                // element `t Ci + c` of row `o`.
                let (start, step) = match col_major {
                    true => (t * g.ci * g.co + o, g.co),
                    false => (o * k + t * g.ci, 1),
                };
                let src = part[start..].iter().step_by(step);
                for (d, &v) in dst[t..].iter_mut().step_by(taps).zip(src) {
                    *d += v;
                }
            }
        }
    });
    out
}
