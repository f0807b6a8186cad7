//! A 2-D convolution op whose CPU forward *and* backward are im2col + GEMM.
//!
//! Candle 0.11 computes a convolution's input gradient with a direct (per-output dot product)
//! transposed convolution and its weight gradient as a convolution whose "kernel" is the whole
//! output gradient; on a CPU these dominate a ResNet training step (about 60 % of it, see the
//! crate README). Here every pass is one GEMM per image, on buffers of one image's im2col matrix:
//!
//! - forward: `Y_n (Co, P) = W (Co, K) x col(X_n) (K, P)`, `K = Ci * kh * kw`, `P = OH * OW`;
//! - input gradient: `dX_n = col2im(W^T (K, Co) x dY_n (Co, P))`;
//! - weight gradient: `dW = sum_n dY_n (Co, P) x col(X_n)^T (P, K)`, summed over a fixed
//!   partition of the batch so the result does not depend on the thread count.
//!
//! Small images are grouped so that one GEMM covers at least 1,024 output pixels
//! (`col` is then `K x images*P`); groups run in parallel (rayon, each GEMM single-threaded), or,
//! when there are too few of them, one at a time with the GEMM and the copies split across
//! threads. The grouping is a function of the geometry alone and gemm never splits a reduction,
//! so the result is bit-identical for any thread count. Kernel taps that never read inside the
//! image are cropped away first (a 3x3 convolution on a 1x1 map is a 1x1 convolution). f32 and
//! f64 only; other dtypes and other devices use candle's own `conv2d` (see [`conv2d`]).
//!
//! On x86-64 CPUs with AVX-512F, the channels-last op ([`conv2d_nhwc`]) runs the f32 forward of
//! stride-1 kernels with more than one tap, their input gradient and (up to 64 input channels)
//! their weight gradient as direct convolutions (the crate-private `direct` module: no im2col
//! matrix; output channels in multiples of 16, at least 16 input channels);
//! `CANDLE_RESNET_DIRECT=0` in the environment sends them to im2col + GEMM as well. Their sums
//! run in another order than the GEMM's, also bit-identical for any thread count.
//!
//! With the `onednn` feature, f32 convolutions run on oneDNN instead (see [`Backend`]): its
//! direct convolutions on blocked layouts need no im2col, which at small images costs as much as
//! the GEMM itself. f64 keeps the im2col path either way.

use super::chunks;
use super::storage::contiguous_slice;
use super::taps::{self, Taps};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

#[cfg(feature = "onednn")]
#[path = "onednn.rs"]
mod onednn;

#[path = "conv_nhwc.rs"]
mod nhwc;

#[path = "conv_direct.rs"]
mod direct;

/// Which implementation runs an f32 convolution on the CPU (f64 always takes the im2col + GEMM
/// path; other dtypes and devices use candle's `conv2d`).
///
/// ```
/// use candle_resnet::ops::conv::Backend;
/// // "im2col + GEMM" in a default build (led by "direct AVX-512 + " on CPUs with AVX-512);
/// // "oneDNN 2.6.3" (say) with the `onednn` feature.
/// println!("f32 convolutions: {}", Backend::Auto.describe());
/// assert!(Backend::Gemm.describe().ends_with("im2col + GEMM"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// oneDNN when the crate is built with the `onednn` feature, unless the environment variable
    /// `CANDLE_RESNET_ONEDNN` is `0`; im2col + GEMM otherwise.
    #[default]
    Auto,
    /// The pure-Rust im2col + GEMM path: bit-identical results for any thread count.
    Gemm,
    /// oneDNN; an error in a build without the `onednn` feature.
    OneDnn,
    /// oneDNN with bf16 arithmetic on f32 tensors, where the CPU runs bf16 natively (AMX or
    /// AVX512-BF16; elsewhere the same as [`Backend::OneDnn`]): each operand is rounded to bf16
    /// on its way into oneDNN's layout, the products accumulate in f32 and the result comes
    /// back in f32 (some of oneDNN's kernels pass partial sums or the result through bf16 on the way). Mixed
    /// precision confined to the convolution: everything around it stays f32, where candle's
    /// CPU ops are fastest. An error in a build without the `onednn` feature.
    OneDnnBf16,
}

impl Backend {
    /// Whether f32 convolutions take oneDNN.
    fn onednn(self) -> Result<bool> {
        match self {
            Backend::Gemm => Ok(false),
            Backend::OneDnn | Backend::OneDnnBf16 if cfg!(feature = "onednn") => Ok(true),
            Backend::OneDnn | Backend::OneDnnBf16 => {
                bail!(
                    "conv2d: Backend::{self:?} needs candle-resnet built with the `onednn` feature"
                )
            }
            Backend::Auto => Ok(cfg!(feature = "onednn")
                && std::env::var("CANDLE_RESNET_ONEDNN").map_or(true, |v| v.trim() != "0")),
        }
    }

    /// What runs f32 convolutions under this choice: `"im2col + GEMM"` (`"direct AVX-512 +
    /// im2col + GEMM"` where the direct kernels of the channels-last op run, see the module
    /// docs), or `"oneDNN X.Y.Z"` with the linked library's version (`"unavailable"` for
    /// [`Backend::OneDnn`] without the feature).
    pub fn describe(self) -> String {
        match self.onednn() {
            Ok(false) if direct::enabled() => "direct AVX-512 + im2col + GEMM".to_string(),
            Ok(false) => "im2col + GEMM".to_string(),
            Ok(true) if self.bf16_arithmetic() => format!("{}, bf16 arithmetic", onednn_label()),
            Ok(true) => onednn_label(),
            Err(_) => "unavailable".to_string(),
        }
    }

    /// Whether f32 convolutions under this choice take the pure-Rust path (the direct kernels
    /// or im2col + GEMM; no error, no oneDNN).
    pub fn is_gemm(self) -> bool {
        matches!(self.onednn(), Ok(false))
    }

    /// Whether convolutions of `dtype` tensors on the CPU can run channels-last
    /// ([`conv2d_nhwc_with`]) under this choice: f32 and f64 whenever the choice is valid
    /// (f64 never takes oneDNN; f32 takes it channels-last too).
    pub(crate) fn runs_channels_last(self, dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::F64) && self.onednn().is_ok()
    }

    /// Whether f32 convolutions under this choice compute in bf16 ([`Backend::OneDnnBf16`] on
    /// a CPU with native bf16).
    pub fn bf16_arithmetic(self) -> bool {
        self == Backend::OneDnnBf16 && bf16_on_onednn(self)
    }
}

/// "oneDNN X.Y.Z" (only reached with the feature).
fn onednn_label() -> String {
    #[cfg(feature = "onednn")]
    return format!("oneDNN {}", onednn::version());
    #[cfg(not(feature = "onednn"))]
    "unavailable".to_string()
}

