//! Scalar arithmetic shared by the CPU kernels: the accumulator trait and a vectorisable `exp`.
//!
//! The CPU kernels spend almost all their time in `exp`. `f32::exp` calls libm one element at a
//! time, so the f32 path uses [`exp_f32`], a branch-free Cody-Waite range reduction with a
//! degree-6 minimax polynomial that LLVM turns into SIMD code (max error ~1 ulp over the range
//! the kernels use it on). The f64 path keeps libm's `exp`: it exists for exactness, not speed.

use half::{bf16, f16};

/// Accumulation type of the kernels: `f32` for f16/bf16/f32 inputs, `f64` for f64 inputs.
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    /// [`Acc::exp`] with fused multiply-adds, for the kernels compiled for CPUs that have them
    /// (the AVX2 and AVX-512 row kernels): a third fewer instructions, within the same error
    /// bound. Elsewhere (the portable kernels) `exp` itself.
    #[inline(always)]
    fn exp_fma(self) -> Self {
        self.exp()
    }
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    /// `self * a + b` with one rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;

    /// [`LANES`] partial sums of a row, accurate whatever their length: f32 terms are added in
    /// f64 (a row would need 2^29 elements before the f64 rounding reached one f32 unit), f64
    /// terms with Kahan's compensation (each lane's error stays about 2 ulps of its sum, not
    /// its length times that). Infinite and NaN terms propagate as in a plain sum.
    type Lanes: Copy + Send;
    const LANES_ZERO: Self::Lanes;
    /// Adds `v[j]` to lane `j`.
    fn lanes_add(l: &mut Self::Lanes, v: &[Self; LANES]);
    /// The sum of the lanes, rounded once to `Self`.
    fn lanes_total(l: &Self::Lanes) -> Self;
    /// [`Acc::lanes_add`] in the AVX-512 kernels: the same sums, written with the instructions
    /// where LLVM's own vectorisation of `lanes_add` falls short (for f32 it paired the lanes
    /// of different accumulators into 2-wide converts, a third of a row's time in shuffles).
    ///
    /// # Safety
    /// Only called where the CPU has AVX-512 F and DQ (the `*_avx512` kernels).
    #[inline(always)]
    unsafe fn lanes_add_avx512(l: &mut Self::Lanes, v: &[Self; LANES]) {
        Self::lanes_add(l, v)
    }
}

/// Independent accumulator lanes of the row loops (a multiple of every SIMD width we target).
pub(crate) const LANES: usize = 16;

/// Neumaier's compensated sum of `v` in f64 (error about one ulp of the result plus
/// `n^2 u^2` times the sum of |terms|; infinities and NaN propagate).
pub(crate) fn neumaier(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0f64, 0f64);
    for x in v {
        let t = s + x;
        let d = if s.abs() >= x.abs() {
            (s - t) + x
        } else {
            (x - t) + s
        };
        // Once the sum is infinite or NaN the compensation means nothing (and inf - inf is NaN).
        c += if t.is_finite() { d } else { 0.0 };
        s = t;
    }
    if s.is_finite() {
        s + c
    } else {
        s
    }
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn exp_fma(self) -> Self {
        exp_f32_fma(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }

    type Lanes = [f64; LANES];
    const LANES_ZERO: Self::Lanes = [0.0; LANES];
    #[inline(always)]
    fn lanes_add(l: &mut Self::Lanes, v: &[Self; LANES]) {
        for j in 0..LANES {
            l[j] += v[j] as f64;
        }
    }
    #[inline(always)]
    fn lanes_total(l: &Self::Lanes) -> Self {
        pairwise(l) as f32
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes_add_avx512(l: &mut Self::Lanes, v: &[Self; LANES]) {
        use std::arch::x86_64::{
            _mm512_add_pd, _mm512_castps512_ps256, _mm512_cvtps_pd, _mm512_extractf32x8_ps,
            _mm512_loadu_pd, _mm512_loadu_ps, _mm512_storeu_pd,
        };
        // SAFETY: the caller guarantees AVX-512 F and DQ; every load and store is of 16 f32 or
        // 8 f64 inside `v` and `l` (16 elements each).
        unsafe {
            let x = _mm512_loadu_ps(v.as_ptr());
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
            let hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(x));
            let p = l.as_mut_ptr();
            _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo));
            _mm512_storeu_pd(p.add(8), _mm512_add_pd(_mm512_loadu_pd(p.add(8)), hi));
        }
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }

    /// Sums and Kahan compensations.
    type Lanes = ([f64; LANES], [f64; LANES]);
    const LANES_ZERO: Self::Lanes = ([0.0; LANES], [0.0; LANES]);
    #[inline(always)]
    fn lanes_add(l: &mut Self::Lanes, v: &[Self; LANES]) {
        let (s, c) = l;
        for j in 0..LANES {
            let y = v[j] - c[j];
            let t = s[j] + y;
            let nc = (t - s[j]) - y;
            // An infinite or NaN sum has no compensation (inf - inf would turn it into NaN).
            c[j] = if t.is_finite() { nc } else { 0.0 };
            s[j] = t;
        }
    }
    #[inline(always)]
    fn lanes_total(l: &Self::Lanes) -> Self {
        let (s, c) = l;
        let sum = neumaier(s.iter().copied());
        if sum.is_finite() {
            // Kahan's c holds (rounded - exact) of its lane.
            sum - neumaier(c.iter().copied())
        } else {
            sum
        }
    }
}

