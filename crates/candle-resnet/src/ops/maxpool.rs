//! A fused, differentiable 2-D max-pool with padding (candle's `max_pool2d` has no padding and no
//! backward when the kernel size differs from the stride, which is exactly ResNet's 3x3/s2/p1
//! stem pool).
//!
//! Semantics are PyTorch's `nn.MaxPool2d(kernel, stride, padding)` with `ceil_mode=False`,
//! `dilation=1`: padding behaves as `-inf`, the output is `floor((H + 2p - k) / s) + 1`, a NaN in
//! a window wins (propagates), and the backward routes each output's gradient to the first
//! maximal element of its window in row-major order.
//!
//! On the CPU the pool is a fused kernel ([`MaxPool2d`] as a custom op); on CUDA and Metal the
//! same semantics come from candle's tensor ops ([`MaxPool2d::forward_composed`]): `k * k`
//! index selects find each window's winner and one differentiable `gather` picks it, so the
//! backward is candle's `scatter_add`.

use super::storage::contiguous_slice;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// `nn.MaxPool2d(kernel, stride, padding)` on `(N, C, H, W)` tensors, with a backward pass.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_resnet::ops::maxpool::MaxPool2d;
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let y = MaxPool2d::new(3, 2, 1).forward(&x)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![5., 7., 13., 15.]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// Geometry of one call.
#[derive(Clone, Copy)]
struct Geo {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl MaxPool2d {
    /// A max-pool with a square `kernel`, `stride` and zero-cost `-inf` `padding`.
    ///
    /// ```
    /// let stem_pool = candle_resnet::ops::maxpool::MaxPool2d::new(3, 2, 1);
    /// ```
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel,
            stride,
            padding,
        }
    }

    /// Applies the pool; differentiable with respect to `x`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// # fn main() -> candle_core::Result<()> {
    /// let x = Var::new(&[[[[1f32, 3.], [2., 0.]]]], &Device::Cpu)?;
    /// let y = candle_resnet::ops::maxpool::MaxPool2d::new(2, 2, 0).forward(x.as_tensor())?;
    /// let g = y.sum_all()?.backward()?.get(x.as_tensor()).unwrap().flatten_all()?;
    /// assert_eq!(g.to_vec1::<f32>()?, vec![0., 1., 0., 0.]);
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return self.forward_composed(x);
        }
        self.check(x)?;
        x.contiguous()?.apply_op1(*self)
    }

    /// [`MaxPool2d::forward`] on a channels-last `(N, H, W, C)` tensor, giving `(N, OH, OW, C)`:
    /// the same values and gradients, bit for bit, as the pool of the `(N, C, H, W)` transpose.
    /// On the CPU a fused kernel (each window's rows of `C` channels compared as vectors);
    /// elsewhere the `(N, C, H, W)` pool between two transposes.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_resnet::ops::maxpool::MaxPool2d;
    /// # fn main() -> candle_core::Result<()> {
    /// let x = Tensor::randn(0f32, 1., (2, 3, 9, 8), &Device::Cpu)?;
    /// let pool = MaxPool2d::new(3, 2, 1);
    /// let nchw = pool.forward(&x)?;
    /// let nhwc = pool.forward_nhwc(&x.permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2))?;
    /// assert_eq!(nchw.flatten_all()?.to_vec1::<f32>()?, nhwc.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            bail!(
                "max_pool2d: expected an (N, H, W, C) input, got shape {:?}",
                x.dims()
            );
        }
        if !x.device().is_cpu() {
            return self
                .forward(&x.permute((0, 3, 1, 2))?)?
                .permute((0, 2, 3, 1))?
                .contiguous();
        }
        self.check(x)?;
        x.contiguous()?.apply_op1(Nhwc(*self))
    }

    /// The op [`MaxPool2d::forward_nhwc`] applies on the CPU to `x`, for callers that run it
    /// themselves ([`crate::ops::block`]).
    pub(crate) fn nhwc_op(&self, x: &Tensor) -> Result<Nhwc> {
        self.check(x)?;
        Ok(Nhwc(*self))
    }

    /// The pool from candle tensor ops only, with the fused kernel's semantics (first maximal
    /// element of each window in row-major order, the first NaN wins, padding never does):
    /// what [`MaxPool2d::forward`] runs on CUDA and Metal, and runs anywhere. The winner's
    /// position in the plane is found with `k * k` `index_select`s and compare/`where_cond`
    /// steps (not differentiated), then `gather` takes the values, so the gradient is candle's
    /// `scatter_add` of `dy` onto the winners.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_resnet::ops::maxpool::MaxPool2d;
    /// # fn main() -> candle_core::Result<()> {
    /// let x = Tensor::randn(0f32, 1., (2, 3, 9, 8), &Device::Cpu)?;
    /// let pool = MaxPool2d::new(3, 2, 1);
    /// let (a, b) = (pool.forward(&x)?, pool.forward_composed(&x)?);
    /// assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x)?;
        let g = self.geo(x.shape())?;
        let (n, c, _, _) = x.dims4()?;
        let dev = x.device();
        let flat = x.reshape((g.planes, g.h * g.w))?;
        let plane = flat.detach();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        // (value, position) of the best element so far, and whether it is a real element yet.
        let mut best: Option<(Tensor, Tensor, Tensor)> = None;
        for di in 0..k {
            for dj in 0..k {
                // This window offset's position in the plane for every output, or None (padding).
                let pos: Vec<Option<u32>> = (0..g.oh * g.ow)
                    .map(|o| {
                        let y = (o / g.ow * s + di).checked_sub(p).filter(|&y| y < g.h)?;
                        let x = (o % g.ow * s + dj).checked_sub(p).filter(|&x| x < g.w)?;
                        Some((y * g.w + x) as u32)
                    })
                    .collect();
                if pos.iter().all(Option::is_none) {
                    continue;
                }
                let valid: Vec<u8> = pos.iter().map(|q| q.is_some() as u8).collect();
                let pos: Vec<u32> = pos.iter().map(|q| q.unwrap_or(0)).collect();
                let pos = Tensor::from_vec(pos, g.oh * g.ow, dev)?;
                let valid = Tensor::from_vec(valid, (1, g.oh * g.ow), dev)?
                    .broadcast_as((g.planes, g.oh * g.ow))?;
                let v = plane.index_select(&pos, 1)?;
                let pos = pos.unsqueeze(0)?.broadcast_as((g.planes, g.oh * g.ow))?;
                best = Some(match best {
                    None => (v, pos.contiguous()?, valid.contiguous()?),
                    Some((bv, bp, have)) => {
                        // take = valid & (!have | v > bv | (isnan(v) & !isnan(bv)))
                        let nan_wins = v.ne(&v)?.mul(&bv.eq(&bv)?)?;
                        let better = v.gt(&bv)?.maximum(&nan_wins)?.maximum(&have.eq(0u8)?)?;
                        let take = valid.mul(&better)?;
                        (
                            take.where_cond(&v, &bv)?,
                            take.where_cond(&pos, &bp)?,
                            have.maximum(&valid)?,
                        )
                    }
                });
            }
        }
        let Some((_, pos, _)) = best else {
            bail!("max_pool2d: empty window");
        };
        flat.gather(&pos, 1)?.reshape((n, c, g.oh, g.ow))
    }

    /// The pool's parameters and the input's rank (shape against the kernel: [`MaxPool2d::geo`]).
    fn check(&self, x: &Tensor) -> Result<()> {
        if x.rank() != 4 {
            bail!(
                "max_pool2d: expected an (N, C, H, W) input, got shape {:?}",
                x.dims()
            );
        }
        if self.kernel == 0 || self.stride == 0 {
            bail!("max_pool2d: kernel and stride must be positive");
        }
        if 2 * self.padding > self.kernel {
            bail!(
                "max_pool2d: padding {} must be at most half the kernel {}",
                self.padding,
                self.kernel
            );
        }
        Ok(())
    }

    fn geo(&self, shape: &Shape) -> Result<Geo> {
        let (n, c, h, w) = shape.dims4()?;
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding);
        if hp < self.kernel || wp < self.kernel {
            bail!(
                "max_pool2d: input {h}x{w} (padded {hp}x{wp}) is smaller than the {}x{} kernel",
                self.kernel,
                self.kernel
            );
        }
        Ok(Geo {
            planes: n * c,
            h,
            w,
            oh: (hp - self.kernel) / self.stride + 1,
            ow: (wp - self.kernel) / self.stride + 1,
        })
    }

    /// The input rows (or columns) `lo..hi` of each output row (or column)'s window, clipped to
    /// the image: padding never wins, so it is simply left out.
    fn ranges(&self, out: usize, len: usize) -> Vec<(usize, usize)> {
        (0..out)
            .map(|o| {
                let start = (o * self.stride) as isize - self.padding as isize;
                let lo = start.max(0) as usize;
                let hi = ((start + self.kernel as isize).max(0) as usize).min(len);
                (lo, hi.max(lo))
            })
            .collect()
    }

    /// Forward, separably: each input row's maximum over every output column's window, then the
    /// maximum of those over each output row's window. Both passes keep the first maximal value
    /// in scan order (`v > best`, and the first NaN wins), so the result is the first maximal
    /// element of the window in row-major order, as in PyTorch, signed zeros included.
    fn fwd<T: WithDType>(&self, x: &[T], g: &Geo) -> Vec<T> {
        let (rows, cols) = (self.ranges(g.oh, g.h), self.ranges(g.ow, g.w));
        let mut out = vec![T::zero(); g.planes * g.oh * g.ow];
        out.par_chunks_mut(g.oh * g.ow)
            .zip(x.par_chunks(g.h * g.w))
            .for_each_init(Vec::new, |across: &mut Vec<T>, (o, plane)| {
                across.clear();
                for row in plane.chunks_exact(g.w) {
                    across.extend(cols.iter().map(|&(lo, hi)| first_max(&row[lo..hi])));
                }
                for (orow, &(lo, hi)) in o.chunks_exact_mut(g.ow).zip(&rows) {
                    for (j, dst) in orow.iter_mut().enumerate() {
                        let mut best = across[lo * g.ow + j];
                        for y in lo + 1..hi {
                            best = pick(best, across[y * g.ow + j]);
                        }
                        *dst = best;
                    }
                }
            });
        out
    }

    /// Backward: each output's gradient goes to the first element of its window equal to the
    /// output (the first NaN for a NaN output), which is the first maximal element; windows
    /// overlap, so each plane sums in f64 and rounds once.
    fn bwd_kernel<T: WithDType>(&self, x: &[T], y: &[T], dy: &[T], g: &Geo) -> Vec<T> {
        let (rows, cols) = (self.ranges(g.oh, g.h), self.ranges(g.ow, g.w));
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(g.h * g.w)
            .zip(x.par_chunks(g.h * g.w))
            .zip(y.par_chunks(g.oh * g.ow).zip(dy.par_chunks(g.oh * g.ow)))
            .for_each_init(Vec::new, |acc: &mut Vec<f64>, ((d, plane), (yp, dyp))| {
                acc.clear();
                acc.resize(g.h * g.w, 0.0);
                for (i, &(ylo, yhi)) in rows.iter().enumerate() {
                    for (j, &(xlo, xhi)) in cols.iter().enumerate() {
                        let m = yp[i * g.ow + j];
                        // `m != m`: a NaN output, won by the window's first NaN.
                        #[allow(clippy::eq_op)]
                        let hit = |v: T| (v == m) | ((m != m) & (v != v));
                        // Scanned backwards with selects (no branch to mispredict): the last
                        // hit seen is the first in row-major order. Some element always hits,
                        // `m` being the maximum of this very window.
                        let mut at = ylo * g.w + xlo;
                        for r in (ylo..yhi).rev() {
                            for c in (xlo..xhi).rev() {
                                let q = r * g.w + c;
                                at = if hit(plane[q]) { q } else { at };
                            }
                        }
                        acc[at] += dyp[i * g.ow + j].to_f64();
                    }
                }
                for (dst, &a) in d.iter_mut().zip(acc.iter()) {
                    *dst = T::from_f64(a);
                }
            });
        dx
    }
}

