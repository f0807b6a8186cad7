//! CPU kernels of the fused cross-entropy op.
//!
//! Layout: the logits are viewed as `(outer, C, inner)`, contiguous, with rows `r = n * inner + d`
//! (the order of the targets). `inner == 1` is the common `(N, C)` / `(B, T, V)` case: each row is
//! a contiguous slice and is read straight from the input. For `inner > 1` (PyTorch's K-dim inputs)
//! a tile of [`TILE`] rows is gathered into a per-task buffer of `TILE * C` accumulators, so the
//! same row kernels serve both layouts and nothing of size `N * C` is ever allocated.
//!
//! Forward, per row, in one read of the row: an online max / sum-of-exp (the max is updated once
//! per [`BLOCK`] of elements, the sums live in [`LANES`] independent lanes so LLVM vectorises
//! them), the sum of (weighted) logits, and, for soft targets, the target-weighted sums. Every
//! sum is taken relative to the running max `m` (`sum w (x - m)`, shifted by `(m_old - m_new) *
//! sum w` when the max moves), so all its terms have one sign and nothing cancels, at any logit
//! scale. The log-sum-exp is saved as the pair `(m, ln sum exp(x - m))` (see
//! [`crate::launch::STATS`]); the backward forms `p = exp((x - m) - log_sum)`, exact to a few ulps
//! where `exp(x - lse)` with a rounded `lse` is not, and writes the gradient in the same pass;
//! the true-class term is subtracted in the accumulator type before rounding to the input's
//! dtype.

use crate::math::{Acc, Elem, LANES};
use rayon::prelude::*;

/// Rows gathered at once for `inner > 1` layouts.
const TILE: usize = 16;
/// Rough number of elements a rayon task should cover.
const GRAIN: usize = 1 << 16;

/// Static description of one fused cross-entropy call, shared by forward and backward.
#[derive(Debug, Clone)]
pub(crate) struct Problem<'a, A> {
    pub outer: usize,
    pub classes: usize,
    pub inner: usize,
    pub smoothing: f64,
    pub ignore_index: i64,
    /// PaLM's z-loss coefficient: `+ z * lse^2` per (non-ignored) row.
    pub z_loss: f64,
    /// Gemma's logit soft-capping: logits become `cap * tanh(x / cap)` first.
    pub softcap: Option<f64>,
    /// Class weights (len C) or empty when unweighted.
    pub weight: &'a [A],
    /// Sum of the class weights (C when unweighted).
    pub weight_sum: A,
}

impl<A: Acc> Problem<'_, A> {
    pub fn rows(&self) -> usize {
        self.outer * self.inner
    }
    /// `1 - eps`, formed in f64 before the one rounding (exact near eps = 1, where rounding
    /// eps first would lose every digit of the difference).
    fn one_minus_eps(&self) -> A {
        A::from_f64(1.0 - self.smoothing)
    }
    fn eps_over_c(&self) -> A {
        A::from_f64(self.smoothing / self.classes as f64)
    }
    fn weighted(&self) -> bool {
        !self.weight.is_empty()
    }
    /// Whether the gradient kernel needs the class weights: class-index targets without
    /// smoothing use only the target's weight (a coefficient), so a NaN or infinite weight of a
    /// class no row targets stays out of the gradient, as in PyTorch.
    fn grad_weighted(&self, soft: bool) -> bool {
        self.weighted() && (soft || self.smoothing != 0.0)
    }
    /// With smoothing every class has target mass `q_c = (1 - eps) t_c + eps / C > 0`, so a
    /// zero soft target on a -inf logit is an infinite term (PyTorch: `inf`), not `0 * -inf`;
    /// without smoothing `q_c = t_c = 0` there and PyTorch's `0 * -inf` is NaN, which we keep.
    fn soft_zero_is_zero(&self) -> bool {
        self.smoothing != 0.0
    }
}

/// Targets of one call: class indices (already validated) or a probability tensor laid out like
/// the logits.
pub(crate) enum Targets<'a, T> {
    Hard(&'a [i64]),
    Soft(&'a [T]),
}

/// Row sums of one forward pass, relative to the shift `m` (the row's max, 0 when every logit
/// is -inf).
#[derive(Clone, Copy)]
struct RowSums<A> {
    shift: A,
    /// `sum exp(x - m)`.
    sum_exp: A,
    /// `sum_c w_c (x_c - m)` (<= 0).
    wx: A,
    /// Soft targets only: `sum_c w_c t_c (x_c - m)` (<= 0) and `sum_c w_c t_c`.
    wtx: A,
    wt: A,
}

/// The row's maximum (NaN elements are skipped; -inf for an empty or all -inf row).
#[inline(always)]
fn row_max<A: Acc>(xb: &[A]) -> A {
    // Four vectors of lanes: independent max chains, so the loop runs at the loads' pace rather
    // than one max's latency per vector.
    const WIDE: usize = 4 * LANES;
    let mut mx = [A::NEG_INF; WIDE];
    let chunks = xb.chunks_exact(WIDE);
    let rem = chunks.remainder();
    for ch in chunks {
        for j in 0..WIDE {
            mx[j] = if ch[j] > mx[j] { ch[j] } else { mx[j] };
        }
    }
    for (j, &v) in rem.iter().enumerate() {
        mx[j] = if v > mx[j] { v } else { mx[j] };
    }
    let mut m = mx[0];
    for &v in &mx[1..] {
        m = if v > m { v } else { m };
    }
    m
}

/// Asks the CPU to bring `s[i..i + n]` (clamped to `s`) into its caches: the row kernels call
/// it on the next row while they compute on this one, so that the next row's first pass reads
/// from cache instead of waiting for memory (the passes after the first over a row hit the
/// cache anyway: a row of 32,000 f32 is 125 KiB).
#[inline(always)]
fn prefetch<A>(s: &[A], i: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        const LINE: usize = 64;
        let end = (i + n).min(s.len());
        if i >= end {
            return;
        }
        let bytes = (end - i) * std::mem::size_of::<A>();
        let base = s[i..end].as_ptr().cast::<i8>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: `base + off` lies inside `s[i..end]`; a prefetch reads nothing and never
            // faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(off))
            };
            off += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, i, n);
}