/// Geometry of a convolution (square stride and padding, no dilation, one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geo {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[n, ci, h, wd], &[co, ci2, kh, kw]) = (x, w) else {
            bail!("conv2d: expected (N, C, H, W) input and (Co, Ci, kh, kw) weight, got {x:?} and {w:?}");
        };
        if ci != ci2 {
            bail!("conv2d: input has {ci} channels, weight expects {ci2}");
        }
        if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            bail!("conv2d: input {h}x{wd} with padding {padding} is smaller than the {kh}x{kw} kernel (or stride is 0)");
        }
        Ok(Self {
            n,
            ci,
            h,
            w: wd,
            co,
            kh,
            kw,
            stride,
            padding,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (wd + 2 * padding - kw) / stride + 1,
        })
    }
    fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }
    fn p(&self) -> usize {
        self.oh * self.ow
    }
    fn in_len(&self) -> usize {
        self.ci * self.h * self.w
    }
    /// Stride 1 and an output the size of the input (3x3 with padding 1, 5x5 with 2, ...).
    fn same(&self) -> bool {
        self.stride == 1 && self.oh == self.h && self.ow == self.w
    }
    /// The geometry as the gather tables take it.
    fn tap_shape(&self) -> taps::Shape {
        taps::Shape {
            ci: self.ci,
            h: self.h,
            w: self.w,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            padding: self.padding,
            oh: self.oh,
            ow: self.ow,
        }
    }
    /// Nothing to compute: no image, channel, output pixel or input pixel (every pass is
    /// zeros of its shape).
    fn empty(&self) -> bool {
        self.n == 0 || self.ci == 0 || self.co == 0 || self.p() == 0 || self.h * self.w == 0
    }
    /// A 1x1, stride-1, unpadded convolution: the image is its own im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
    /// The input row feeding output column `o` at kernel offset `k`, if inside the image.
    #[inline]
    fn src(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        let i = (o * self.stride + k) as isize - self.padding as isize;
        (i >= 0 && (i as usize) < len).then_some(i as usize)
    }
}

/// Output pixels x images that one GEMM should cover at least. A convolution over small images
/// (a 32 px ResNet's last stage has one output pixel) done one image at a time is a chain of
/// matrix-vector products that re-read the whole weight per image; grouping images gives the
/// GEMM full micro-kernel tiles and packs the weight once per group.
const MIN_GEMM_COLS: usize = 1024;

/// Weight-gradient partial sums: at most this many, over fixed image ranges.
const WGRAD_PARTIALS: usize = 8;

impl Geo {
    /// The image ranges whose weight gradients are summed as separate partials: fixed (a
    /// multiple of the GEMM group), each summed in order, then the partials in order, so the
    /// result has the same bits for any thread count.
    fn wgrad_ranges(&self) -> Vec<(usize, usize)> {
        let per = self
            .n
            .div_ceil(WGRAD_PARTIALS)
            .max(1)
            .next_multiple_of(self.images_per_gemm());
        (0..self.n)
            .step_by(per)
            .map(|a| (a, (a + per).min(self.n)))
            .collect()
    }

    /// Images per GEMM: a function of the geometry alone, so results never depend on the thread
    /// count.
    fn images_per_gemm(&self) -> usize {
        let n = self.n.max(1);
        let ng = MIN_GEMM_COLS.div_ceil(self.p()).clamp(1, n);
        // Groups of equal size (32 images of 49 pixels: 16 + 16, not 21 + 11).
        n.div_ceil(n.div_ceil(ng))
    }
}

/// How groups of work are spread over the threads: across groups when there are enough of them
/// for every thread, otherwise one group at a time with the GEMM itself split across threads
/// (gemm splits rows and columns, never the reduction, so the sums stay bit-identical).
fn spread(groups: usize) -> (bool, Parallelism) {
    let threads = rayon::current_num_threads();
    if threads > 1 && groups < 2 * threads {
        (false, Parallelism::Rayon(threads))
    } else {
        (true, Parallelism::None)
    }
}

/// Runs `f(group index, output chunk, parallelism, scratch)` over `out.chunks_mut(chunk)`.
fn for_each_group<T: WithDType>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T], Parallelism, &mut Scratch<T>) + Sync + Send,
) {
    let groups = out.len().div_ceil(chunk.max(1));
    match spread(groups) {
        (true, par) => out
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(gi, o)| with_scratch(|s| f(gi, o, par, s))),
        (false, par) => with_scratch(|s| {
            for (gi, o) in out.chunks_mut(chunk).enumerate() {
                f(gi, o, par, s);
            }
        }),
    }
}

/// Reusable per-thread buffers: an im2col matrix and a GEMM output in (rows, images x pixels)
/// order.
struct Scratch<T> {
    col: Vec<T>,
    tmp: Vec<T>,
}

/// Runs `f` with this thread's scratch buffers of element type `T`, kept from one convolution
/// to the next: allocating and zero-filling megabytes of im2col matrix per pass cost a few per
/// cent of a 32 px training step. A pass that runs inside another on the same thread (rayon
/// work-stealing while a nested parallel loop waits) takes a second set, so the pool holds at
/// most one set per nesting level; the buffers never shrink, their size is that of the largest
/// convolution seen.
fn with_scratch<T: WithDType, R>(f: impl FnOnce(&mut Scratch<T>) -> R) -> R {
    use std::any::Any;
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
    }
    let taken = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let at = p.iter().position(|b| b.is::<Scratch<T>>())?;
        p.swap_remove(at).downcast::<Scratch<T>>().ok()
    });
    let mut s = taken.unwrap_or_default();
    let r = f(&mut s);
    POOL.with(|p| p.borrow_mut().push(s));
    r
}

impl<T> Default for Scratch<T> {
    fn default() -> Self {
        Self {
            col: Vec::new(),
            tmp: Vec::new(),
        }
    }
}

/// `buf` resized to `len` (contents unspecified: every caller overwrites all of it).
fn sized<T: WithDType>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::zero());
    }
    &mut buf[..len]
}

/// The output positions `o` in `0..out_len` whose source `o * stride + off` lies in `0..len`.
#[inline]
fn valid_range(out_len: usize, len: usize, stride: usize, off: isize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = if off >= len as isize {
        0
    } else {
        (len as isize - off + s - 1) / s
    };
    let hi = (hi.max(0) as usize).min(out_len);
    ((lo as usize).min(hi), hi)
}

/// `dst[o] = src[o * stride + off]`, zero where that falls outside `src`.
#[inline]
fn gather_row<T: WithDType>(dst: &mut [T], src: &[T], stride: usize, off: isize) {
    let (lo, hi) = valid_range(dst.len(), src.len(), stride, off);
    dst[..lo].fill(T::zero());
    dst[hi..].fill(T::zero());
    if lo == hi {
        // No output reads inside `src` (a stride longer than the padded input, say); `start`
        // below would point past its end.
        return;
    }
    let start = (lo as isize * stride as isize + off) as usize;
    if stride == 1 {
        dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
    } else {
        for (d, s) in dst[lo..hi]
            .iter_mut()
            .zip(src[start..].iter().step_by(stride))
        {
            *d = *s;
        }
    }
}

/// `dst[o * stride + off] += src[o]` where that lies inside `dst`.
#[inline]
fn scatter_add_row<T: WithDType>(dst: &mut [T], src: &[T], stride: usize, off: isize) {
    let (lo, hi) = valid_range(src.len(), dst.len(), stride, off);
    if lo == hi {
        return;
    }
    let start = (lo as isize * stride as isize + off) as usize;
    if stride == 1 {
        for (d, s) in dst[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
            *d += *s;
        }
    } else {
        for (d, s) in dst[start..].iter_mut().step_by(stride).zip(&src[lo..hi]) {
            *d += *s;
        }
    }
}

/// One im2col row segment: kernel tap `(ky, kx)` of one input plane (H x W), `P` values.
fn im2col_tap<T: WithDType>(g: &Geo, plane: &[T], ky: usize, kx: usize, dst: &mut [T]) {
    let pad = g.padding as isize;
    if g.same() {
        return same_tap(g, plane, ky as isize - pad, kx as isize - pad, dst);
    }
    for oy in 0..g.oh {
        let d = &mut dst[oy * g.ow..(oy + 1) * g.ow];
        match g.src(oy, ky, g.h) {
            None => d.fill(T::zero()),
            Some(iy) => gather_row(d, &plane[iy * g.w..][..g.w], g.stride, kx as isize - pad),
        }
    }
}