/// Pairwise sum of the lanes (the same result for any row length).
#[inline(always)]
fn pairwise(v: &[f64; LANES]) -> f64 {
    let mut h = *v;
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            h[i] += h[i + width];
        }
        width /= 2;
    }
    h[0]
}

/// Element types of the logits, with their accumulator and bulk conversions.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    type A: Acc;
    fn to_acc(self) -> Self::A;
    fn from_acc(v: Self::A) -> Self;
    /// The slice itself when `Self == Self::A` (no conversion needed).
    fn as_acc(src: &[Self]) -> Option<&[Self::A]>;
    /// Mutable variant of [`Elem::as_acc`].
    fn as_acc_mut(dst: &mut [Self]) -> Option<&mut [Self::A]>;
    /// Converts `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [Self::A]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }
    /// Rounds `src` into `dst` (same length), round-to-nearest-even.
    fn store(src: &[Self::A], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(*s);
        }
    }
}

impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        v
    }
    fn as_acc(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
    fn as_acc_mut(dst: &mut [Self]) -> Option<&mut [f32]> {
        Some(dst)
    }
}

impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(v: f64) -> Self {
        v
    }
    fn as_acc(src: &[Self]) -> Option<&[f64]> {
        Some(src)
    }
    fn as_acc_mut(dst: &mut [Self]) -> Option<&mut [f64]> {
        Some(dst)
    }
}

impl Elem for f16 {
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn as_acc(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_acc_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn load(src: &[Self], dst: &mut [f32]) {
        // Uses F16C when the CPU has it (runtime detection inside `half`).
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    fn store(src: &[f32], dst: &mut [Self]) {
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src)
    }
}

impl Elem for bf16 {
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn as_acc(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_acc_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

/// `e^x` for f32, accurate to about 1 ulp, written so that LLVM vectorises it.
///
/// Inputs below `ln(f32::MIN_POSITIVE)` return 0 (subnormal results are flushed: the kernels only
/// add them to sums that already hold a term >= 1), inputs above 88 saturate at `e^88`, NaN gives
/// NaN. The kernels only call it on `x - max <= 0`.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    exp_f32_with::<false>(x)
}

/// [`exp_f32`] with every multiply-add fused (one rounding each instead of two): the same
/// algorithm and error bound. Only fast where the CPU has FMA units and the caller is compiled
/// for them (elsewhere `mul_add` is a library call).
#[inline(always)]
pub(crate) fn exp_f32_fma(x: f32) -> f32 {
    exp_f32_with::<true>(x)
}

/// `a * b + c`, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn exp_f32_with<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in 9 bits and the rest (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.0;
    // Round-to-nearest via the 1.5 * 2^23 trick: the integer lands in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    // `clamp` keeps NaN as NaN.
    let xc = x.clamp(LO, HI);
    let t = madd::<FMA>(xc, LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = madd::<FMA>(-n, LN2_HI, xc);
    let r = madd::<FMA>(-n, LN2_LO, r);
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32;
    let p = madd::<FMA>(p, r, 1.398_199_9e-3);
    let p = madd::<FMA>(p, r, 8.333_452e-3);
    let p = madd::<FMA>(p, r, 4.166_579_6e-2);
    let p = madd::<FMA>(p, r, 1.666_666_5e-1);
    let p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p, r2, r) + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    // NaN propagates through the comparisons above (they are false) and through `p`.
    if x < LO {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_f32, exp_f32_fma};

    #[test]
    fn exp_f32_matches_f64_within_two_ulp() {
        for (name, f) in [("plain", exp_f32 as fn(f32) -> f32), ("fma", exp_f32_fma)] {
            let mut worst = 0.0f64;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let got = f(x) as f64;
                let want = (x as f64).exp();
                let ulp = (want as f32).abs() * f32::EPSILON;
                let err = (got - want).abs() / ulp as f64;
                worst = worst.max(err);
                x += 0.000_731;
            }
            assert!(worst <= 2.0, "{name}: worst error {worst} ulp");
        }
    }

    #[test]
    fn exp_f32_edges() {
        for f in [exp_f32 as fn(f32) -> f32, exp_f32_fma] {
            assert_eq!(f(0.0), 1.0);
            assert_eq!(f(f32::NEG_INFINITY), 0.0);
            assert_eq!(f(-1000.0), 0.0);
            assert!(f(f32::NAN).is_nan());
            assert!(f(88.0).is_finite());
            assert!(f(f32::MIN_POSITIVE.ln() - 0.5) == 0.0);
        }
    }
}