/// Row `r + 1` of the `c_n`-wide rows of `x` to prefetch while row `r` is worked on: only when
/// the same task works on it next (`more`) and the rows need no conversion; else empty.
#[inline]
fn next_row<T: Elem>(x: &[T], r: usize, c_n: usize, more: bool) -> &[T::A] {
    match x.get((r + 1) * c_n..(r + 2) * c_n) {
        Some(nr) if more => T::as_acc(nr).unwrap_or(&[]),
        _ => &[],
    }
}

/// `LANES` consecutive elements of `s` starting at `i` as an array (bounds checked once).
#[inline(always)]
fn lanes<A: Copy>(s: &[A], i: usize) -> [A; LANES] {
    s[i..i + LANES].try_into().unwrap()
}

/// The lane accumulators of [`row_sums`] (see [`Acc::Lanes`]).
struct Lanes<A: Acc> {
    se: A::Lanes,
    wx: A::Lanes,
    wtx: A::Lanes,
    wt: A::Lanes,
}

/// One step's terms per lane: `exp(x - m)`, `w (x - m)` and, for soft targets, `w t (x - m)`
/// and `w t`.
#[derive(Clone, Copy)]
struct Terms<A> {
    e: [A; LANES],
    wd: [A; LANES],
    wtd: [A; LANES],
    wt: [A; LANES],
}

impl<A: Acc> Terms<A> {
    const ZERO: Self = Self {
        e: [A::ZERO; LANES],
        wd: [A::ZERO; LANES],
        wtd: [A::ZERO; LANES],
        wt: [A::ZERO; LANES],
    };

    /// The terms of `LANES` elements (`live` of them real, the rest padding that adds nothing),
    /// relative to the shift `m`. `safe_zero_t`: a zero soft target contributes 0 to
    /// `sum w t (x - m)` even on a -inf logit (see [`Problem::soft_zero_is_zero`]).
    #[inline(always)]
    fn of<const W: bool, const S: bool, const V: u8>(
        xv: &[A; LANES],
        wv: &[A; LANES],
        tv: &[A; LANES],
        m: A,
        live: usize,
        safe_zero_t: bool,
    ) -> Self {
        let mut t = Self::ZERO;
        for j in 0..LANES {
            let d = xv[j] - m;
            let pad = j >= live;
            let e = exp_at::<A, V>(d);
            t.e[j] = if pad { A::ZERO } else { e };
            let w_d = if W { wv[j] * d } else { d };
            t.wd[j] = if pad { A::ZERO } else { w_d };
            if S {
                let prod = w_d * tv[j];
                let prod = if safe_zero_t && tv[j] == A::ZERO {
                    A::ZERO
                } else {
                    prod
                };
                t.wtd[j] = if pad { A::ZERO } else { prod };
                let w_t = if W { wv[j] * tv[j] } else { tv[j] };
                t.wt[j] = if pad { A::ZERO } else { w_t };
            }
        }
        t
    }
}

impl<A: Acc> Lanes<A> {
    /// Adds partial sums to the accurate lane accumulators (`V`: see [`PORTABLE`]).
    #[inline(always)]
    fn add<const S: bool, const V: u8>(&mut self, t: &Terms<A>) {
        let add = |l: &mut A::Lanes, v: &[A; LANES]| {
            if V == 2 {
                // SAFETY: `V` is 2 only in the AVX-512 kernels (see `dispatch_simd`).
                unsafe { A::lanes_add_avx512(l, v) }
            } else {
                A::lanes_add(l, v)
            }
        };
        add(&mut self.se, &t.e);
        add(&mut self.wx, &t.wd);
        if S {
            add(&mut self.wtx, &t.wtd);
            add(&mut self.wt, &t.wt);
        }
    }
}

/// Steps of `LANES` elements summed in `A` before the partial sums go to the accurate lanes:
/// each partial is a sum of at most 4 terms of one sign (error under 2 ulps of it), and the
/// accurate lanes add one value per 4 elements instead of one per element.
const STEPS: usize = 4;

