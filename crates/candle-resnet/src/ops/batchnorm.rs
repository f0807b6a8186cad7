//! The fused CPU kernels of train-mode batch norm: per-channel statistics, normalisation, and the
//! backward, each one parallel pass (over channels for reductions, over planes otherwise).
//!
//! `batch_norm_train(x, gamma, beta, eps, relu)` returns `y` and the batch `(mean, biased var)`; its
//! backward is the analytic one (gradient through the batch statistics included):
//! `dx = gamma * invstd / M * (M * dy - sum(dy) - xhat * sum(dy * xhat))`,
//! `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)`, sums over `(N, H, W)`, `M = N * H * W`.
//! Sums are accumulated in f64.

use super::storage::contiguous_slice;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use candle_ddp::Collective;
use rayon::prelude::*;
use std::sync::Arc;

#[path = "batchnorm_rows.rs"]
mod rows;

/// `(N, C, H*W)`: with `H*W == 1` the input is an `(N, C)` matrix, which is also how a
/// channels-last `(N, H, W, C)` tensor arrives (as `(N*H*W, C, 1, 1)`); the kernels of
/// [`rows`] take that case.
#[derive(Debug, Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    hw: usize,
}

impl Geo {
    /// The geometry of `x`, `(N, C, H, W)`, or `(N, H, W, C)` when `channels_last` (read as the
    /// `(N*H*W, C)` matrix it is in memory: no reshape, so no extra node in the graph whose
    /// gradient candle's backward would accumulate into a zeroed copy).
    fn new(dims: &[usize], channels_last: bool) -> Result<Self> {
        match (dims, channels_last) {
            (&[n, c, h, w], false) => Ok(Self { n, c, hw: h * w }),
            (&[n, h, w, c], true) => Ok(Self {
                n: n * h * w,
                c,
                hw: 1,
            }),
            (_, false) => bail!("batch_norm: expected an (N, C, H, W) input, got {dims:?}"),
            (_, true) => bail!("batch_norm: expected an (N, H, W, C) input, got {dims:?}"),
        }
    }
    fn m(&self) -> usize {
        self.n * self.hw
    }
    fn plane<'a, T>(&self, x: &'a [T], n: usize, c: usize) -> &'a [T] {
        &x[(n * self.c + c) * self.hw..(n * self.c + c + 1) * self.hw]
    }
}

/// Independent f64 partial sums: a single running sum is one long chain of dependent adds
/// (latency-bound); eight chains in parallel keep the adder busy. The order is fixed, so the
/// result does not depend on the thread count.
const LANES: usize = 8;

#[derive(Default)]
struct Lanes([f64; LANES]);

impl Lanes {
    #[inline]
    fn add(&mut self, v: [f64; LANES]) {
        for (a, b) in self.0.iter_mut().zip(v) {
            *a += b;
        }
    }
    fn total(&self) -> f64 {
        let [a, b, c, d, e, f, g, h] = self.0;
        ((a + b) + (c + d)) + ((e + f) + (g + h))
    }
}

/// Per-channel `[mean..., biased var...]` as `(2, C)`.
fn stats<T: WithDType>(g: &Geo, x: &[T]) -> Vec<T> {
    if g.hw == 1 {
        return rows::stats(g, x);
    }
    let per: Vec<(f64, f64)> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            // Shifted sums (shift = the channel's first value) keep the variance accurate.
            let shift = g.plane(x, 0, c).first().map_or(0.0, |v| v.to_f64());
            let (mut s, mut s2) = (Lanes::default(), Lanes::default());
            for n in 0..g.n {
                let plane = g.plane(x, n, c);
                let mut it = plane.chunks_exact(LANES);
                for ch in &mut it {
                    let d: [f64; LANES] = std::array::from_fn(|l| ch[l].to_f64() - shift);
                    s.add(d);
                    s2.add(d.map(|v| v * v));
                }
                for v in it.remainder() {
                    let d = v.to_f64() - shift;
                    s.0[0] += d;
                    s2.0[0] += d * d;
                }
            }
            let (s, s2) = (s.total(), s2.total());
            let m = g.m() as f64;
            let mean = s / m;
            (shift + mean, (s2 / m - mean * mean).max(0.0))
        })
        .collect();
    per.iter()
        .map(|p| T::from_f64(p.0))
        .chain(per.iter().map(|p| T::from_f64(p.1)))
        .collect()
}