/// [`im2col_tap`] for a stride-1 convolution whose output has the input's size (a ResNet's
/// 3x3, padding 1): the tap is the plane shifted by `dy * W + dx`, copied as one block, then
/// the columns that wrapped around from the neighbouring row are zeroed. Row by row, the copies
/// of a 7-to-56-pixel-wide image cost more in calls than in bytes.
fn same_tap<T: WithDType>(g: &Geo, plane: &[T], dy: isize, dx: isize, dst: &mut [T]) {
    let (h, w) = (g.h, g.w);
    let hw = (h * w) as isize;
    if dx.unsigned_abs() >= w {
        // Every column's source `ox + dx` is outside the row (a kernel wider than the image);
        // the shifted block below would have no extent.
        dst.fill(T::zero());
        return;
    }
    // Output rows whose source row `oy + dy` is inside the image.
    let b = (h as isize - dy).clamp(0, h as isize) as usize;
    let a = ((-dy).max(0) as usize).min(b);
    dst[..a * w].fill(T::zero());
    dst[b * w..].fill(T::zero());
    if a == b {
        return;
    }
    // dst[j] = plane[j + shift] for j in a*W..b*W, clamped to the plane.
    let shift = dy * w as isize + dx;
    let s_lo = (a as isize * w as isize + shift).max(0);
    let s_hi = (b as isize * w as isize + shift).min(hw);
    let (d_lo, d_hi) = ((s_lo - shift) as usize, (s_hi - shift) as usize);
    dst[a * w..d_lo].fill(T::zero());
    dst[d_hi..b * w].fill(T::zero());
    dst[d_lo..d_hi].copy_from_slice(&plane[s_lo as usize..s_hi as usize]);
    // Columns whose source `ox + dx` left the row: zero.
    let edge = dx.unsigned_abs().min(w);
    if dx != 0 {
        for oy in a..b {
            let seg = &mut dst[oy * w..(oy + 1) * w];
            if dx < 0 {
                seg[..edge].fill(T::zero());
            } else {
                seg[w - edge..].fill(T::zero());
            }
        }
    }
}

/// The im2col matrix of `cnt` images (`imgs`, image-major) side by side: `K x cnt*P`,
/// row `(c, ky, kx)` holding that tap of every image. Rows are independent, so they are filled
/// in parallel when `parallel`.
fn im2col<T: WithDType>(g: &Geo, imgs: &[T], cnt: usize, col: &mut [T], parallel: bool) {
    let (p, hw, taps) = (g.p(), g.h * g.w, g.kh * g.kw);
    chunks(col, cnt * p, parallel, |r, row| {
        let (c, t) = (r / taps, r % taps);
        for (i, dst) in row.chunks_mut(p).enumerate() {
            let plane = &imgs[i * g.in_len() + c * hw..][..hw];
            im2col_tap(g, plane, t / g.kw, t % g.kw, dst);
        }
    });
}

/// Adds an im2col-shaped gradient (`K x cnt*P`) back into `cnt` image gradients (`dx`, zero on
/// entry), one input plane at a time (in parallel when `parallel`).
fn col2im<T: WithDType>(g: &Geo, col: &[T], cnt: usize, dx: &mut [T], parallel: bool) {
    let (p, ld, hw) = (g.p(), cnt * g.p(), g.h * g.w);
    let pad = g.padding as isize;
    chunks(dx, hw, parallel, |q, plane| {
        let (i, c) = (q / g.ci, q % g.ci);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (c * g.kh + ky) * g.kw + kx;
                let row = &col[r * ld + i * p..][..p];
                if g.same() {
                    same_tap_add(g, row, ky as isize - pad, kx as isize - pad, plane);
                    continue;
                }
                for oy in 0..g.oh {
                    let Some(iy) = g.src(oy, ky, g.h) else {
                        continue;
                    };
                    scatter_add_row(
                        &mut plane[iy * g.w..][..g.w],
                        &row[oy * g.ow..(oy + 1) * g.ow],
                        g.stride,
                        kx as isize - pad,
                    );
                }
            }
        }
    });
}

/// The adjoint of [`same_tap`]: `plane[(oy + dy) * W + ox + dx] += row[oy * W + ox]` over the
/// outputs whose source lies inside the image, with the ranges worked out once per tap.
fn same_tap_add<T: WithDType>(g: &Geo, row: &[T], dy: isize, dx: isize, plane: &mut [T]) {
    let (h, w) = (g.h as isize, g.w as isize);
    let (oy0, oy1) = ((-dy).max(0), (h - dy).min(h));
    let (ox0, ox1) = ((-dx).max(0), (w - dx).min(w));
    if oy0 >= oy1 || ox0 >= ox1 {
        return;
    }
    let len = (ox1 - ox0) as usize;
    for oy in oy0..oy1 {
        let src = &row[(oy * w + ox0) as usize..][..len];
        let dst = &mut plane[((oy + dy) * w + ox0 + dx) as usize..][..len];
        for (d, &v) in dst.iter_mut().zip(src) {
            *d += v;
        }
    }
}

/// `cnt` images of `rows x p` each (image-major, `src`) as one `rows x cnt*p` matrix (`dst`).
fn to_matrix<T: WithDType>(src: &[T], dst: &mut [T], rows: usize, p: usize, parallel: bool) {
    let cnt = src.len() / (rows * p);
    chunks(dst, cnt * p, parallel, |r, row| {
        for (i, d) in row.chunks_mut(p).enumerate() {
            d.copy_from_slice(&src[(i * rows + r) * p..][..p]);
        }
    });
}

/// The inverse of [`to_matrix`]: a `rows x cnt*p` matrix back to `cnt` images.
fn to_images<T: WithDType>(src: &[T], dst: &mut [T], rows: usize, p: usize, parallel: bool) {
    let cnt = dst.len() / (rows * p);
    chunks(dst, rows * p, parallel, |i, img| {
        for (r, d) in img.chunks_mut(p).enumerate() {
            d.copy_from_slice(&src[r * cnt * p + i * p..][..p]);
        }
    });
}

/// Row-major strides of a matrix view: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View {
    rs: usize,
    cs: usize,
}

impl View {
    fn rows(ld: usize) -> Self {
        Self { rs: ld, cs: 1 }
    }
    fn transposed(ld: usize) -> Self {
        Self { rs: 1, cs: ld }
    }
}

/// `c (m x n, row stride ldc) (+)= a (m x k) * b (k x n)`.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: WithDType>(
    dims: (usize, usize, usize),
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    par: Parallelism,
) {
    gemm_view_into(
        dims,
        (a, av),
        (b, bv),
        (c, View::rows(ldc)),
        accumulate,
        par,
    )
}

/// `c (m x n) (+)= a (m x k) * b (k x n)`, each matrix at its own strides.
///
/// The gemm crate computes a row-major `c` as `c^T = b^T a^T` and then copies `b^T` into its
/// panels element by element (a strided gather) unless `b`'s rows are contiguous; a column-major
/// `c` keeps `a` on that side. Callers lay out their operands so that the large one is read
/// with unit stride where it is packed.
fn gemm_view_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, av): (&[T], View),
    (b, bv): (&[T], View),
    (c, cv): (&mut [T], View),
    accumulate: bool,
    par: Parallelism,
) {
    // The slices cover every index the views address: checked here, once, before the raw call.
    let span = |rows: usize, cols: usize, v: View| (rows - 1) * v.rs + (cols - 1) * v.cs + 1;
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= span(m, n, cv));
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * cv.rs + j * cv.cs] = T::zero();
                }
            }
        }
        return;
    }
    assert!(a.len() >= span(m, k, av) && b.len() >= span(k, n, bv));
    // SAFETY: bounds checked above; `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            cv.cs as isize,
            cv.rs as isize,
            accumulate,
            a.as_ptr(),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr(),
            bv.cs as isize,
            bv.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// The GEMM's right-hand side for images `first..first + cnt`: their im2col matrices side by
