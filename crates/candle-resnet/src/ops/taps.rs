//! im2col and col2im of small images as gathers through index tables.
//!
//! On a 2-to-16-pixel-wide map the im2col matrix is made of very short runs: a 3x3 tap of a
//! 4x4 plane is 16 values, fetched by a handful of copies and fills whose bookkeeping costs more
//! than the bytes (at 32 px these two passes took as long as the GEMMs). Here a geometry's
//! taps become two tables built once per pass:
//!
//! - `cols`, `taps x cnt*P`: for each im2col element `(tap, image i, output pixel p)`, the offset
//!   of the input value it copies, relative to the start of its channel's plane in image 0
//!   (`i * Ci*H*W + iy * W + ix`), or -1 where the tap reads padding;
//! - `pixels`, `taps x cnt*H*W`: for each input pixel `(image i, q)` and tap, the im2col column
//!   `i * P + p` that the tap fed from it, or -1 (with any stride, a tap reads each input pixel
//!   for at most one output pixel).
//!
//! An im2col row is then one gather over `cnt * P` values, and col2im's value for an input
//! pixel is the sum over taps of one gather each, in tap order: the order the scatter-add in
//! `conv.rs` uses, so both routes give the same bits. With AVX-512 the gathers are
//! `vgatherdps` with the padding masked off; elsewhere a scalar loop.

use candle_core::{DType, WithDType};
use std::sync::{Arc, Mutex, OnceLock};

/// The two gather tables of a convolution geometry for up to `cnt` images (see the module docs).
/// A table built for `cnt` images serves any smaller group: its rows' first `k * P` (or
/// `k * H*W`) entries concern images `0..k` only.
pub(super) struct Taps {
    shape: Shape,
    cnt: usize,
    cols: Table,
    /// Built on the first col2im: a convolution whose input needs no gradient (a network's stem)
    /// never reads it, and at 224 px it is the larger of the two (about 10 MB for the stem).
    pixels: OnceLock<Table>,
    /// Per image: im2col columns (`P`), pixels in a plane (`H*W`), values in an image.
    p: usize,
    hw: usize,
    in_len: usize,
    taps: usize,
}

/// The geometry the tables are built from (the fields of `conv::Geo` they need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub oh: usize,
    pub ow: usize,
}

/// Tables kept for the geometries seen last (a network has a dozen distinct ones; each pass of
/// each layer would otherwise rebuild its tables, about 1 % of a 32 px training step).
const CACHED: usize = 32;

impl Taps {
    /// [`Taps::new`], from a small process-wide cache of recent geometries.
    pub(super) fn cached(s: &Shape, cnt: usize) -> Option<Arc<Self>> {
        static CACHE: Mutex<Vec<(Shape, usize, Arc<Taps>)>> = Mutex::new(Vec::new());
        let hit = |c: &Vec<(Shape, usize, Arc<Taps>)>| {
            c.iter()
                .find(|(k, n, _)| k == s && *n == cnt)
                .map(|(_, _, t)| Arc::clone(t))
        };
        if let Some(t) = hit(&CACHE.lock().unwrap_or_else(|e| e.into_inner())) {
            return Some(t);
        }
        // Built outside the lock; a racing thread may build the same tables, harmlessly.
        let t = Arc::new(Self::new(s, cnt)?);
        let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if hit(&c).is_none() {
            if c.len() == CACHED {
                c.remove(0);
            }
            c.push((*s, cnt, Arc::clone(&t)));
        }
        Some(t)
    }

    /// The tables for groups of up to `cnt` images; `None` when an offset would not fit an i32
    /// (more than 2^31 values in a group), where the caller keeps the copy-based route.
    pub(super) fn new(s: &Shape, cnt: usize) -> Option<Self> {
        let (p, hw, taps) = (s.oh * s.ow, s.h * s.w, s.kh * s.kw);
        let in_len = s.ci * hw;
        if cnt.checked_mul(in_len)? >= i32::MAX as usize || cnt.checked_mul(p)? >= i32::MAX as usize
        {
            return None;
        }
        Some(Self {
            shape: *s,
            cnt,
            cols: Self::cols_table(s, cnt),
            pixels: OnceLock::new(),
            p,
            hw,
            in_len,
            taps,
        })
    }

    /// The `cols` table (see the module docs): per tap, the input offset each im2col element
    /// copies, or -1.
    fn cols_table(s: &Shape, cnt: usize) -> Table {
        let (p, hw) = (s.oh * s.ow, s.h * s.w);
        let in_len = s.ci * hw;
        let mut cols = Vec::with_capacity(s.kh * s.kw * cnt * p);
        let pad = s.padding as isize;
        let (st, h, w) = (s.stride as isize, s.h as isize, s.w as isize);
        for ky in 0..s.kh as isize {
            for kx in 0..s.kw as isize {
                for i in 0..cnt {
                    for oy in 0..s.oh as isize {
                        for ox in 0..s.ow as isize {
                            let (iy, ix) = (oy * st + ky - pad, ox * st + kx - pad);
                            let inside = (0..h).contains(&iy) && (0..w).contains(&ix);
                            cols.push(if inside {
                                (i * in_len) as i32 + (iy * w + ix) as i32
                            } else {
                                -1
                            });
                        }
                    }
                }
            }
        }
        Table::new(cols, cnt * p)
    }