/// Batch statistics op: `x -> (2, C)`; `.0`: `x` is channels-last.
struct Stats(bool);

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "candle-finetune-bn-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geo::new(l.dims(), self.0)?;
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(stats(
                &g,
                contiguous_slice::<f32>(s, l, "batch_norm: tensors")?,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(stats(
                &g,
                contiguous_slice::<f64>(s, l, "batch_norm: tensors")?,
            )),
            _ => bail!("batch_norm: fused kernels take f32 or f64"),
        };
        Ok((out, Shape::from((2, g.c))))
    }
}

/// `(x, stats (2, C), affine (2, C) = [gamma; beta]) -> y`.
#[derive(Debug, Clone)]
struct Normalize {
    eps: f64,
    /// Followed by ReLU, fused: `max(y, 0)` written directly, its gradient mask applied first
    /// in the backward (bit-identical to the two ops).
    relu: bool,
    /// Synchronised batch norm: the world whose batches the statistics cover, and their number
    /// of values per channel (`M` of the backward).
    sync: Option<(Arc<dyn Collective>, f64)>,
    /// `x` is `(N, H, W, C)`.
    channels_last: bool,
}

/// The forward's per-channel `(scale, shift)` in `T`: `y = x * scale + shift`. The backward
/// recomputes them (and so the fused ReLU's mask) bit for bit from the same inputs.
#[inline]
fn channel_affine<T: WithDType>(eps: f64, mean: T, var: T, gamma: T, beta: T) -> (T, T) {
    let scale = gamma.to_f64() / (var.to_f64() + eps).sqrt();
    let shift = beta.to_f64() - mean.to_f64() * scale;
    (T::from_f64(scale), T::from_f64(shift))
}

/// Elements per parallel task of the element-wise passes: whole planes, at least this many
/// elements, so that a 1x1 map (512 channels x 128 images) is not 65,536 tasks.
const TASK: usize = 1 << 13;

impl Geo {
    /// Planes per parallel task (see [`TASK`]).
    fn planes_per_task(&self) -> usize {
        TASK.div_ceil(self.hw.max(1))
    }
}

/// `x * scale + shift` per channel, plus `residual` where given, then ReLU when `relu`.
fn normalize<T: WithDType>(
    g: &Geo,
    (eps, relu): (f64, bool),
    x: &[T],
    st: &[T],
    af: &[T],
    residual: Option<&[T]>,
) -> Vec<T> {
    let coef: Vec<(T, T)> = (0..g.c)
        .map(|c| channel_affine(eps, st[c], st[g.c + c], af[c], af[g.c + c]))
        .collect();
    if g.hw == 1 {
        return rows::normalize(g, relu, x, &coef, residual);
    }
    let ppt = g.planes_per_task();
    let (hw, task) = (g.hw.max(1), g.hw * ppt);
    let tail = |v: T| if relu { super::relu1(v) } else { v };
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .enumerate()
        .for_each(|(t, (out, xs))| {
            for (k, (out, xp)) in out.chunks_mut(hw).zip(xs.chunks(hw)).enumerate() {
                let (scale, shift) = coef[(t * ppt + k) % g.c];
                match residual {
                    None => {
                        for (o, &v) in out.iter_mut().zip(xp) {
                            *o = tail(v * scale + shift);
                        }
                    }
                    Some(res) => {
                        let rp = &res[(t * ppt + k) * hw..][..xp.len()];
                        for ((o, &v), &r) in out.iter_mut().zip(xp).zip(rp) {
                            *o = tail((v * scale + shift) + r);
                        }
                    }
                }
            }
        });
    y
}