/// side (`K x cnt*P`), or the images themselves for a pointwise convolution (one image: no
/// copy).
fn columns<'a, T: WithDType>(
    g: &Geo,
    taps: Option<&Taps>,
    x: &'a [T],
    (first, cnt): (usize, usize),
    col: &'a mut Vec<T>,
    parallel: bool,
) -> &'a [T] {
    let (k, p) = (g.k(), g.p());
    let imgs = &x[first * g.in_len()..(first + cnt) * g.in_len()];
    if g.pointwise() && cnt == 1 {
        return imgs;
    }
    let col = sized(col, k * cnt * p);
    match taps {
        _ if g.pointwise() => to_matrix(imgs, col, g.ci, p, parallel),
        Some(t) => t.im2col(imgs, cnt, col, parallel),
        None => im2col(g, imgs, cnt, col, parallel),
    }
    col
}

/// `dY` of images `first..first + cnt` as one `Co x cnt*P` matrix (one image: no copy).
fn grads<'a, T: WithDType>(
    g: &Geo,
    dy: &'a [T],
    (first, cnt): (usize, usize),
    tmp: &'a mut Vec<T>,
    parallel: bool,
) -> &'a [T] {
    let p = g.p();
    let imgs = &dy[first * g.co * p..(first + cnt) * g.co * p];
    if cnt == 1 {
        return imgs;
    }
    let tmp = sized(tmp, g.co * cnt * p);
    to_matrix(imgs, tmp, g.co, p, parallel);
    tmp
}

/// Whether a group's own passes (im2col, copies) should split across threads: when groups run
/// one at a time.
fn split(par: Parallelism) -> bool {
    !matches!(par, Parallelism::None)
}

/// Maps at most this wide, and strided convolutions at any width, take im2col and col2im
/// through gather tables ([`Taps`]): a stride-2 tap is a strided copy that the copy route does
/// one element at a time (the 224 px stem: 96 -> 119 GFLOP/s forward; a 224 px training step
/// +11 %, measured alternating). Wider stride-1 maps copy whole shifted rows, which is as fast.
const TAPS_MAX_WIDTH: usize = 32;

/// The gather tables for groups of `cnt` images where they apply: small maps, f32 on a CPU with
/// AVX-512 (whose gathers make them fast) or f64 (the reference dtype of the tests, so the
/// tables' logic is checked on any CPU).
fn tap_tables<T: WithDType>(g: &Geo, cnt: usize) -> Option<std::sync::Arc<Taps>> {
    let fast = match T::DTYPE {
        DType::F32 => taps::vector_gathers(),
        DType::F64 => true,
        _ => false,
    };
    if !fast
        || g.pointwise()
        || (g.w > TAPS_MAX_WIDTH && g.stride == 1)
        || g.p() == 0
        || g.h * g.w == 0
        || g.ci == 0
    {
        return None;
    }
    Taps::cached(&g.tap_shape(), cnt)
}

/// `wv`: where the weight matrix `(Co, K)` lies in `w` (row-major and contiguous, or the one
/// used tap of a cropped kernel, see [`Crop::tap_view`]).
fn forward<T: WithDType>(g: &Geo, x: &[T], w: &[T], wv: View) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let mut y = vec![T::zero(); g.n * g.co * p];
    let taps = tap_tables::<T>(g, ng);
    for_each_group(&mut y, ng * g.co * p, |gi, yg, par, s| {
        let cnt = yg.len() / (g.co * p);
        let Scratch { col, tmp } = s;
        let b = columns(g, taps.as_deref(), x, (gi * ng, cnt), col, split(par));
        let (dims, ld) = ((g.co, cnt * p, k), cnt * p);
        if cnt == 1 {
            gemm_into(dims, w, wv, b, View::rows(p), yg, p, false, par);
        } else {
            let t = sized(tmp, g.co * ld);
            gemm_into(dims, w, wv, b, View::rows(ld), t, ld, false, par);
            to_images(t, yg, g.co, p, split(par));
        }
    });
    y
}

/// `wv` as in [`forward`].
fn grad_input<T: WithDType>(g: &Geo, w: &[T], dy: &[T], wv: View) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let mut dx = vec![T::zero(); g.n * g.in_len()];
    let taps = tap_tables::<T>(g, ng);
    for_each_group(&mut dx, ng * g.in_len(), |gi, dxg, par, s| {
        let cnt = dxg.len() / g.in_len();
        let Scratch { col, tmp } = s;
        let d = grads(g, dy, (gi * ng, cnt), tmp, split(par));
        let (dims, ld) = ((k, cnt * p, g.co), cnt * p);
        let wt = View {
            rs: wv.cs,
            cs: wv.rs,
        }; // W^T: (K, Co)
        if g.pointwise() && cnt == 1 {
            gemm_into(dims, w, wt, d, View::rows(p), dxg, p, false, par);
            return;
        }
        let c = sized(col, k * ld);
        gemm_into(dims, w, wt, d, View::rows(ld), c, ld, false, par);
        match &taps {
            _ if g.pointwise() => to_images(c, dxg, g.ci, p, split(par)),
            Some(t) => {
                // Summed per channel across the group, then back to image-major order.
                let hw = g.h * g.w;
                let m = sized(tmp, cnt * g.in_len());
                t.col2im(c, cnt, m, split(par));
                to_images(m, dxg, g.ci, hw, split(par));
            }
            None => col2im(g, c, cnt, dxg, split(par)),
        }
    });
    dx
}

fn grad_weight<T: WithDType>(g: &Geo, x: &[T], dy: &[T]) -> Vec<T> {
    let (k, p, ng) = (g.k(), g.p(), g.images_per_gemm());
    let ranges = g.wgrad_ranges();
    let mut partials = vec![T::zero(); ranges.len() * g.co * k];
    let taps = tap_tables::<T>(g, ng);
    for_each_group(&mut partials, g.co * k, |ri, acc, par, s| {
        let (a, b) = ranges[ri];
        for (j, first) in (a..b).step_by(ng).enumerate() {
            let cnt = ng.min(b - first);
            let Scratch { col, tmp } = s;
            let cols = columns(g, taps.as_deref(), x, (first, cnt), col, split(par));
            let d = grads(g, dy, (first, cnt), tmp, split(par));
            // dW^T (K, Co) += cols (K, cnt*P) x dY^T (cnt*P, Co). Both operands have the
            // reduction contiguous; gemm packs a transposed right-hand side quickly when it is
            // the narrow one (Co columns), slowly when it is the wide one (K columns: dW =
            // dY x cols^T ran at a third of the speed), hence the transposed product.
            let (dims, ld) = ((k, g.co, cnt * p), cnt * p);
            let dt = View::transposed(ld);
            gemm_into(dims, cols, View::rows(ld), d, dt, acc, g.co, j > 0, par);
        }
    });
    // The partials in order, transposed to (Co, K); element-wise, so split across threads.
    let mut out = vec![T::zero(); g.co * k];
    let n_parts = ranges.len();
    out.par_chunks_mut(k).enumerate().for_each(|(co, o)| {
        for part in partials.chunks(g.co * k).take(n_parts) {
            for (kk, o) in o.iter_mut().enumerate() {
                *o += part[kk * g.co + co];
            }
        }
    });
    out
}