/// Two passes over a row: its max, then every sum relative to it (no rescaling, so no
/// rounding but the terms' own and the accumulators'). `W`: weighted; `S`: soft targets (`t`
/// is then the target row); `V`: what the instance is compiled for (see [`PORTABLE`]).
#[inline(always)]
fn row_sums<A: Acc, const W: bool, const S: bool, const V: u8>(
    x: &[A],
    w: &[A],
    t: &[A],
    safe_zero_t: bool,
    next: &[A],
) -> RowSums<A> {
    let max = row_max(x);
    // Every logit -inf (or none): shift 0, where exp(x - 0) adds the exact 0 and NaN stays NaN.
    let shift = if max == A::NEG_INF { A::ZERO } else { max };
    let mut l = Lanes::<A> {
        se: A::LANES_ZERO,
        wx: A::LANES_ZERO,
        wtx: A::LANES_ZERO,
        wt: A::LANES_ZERO,
    };
    let ones = [A::ONE; LANES];
    let len = x.len();
    let mut i = 0;
    // Whole steps: `STEPS` x `LANES` elements summed per lane in `A`, then into the accurate
    // lanes (plain arrays and loops, which LLVM keeps in vector registers).
    while i + LANES <= len {
        let steps = STEPS.min((len - i) / LANES);
        let (mut pe, mut pw, mut pwt, mut pt) = (
            [A::ZERO; LANES],
            [A::ZERO; LANES],
            [A::ZERO; LANES],
            [A::ZERO; LANES],
        );
        prefetch(next, i, steps * LANES);
        for k in 0..steps {
            let o = i + k * LANES;
            let xv = lanes(x, o);
            let wv = if W { lanes(w, o) } else { ones };
            let tv = if S { lanes(t, o) } else { ones };
            for j in 0..LANES {
                let d = xv[j] - shift;
                pe[j] += exp_at::<A, V>(d);
                let w_d = if W { wv[j] * d } else { d };
                pw[j] += w_d;
                if S {
                    let prod = w_d * tv[j];
                    pwt[j] += if safe_zero_t && tv[j] == A::ZERO {
                        A::ZERO
                    } else {
                        prod
                    };
                    pt[j] += if W { wv[j] * tv[j] } else { tv[j] };
                }
            }
        }
        l.add::<S, V>(&Terms {
            e: pe,
            wd: pw,
            wtd: pwt,
            wt: pt,
        });
        i += steps * LANES;
    }
    if i < len {
        let live = len - i;
        let (mut xv, mut wv, mut tv) = ([shift; LANES], ones, ones);
        xv[..live].copy_from_slice(&x[i..]);
        if W {
            wv[..live].copy_from_slice(&w[i..]);
        }
        if S {
            tv[..live].copy_from_slice(&t[i..]);
        }
        l.add::<S, V>(&Terms::of::<W, S, V>(
            &xv,
            &wv,
            &tv,
            shift,
            live,
            safe_zero_t,
        ));
    }
    RowSums {
        shift,
        sum_exp: A::lanes_total(&l.se),
        wx: A::lanes_total(&l.wx),
        wtx: if S { A::lanes_total(&l.wtx) } else { A::ZERO },
        wt: if S { A::lanes_total(&l.wt) } else { A::ZERO },
    }
}

/// Coefficients of one row's gradient:
/// `out_c = alpha * exp((x_c - shift) - log_sum) - beta * w_c - gamma * w_c * t_c`, then
/// `out_y -= fix.1`.
#[derive(Clone, Copy)]
struct GradRow<A> {
    shift: A,
    log_sum: A,
    alpha: A,
    beta: A,
    gamma: A,
    /// Class-index targets: the true class and its one-hot term.
    fix: Option<(usize, A)>,
}

#[inline(always)]
fn row_grad<A: Acc, const W: bool, const S: bool, const V: u8>(
    x: &[A],
    w: &[A],
    t: &[A],
    k: GradRow<A>,
    out: &mut [A],
    next: &[A],
) {
    const BLOCK: usize = STEPS * LANES;
    for (b, (ob, xb)) in out.chunks_mut(BLOCK).zip(x.chunks(BLOCK)).enumerate() {
        let c0 = b * BLOCK;
        prefetch(next, c0, BLOCK);
        for (c, (o, &xv)) in ob.iter_mut().zip(xb).enumerate() {
            let c = c0 + c;
            let p = exp_at::<A, V>((xv - k.shift) - k.log_sum);
            let wc = if W { w[c] } else { A::ONE };
            let mut g = k.alpha * p - k.beta * wc;
            if S {
                g = g - k.gamma * wc * t[c];
            }
            *o = g;
        }
    }
    // Subtracted in the accumulator type, before any rounding to the logits' dtype.
    if let Some((y, v)) = k.fix {
        out[y] = out[y] - v;
    }
}

/// `e^x` as the kernels compiled for `V` compute it (with FMAs where `V > 0`).
#[inline(always)]
fn exp_at<A: Acc, const V: u8>(x: A) -> A {
    if V > 0 {
        x.exp_fma()
    } else {
        x.exp()
    }
}