impl CustomOp3 for Normalize {
    fn name(&self) -> &'static str {
        "candle-finetune-bn-normalize"
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
        let g = Geo::new(l1.dims(), self.channels_last)?;
        let what = "batch_norm: tensors";
        macro_rules! run {
            ($t:ty) => {{
                let (x, st, af) = (
                    contiguous_slice::<$t>(s1, l1, what)?,
                    contiguous_slice::<$t>(s2, l2, what)?,
                    contiguous_slice::<$t>(s3, l3, what)?,
                );
                if st.len() != 2 * g.c || af.len() != 2 * g.c {
                    bail!(
                        "batch_norm: statistics and affine must be (2, {}) each",
                        g.c
                    );
                }
                normalize(&g, (self.eps, self.relu), x, st, af, None)
            }};
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(run!(f32)),
            CpuStorage::F64(_) => CpuStorage::F64(run!(f64)),
            _ => bail!("batch_norm: fused kernels take f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        st: &Tensor,
        af: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // With the fused ReLU, its mask (output > 0) is recomputed inside both kernels from x and
        // the forward's exact per-channel affine: no masked copy of dy.
        let _ = y;
        let packed = Tensor::cat(&[st, af], 0)?; // (4, C): mean, var, gamma, beta
        let (dx, sums) = self.passes(x, dy, &packed)?;
        // sums = [sum(dy * xhat); sum(dy)] = [dgamma; dbeta]: the affine gradient as stacked.
        // The statistics were computed from x by a detached op: their dependence on x is in dx.
        Ok((Some(dx), None, Some(sums)))
    }
}

impl Normalize {
    /// The backward's two passes over `(x, dy, packed (4, C) = [mean; var; gamma; beta])`:
    /// `(dx, [dgamma; dbeta])`.
    fn passes(&self, x: &Tensor, dy: &Tensor, packed: &Tensor) -> Result<(Tensor, Tensor)> {
        let dy = dy.contiguous()?;
        let op = |dx, count| Backward {
            eps: self.eps,
            relu: self.relu,
            dx,
            count,
            channels_last: self.channels_last,
        };
        let sums = x.apply_op3_no_bwd(&dy, packed, &op(false, None))?; // (2, C)
                                                                       // Synchronised: the input gradient needs the sums over every rank's batch (the
                                                                       // statistics depended on all of them); the affine gradient stays this rank's share.
        let (all, count) = match &self.sync {
            Some((world, count)) => (all_reduce_sum(world.as_ref(), &sums)?, Some(*count)),
            None => (sums.clone(), None),
        };
        let packed = Tensor::cat(&[packed, &all], 0)?; // (6, C)
        let dx = x.apply_op3_no_bwd(&dy, &packed, &op(true, count))?;
        Ok((dx, sums))
    }
}

/// `relu(bn(x) + residual)`, the end of a ResNet block, as one op:
/// `(x, packed (4, C) = [mean; var; gamma; beta], residual) -> y`. One pass forward, and one
/// full-size node fewer in the graph than the batch norm and [`crate::ops::relu::add_relu`]
/// (whose gradient candle's backward would add into a zeroed buffer); the same values and
/// gradients bit for bit.
struct NormalizeAddRelu(Normalize);

impl CustomOp3 for NormalizeAddRelu {
    fn name(&self) -> &'static str {
        "candle-resnet-bn-add-relu"
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
        let g = Geo::new(l1.dims(), self.0.channels_last)?;
        if l1.shape() != l3.shape() {
            bail!(
                "batch_norm: the residual {:?} differs from the input {:?}",
                l3.dims(),
                l1.dims()
            );
        }
        let what = "batch_norm: tensors";
        macro_rules! run {
            ($t:ty) => {{
                let pk = contiguous_slice::<$t>(s2, l2, what)?;
                if pk.len() != 4 * g.c {
                    bail!(
                        "batch_norm: statistics and affine must be (4, {}) packed",
                        g.c
                    );
                }
                let (st, af) = pk.split_at(2 * g.c);
                let (x, res) = (
                    contiguous_slice(s1, l1, what)?,
                    contiguous_slice(s3, l3, what)?,
                );
                normalize(&g, (self.0.eps, true), x, st, af, Some(res))
            }};
        }
        let out = match (s1, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(run!(f32)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(run!(f64)),
            _ => bail!("batch_norm: fused kernels take f32 or f64 (input and residual alike)"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _residual: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The ReLU's mask comes from the output (it saw the residual); the batch norm's
        // backward then runs on the masked gradient, which is also the residual's.
        let dm = crate::ops::relu::relu_grad(y, dy)?;
        let (dx, sums) = self.0.passes(x, &dm, packed)?;
        let dpacked = Tensor::cat(&[&sums.zeros_like()?, &sums], 0)?;
        Ok((Some(dx), Some(dpacked), Some(dm)))
    }
}

/// Backward kernels over `(x, dy, packed)`: per-channel sums (`dx == false`, output (2, C)) or
/// the input gradient (`dx == true`, packed holds the sums too).
struct Backward {
    eps: f64,
    /// The forward fused a ReLU: dy counts only where its output was positive.
    relu: bool,
    dx: bool,
    /// Values per channel the statistics cover, where not this batch's (synchronised).
    count: Option<f64>,
    /// `x` and `dy` are `(N, H, W, C)`.
    channels_last: bool,
}

/// `dy`, or 0 where the fused ReLU's output `relu(x * scale + shift)` was `<= 0` (PyTorch's
/// `threshold_backward`: 0 at 0; a NaN output passes the gradient).
#[inline]
fn masked<T: WithDType>(relu: bool, v: T, d: T, (scale, shift): (T, T)) -> T {
    // Non-short-circuit `|`: a select, not a branch that random signs would mispredict.
    let at_or_below_zero = v * scale + shift <= T::zero();
    let keep = !relu | !at_or_below_zero;
    if keep {
        d
    } else {
        T::zero()
    }
}

fn sums<T: WithDType>(g: &Geo, (eps, relu): (f64, bool), x: &[T], dy: &[T], pk: &[T]) -> Vec<T> {
    if g.hw == 1 {
        return rows::sums(g, (eps, relu), x, dy, pk);
    }
    let per: Vec<(f64, f64)> = (0..g.c)
        .into_par_iter()
        .map(|c| {
            let mean = pk[c].to_f64();
            let invstd = 1.0 / (pk[g.c + c].to_f64() + eps).sqrt();
            let aff = channel_affine(eps, pk[c], pk[g.c + c], pk[2 * g.c + c], pk[3 * g.c + c]);
            let (mut sg, mut sb) = (Lanes::default(), Lanes::default());
            for n in 0..g.n {
                let (xp, dp) = (g.plane(x, n, c), g.plane(dy, n, c));
                let mut xi = xp.chunks_exact(LANES);
                let mut di = dp.chunks_exact(LANES);
                for (xc, dc) in (&mut xi).zip(&mut di) {
                    let d: [f64; LANES] =
                        std::array::from_fn(|l| masked(relu, xc[l], dc[l], aff).to_f64());
                    sg.add(std::array::from_fn(|l| d[l] * (xc[l].to_f64() - mean)));
                    sb.add(d);
                }
                for (&v, &d) in xi.remainder().iter().zip(di.remainder()) {
                    let d = masked(relu, v, d, aff).to_f64();
                    sg.0[0] += d * (v.to_f64() - mean);
                    sb.0[0] += d;
                }
            }
            (sg.total() * invstd, sb.total())
        })
        .collect();
    per.iter()
        .map(|p| T::from_f64(p.0))
        .chain(per.iter().map(|p| T::from_f64(p.1)))
        .collect()
}

/// `(a, cx, b)` of `dx = a * dy + cx * x + b` for one channel.
type Coef = (f64, f64, f64);

fn input_grad<T: WithDType>(
    g: &Geo,
    (eps, relu, m): (f64, bool, f64),
    x: &[T],
    dy: &[T],
    pk: &[T],
) -> Vec<T> {
    let c_n = g.c;
    // Per channel: dx = a * dy + cx * x + b, and the forward's affine for the ReLU mask.
    let coef: Vec<(Coef, (T, T))> = (0..c_n)
        .map(|c| {
            let mean = pk[c].to_f64();
            let invstd = 1.0 / (pk[c_n + c].to_f64() + eps).sqrt();
            let gamma = pk[2 * c_n + c].to_f64();
            let (sg, sb) = (pk[4 * c_n + c].to_f64(), pk[5 * c_n + c].to_f64());
            let k = gamma * invstd;
            // dx = k * (dy - sb/M - xhat * sg/M), xhat = (x - mean) * invstd; sg already holds
            // one factor invstd (it sums dy * xhat).
            let b = -k * (sb / m - mean * invstd * sg / m);
            let cx = -k * invstd * sg / m;
            let aff = channel_affine(eps, pk[c], pk[c_n + c], pk[2 * c_n + c], pk[3 * c_n + c]);
            ((k, cx, b), aff)
        })
        .collect();
    if g.hw == 1 {
        return rows::input_grad(g, relu, x, dy, &coef, &pk[..c_n]);
    }
    let ppt = g.planes_per_task();
    let hw = g.hw.max(1);
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(hw * ppt)
        .zip(x.par_chunks(hw * ppt).zip(dy.par_chunks(hw * ppt)))
        .enumerate()
        .for_each(|(t, (out, (xs, ds)))| {
            for (k, (out, (xp, dp))) in out
                .chunks_mut(hw)
                .zip(xs.chunks(hw).zip(ds.chunks(hw)))
                .enumerate()
            {
                let ((a, cx, b), aff) = coef[(t * ppt + k) % c_n];
                for ((o, &v), &d) in out.iter_mut().zip(xp).zip(dp) {
                    let d = masked(relu, v, d, aff);
                    *o = T::from_f64(a * d.to_f64() + cx * v.to_f64() + b);
                }
            }
        });
    dx
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "candle-finetune-bn-backward"
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
        let g = Geo::new(l1.dims(), self.channels_last)?;
        macro_rules! run {
            ($t:ty, $v:ident) => {{
                let (x, dy, pk) = (
                    contiguous_slice::<$t>(s1, l1, "batch_norm: tensors")?,
                    contiguous_slice::<$t>(s2, l2, "batch_norm: tensors")?,
                    contiguous_slice::<$t>(s3, l3, "batch_norm: tensors")?,
                );
                if self.dx {
                    (
                        CpuStorage::$v(input_grad(
                            &g,
                            (self.eps, self.relu, self.count.unwrap_or(g.m() as f64)),
                            x,
                            dy,
                            pk,
                        )),
                        l1.shape().clone(),
                    )
                } else {
                    (
                        CpuStorage::$v(sums(&g, (self.eps, self.relu), x, dy, pk)),
                        Shape::from((2, g.c)),
                    )
                }
            }};
        }
        Ok(match s1 {
            CpuStorage::F32(_) => run!(f32, F32),
            CpuStorage::F64(_) => run!(f64, F64),
            _ => bail!("batch_norm: fused kernels take f32 or f64"),
        })
    }
}

/// What follows the normalisation, in the same pass.
#[derive(Clone, Copy)]
pub(crate) enum Tail<'a> {
    /// Nothing: `y = bn(x)`.
    None,
    /// `y = relu(bn(x))`.
    Relu,
    /// `y = relu(bn(x) + residual)` (the residual has `x`'s shape and dtype).
    AddRelu(&'a Tensor),
}

/// Train-mode batch norm of `x (N, C, H, W)` (`(N, H, W, C)` when `channels_last`) followed by
/// `tail`: returns `y` and the detached batch statistics `(2, C) = [mean; biased variance]`.
/// Differentiable in `x`, `gamma` and `beta` (and the residual).
pub(crate) fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    tail: Tail,
    channels_last: bool,
) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    let st = x.apply_op1_no_bwd(&Stats(channels_last))?;
    let y = normalize_op(&x, &st, (gamma, beta), (eps, tail, channels_last), None)?;
    Ok((y, st))
}