/// The pool on channels-last tensors (see [`MaxPool2d::forward_nhwc`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Nhwc(MaxPool2d);

impl Nhwc {
    /// The geometry of `(N, H, W, C)` dims, as `(geometry, N, C)`.
    fn geo(&self, dims: &[usize]) -> Result<(Geo, usize, usize)> {
        let &[n, h, w, c] = dims else {
            bail!("max_pool2d: expected an (N, H, W, C) input, got shape {dims:?}");
        };
        Ok((self.0.geo(&Shape::from((n, c, h, w)))?, n, c))
    }

    /// Forward: per output pixel, the window's pixels in row-major order, each a row of `C`
    /// values kept where [`pick`] takes them: the first maximal element, as the plane kernel.
    fn fwd<T: WithDType>(&self, x: &[T], g: &Geo, c: usize) -> Vec<T> {
        let p = &self.0;
        let (rows, cols) = (p.ranges(g.oh, g.h), p.ranges(g.ow, g.w));
        let mut out = vec![T::zero(); x.len() / (g.h * g.w).max(1) * g.oh * g.ow];
        if c == 0 || out.is_empty() {
            return out;
        }
        out.par_chunks_mut(g.oh * g.ow * c)
            .zip(x.par_chunks(g.h * g.w * c))
            .for_each(|(o, img)| {
                for (po, best) in o.chunks_exact_mut(c).enumerate() {
                    let ((ylo, yhi), (xlo, xhi)) = (rows[po / g.ow], cols[po % g.ow]);
                    best.copy_from_slice(&img[(ylo * g.w + xlo) * c..][..c]);
                    for r in ylo..yhi {
                        for q in xlo..xhi {
                            if (r, q) == (ylo, xlo) {
                                continue;
                            }
                            let v = &img[(r * g.w + q) * c..][..c];
                            for (b, &v) in best.iter_mut().zip(v) {
                                *b = pick(*b, v);
                            }
                        }
                    }
                }
            });
        out
    }