/// The `V` of the portable row kernels: 1 where fused multiply-adds are part of the base
/// instruction set (aarch64), else 0. The x86 kernels are 1 (AVX2 + FMA) and 2 (AVX-512: also
/// its f64 lane accumulation). `V > 0` computes `exp` with FMAs, so a row's results are the same
/// on every CPU with FMA units, whichever kernel runs.
const PORTABLE: u8 = if cfg!(target_arch = "aarch64") { 1 } else { 0 };

macro_rules! dispatch_simd {
    ($generic:ident, $avx2:ident, $avx512:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2<A: Acc, const W: bool, const S: bool>($($arg: $ty),*) -> $ret {
            $generic::<A, W, S, 1>($($arg),*)
        }
        // 32 vector registers of 16 f32: the row loops' lanes, partial sums and f64
        // accumulators fit without spilling (with AVX2's 16 they do not).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
        unsafe fn $avx512<A: Acc, const W: bool, const S: bool>($($arg: $ty),*) -> $ret {
            $generic::<A, W, S, 2>($($arg),*)
        }
    };
}

dispatch_simd!(
    row_sums,
    row_sums_avx2,
    row_sums_avx512,
    (x: &[A], w: &[A], t: &[A], safe_zero_t: bool, next: &[A]) -> RowSums<A>
);
dispatch_simd!(
    row_grad,
    row_grad_avx2,
    row_grad_avx512,
    (x: &[A], w: &[A], t: &[A], k: GradRow<A>, out: &mut [A], next: &[A]) -> ()
);

/// The widest x86 kernel this CPU runs: 2 for AVX-512 (F, VL, DQ), 1 for AVX2 + FMA, else 0.
fn simd_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has_avx2() {
            return 2;
        }
    }
    u8::from(has_avx2())
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Picks the monomorphised row kernel once per call.
#[derive(Clone, Copy)]
struct Kernels<A: Acc> {
    weighted: bool,
    soft: bool,
    /// [`simd_level`]; read only where the x86 kernels exist.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    simd: u8,
    _a: std::marker::PhantomData<A>,
}