/// One train-mode batch norm whose graph its caller keeps ([`crate::ops::block`]): the batch
/// statistics of a detached input and what the kernels need to normalise it and to run the
/// backward, none of it in candle's graph.
pub(crate) struct Detached {
    op: Normalize,
    /// `(2, C)`: `[mean; biased variance]`.
    stats: Tensor,
    /// `(2, C)`: `[gamma; beta]` in the input's dtype.
    affine: Tensor,
    /// `(4, C)`: `[mean; var; gamma; beta]`.
    packed: Tensor,
}

impl Detached {
    /// The statistics of `x` (CPU f32/f64, contiguous, detached) and the affine `(2, C)`
    /// (detached, `x`'s dtype); `relu`: the ReLU follows (for [`Detached::normalize`] and the
    /// backward).
    pub(crate) fn new(
        x: &Tensor,
        affine: &Tensor,
        eps: f64,
        relu: bool,
        channels_last: bool,
    ) -> Result<Self> {
        let stats = x.apply_op1_no_bwd(&Stats(channels_last))?;
        let packed = Tensor::cat(&[&stats, affine], 0)?;
        let op = Normalize {
            eps,
            relu,
            sync: None,
            channels_last,
        };
        Ok(Self {
            op,
            stats,
            affine: affine.clone(),
            packed,
        })
    }