/// The three passes of a convolution and their operands: forward `(x, w) -> y`, input gradient
/// `(w, dy) -> dx`, weight gradient `(x, dy) -> dw`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    GradInput,
    GradWeight,
}

impl Pass {
    /// The pass's two operands as errors name them (`"conv2d: input"`, ...).
    fn operands(self, op: &str) -> [String; 2] {
        let [a, b] = match self {
            Pass::Forward => ["input", "weight"],
            Pass::GradInput => ["weight", "grad"],
            Pass::GradWeight => ["input", "grad"],
        };
        [format!("{op}: {a}"), format!("{op}: {b}")]
    }
}

/// One f32 `(N, C, H, W)` pass: through oneDNN when asked for (and the geometry is not empty;
/// in bf16 arithmetic with `bf16`), else im2col + GEMM.
/// `wv`: the weight's view when it is not contiguous (the im2col + GEMM route only).
fn run_f32(
    g: &Geo,
    route: Route,
    pass: Pass,
    (a, b): (&[f32], &[f32]),
    wv: Option<View>,
) -> Result<Vec<f32>> {
    #[cfg(feature = "onednn")]
    if route.onednn && g.n > 0 && g.ci > 0 && g.co > 0 {
        return run_onednn(g, route, false, pass, (a, b));
    }
    #[cfg(not(feature = "onednn"))]
    let _ = route;
    Ok(run_gemm(g, pass, a, b, wv))
}

/// One f32 pass on oneDNN (a geometry with images and channels), activations channels-last
/// where `nhwc`, in bf16 arithmetic where `route.bf16`.
#[cfg(feature = "onednn")]
fn run_onednn(
    g: &Geo,
    route: Route,
    nhwc: bool,
    pass: Pass,
    (a, b): (&[f32], &[f32]),
) -> Result<Vec<f32>> {
    if route.bf16 {
        onednn::run_f32_bf16(pass, g, nhwc, a, b)
    } else {
        onednn::run(pass, g, nhwc, a, b)
    }
}

/// Where an op's passes run, resolved from [`Backend`] when the op is built.
#[derive(Debug, Clone, Copy)]
struct Route {
    /// oneDNN (f32 and bf16 tensors) rather than im2col + GEMM.
    onednn: bool,
    /// f32 tensors in bf16 arithmetic ([`Backend::OneDnnBf16`]).
    #[cfg_attr(not(feature = "onednn"), allow(dead_code))]
    bf16: bool,
}

impl Route {
    /// The route of `backend` for `dtype` tensors; an error where the backend is not built in.
    fn of(backend: Backend, dtype: DType) -> Result<Self> {
        Ok(Self {
            onednn: backend.onednn()?,
            bf16: backend.bf16_arithmetic() && dtype == DType::F32,
        })
    }
}

/// bf16 passes: oneDNN only (the op is built for bf16 only where [`bf16_on_onednn`] holds).
fn run_bf16(g: &Geo, pass: Pass, a: &[half::bf16], b: &[half::bf16]) -> Result<Vec<half::bf16>> {
    if !cfg!(feature = "onednn") {
        bail!("conv2d: bf16 convolutions run on oneDNN (the `onednn` feature)")
    }
    #[cfg(feature = "onednn")]
    if g.n > 0 && g.ci > 0 && g.co > 0 {
        return onednn::run_bf16(pass, g, a, b);
    }
    // No image or no channel: the f32 pass's (zero or empty) result, in bf16.
    let f32s = |v: &[half::bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
    let out = run_gemm(g, pass, &f32s(a), &f32s(b), None);
    Ok(out.into_iter().map(half::bf16::from_f32).collect())
}

/// Whether bf16 convolutions with `backend` run natively in bf16 on oneDNN here (the `onednn`
/// feature, the backend choosing oneDNN, and a CPU with AMX or AVX512-BF16); otherwise they run
/// as f32 convolutions of the bf16 values, rounded back.
pub fn bf16_on_onednn(backend: Backend) -> bool {
    #[cfg(feature = "onednn")]
    return backend.onednn().unwrap_or(false) && onednn::bf16_native();
    #[cfg(not(feature = "onednn"))]
    {
        let _ = backend;
        false
    }
}

/// One pass by im2col + GEMM; `wv` places a weight that is not contiguous (forward and input
/// gradient).
fn run_gemm<T: WithDType>(g: &Geo, pass: Pass, a: &[T], b: &[T], wv: Option<View>) -> Vec<T> {
    let wv = wv.unwrap_or(View::rows(g.k()));
    match pass {
        Pass::Forward => forward(g, a, b, wv),
        Pass::GradInput => grad_input(g, a, b, wv),
        Pass::GradWeight => grad_weight(g, a, b),
    }
}

/// The kernel taps a convolution actually uses (see [`crop_plan`]): rows `y0..y0 + kh` and
/// columns `x0..x0 + kw` of a `full_kh x full_kw` kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Crop {
    full_kh: usize,
    full_kw: usize,
    y0: usize,
    x0: usize,
    kh: usize,
    kw: usize,
}

impl Crop {
    /// Whether one tap is left (a 3x3 kernel on a 1x1 map: its centre).
    fn single_tap(&self) -> bool {
        self.kh == 1 && self.kw == 1
    }

    /// The one used tap of `w (Co, Ci, full_kh, full_kw)` as a `(Co, Ci)` matrix view, without a
    /// copy: the slice from the tap's first element and its strides.
    fn tap_view<'a, T>(&self, w: &'a [T], ci: usize) -> (&'a [T], View) {
        let taps = self.full_kh * self.full_kw;
        let at = self.y0 * self.full_kw + self.x0;
        (
            &w[at.min(w.len())..],
            View {
                rs: ci * taps,
                cs: taps,
            },
        )
    }

    /// The used taps of `w (Co, Ci, full_kh, full_kw)`, as a `(Co, Ci, kh, kw)` buffer.
    fn take<T: WithDType>(&self, w: &[T]) -> Vec<T> {
        let mut out =
            Vec::with_capacity(w.len() / (self.full_kh * self.full_kw) * self.kh * self.kw);
        for plane in w.chunks_exact(self.full_kh * self.full_kw) {
            for row in plane.chunks_exact(self.full_kw).skip(self.y0).take(self.kh) {
                // Rows of one or two taps (small maps) without a `memcpy` call each.
                match &row[self.x0..self.x0 + self.kw] {
                    [a] => out.push(*a),
                    [a, b] => out.extend([*a, *b]),
                    r => out.extend_from_slice(r),
                }
            }
        }
        out
    }

    /// A `(Co, Ci, kh, kw)` gradient placed in a zero `(Co, Ci, full_kh, full_kw)` one.
    fn put<T: WithDType>(&self, dw: &[T]) -> Vec<T> {
        let planes = dw.len() / (self.kh * self.kw);
        let mut out = vec![T::zero(); planes * self.full_kh * self.full_kw];
        for (dst, src) in out
            .chunks_exact_mut(self.full_kh * self.full_kw)
            .zip(dw.chunks_exact(self.kh * self.kw))
        {
            for (r, srow) in src.chunks_exact(self.kw).enumerate() {
                let at = (self.y0 + r) * self.full_kw + self.x0;
                match (&mut dst[at..at + self.kw], srow) {
                    ([d], [s]) => *d = *s,
                    ([d0, d1], [s0, s1]) => (*d0, *d1) = (*s0, *s1),
                    (d, s) => d.copy_from_slice(s),
                }
            }
        }
        out
    }
}