    /// Backward: each output's gradient to the first element of its window equal to the output
    /// (the first NaN for a NaN output), summed per image in f64 in output order and rounded
    /// once: the plane kernel's sums, in the same order.
    ///
    /// Per output pixel, the window's pixels are visited in row-major order, a row of `C`
    /// channels at a time: each channel adds its gradient where it first hits and `0.0`
    /// elsewhere. Adding `+0.0` leaves every sum's bits as they are (a sum that starts at `+0.0`
    /// is never `-0.0`), and a masked add over a row vectorises where a scatter to each
    /// channel's winner does not.
    fn bwd_kernel<T: WithDType>(&self, x: &[T], y: &[T], dy: &[T], g: &Geo, c: usize) -> Vec<T> {
        let p = &self.0;
        let (rows, cols) = (p.ranges(g.oh, g.h), p.ranges(g.ow, g.w));
        let mut dx = vec![T::zero(); x.len()];
        let (hwc, ohwc) = (g.h * g.w * c, g.oh * g.ow * c);
        if c == 0 || hwc == 0 || ohwc == 0 {
            return dx;
        }
        // The f64 sums live in a ring of input rows, as many as one window spans: windows move
        // down (their first row never decreases), so a row below the current window's first
        // is complete, rounded into dx and its slot reused. The sums and their order are those
        // of a whole-image buffer, in a few rows that stay in cache.
        let depth = rows
            .iter()
            .map(|&(lo, hi)| hi - lo)
            .max()
            .unwrap_or(1)
            .max(1);
        let row_len = g.w * c;
        dx.par_chunks_mut(hwc)
            .zip(x.par_chunks(hwc))
            .zip(y.par_chunks(ohwc).zip(dy.par_chunks(ohwc)))
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(ring, found): &mut (Vec<f64>, Vec<bool>), ((d, img), (yi, dyi))| {
                    ring.clear();
                    ring.resize(depth * row_len, 0.0);
                    let mut flush = |r: usize, ring: &mut [f64]| {
                        let slot = &mut ring[(r % depth) * row_len..][..row_len];
                        for (dst, a) in d[r * row_len..][..row_len].iter_mut().zip(slot) {
                            *dst = T::from_f64(*a);
                            *a = 0.0;
                        }
                    };
                    let mut done = 0;
                    for (po, (m, dm)) in yi.chunks_exact(c).zip(dyi.chunks_exact(c)).enumerate() {
                        let ((ylo, yhi), (xlo, xhi)) = (rows[po / g.ow], cols[po % g.ow]);
                        while done < ylo {
                            flush(done, ring);
                            done += 1;
                        }
                        found.clear();
                        found.resize(c, false);
                        for r in ylo..yhi {
                            for q in xlo..xhi {
                                let v = &img[(r * g.w + q) * c..][..c];
                                let sums = &mut ring[(r % depth) * row_len + q * c..][..c];
                                let lanes = sums.iter_mut().zip(found.iter_mut());
                                for (((s, f), &v), (&m, &d)) in lanes.zip(v).zip(m.iter().zip(dm)) {
                                    #[allow(clippy::eq_op)]
                                    let hit = (v == m) | ((m != m) & (v != v));
                                    let take = hit & !*f;
                                    *f |= hit;
                                    *s += if take { d.to_f64() } else { 0.0 };
                                }
                            }
                        }
                    }
                    for r in done..g.h {
                        flush(r, ring);
                    }
                },
            );
        dx
    }
}