    /// `(2, C)`: the batch's `[mean; biased variance]`.
    pub(crate) fn stats(&self) -> &Tensor {
        &self.stats
    }

    /// `x` normalised (and the ReLU, where asked): [`Normalize`]'s forward.
    pub(crate) fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op3_no_bwd(&self.stats, &self.affine, &self.op)
    }

    /// `relu(normalize(x) + residual)` on CPU storages: [`NormalizeAddRelu`]'s forward.
    pub(crate) fn add_relu_cpu(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (rs, rl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (pk, pl) = self.packed.storage_and_layout();
        let candle_core::Storage::Cpu(pk) = &*pk else {
            bail!("batch_norm: the fused kernels run on the CPU");
        };
        let op = NormalizeAddRelu(Normalize {
            relu: false,
            ..self.op.clone()
        });
        op.cpu_fwd(xs, xl, pk, pl, rs, rl)
    }

    /// `(dx, [dgamma; dbeta])` for the input `x` and the gradient `dy` of the output (after
    /// the ReLU where there is one; for [`Detached::add_relu_cpu`], the gradient already
    /// masked by its ReLU).
    pub(crate) fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        self.op.passes(x, dy, &self.packed)
    }
}

/// `x` normalised with the statistics `st`, then scaled and shifted by `(gamma, beta)`, then
/// `tail`: the differentiable [`Normalize`] op, or [`NormalizeAddRelu`].
fn normalize_op(
    x: &Tensor,
    st: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (eps, tail, channels_last): (f64, Tail, bool),
    sync: Option<(Arc<dyn Collective>, f64)>,
) -> Result<Tensor> {
    let affine = Tensor::stack(&[gamma, beta], 0)?.to_dtype(x.dtype())?;
    let op = |relu| Normalize {
        eps,
        relu,
        sync: sync.clone(),
        channels_last,
    };
    match tail {
        Tail::None => x.apply_op3(st, &affine, op(false)),
        Tail::Relu => x.apply_op3(st, &affine, op(true)),
        // The op's backward masks the gradient itself: its batch-norm passes run without ReLU.
        Tail::AddRelu(res) => {
            let packed = Tensor::cat(&[st, &affine], 0)?;
            x.apply_op3(&packed, &res.contiguous()?, NormalizeAddRelu(op(false)))
        }
    }
}