    /// The `pixels` table (see the module docs), built on first use: per tap, the im2col column
    /// that read each input pixel, or -1.
    fn pixels(&self) -> &Table {
        self.pixels.get_or_init(|| {
            let (s, cnt) = (&self.shape, self.cnt);
            let p = s.oh * s.ow;
            let mut pixels = Vec::with_capacity(s.kh * s.kw * cnt * s.h * s.w);
            let pad = s.padding as isize;
            let (st, h, w) = (s.stride as isize, s.h as isize, s.w as isize);
            // The output pixel whose tap (ky, kx) reads input (iy, ix): `o * stride + k - pad =
            // i`, if that `o` is whole and inside the output.
            let from = |i: isize, k: isize, out: usize| {
                let t = i + pad - k;
                (t >= 0 && t % st == 0 && t / st < out as isize).then_some(t / st)
            };
            for ky in 0..s.kh as isize {
                for kx in 0..s.kw as isize {
                    for i in 0..cnt {
                        for iy in 0..h {
                            for ix in 0..w {
                                pixels.push(match (from(iy, ky, s.oh), from(ix, kx, s.ow)) {
                                    (Some(oy), Some(ox)) => {
                                        (i * p) as i32 + (oy * s.ow as isize + ox) as i32
                                    }
                                    _ => -1,
                                });
                            }
                        }
                    }
                }
            }
            Table::new(pixels, cnt * s.h * s.w)
        })
    }

    /// The im2col matrix of `cnt` images (`imgs`, image-major, no more than the tables were
    /// built for): `K x cnt*P`, row `(c, tap)` holding that tap of every image.
    pub(super) fn im2col<T: WithDType>(
        &self,
        imgs: &[T],
        cnt: usize,
        col: &mut [T],
        parallel: bool,
    ) {
        let ld = cnt * self.p;
        let ci = self.in_len / self.hw;
        assert!(ld <= self.cols.ld && imgs.len() == cnt * self.in_len);
        assert_eq!(col.len(), ci * self.taps * ld);
        // Entries of images `0..cnt` are below `(cnt - 1) * in_len + hw`: from a plane's start
        // `c * hw` they stay inside `imgs`, as `c * hw + hw <= in_len`.
        let top = (cnt.max(1) - 1) * self.in_len + self.hw;
        super::chunks(col, ld, parallel, |r, row| {
            let (c, t) = (r / self.taps, r % self.taps);
            // SAFETY: the entries are below `top` by construction (see above and `Taps::new`).
            unsafe { self.cols.gather(t, row, &imgs[c * self.hw..], top, false) };
        });
    }

    /// The adjoint of [`Taps::im2col`]: a `K x cnt*P` im2col-shaped gradient summed back into
    /// pixels, as a channel-major `Ci x cnt*H*W` matrix (`out`, overwritten); rows in parallel
    /// when `parallel`.
    pub(super) fn col2im<T: WithDType>(
        &self,
        col: &[T],
        cnt: usize,
        out: &mut [T],
        parallel: bool,
    ) {
        let (ld, lp) = (cnt * self.p, cnt * self.hw);
        let ci = self.in_len / self.hw;
        let pixels = self.pixels();
        assert!(lp <= pixels.ld && col.len() == ci * self.taps * ld);
        assert_eq!(out.len(), ci * lp);
        super::chunks(out, lp, parallel, |c, acc| {
            acc.fill(T::zero());
            for t in 0..self.taps {
                // Entries of images `0..cnt` are im2col columns, below `cnt * P = ld`.
                let row = &col[(c * self.taps + t) * ld..][..ld];
                // SAFETY: `Taps::new` writes `i * P + p < (i + 1) * P` for image `i < cnt`.
                unsafe { pixels.gather(t, acc, row, ld, true) };
            }
        });
    }
}

/// Lanes per vector block of a table (16 f32 in an AVX-512 register).
const LANES: usize = 16;

/// One table: rows of `ld` indices (one row per tap), and for every block of [`LANES`] entries
/// of a row whether its valid entries are consecutive (a shifted copy: 3x3 stride-1 taps on
/// maps 4 or 8 wide), so that a masked load can stand in for the gather.
struct Table {
    idx: Vec<i32>,
    runs: Vec<Run>,
    ld: usize,
}

