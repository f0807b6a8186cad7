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
//! Images are processed in parallel (rayon), each GEMM single-threaded. f32 and f64 only; other
//! dtypes and other devices use candle's own `conv2d` (see [`conv2d`]).

use super::storage::contiguous_slice;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

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

/// Fills `col` (K x P, row-major) from one image `x` (Ci x H x W).
fn im2col<T: WithDType>(g: &Geo, x: &[T], col: &mut [T]) {
    let p = g.p();
    for c in 0..g.ci {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut col[((c * g.kh + ky) * g.kw + kx) * p..][..p];
                for oy in 0..g.oh {
                    let dst = &mut row[oy * g.ow..(oy + 1) * g.ow];
                    let Some(iy) = g.src(oy, ky, g.h) else {
                        dst.fill(T::zero());
                        continue;
                    };
                    let src = &x[(c * g.h + iy) * g.w..(c * g.h + iy + 1) * g.w];
                    for (ox, d) in dst.iter_mut().enumerate() {
                        *d = match g.src(ox, kx, g.w) {
                            Some(ix) => src[ix],
                            None => T::zero(),
                        };
                    }
                }
            }
        }
    }
}

/// Adds `col` (K x P) back into one image gradient `dx` (Ci x H x W), which must start at zero.
fn col2im<T: WithDType>(g: &Geo, col: &[T], dx: &mut [T]) {
    let p = g.p();
    for c in 0..g.ci {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &col[((c * g.kh + ky) * g.kw + kx) * p..][..p];
                for oy in 0..g.oh {
                    let Some(iy) = g.src(oy, ky, g.h) else {
                        continue;
                    };
                    let dst = &mut dx[(c * g.h + iy) * g.w..(c * g.h + iy + 1) * g.w];
                    for (ox, &v) in row[oy * g.ow..(oy + 1) * g.ow].iter().enumerate() {
                        if let Some(ix) = g.src(ox, kx, g.w) {
                            dst[ix] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Row-major strides of a matrix view: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View {
    rs: usize,
    cs: usize,
}

/// `c (m x n, row-major) (+)= a (m x k) * b (k x n)`, single-threaded.
#[allow(clippy::too_many_arguments)]
fn gemm_into<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    c: &mut [T],
    accumulate: bool,
) {
    // The slices cover every index the views address: checked here, once, before the raw call.
    let span = |rows: usize, cols: usize, v: View| (rows - 1) * v.rs + (cols - 1) * v.cs + 1;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::zero());
        }
        return;
    }
    assert!(a.len() >= span(m, k, av) && b.len() >= span(k, n, bv) && c.len() >= m * n);
    // SAFETY: bounds checked above; `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
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
            Parallelism::None,
        )
    }
}

fn forward<T: WithDType>(g: &Geo, x: &[T], w: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut y = vec![T::zero(); g.n * g.co * p];
    y.par_chunks_mut(g.co * p).enumerate().for_each_init(
        || vec![T::zero(); if g.pointwise() { 0 } else { k * p }],
        |col, (i, yi)| {
            let xi = &x[i * g.in_len()..(i + 1) * g.in_len()];
            let cols: &[T] = if g.pointwise() {
                xi
            } else {
                im2col(g, xi, col);
                col
            };
            gemm_into(
                g.co,
                p,
                k,
                w,
                View { rs: k, cs: 1 },
                cols,
                View { rs: p, cs: 1 },
                yi,
                false,
            );
        },
    );
    y
}

fn grad_input<T: WithDType>(g: &Geo, w: &[T], dy: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let mut dx = vec![T::zero(); g.n * g.in_len()];
    dx.par_chunks_mut(g.in_len()).enumerate().for_each_init(
        || vec![T::zero(); if g.pointwise() { 0 } else { k * p }],
        |col, (i, dxi)| {
            let dyi = &dy[i * g.co * p..(i + 1) * g.co * p];
            let wt = View { rs: 1, cs: k }; // W^T: (K, Co)
            if g.pointwise() {
                gemm_into(k, p, g.co, w, wt, dyi, View { rs: p, cs: 1 }, dxi, false);
            } else {
                gemm_into(k, p, g.co, w, wt, dyi, View { rs: p, cs: 1 }, col, false);
                col2im(g, col, dxi);
            }
        },
    );
    dx
}