/// Runs `exec` for one pass with the weight cropped to `crop`'s taps on the way in (forward,
/// input gradient) or its gradient put back in the full kernel on the way out (weight gradient).
/// `views`: `exec` can read a strided weight (im2col + GEMM), so a single-tap crop is a view of
/// the full kernel instead of a copy.
fn with_crop<T: WithDType>(
    (g, pass, crop, views): (&Geo, Pass, Option<Crop>, bool),
    a: &[T],
    b: &[T],
    exec: impl FnOnce(&[T], &[T], Option<View>) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    Ok(match (pass, crop) {
        (_, None) => exec(a, b, None)?,
        (Pass::Forward, Some(c)) if views && c.single_tap() => {
            let (w, v) = c.tap_view(b, g.ci);
            exec(a, w, Some(v))?
        }
        (Pass::GradInput, Some(c)) if views && c.single_tap() => {
            let (w, v) = c.tap_view(a, g.ci);
            exec(w, b, Some(v))?
        }
        (Pass::Forward, Some(c)) => exec(a, &c.take(b), None)?,
        (Pass::GradInput, Some(c)) => exec(&c.take(a), b, None)?,
        (Pass::GradWeight, Some(c)) => c.put(&exec(a, b, None)?),
    })
}

/// One pass on either dtype, with the weight cropped on the way in (forward, input gradient)
/// or its gradient put back in the full kernel on the way out (weight gradient).
fn run_pass(
    g: &Geo,
    route: Route,
    pass: Pass,
    crop: Option<Crop>,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let names = pass.operands("conv2d");
    let names = [names[0].as_str(), names[1].as_str()];
    Ok(match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            let (a, b) = (
                contiguous_slice(s1, l1, names[0])?,
                contiguous_slice(s2, l2, names[1])?,
            );
            let how = (g, pass, crop, !route.onednn);
            CpuStorage::F32(with_crop(how, a, b, |a, b, wv| {
                run_f32(g, route, pass, (a, b), wv)
            })?)
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => {
            let (a, b) = (
                contiguous_slice(s1, l1, names[0])?,
                contiguous_slice(s2, l2, names[1])?,
            );
            CpuStorage::F64(with_crop((g, pass, crop, true), a, b, |a, b, wv| {
                Ok(run_gemm(g, pass, a, b, wv))
            })?)
        }
        (CpuStorage::BF16(_), CpuStorage::BF16(_)) if route.onednn => {
            let (a, b) = (
                contiguous_slice(s1, l1, names[0])?,
                contiguous_slice(s2, l2, names[1])?,
            );
            CpuStorage::BF16(with_crop((g, pass, crop, false), a, b, |a, b, _| {
                run_bf16(g, pass, a, b)
            })?)
        }
        _ => bail!(
            "{} and {}: both f32 or both f64 (bf16 with oneDNN)",
            names[0],
            names[1]
        ),
    })
}

/// One pass of a channels-last convolution (f32 or f64: the direct kernels or im2col + GEMM;
/// f32 on oneDNN where `route` says so), with the weight cropped on the way in or its gradient
/// put back in the full kernel on the way out, as [`run_pass`].
fn run_pass_nhwc(
    g: &Geo,
    route: Route,
    pass: Pass,
    crop: Option<Crop>,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let names = pass.operands("conv2d_nhwc");
    let names = [names[0].as_str(), names[1].as_str()];
    fn typed<T: WithDType>(g: &Geo, pass: Pass, crop: Option<Crop>, a: &[T], b: &[T]) -> Vec<T> {
        let empty = g.empty();
        let single_tap = g.kh * g.kw == 1;
        let cropped = |w: &[T]| crop.map(|c| c.take(w));
        match pass {
            Pass::Forward if empty => vec![T::zero(); g.n * g.p() * g.co],
            Pass::GradInput if empty => vec![T::zero(); g.n * g.in_len()],
            Pass::GradWeight if empty => {
                let dw = vec![T::zero(); g.co * g.k()];
                match crop {
                    Some(c) => c.put(&dw),
                    None => dw,
                }
            }
            // One tap (a 1x1 kernel, or the centre of a 3x3 one on a 1x1 map): the weight is a
            // strided (Co, Ci) matrix as it lies, read in place.
            Pass::Forward | Pass::GradInput if single_tap => {
                let w = if pass == Pass::Forward { b } else { a };
                let (w, v) = match crop {
                    Some(c) => c.tap_view(w, g.ci),
                    None => (w, View::rows(g.ci)),
                };
                if pass == Pass::Forward {
                    let wt = View { rs: v.cs, cs: v.rs };
                    nhwc::forward(g, a, w, wt)
                } else {
                    nhwc::grad_input(g, w, v, b)
                }
            }
            // `W^T` row-major: the side the gemm crate packs, read with unit stride.
            Pass::Forward => {
                let w = cropped(b);
                let wkc = nhwc::weight_kco(g, w.as_deref().unwrap_or(b));
                nhwc::forward(g, a, &wkc, View::rows(g.co))
            }
            Pass::GradInput => {
                let w = cropped(a);
                let wck = nhwc::weight_cok(g, w.as_deref().unwrap_or(a));
                nhwc::grad_input(g, &wck, View::rows(g.k()), b)
            }
            Pass::GradWeight => {
                let dw = nhwc::grad_weight(g, a, b);
                match crop {
                    Some(c) => c.put(&dw),
                    None => dw,
                }
            }
        }
    }
    Ok(match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => {
            let a = contiguous_slice(s1, l1, names[0])?;
            let b = contiguous_slice(s2, l2, names[1])?;
            #[cfg(feature = "onednn")]
            if route.onednn && !g.empty() {
                return Ok(CpuStorage::F32(with_crop(
                    (g, pass, crop, false),
                    a,
                    b,
                    |a, b, _| run_onednn(g, route, true, pass, (a, b)),
                )?));
            }
            #[cfg(not(feature = "onednn"))]
            let _ = route;
            let direct = run_direct(g, pass, crop, a, b);
            CpuStorage::F32(direct.unwrap_or_else(|| typed(g, pass, crop, a, b)))
        }
        (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(typed(
            g,
            pass,
            crop,
            contiguous_slice(s1, l1, names[0])?,
            contiguous_slice(s2, l2, names[1])?,
        )),
        _ => bail!("{} and {}: both f32 or both f64", names[0], names[1]),
    })
}

/// One pass of a channels-last f32 convolution by the direct kernels ([`direct`]), where they
/// run: the three passes of a stride-1 convolution of several taps, with the channels the
/// kernels need (see `direct::Plan::runs`). `None` sends the pass to im2col +
/// GEMM; so does `CANDLE_RESNET_DIRECT=0` in the environment.
fn run_direct(g: &Geo, pass: Pass, crop: Option<Crop>, a: &[f32], b: &[f32]) -> Option<Vec<f32>> {
    if g.empty() || g.kh * g.kw == 1 || !direct::enabled() {
        return None;
    }
    let full = |w: &[f32]| crop.map(|c| c.take(w));
    match pass {
        Pass::Forward => {
            let w = full(b);
            direct::forward(g, a, w.as_deref().unwrap_or(b))
        }
        Pass::GradInput => {
            let w = full(a);
            direct::grad_input(g, w.as_deref().unwrap_or(a), b)
        }
        Pass::GradWeight => {
            let dw = direct::grad_weight(g, a, b)?;
            Some(match crop {
                Some(c) => c.put(&dw),
                None => dw,
            })
        }
    }
}