/// A block of a [`Table`] row: `mask` has a bit per valid entry (index >= 0); where they are
/// `base + lane` for each valid lane, `base` is that offset, else [`Run::SCATTERED`].
#[derive(Clone, Copy)]
struct Run {
    base: i32,
    mask: u16,
}

impl Run {
    const SCATTERED: i32 = i32::MIN;
}

impl Table {
    fn new(idx: Vec<i32>, ld: usize) -> Self {
        let runs = idx
            .chunks(ld.max(1))
            .flat_map(|row| row.chunks(LANES))
            .map(|block| {
                let mut mask = 0u16;
                let mut base = None;
                let mut run = true;
                for (lane, &i) in block.iter().enumerate() {
                    if i < 0 {
                        continue;
                    }
                    mask |= 1 << lane;
                    let b = i - lane as i32;
                    run &= *base.get_or_insert(b) == b;
                }
                let base = match base {
                    Some(b) if run => b,
                    Some(_) => Run::SCATTERED,
                    None => 0,
                };
                Run { base, mask }
            })
            .collect();
        Self { idx, runs, ld }
    }

    /// [`gather`] through row `t`'s first `dst.len()` entries.
    ///
    /// # Safety
    /// As [`gather`]: those entries are below `top`.
    unsafe fn gather<T: WithDType>(
        &self,
        t: usize,
        dst: &mut [T],
        src: &[T],
        top: usize,
        add: bool,
    ) {
        let blocks = self.ld.div_ceil(LANES);
        let idx = &self.idx[t * self.ld..][..dst.len()];
        let runs = &self.runs[t * blocks..][..dst.len().div_ceil(LANES)];
        // SAFETY: the caller's promise.
        unsafe { gather(dst, src, idx, runs, top, add) }
    }
}

/// `dst[j] (+)= src[idx[j]]` for every `j` with `idx[j] >= 0`; without `add`, the other `dst[j]`
/// become zero. `runs` describes `idx` block by block (see [`Table`]).
///
/// # Safety
/// Every index is below `top` (checked in debug builds only; `top <= src.len()` always is): the
/// vector route reads without bounds checks.
unsafe fn gather<T: WithDType>(
    dst: &mut [T],
    src: &[T],
    idx: &[i32],
    runs: &[Run],
    top: usize,
    add: bool,
) {
    assert!(dst.len() == idx.len() && top <= src.len() && runs.len() == idx.len().div_ceil(LANES));
    debug_assert!(idx.iter().all(|&i| i < 0 || (i as usize) < top));
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == DType::F32 && avx512() {
        // SAFETY: T is f32 (its DType says so), AVX-512F was detected, and every index is
        // below `top <= src.len()` (the caller's promise).
        unsafe {
            let d = std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut f32, dst.len());
            let s = std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len());
            return gather_f32_avx512(d, s, idx, runs, add);
        }
    }
    let _ = runs;
    for (d, &i) in dst.iter_mut().zip(idx) {
        if i >= 0 {
            let v = src[i as usize];
            *d = if add { *d + v } else { v };
        } else if !add {
            *d = T::zero();
        }
    }
}

/// Whether f32 gathers run as vector instructions here (x86-64 with AVX-512F).
pub(super) fn vector_gathers() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// [`gather`] for f32, 16 lanes at a time, the padding lanes masked off (neither read nor, when
/// adding, added); a block whose valid lanes are consecutive is one masked load.
///
/// # Safety
/// The CPU has AVX-512F; `dst.len() == idx.len()`; `runs` describes `idx` (see [`Table`]);
/// every non-negative index is below `src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_f32_avx512(dst: &mut [f32], src: &[f32], idx: &[i32], runs: &[Run], add: bool) {
    use std::arch::x86_64::*;
    let n = dst.len();
    for (b, run) in runs.iter().enumerate() {
        let j = b * LANES;
        let lanes: __mmask16 = if n - j >= LANES {
            0xffff
        } else {
            (1u16 << (n - j)) - 1
        };
        let valid = run.mask & lanes;
        let g = if run.base != Run::SCATTERED {
            // Valid lane `l` reads `src[base + l]`, inside `src`; the address of a masked-off
            // lane may lie outside it, which a masked load never touches.
            _mm512_maskz_loadu_ps(valid, src.as_ptr().wrapping_offset(run.base as isize))
        } else {
            let v = _mm512_maskz_loadu_epi32(lanes, idx.as_ptr().add(j));
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), valid, v, src.as_ptr())
        };
        let out = dst.as_mut_ptr().add(j);
        if add {
            let acc = _mm512_maskz_loadu_ps(lanes, out);
            _mm512_mask_storeu_ps(out, lanes, _mm512_mask_add_ps(acc, valid, acc, g));
        } else {
            _mm512_mask_storeu_ps(out, lanes, g);
        }
    }
}