macro_rules! select {
    ($self:ident, $generic:ident, $avx2:ident, $avx512:ident, $($arg:expr),*) => {{
        #[cfg(target_arch = "x86_64")]
        if $self.simd == 2 {
            // SAFETY: level 2 is only set after runtime detection of AVX-512 F/VL/DQ, AVX2, FMA.
            return unsafe {
                match ($self.weighted, $self.soft) {
                    (false, false) => $avx512::<A, false, false>($($arg),*),
                    (true, false) => $avx512::<A, true, false>($($arg),*),
                    (false, true) => $avx512::<A, false, true>($($arg),*),
                    (true, true) => $avx512::<A, true, true>($($arg),*),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if $self.simd == 1 {
            // SAFETY: level 1 is only set after runtime detection of AVX2 and FMA.
            return unsafe {
                match ($self.weighted, $self.soft) {
                    (false, false) => $avx2::<A, false, false>($($arg),*),
                    (true, false) => $avx2::<A, true, false>($($arg),*),
                    (false, true) => $avx2::<A, false, true>($($arg),*),
                    (true, true) => $avx2::<A, true, true>($($arg),*),
                }
            };
        }
        match ($self.weighted, $self.soft) {
            (false, false) => $generic::<A, false, false, PORTABLE>($($arg),*),
            (true, false) => $generic::<A, true, false, PORTABLE>($($arg),*),
            (false, true) => $generic::<A, false, true, PORTABLE>($($arg),*),
            (true, true) => $generic::<A, true, true, PORTABLE>($($arg),*),
        }
    }};
}

impl<A: Acc> Kernels<A> {
    fn new(weighted: bool, soft: bool) -> Self {
        Self {
            weighted,
            soft,
            simd: simd_level(),
            _a: std::marker::PhantomData,
        }
    }
    /// `next`: the row to prefetch while this one is summed (empty: none).
    fn sums(&self, x: &[A], w: &[A], t: &[A], safe_zero_t: bool, next: &[A]) -> RowSums<A> {
        select!(
            self,
            row_sums,
            row_sums_avx2,
            row_sums_avx512,
            x,
            w,
            t,
            safe_zero_t,
            next
        )
    }
    /// `next`: the logits row to prefetch while this row's gradient is written (empty: none).
    fn grad(&self, x: &[A], w: &[A], t: &[A], k: GradRow<A>, out: &mut [A], next: &[A]) {
        select!(
            self,
            row_grad,
            row_grad_avx2,
            row_grad_avx512,
            x,
            w,
            t,
            k,
            out,
            next
        )
    }
}

pub(crate) use crate::launch::STATS;

/// The row's `[loss, shift, log_sum, target_weight]` (see [`crate::launch::STATS`]). Every term
/// is a sum of non-negative parts: `lse - x_y = (m - x_y) + log_sum`, and the smoothing term
/// `sum_c w_c (lse - x_c) = W log_sum - sum_c w_c (x_c - m)` with the last sum <= 0.
fn finish_row<A: Acc>(
    p: &Problem<'_, A>,
    s: &RowSums<A>,
    x_at: impl Fn(usize) -> A,
    target: RowTarget,
) -> [A; STATS] {
    let (m, ls) = (s.shift, s.sum_exp.ln());
    let one_m = p.one_minus_eps();
    let eoc = p.eps_over_c();
    let smooth = p.smoothing != 0.0;
    let z = || {
        let lse = m + ls;
        A::from_f64(p.z_loss) * lse * lse
    };
    // Terms whose factor is exactly 0 (eps = 0, or 1 - eps = 0) are left out, not multiplied
    // by 0: PyTorch's formula does not have them, and 0 * inf would be NaN.
    match target {
        RowTarget::Ignored => [A::ZERO, m, ls, A::ZERO],
        RowTarget::Class(y) => {
            let wy = if p.weighted() { p.weight[y] } else { A::ONE };
            let nll = wy * ((m - x_at(y)) + ls);
            let mut loss = one_m * nll;
            if smooth {
                loss += eoc * (ls * p.weight_sum - s.wx);
            }
            if p.z_loss != 0.0 {
                loss += z();
            }
            [loss, m, ls, wy]
        }
        RowTarget::Soft => {
            let mut wq = one_m * s.wt;
            let mut wqx = if one_m != A::ZERO {
                one_m * s.wtx
            } else {
                A::ZERO
            };
            if smooth {
                wq += eoc * p.weight_sum;
                wqx += eoc * s.wx;
            }
            let mut loss = ls * wq - wqx;
            if p.z_loss != 0.0 {
                loss += z();
            }
            [loss, m, ls, wq]
        }
    }
}

#[derive(Clone, Copy)]
enum RowTarget {
    Ignored,
    Class(usize),
    Soft,
}

fn row_target<A>(p: &Problem<'_, A>, targets: &Targets<'_, impl Sized>, r: usize) -> RowTarget {
    match targets {
        Targets::Soft(_) => RowTarget::Soft,
        Targets::Hard(t) => {
            let y = t[r];
            if y == p.ignore_index {
                RowTarget::Ignored
            } else {
                // Validated by the caller.
                RowTarget::Class(y as usize)
            }
        }
    }
}

/// A task: `(first row, 0, rows)` for `inner == 1`, `(n, d0, rows)` otherwise.
type Task = (usize, usize, usize);

/// `row <- cap * tanh(row / cap)`.
fn cap_row<A: Acc>(row: &mut [A], cap: f64) {
    let c = A::from_f64(cap);
    for v in row.iter_mut() {
        *v = c * (*v / c).tanh();
    }
}

/// `row <- cap * tanh(row / cap)`, and `dcap <- d/dx` of it, `sech^2(x / cap)`, computed as
/// `4e / (1 + e)^2` with `e = exp(-2 |x / cap|)`: `1 - tanh^2` from the rounded tanh would lose
/// every digit where tanh saturates (|x| >> cap), the very logits soft-capping is for. The
/// derivative's relative error grows with `2 |u|` times that of `u = x / cap`, so `u` is carried
/// as the rounded quotient `q` plus its exact remainder `(x - q cap) / cap` (one fused
/// multiply-add), which enters `e` to first order.
fn cap_row_with_grad<A: Acc>(row: &mut [A], dcap: &mut [A], cap: f64) {
    let c = A::from_f64(cap);
    let (two, four) = (A::from_f64(2.0), A::from_f64(4.0));
    for (v, d) in row.iter_mut().zip(dcap.iter_mut()) {
        let x = *v;
        let q = x / c;
        let lo = (A::ZERO - q).mul_add(c, x) / c;
        // No remainder where it is not finite: |x| = inf (inf - inf is NaN) or |x / cap| past
        // the dtype's range (the quotient is inf, the capped logit flat, its derivative 0); a
        // NaN x stays NaN through `q`.
        #[allow(clippy::eq_op)]
        let lo = if lo - lo == A::ZERO { lo } else { A::ZERO };
        // -2|u| = -2|q| - 2 sign(q) lo.
        let (aq, slo) = if q < A::ZERO {
            (A::ZERO - q, A::ZERO - lo)
        } else {
            (q, lo)
        };
        let e = (A::ZERO - two * aq).exp() * (A::ONE - two * slo);
        let s = A::ONE + e;
        *d = four * e / (s * s);
        *v = c * q.tanh();
    }
}

/// Chain rule of the soft-cap: `grad <- grad * dcap`.
fn cap_grad<A: Acc>(grad: &mut [A], dcap: &[A]) {
    for (g, &d) in grad.iter_mut().zip(dcap) {
        *g *= d;
    }
}

/// Splits the rows into tasks that never cross an `outer` boundary.
fn tasks(p: &Problem<'_, impl Acc>) -> Vec<Task> {
    let mut out = Vec::new();
    if p.inner == 1 {
        let rows = p.rows();
        let per = (GRAIN / p.classes.max(1)).clamp(1, 256);
        let threads = rayon::current_num_threads();
        // At least ~4 tasks per thread when there is enough work.
        let per = per.min(rows.div_ceil(threads * 4).max(1));
        let mut r = 0;
        while r < rows {
            let len = per.min(rows - r);
            out.push((r, 0, len));
            r += len;
        }
    } else {
        for n in 0..p.outer {
            let mut d = 0;
            while d < p.inner {
                let len = TILE.min(p.inner - d);
                out.push((n, d, len));
                d += len;
            }
        }
    }
    out
}

/// Gathers rows `(n, d0..d0+len)` of a `(outer, C, inner)` array into `buf[j * C + c]`.
fn gather<T: Elem>(
    src: &[T],
    p: &Problem<'_, T::A>,
    n: usize,
    d0: usize,
    len: usize,
    buf: &mut [T::A],
) {
    let c_n = p.classes;
    let base = n * c_n * p.inner + d0;
    for c in 0..c_n {
        let col = &src[base + c * p.inner..base + c * p.inner + len];
        for (j, v) in col.iter().enumerate() {
            buf[j * c_n + c] = v.to_acc();
        }
    }
}

fn scatter<T: Elem>(
    buf: &[T::A],
    p: &Problem<'_, T::A>,
    n: usize,
    d0: usize,
    len: usize,
    dst: &mut [T],
) {
    let c_n = p.classes;
    let base = n * c_n * p.inner + d0;
    for c in 0..c_n {
        let col = &mut dst[base + c * p.inner..base + c * p.inner + len];
        for (j, v) in col.iter_mut().enumerate() {
            *v = T::from_acc(buf[j * c_n + c]);
        }
    }
}

/// Forward: returns `rows * STATS` accumulators `[loss, shift, log_sum, target_weight]` per row.
pub(crate) fn forward<T: Elem>(
    x: &[T],
    targets: &Targets<'_, T>,
    p: &Problem<'_, T::A>,
) -> Vec<T::A> {
    let rows = p.rows();
    let c_n = p.classes;
    let mut out = vec![T::A::ZERO; rows * STATS];
    if rows == 0 {
        return out;
    }
    let k = Kernels::<T::A>::new(p.weighted(), matches!(targets, Targets::Soft(_)));
    let tasks = tasks(p);
    // Split the output into the tasks' disjoint pieces.
    let mut pieces: Vec<(Task, &mut [T::A])> = Vec::with_capacity(tasks.len());
    let mut rest: &mut [T::A] = &mut out;
    for t in &tasks {
        let (head, tail) = rest.split_at_mut(t.2 * STATS);
        pieces.push((*t, head));
        rest = tail;
    }
    pieces.into_par_iter().for_each(|((a, d0, len), dst)| {
        let empty: &[T::A] = &[];
        if p.inner == 1 {
            // Rows a..a+len, each contiguous.
            let mut xbuf = Vec::new();
            let mut tbuf = Vec::new();
            for j in 0..len {
                let r = a + j;
                let xr = &x[r * c_n..(r + 1) * c_n];
                let xa: &[T::A] = match (T::as_acc(xr), p.softcap) {
                    (Some(v), None) => v,
                    (_, cap) => {
                        xbuf.resize(c_n, T::A::ZERO);
                        T::load(xr, &mut xbuf);
                        if let Some(cap) = cap {
                            cap_row(&mut xbuf, cap);
                        }
                        &xbuf
                    }
                };
                let ta: &[T::A] = match targets {
                    Targets::Soft(t) => {
                        let tr = &t[r * c_n..(r + 1) * c_n];
                        match T::as_acc(tr) {
                            Some(v) => v,
                            None => {
                                tbuf.resize(c_n, T::A::ZERO);
                                T::load(tr, &mut tbuf);
                                &tbuf
                            }
                        }
                    }
                    Targets::Hard(_) => empty,
                };
                let next = next_row(x, r, c_n, j + 1 < len);
                let s = k.sums(xa, p.weight, ta, p.soft_zero_is_zero(), next);
                let st = finish_row(p, &s, |c| xa[c], row_target(p, targets, r));
                dst[j * STATS..(j + 1) * STATS].copy_from_slice(&st);
            }
        } else {
            let n = a;
            let mut xbuf = vec![T::A::ZERO; len * c_n];
            gather(x, p, n, d0, len, &mut xbuf);
            if let Some(cap) = p.softcap {
                cap_row(&mut xbuf, cap);
            }
            let mut tbuf = Vec::new();
            if let Targets::Soft(t) = targets {
                tbuf.resize(len * c_n, T::A::ZERO);
                gather(t, p, n, d0, len, &mut tbuf);
            }
            for j in 0..len {
                let r = n * p.inner + d0 + j;
                let xa = &xbuf[j * c_n..(j + 1) * c_n];
                let ta = if tbuf.is_empty() {
                    empty
                } else {
                    &tbuf[j * c_n..(j + 1) * c_n]
                };
                let s = k.sums(xa, p.weight, ta, p.soft_zero_is_zero(), empty);
                let st = finish_row(p, &s, |c| xa[c], row_target(p, targets, r));
                dst[j * STATS..(j + 1) * STATS].copy_from_slice(&st);
            }
        }
    });
    out
}

/// Coefficients of `row_grad` for row `r`, or `None` when the row's gradient is zero.
/// `st = [shift, log_sum, target_weight, g]` where `g` is the upstream gradient of the row's
/// loss.
fn grad_coeffs<A: Acc>(p: &Problem<'_, A>, target: RowTarget, st: &[A]) -> Option<GradRow<A>> {
    let (shift, log_sum, tw, g) = (st[0], st[1], st[2], st[3]);
    let one_m = p.one_minus_eps();
    let eoc = p.eps_over_c();
    // As in the forward, terms with a zero factor are left out rather than multiplied.
    let z_term = if p.z_loss != 0.0 {
        A::from_f64(2.0 * p.z_loss) * (shift + log_sum)
    } else {
        A::ZERO
    };
    let smooth_w = if p.smoothing != 0.0 {
        eoc * p.weight_sum
    } else {
        A::ZERO
    };
    match target {
        RowTarget::Ignored => None,
        RowTarget::Class(y) => {
            // d/dx_c = g [ (1-eps) w_y (p_c - [c=y]) + eps/C (p_c sum_w - w_c) + 2 z lse p_c ]
            Some(GradRow {
                shift,
                log_sum,
                alpha: g * (one_m * tw + smooth_w + z_term),
                beta: g * eoc,
                gamma: A::ZERO,
                fix: Some((y, g * one_m * tw)),
            })
        }
        RowTarget::Soft => {
            // d/dx_c = g [ p_c sum_k w_k q_k - w_c q_c + 2 z lse p_c ],  q_c = (1-eps) t_c + eps/C
            Some(GradRow {
                shift,
                log_sum,
                alpha: g * (tw + z_term),
                beta: g * eoc,
                gamma: g * one_m,
                fix: None,
            })
        }
    }
}

/// Backward: writes `d loss / d x` into `grad` (same layout as `x`). `stats` holds
/// `[shift, log_sum, target_weight, g]` per row.
pub(crate) fn backward<T: Elem>(
    x: &[T],
    targets: &Targets<'_, T>,
    stats: &[T::A],
    p: &Problem<'_, T::A>,
    grad: &mut [T],
) {
    let rows = p.rows();
    let c_n = p.classes;
    if rows == 0 {
        return;
    }
    let soft = matches!(targets, Targets::Soft(_));
    let k = Kernels::<T::A>::new(p.grad_weighted(soft), soft);
    let empty: &[T::A] = &[];
    if p.inner == 1 {
        let tasks = tasks(p);
        let mut pieces: Vec<(usize, usize, &mut [T])> = Vec::with_capacity(tasks.len());
        let mut rest: &mut [T] = grad;
        for &(a, _, len) in &tasks {
            let (head, tail) = rest.split_at_mut(len * c_n);
            pieces.push((a, len, head));
            rest = tail;
        }
        pieces.into_par_iter().for_each(|(a, len, dst)| {
            let mut xbuf = Vec::new();
            let mut dbuf = Vec::new();
            let mut tbuf = Vec::new();
            let mut gbuf = Vec::new();
            for j in 0..len {
                let r = a + j;
                let out = &mut dst[j * c_n..(j + 1) * c_n];
                let st = &stats[r * STATS..(r + 1) * STATS];
                let Some(coef) = grad_coeffs(p, row_target(p, targets, r), st) else {
                    out.fill(T::from_acc(T::A::ZERO));
                    continue;
                };
                let xr = &x[r * c_n..(r + 1) * c_n];
                let xa: &[T::A] = match (T::as_acc(xr), p.softcap) {
                    (Some(v), None) => v,
                    (_, cap) => {
                        xbuf.resize(c_n, T::A::ZERO);
                        T::load(xr, &mut xbuf);
                        if let Some(cap) = cap {
                            dbuf.resize(c_n, T::A::ZERO);
                            cap_row_with_grad(&mut xbuf, &mut dbuf, cap);
                        }
                        &xbuf
                    }
                };
                let ta: &[T::A] = match targets {
                    Targets::Soft(t) => {
                        let tr = &t[r * c_n..(r + 1) * c_n];
                        match T::as_acc(tr) {
                            Some(v) => v,
                            None => {
                                tbuf.resize(c_n, T::A::ZERO);
                                T::load(tr, &mut tbuf);
                                &tbuf
                            }
                        }
                    }
                    Targets::Hard(_) => empty,
                };
                let next = next_row(x, r, c_n, j + 1 < len);
                match T::as_acc_mut(out) {
                    Some(o) => {
                        k.grad(xa, p.weight, ta, coef, o, next);
                        if p.softcap.is_some() {
                            cap_grad(o, &dbuf);
                        }
                    }
                    None => {
                        gbuf.resize(c_n, T::A::ZERO);
                        k.grad(xa, p.weight, ta, coef, &mut gbuf, next);
                        if p.softcap.is_some() {
                            cap_grad(&mut gbuf, &dbuf);
                        }
                        T::store(&gbuf, out);
                    }
                }
            }
        });
    } else {
        // Each outer index owns a disjoint `(C, inner)` slab of the gradient.
        grad.par_chunks_mut(c_n * p.inner)
            .enumerate()
            .for_each(|(n, slab)| {
                let mut xbuf = vec![T::A::ZERO; TILE * c_n];
                let mut dbuf = vec![T::A::ZERO; if p.softcap.is_some() { TILE * c_n } else { 0 }];
                let mut tbuf = Vec::new();
                let mut gbuf = vec![T::A::ZERO; TILE * c_n];
                let local = Problem {
                    outer: 1,
                    ..p.clone()
                };
                let mut d0 = 0;
                while d0 < p.inner {
                    let len = TILE.min(p.inner - d0);
                    gather(x, p, n, d0, len, &mut xbuf);
                    if let Some(cap) = p.softcap {
                        let n_el = len * c_n;
                        cap_row_with_grad(&mut xbuf[..n_el], &mut dbuf[..n_el], cap);
                    }
                    if let Targets::Soft(t) = targets {
                        tbuf.resize(TILE * c_n, T::A::ZERO);
                        gather(t, p, n, d0, len, &mut tbuf);
                    }
                    let first = n * p.inner + d0;
                    let bufs = (&xbuf[..], &dbuf[..], &tbuf[..]);
                    tile_grads(&k, p, targets, stats, first, len, bufs, &mut gbuf);
                    scatter(&gbuf, &local, 0, d0, len, slab);
                    d0 += len;
                }
            });
    }
}

/// A tile's logits, soft-cap derivatives and soft targets (see [`tile_grads`]).
type TileBufs<'a, A> = (&'a [A], &'a [A], &'a [A]);

/// Gradients of the `len` consecutive rows starting at row `first`, whose logits (already
/// soft-capped), soft-cap derivatives (empty without a cap) and soft targets are rows of `C` in
/// `xbuf` / `dbuf` / `tbuf`, into `gbuf`.
#[allow(clippy::too_many_arguments)]
fn tile_grads<T: Elem>(
    k: &Kernels<T::A>,
    p: &Problem<'_, T::A>,
    targets: &Targets<'_, T>,
    stats: &[T::A],
    first: usize,
    len: usize,
    (xbuf, dbuf, tbuf): TileBufs<'_, T::A>,
    gbuf: &mut [T::A],
) {
    let c_n = p.classes;
    for j in 0..len {
        let r = first + j;
        let st = &stats[r * STATS..(r + 1) * STATS];
        let o = &mut gbuf[j * c_n..(j + 1) * c_n];
        match grad_coeffs(p, row_target(p, targets, r), st) {
            None => o.fill(T::A::ZERO),
            Some(coef) => {
                let xa = &xbuf[j * c_n..(j + 1) * c_n];
                let ta = if tbuf.is_empty() {
                    &[][..]
                } else {
                    &tbuf[j * c_n..(j + 1) * c_n]
                };
                k.grad(xa, p.weight, ta, coef, o, &[]);
                if p.softcap.is_some() {
                    cap_grad(o, &dbuf[j * c_n..(j + 1) * c_n]);
                }
            }
        }
    }
}

/// Backward written over the logits themselves (`xg` holds the logits on entry, the gradient on
/// exit). Each row (or 16-row tile) is copied to a per-task buffer before it is overwritten.
pub(crate) fn backward_inplace<T: Elem>(
    xg: &mut [T],
    targets: &Targets<'_, T>,
    stats: &[T::A],
    p: &Problem<'_, T::A>,
) {
    let rows = p.rows();
    let c_n = p.classes;
    if rows == 0 {
        return;
    }
    let soft = matches!(targets, Targets::Soft(_));
    let k = Kernels::<T::A>::new(p.grad_weighted(soft), soft);
    let local = Problem {
        outer: 1,
        ..p.clone()
    };
    xg.par_chunks_mut(c_n * p.inner)
        .enumerate()
        .for_each(|(n, slab)| {
            let tile = if p.inner == 1 { 1 } else { TILE };
            let mut xbuf = vec![T::A::ZERO; tile * c_n];
            let mut dbuf = vec![T::A::ZERO; if p.softcap.is_some() { tile * c_n } else { 0 }];
            let mut gbuf = vec![T::A::ZERO; tile * c_n];
            let mut tbuf = Vec::new();
            let mut d0 = 0;
            while d0 < p.inner {
                let len = tile.min(p.inner - d0);
                if p.inner == 1 {
                    T::load(slab, &mut xbuf);
                } else {
                    gather(slab, &local, 0, d0, len, &mut xbuf);
                }
                if let Some(cap) = p.softcap {
                    let n_el = len * c_n;
                    cap_row_with_grad(&mut xbuf[..n_el], &mut dbuf[..n_el], cap);
                }
                if let Targets::Soft(t) = targets {
                    tbuf.resize(tile * c_n, T::A::ZERO);
                    let base = n * c_n * p.inner;
                    gather(
                        &t[base..base + c_n * p.inner],
                        &local,
                        0,
                        d0,
                        len,
                        &mut tbuf,
                    );
                }
                let first = n * p.inner + d0;
                let bufs = (&xbuf[..], &dbuf[..], &tbuf[..]);
                tile_grads(&k, p, targets, stats, first, len, bufs, &mut gbuf);
                if p.inner == 1 {
                    T::store(&gbuf, slab);
                } else {
                    scatter(&gbuf, &local, 0, d0, len, slab);
                }
                d0 += len;
            }
        });
}