impl CustomOp1 for Nhwc {
    fn name(&self) -> &'static str {
        "candle-finetune-max-pool2d-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, n, c) = self.geo(l.dims())?;
        let what = "max_pool2d: input";
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.fwd(contiguous_slice(s, l, what)?, &g, c)),
            CpuStorage::F64(_) => CpuStorage::F64(self.fwd(contiguous_slice(s, l, what)?, &g, c)),
            CpuStorage::F16(_) => CpuStorage::F16(self.fwd(contiguous_slice(s, l, what)?, &g, c)),
            CpuStorage::BF16(_) => CpuStorage::BF16(self.fwd(contiguous_slice(s, l, what)?, &g, c)),
            _ => bail!("max_pool2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((n, g.oh, g.ow, c))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &MaxPool2dBackward {
                pool: self.0,
                nhwc: true,
            },
        )?;
        Ok(Some(grad))
    }
}

/// `v` replaces `best` when greater, or when it is the first NaN.
#[inline]
#[allow(clippy::eq_op)]
fn pick<T: WithDType>(best: T, v: T) -> T {
    // Non-short-circuit `|` / `&`: a select, not a branch the random data would mispredict.
    let take = (v > best) | ((v != v) & (best == best));
    if take {
        v
    } else {
        best
    }
}