/// The convolution op: `(x, w) -> y`, with its backward, on the taps `crop` keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dOp {
    stride: usize,
    /// Padding of the cropped kernel.
    padding: usize,
    /// Where the passes run.
    route: Route,
    crop: Option<Crop>,
    /// Channels-last tensors: `x (N, H, W, Ci)`, `y (N, OH, OW, Co)` (the weight stays
    /// `(Co, Ci, kh, kw)`).
    nhwc: bool,
}

impl Conv2dOp {
    /// The geometry of the cropped convolution of `x` by `w` (full kernel dims).
    fn geo(&self, x: &[usize], w: &[usize]) -> Result<Geo> {
        let w = match (self.crop, w) {
            (Some(c), &[co, ci, _, _]) => vec![co, ci, c.kh, c.kw],
            _ => w.to_vec(),
        };
        match (self.nhwc, x) {
            (true, &[n, h, wd, c]) => Geo::new(&[n, c, h, wd], &w, self.stride, self.padding),
            (true, _) => bail!("conv2d_nhwc: expected an (N, H, W, Ci) input, got {x:?}"),
            (false, _) => Geo::new(x, &w, self.stride, self.padding),
        }
    }

    /// The output's shape: `(N, Co, OH, OW)`, or `(N, OH, OW, Co)` channels-last.
    fn out_shape(&self, g: &Geo) -> Shape {
        if self.nhwc {
            Shape::from((g.n, g.oh, g.ow, g.co))
        } else {
            Shape::from((g.n, g.co, g.oh, g.ow))
        }
    }