/// Images per partial sum of the weight gradient: fixed by the batch size alone.
const WGRAD_GROUPS: usize = 8;

fn grad_weight<T: WithDType>(g: &Geo, x: &[T], dy: &[T]) -> Vec<T> {
    let (k, p) = (g.k(), g.p());
    let per = g.n.div_ceil(WGRAD_GROUPS).max(1);
    let groups: Vec<usize> = (0..g.n.div_ceil(per)).collect();
    let partials: Vec<Vec<T>> = groups
        .par_iter()
        .map(|&gi| {
            let mut acc = vec![T::zero(); g.co * k];
            let mut col = vec![T::zero(); if g.pointwise() { 0 } else { k * p }];
            for (j, i) in (gi * per..((gi + 1) * per).min(g.n)).enumerate() {
                let xi = &x[i * g.in_len()..(i + 1) * g.in_len()];
                let cols: &[T] = if g.pointwise() {
                    xi
                } else {
                    im2col(g, xi, &mut col);
                    &col
                };
                let dyi = &dy[i * g.co * p..(i + 1) * g.co * p];
                // dW (Co, K) += dY_i (Co, P) x col^T (P, K)
                gemm_into(
                    g.co,
                    k,
                    p,
                    dyi,
                    View { rs: p, cs: 1 },
                    cols,
                    View { rs: 1, cs: p },
                    &mut acc,
                    j > 0,
                );
            }
            acc
        })
        .collect();
    let mut out = vec![T::zero(); g.co * k];
    for part in partials {
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
    out
}

/// The convolution op: `(x, w) -> y`, with its im2col + GEMM backward.
#[derive(Debug, Clone, Copy)]
struct Conv2dOp {
    stride: usize,
    padding: usize,
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
        let g = Geo::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let y = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(forward(
                &g,
                contiguous_slice(s1, l1, "conv2d: input")?,
                contiguous_slice(s2, l2, "conv2d: weight")?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(forward(
                &g,
                contiguous_slice(s1, l1, "conv2d: input")?,
                contiguous_slice(s2, l2, "conv2d: weight")?,
            )),
            _ => bail!("conv2d: input and weight must both be f32 or both f64"),
        };
        Ok((y, Shape::from((g.n, g.co, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let g = Geo::new(x.dims(), w.dims(), self.stride, self.padding)?;
        let dx = w.apply_op2_no_bwd(&dy, &GradInput(g))?;
        let dw = x.apply_op2_no_bwd(&dy, &GradWeight(g))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(w, dy) -> dx`.
struct GradInput(Geo);

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "candle-finetune-conv2d-grad-input"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dx = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(grad_input(
                g,
                contiguous_slice(s1, l1, "conv2d: weight")?,
                contiguous_slice(s2, l2, "conv2d: grad")?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(grad_input(
                g,
                contiguous_slice(s1, l1, "conv2d: weight")?,
                contiguous_slice(s2, l2, "conv2d: grad")?,
            )),
            _ => bail!("conv2d backward: weight and gradient must both be f32 or both f64"),
        };
        Ok((dx, Shape::from((g.n, g.ci, g.h, g.w))))
    }
}

/// `(x, dy) -> dw`.
struct GradWeight(Geo);

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "candle-finetune-conv2d-grad-weight"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let dw = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(grad_weight(
                g,
                contiguous_slice(s1, l1, "conv2d: input")?,
                contiguous_slice(s2, l2, "conv2d: grad")?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(grad_weight(
                g,
                contiguous_slice(s1, l1, "conv2d: input")?,
                contiguous_slice(s2, l2, "conv2d: grad")?,
            )),
            _ => bail!("conv2d backward: input and gradient must both be f32 or both f64"),
        };
        Ok((dw, Shape::from((g.co, g.ci, g.kh, g.kw))))
    }
}

/// `x (N, Ci, H, W)` convolved with `w (Co, Ci, kh, kw)`, square `stride` and zero `padding`,
/// differentiable in both. On CPU with f32/f64 this is the im2col + GEMM op of this module;
/// otherwise candle's `conv2d`.
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
    let fast = x.device().is_cpu()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if fast {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, Conv2dOp { stride, padding })
    } else {
        x.conv2d(w, padding, stride, 1, 1)
    }
}