/// The first maximal element of a non-empty run (see [`pick`]).
#[inline]
fn first_max<T: WithDType>(run: &[T]) -> T {
    run[1..].iter().fold(run[0], |b, &v| pick(b, v))
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "candle-finetune-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geo(l.shape())?;
        let (n, c, _, _) = l.shape().dims4()?;
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.fwd(contiguous_slice::<f32>(s, l, "max_pool2d: input")?, &g))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.fwd(contiguous_slice::<f64>(s, l, "max_pool2d: input")?, &g))
            }
            CpuStorage::F16(_) => {
                CpuStorage::F16(self.fwd(contiguous_slice::<f16>(s, l, "max_pool2d: input")?, &g))
            }
            CpuStorage::BF16(_) => {
                CpuStorage::BF16(self.fwd(contiguous_slice::<bf16>(s, l, "max_pool2d: input")?, &g))
            }
            _ => bail!("max_pool2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((n, c, g.oh, g.ow))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &MaxPool2dBackward {
                pool: *self,
                nhwc: false,
            },
        )?;
        Ok(Some(grad))
    }
}

use candle_core::backend::BackendStorage;

/// Backward of [`MaxPool2d`] (or of its channels-last form) as a custom op of `(input, output,
/// grad_output)`.
struct MaxPool2dBackward {
    pool: MaxPool2d,
    nhwc: bool,
}

impl CustomOp3 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "candle-finetune-max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, c, out_dims) = if self.nhwc {
            let (g, n, c) = Nhwc(self.pool).geo(l1.dims())?;
            (g, Some(c), [n, g.oh, g.ow, c])
        } else {
            let g = self.pool.geo(l1.shape())?;
            let (n, c, _, _) = l1.shape().dims4()?;
            (g, None, [n, c, g.oh, g.ow])
        };
        if l2.dims() != out_dims || l3.dims() != out_dims {
            bail!(
                "max_pool2d backward: output {:?} / gradient {:?} do not match the pooled shape {out_dims:?}",
                l2.dims(),
                l3.dims()
            );
        }
        fn run<T: WithDType>(
            p: &MaxPool2d,
            (g, c): (&Geo, Option<usize>),
            (s1, l1): (&CpuStorage, &Layout),
            (s2, l2): (&CpuStorage, &Layout),
            (s3, l3): (&CpuStorage, &Layout),
        ) -> Result<Vec<T>> {
            let (x, y, dy) = (
                contiguous_slice::<T>(s1, l1, "max_pool2d backward: input")?,
                contiguous_slice::<T>(s2, l2, "max_pool2d backward: output")?,
                contiguous_slice::<T>(s3, l3, "max_pool2d backward: gradient")?,
            );
            Ok(match c {
                Some(c) => Nhwc(*p).bwd_kernel(x, y, dy, g, c),
                None => p.bwd_kernel(x, y, dy, g),
            })
        }
        let (p, g) = (&self.pool, (&g, c));
        let a = ((s1, l1), (s2, l2), (s3, l3));
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(run(p, g, a.0, a.1, a.2)?),
            CpuStorage::F64(_) => CpuStorage::F64(run(p, g, a.0, a.1, a.2)?),
            CpuStorage::F16(_) => CpuStorage::F16(run(p, g, a.0, a.1, a.2)?),
            CpuStorage::BF16(_) => CpuStorage::BF16(run(p, g, a.0, a.1, a.2)?),
            _ => bail!("max_pool2d backward: unsupported dtype {:?}", s1.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }
}