    /// The input gradient's shape (that of the input).
    fn in_shape(&self, g: &Geo) -> Shape {
        if self.nhwc {
            Shape::from((g.n, g.h, g.w, g.ci))
        } else {
            Shape::from((g.n, g.ci, g.h, g.w))
        }
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "candle-finetune-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geo(l1.dims(), l2.dims())?;
        let y = if self.nhwc {
            run_pass_nhwc(&g, self.route, Pass::Forward, self.crop, (s1, l1), (s2, l2))?
        } else {
            run_pass(&g, self.route, Pass::Forward, self.crop, (s1, l1), (s2, l2))?
        };
        Ok((y, self.out_shape(&g)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // An input outside the graph (the images fed to the stem) needs no gradient.
        self.grads(x, w, dy, (x.track_op(), w.track_op()))
    }
}

impl Conv2dOp {
    /// The gradients of `x` and of `w` (each where `want` asks) for the output gradient `dy`.
    pub(crate) fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        want: (bool, bool),
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let g = self.geo(x.dims(), w.dims())?;
        let full = w.dims4()?;
        let op = |pass| Backward {
            g,
            conv: *self,
            pass,
            full,
        };
        let dx = match want.0 {
            true => Some(w.apply_op2_no_bwd(&dy, &op(Pass::GradInput))?),
            false => None,
        };
        let dw = match want.1 {
            true => Some(x.apply_op2_no_bwd(&dy, &op(Pass::GradWeight))?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// The backward passes as ops: `(w, dy) -> dx` or `(x, dy) -> dw` (full kernel shape).
struct Backward {
    g: Geo,
    /// The forward op (route, crop, layout).
    conv: Conv2dOp,
    pass: Pass,
    /// The full weight's dims.
    full: (usize, usize, usize, usize),
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::GradInput => "candle-finetune-conv2d-grad-input",
            _ => "candle-finetune-conv2d-grad-weight",
        }
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, c) = (&self.g, &self.conv);
        let out = if c.nhwc {
            run_pass_nhwc(g, c.route, self.pass, c.crop, (s1, l1), (s2, l2))?
        } else {
            run_pass(g, c.route, self.pass, c.crop, (s1, l1), (s2, l2))?
        };
        let shape = match self.pass {
            Pass::GradInput => c.in_shape(g),
            _ => Shape::from(self.full),
        };
        Ok((out, shape))
    }
}

/// `x (N, Ci, H, W)` convolved with `w (Co, Ci, kh, kw)`, square `stride` and zero `padding`,
/// differentiable in both. On CPU with f32/f64 this is the op of this module (f32 on the
/// [`Backend::Auto`] choice); otherwise candle's `conv2d`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?;
/// let ours = candle_resnet::ops::conv::conv2d(&x, &w, 2, 1)?;
/// let candle = x.conv2d(&w, 1, 2, 1, 1)?;
/// let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(()) }
/// ```
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_with(x, w, stride, padding, Backend::Auto)
}

/// [`conv2d`] with an explicit [`Backend`] for f32 (e.g. [`Backend::Gemm`] for results that are
/// bit-identical for any thread count, or to compare the two).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_resnet::ops::conv::{conv2d, conv2d_with, Backend};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?;
/// let gemm = conv2d_with(&x, &w, 1, 1, Backend::Gemm)?;
/// let auto = conv2d(&x, &w, 1, 1)?;
/// let diff = (gemm - auto)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(()) }
/// ```
pub fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    backend: Backend,
) -> Result<Tensor> {
    let route = Route::of(backend, x.dtype())?;
    let fast = x.device().is_cpu()
        && x.dtype() == w.dtype()
        && (matches!(x.dtype(), DType::F32 | DType::F64)
            || x.dtype() == DType::BF16 && bf16_on_onednn(backend));
    if fast {
        let (crop, padding) = match crop_plan(x.dims(), w.dims(), stride, padding) {
            Some((c, p)) => (Some(c), p),
            None => (None, padding),
        };
        let op = Conv2dOp {
            stride,
            padding,
            route,
            crop,
            nhwc: false,
        };
        x.contiguous()?.apply_op2(&w.contiguous()?, op)
    } else if x.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
    {
        // candle's CPU convolution has no half-precision matmul. Half inputs are exact in
        // f32, so the f32 convolution rounded back is what a half-precision convolution with
        // f32 accumulation (oneDNN, cuDNN) computes; the casts carry the gradient both ways.
        let dt = x.dtype();
        conv2d_with(
            &x.to_dtype(DType::F32)?,
            &w.to_dtype(DType::F32)?,
            stride,
            padding,
            backend,
        )?
        .to_dtype(dt)
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}

/// [`conv2d`] on channels-last tensors: `x (N, H, W, Ci)` convolved with `w (Co, Ci, kh, kw)`
/// (PyTorch's weight layout, so checkpoints do not change) into `y (N, OH, OW, Co)`,
/// differentiable in both.
///
/// On a CPU with f32 or f64 the passes are im2col + GEMM with the pixels as the GEMM's rows: the
/// layout in which im2col is block copies of `kw * Ci` values and the GEMM runs fastest, so a
/// network kept channels-last (as [`crate::ResNet`] is on this path) trains faster than one in
/// `(N, C, H, W)`. Results are bit-identical for any thread count. Other dtypes and devices go
/// through [`conv2d`] between two transposes. [`conv2d_nhwc_with`] can send the f32 passes to
/// oneDNN instead.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?;
/// let nchw = x.conv2d(&w, 1, 2, 1, 1)?;
/// let nhwc = candle_resnet::ops::conv::conv2d_nhwc(&x.permute((0, 2, 3, 1))?, &w, 2, 1)?;
/// assert_eq!(nhwc.dims(), &[2, 4, 4, 4]);
/// let diff = (nhwc.permute((0, 3, 1, 2))? - nchw)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(()) }
/// ```
pub fn conv2d_nhwc(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_nhwc_with(x, w, stride, padding, Backend::Gemm)
}

/// [`conv2d_nhwc`] with an explicit [`Backend`] for f32: [`Backend::Gemm`] (and
/// [`Backend::Auto`] without the `onednn` feature) is [`conv2d_nhwc`]; the oneDNN backends hand
/// oneDNN the channels-last buffers as they lie, which is the layout its AMX and AVX-512 kernels
/// want, so the only reorder left is the rounding to bf16 of [`Backend::OneDnnBf16`]. An error
/// for a oneDNN backend in a build without the feature.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_resnet::ops::conv::{conv2d_nhwc, conv2d_nhwc_with, Backend};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::randn(0f32, 1., (2, 8, 8, 3), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?;
/// let auto = conv2d_nhwc_with(&x, &w, 1, 1, Backend::Auto)?;
/// let gemm = conv2d_nhwc(&x, &w, 1, 1)?;
/// let diff = (auto - gemm)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4);
/// # Ok(()) }
/// ```
pub fn conv2d_nhwc_with(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    backend: Backend,
) -> Result<Tensor> {
    let (&[n, h, wd, ci], 4) = (x.dims(), w.rank()) else {
        bail!(
            "conv2d_nhwc: expected an (N, H, W, Ci) input and a (Co, Ci, kh, kw) weight, got {:?} and {:?}",
            x.dims(),
            w.dims()
        );
    };
    let fast = x.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64);
    if !fast {
        backend.onednn()?;
        let y = conv2d_with(&x.permute((0, 3, 1, 2))?, w, stride, padding, Backend::Gemm)?;
        return y.permute((0, 2, 3, 1))?.contiguous();
    }
    let op = nhwc_op(
        &[n, h, wd, ci],
        w.dims(),
        (stride, padding),
        backend,
        x.dtype(),
    )?;
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// The op [`conv2d_nhwc_with`] applies on the CPU (f32, f64) to an `(N, H, W, Ci)` input of
/// dims `x` and a weight of dims `w`, `dtype` tensors on `backend`: for callers that run its
/// passes themselves ([`crate::ops::block`]).
pub(crate) fn nhwc_op(
    x: &[usize],
    w: &[usize],
    (stride, padding): (usize, usize),
    backend: Backend,
    dtype: DType,
) -> Result<Conv2dOp> {
    let nchw = match x {
        &[n, h, wd, ci] => vec![n, ci, h, wd],
        other => other.to_vec(),
    };
    let (crop, padding) = match crop_plan(&nchw, w, stride, padding) {
        Some((c, p)) => (Some(c), p),
        None => (None, padding),
    };
    Ok(Conv2dOp {
        stride,
        padding,
        route: Route::of(backend, dtype)?,
        crop,
        nhwc: true,
    })
}

/// The kernel taps that read inside the image for at least one output position, as a smaller
/// kernel with its padding: on a 1x1 map a 3x3, padding-1 convolution only ever uses its centre
/// (a 32 px ResNet's last stage), so it becomes a 1x1 convolution, nine times fewer products.
/// The op crops the weight itself and puts the gradient back in the full kernel (zero on unused
/// taps), so the graph holds no cropped copy. `None`: nothing to crop, or a geometry the op
/// rejects with its own error.
fn crop_plan(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Option<(Crop, usize)> {
    let (&[_, _, h, wd], &[_, _, kh, kw]) = (x, w) else {
        return None;
    };
    if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        return None;
    }
    // Tap k reads input index o * stride + k - padding for outputs o in 0..out: inside the
    // image for some o iff padding - (out - 1) * stride <= k < padding + len.
    let range = |len: usize, k: usize| {
        let out = (len + 2 * padding - k) / stride + 1;
        let lo = padding.saturating_sub((out - 1) * stride);
        (lo, (padding + len).min(k), out)
    };
    let ((y0, y1, oh), (x0, x1, ow)) = (range(h, kh), range(wd, kw));
    // Square padding only: crop when both axes drop the same number of leading taps. No tap
    // inside the image at all (a 1x1 kernel whose every output reads padding): nothing to keep,
    // so no crop; the full kernel reads zeros.
    if (y0, y1) == (0, kh) && (x0, x1) == (0, kw) || y0 != x0 || y1 <= y0 || x1 <= x0 {
        return None;
    }
    let p = padding - y0;
    let (kh2, kw2) = (y1 - y0, x1 - x0);
    let same_out = (h + 2 * p).checked_sub(kh2).map(|v| v / stride + 1) == Some(oh)
        && (wd + 2 * p).checked_sub(kw2).map(|v| v / stride + 1) == Some(ow);
    let crop = Crop {
        full_kh: kh,
        full_kw: kw,
        y0,
        x0,
        kh: kh2,
        kw: kw2,
    };
    same_out.then_some((crop, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Both routes of im2col and col2im on one geometry and group size, compared bit for bit:
    /// the tables only change how values are fetched, never what is summed or in which order.
    fn routes_agree<T: WithDType>(g: &Geo, cnt: usize, seed: u64) {
        // A table built for a larger group serves a smaller one.
        let Some(taps) = Taps::new(&g.tap_shape(), cnt + 1) else {
            panic!("tables for a small geometry")
        };
        let mut state = seed | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            T::from_f64((state % 2001) as f64 / 1000.0 - 1.0)
        };
        let imgs: Vec<T> = (0..cnt * g.in_len()).map(|_| next()).collect();
        let ld = cnt * g.p();
        for parallel in [false, true] {
            let (mut a, mut b) = (vec![T::zero(); g.k() * ld], vec![T::one(); g.k() * ld]);
            im2col(g, &imgs, cnt, &mut a, parallel);
            taps.im2col(&imgs, cnt, &mut b, parallel);
            let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "im2col of {g:?} x {cnt}");
            let col: Vec<T> = (0..g.k() * ld).map(|_| next()).collect();
            let mut dx = vec![T::zero(); cnt * g.in_len()];
            col2im(g, &col, cnt, &mut dx, parallel);
            let mut m = vec![T::one(); cnt * g.in_len()];
            let mut dx2 = vec![T::zero(); cnt * g.in_len()];
            taps.col2im(&col, cnt, &mut m, parallel);
            to_images(&m, &mut dx2, g.ci, g.h * g.w, parallel);
            assert_eq!(bits(&dx), bits(&dx2), "col2im of {g:?} x {cnt}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn gather_tables_match_the_copy_route(
            cnt in 1usize..5, ci in 1usize..4, h in 1usize..10, w in 1usize..10,
            k in 1usize..6, stride in 1usize..4, padding in 0usize..3, seed in any::<u64>(),
        ) {
            let Ok(g) = Geo::new(&[cnt, ci, h, w], &[2, ci, k, k], stride, padding) else {
                return Ok(()); // a kernel larger than the padded input: refused by Geo::new
            };
            routes_agree::<f32>(&g, cnt, seed);
            routes_agree::<f64>(&g, cnt, seed);
        }
    }

    #[test]
    fn gather_tables_cover_resnet_geometries() {
        // The stem at 32 px, the 3x3 stride-1 and stride-2 layers at 8, 4, 2 and 1 px, and a
        // 1x1 stride-2 downsample; groups of 1 and 5 images (a 16-lane vector and a tail).
        for (ci, h, k, s, p) in [
            (3, 32, 7, 2, 3),
            (4, 8, 3, 1, 1),
            (4, 8, 3, 2, 1),
            (4, 4, 3, 1, 1),
            (4, 2, 3, 1, 1),
            (4, 1, 3, 1, 1),
            (4, 8, 1, 2, 0),
        ] {
            for cnt in [1, 5] {
                let g = Geo::new(&[cnt, ci, h, h], &[8, ci, k, k], s, p).expect("geometry");
                routes_agree::<f32>(&g, cnt, 7);
                routes_agree::<f64>(&g, cnt, 11);
            }
        }
    }
}