/// `t` summed over the ranks of `world` (in f64), in `t`'s dtype.
fn all_reduce_sum(world: &dyn Collective, t: &Tensor) -> Result<Tensor> {
    let mut v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    world.all_reduce_sum_f64(&mut v)?;
    Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())
}

/// [`batch_norm_train`] with the statistics of the batches of every rank of `world` together
/// (synchronised batch norm); also returns their number of values per channel.
///
/// The global mean and biased variance come from each rank's own `(mean, var)` over its `M_r`
/// values in two all-reduces, without the cancellation of `E[x^2] - E[x]^2`: first
/// `sum_r M_r mean_r` and `sum_r M_r` give the mean, then
/// `sum_r M_r (var_r + (mean_r - mean)^2)` the squared deviations from it.
pub(crate) fn batch_norm_train_synced(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    tail: Tail,
    world: Arc<dyn Collective>,
    channels_last: bool,
) -> Result<(Tensor, Tensor, usize)> {
    let x = x.contiguous()?;
    let g = Geo::new(x.dims(), channels_last)?;
    let m = g.m() as f64;
    let c = g.c;
    let local = if g.m() == 0 {
        vec![0f64; 2 * c]
    } else {
        x.apply_op1_no_bwd(&Stats(channels_last))?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?
    };
    let mut sums: Vec<f64> = local[..c].iter().map(|mu| m * mu).collect();
    sums.push(m);
    world.all_reduce_sum_f64(&mut sums)?;
    let total = sums[c];
    if total < 2.0 {
        bail!(
            "batch_norm: training needs more than one value per channel over all ranks, got \
             {total} (input {:?} on rank {})",
            x.dims(),
            world.rank()
        );
    }
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / total).collect();
    let mut sq: Vec<f64> = (0..c)
        .map(|i| {
            if m == 0.0 {
                0.0
            } else {
                m * (local[c + i] + (local[i] - mean[i]).powi(2))
            }
        })
        .collect();
    world.all_reduce_sum_f64(&mut sq)?;
    let var = sq.iter().map(|s| s / total);
    let st = Tensor::from_vec(
        mean.iter().copied().chain(var).collect::<Vec<_>>(),
        (2, c),
        x.device(),
    )?
    .to_dtype(x.dtype())?;
    let opts = (eps, tail, channels_last);
    let y = normalize_op(&x, &st, (gamma, beta), opts, Some((world, total)))?;
    Ok((y, st, total as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Two-pass reference in f64: y, dx, dgamma, dbeta for upstream `dy`.
    fn reference(
        x: &[f64],
        dy: &[f64],
        g: &Geo,
        gamma: &[f64],
        beta: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let m = g.m() as f64;
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let (mut dg, mut db) = (vec![0.0; g.c], vec![0.0; g.c]);
        for c in 0..g.c {
            let idx: Vec<usize> = (0..g.n)
                .flat_map(|n| (0..g.hw).map(move |i| (n * g.c + c) * g.hw + i))
                .collect();
            let mean = idx.iter().map(|&i| x[i]).sum::<f64>() / m;
            let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f64>() / m;
            let inv = 1.0 / (var + eps).sqrt();
            for &i in &idx {
                y[i] = (x[i] - mean) * inv * gamma[c] + beta[c];
            }
            db[c] = idx.iter().map(|&i| dy[i]).sum();
            dg[c] = idx.iter().map(|&i| dy[i] * (x[i] - mean) * inv).sum();
            for &i in &idx {
                let xh = (x[i] - mean) * inv;
                dx[i] = gamma[c] * inv / m * (m * dy[i] - db[c] - xh * dg[c]);
            }
        }
        (y, dx, dg, db)
    }

    #[test]
    fn fused_matches_two_pass_reference() {
        let dev = Device::Cpu;
        for dims in [
            (2usize, 3usize, 1usize, 1usize),
            (2, 5, 2, 2),
            (4, 3, 5, 7),
            (300, 40, 1, 1),
            (1000, 9, 1, 1),
        ] {
            let (n, c, h, w) = dims;
            let g = Geo { n, c, hw: h * w };
            let x = Tensor::randn(3f64, 2., dims, &dev).unwrap();
            let dy = Tensor::randn(0f64, 1., dims, &dev).unwrap();
            let gamma = Var::from_tensor(&Tensor::randn(1f64, 0.3, c, &dev).unwrap()).unwrap();
            let beta = Var::from_tensor(&Tensor::randn(0f64, 0.3, c, &dev).unwrap()).unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let (ry, rdx, rdg, rdb) = reference(
                &v(&x),
                &v(&dy),
                &g,
                &v(gamma.as_tensor()),
                &v(beta.as_tensor()),
                1e-5,
            );
            // Channels-first, and the same tensors channels-last ((N, H, W, C) in memory, read
            // by the op without a reshape), brought back to channels-first to compare.
            for channels_last in [false, true] {
                let to = |t: &Tensor| match channels_last {
                    true => t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap(),
                    false => t.clone(),
                };
                let back = |t: &Tensor| match channels_last {
                    true => t.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap(),
                    false => t.clone(),
                };
                let xv = Var::from_tensor(&to(&x)).unwrap();
                let (y, _) = batch_norm_train(
                    xv.as_tensor(),
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    1e-5,
                    Tail::None,
                    channels_last,
                )
                .unwrap();
                let grads = (&y * &to(&dy)).unwrap().sum_all().unwrap();
                let grads = grads.backward().unwrap();
                let close = |a: &[f64], b: &[f64], what: &str| {
                    for (i, (p, q)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (p - q).abs() <= 1e-9 * (1.0 + q.abs()),
                            "{dims:?} channels_last {channels_last} {what}[{i}]: {p} vs {q}"
                        );
                    }
                };
                close(&v(&back(&y)), &ry, "y");
                let dx = back(grads.get(xv.as_tensor()).unwrap());
                close(&v(&dx), &rdx, "dx");
                close(&v(grads.get(gamma.as_tensor()).unwrap()), &rdg, "dgamma");
                close(&v(grads.get(beta.as_tensor()).unwrap()), &rdb, "dbeta");
            }
        }
    }
}
