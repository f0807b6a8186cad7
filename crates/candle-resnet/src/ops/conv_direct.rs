//! Direct channels-last f32 convolution on x86-64 CPUs with AVX-512: no im2col matrix, no
//! packing of the activations.
//!
//! The output is a list of pixels `(n, oy, ox)`, each a row of `Co` channels. A micro-tile is
//! [`TILE`] consecutive pixels (across rows and images alike) by up to 64 output channels (four
//! 16-lane registers), 24 accumulators in registers. For each kernel tap the tile's pixels point
//! at their `Ci` input channels (contiguous in a channels-last image) or, where the tap reads
//! padding, at a row of zeros; each input channel is then one broadcast per pixel against the
//! weight's row for that tap. The weight is packed once per pass in 64-channel blocks aligned to
//! cache lines ([`packed`]); a task (up to [`TILES_PER_TASK`] tiles of one block) walks tap by tap
//! through [`CI_CHUNK`] input channels at a time, every tile reusing that 16 KiB slice from the
//! L1 cache, the sums kept in the output between slices.
//!
//! Each output element is one sum over `(ky, kx, ci)` in that order, started from zero and
//! computed by one micro-tile; tiles and tasks depend on the geometry alone, so the result has
//! the same bits for any thread count.
//!
//! The same kernel runs a stride-1 convolution's input gradient: it is the convolution of the
//! output gradient with the kernel flipped and its channel axes swapped, padded `k - 1 - p`
//! ([`Plan::grad_input`], [`grad_input`]). The weight gradient ([`grad_weight`]) has a kernel of
//! its own: 6 input by 64 output channels of one tap in registers over blocks of 64 pixels.

use super::Geo;
use rayon::prelude::*;

/// Pixels per micro-tile: 6 pixels x 4 registers = 24 accumulators of the 32 registers.
const TILE: usize = 6;
/// Output channels per register.
const LANES: usize = 16;
/// Output channels per micro-tile.
const CO_BLOCK: usize = 4 * LANES;
/// Micro-tiles per parallel task.
const TILES_PER_TASK: usize = 16;
/// Input channels per pass over a task's tiles: a `(64, 64)` slice of the weight, 16 KiB.
const CI_CHUNK: usize = 64;
/// Output pixels per block of the weight gradient's reduction.
const WG_PIXELS: usize = 64;
/// Up to this many input channels the weight gradient takes the direct kernel.
const DW_MAX_CI: usize = 64;

/// A convolution in the kernel's terms: `x (n, h, w, ci)` to `y (n, oh, ow, co)` with a
/// `(kh, kw, ci, co)` weight; output pixel `(oy, ox)`, tap `(ky, kx)` reads input pixel
/// `(oy * stride + ky - pad_y, ox * stride + kx - pad_x)`, zero outside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    n: usize,
    h: usize,
    w: usize,
    ci: usize,
    oh: usize,
    ow: usize,
    co: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad_y: isize,
    pad_x: isize,
}

impl Plan {
    /// The forward of `g`.
    pub(super) fn forward(g: &Geo) -> Self {
        Self {
            n: g.n,
            h: g.h,
            w: g.w,
            ci: g.ci,
            oh: g.oh,
            ow: g.ow,
            co: g.co,
            kh: g.kh,
            kw: g.kw,
            stride: g.stride,
            pad_y: g.padding as isize,
            pad_x: g.padding as isize,
        }
    }

    /// The input gradient of `g` as a convolution of the output gradient, for stride 1 only
    /// (`None` otherwise): `dx[iy] = sum_ky dy[iy + p - ky] w[ky]`, i.e. tap `kh - 1 - ky` of the
    /// flipped kernel at padding `kh - 1 - p`.
    pub(super) fn grad_input(g: &Geo) -> Option<Self> {
        (g.stride == 1).then(|| Self {
            n: g.n,
            h: g.oh,
            w: g.ow,
            ci: g.co,
            oh: g.h,
            ow: g.w,
            co: g.ci,
            kh: g.kh,
            kw: g.kw,
            stride: 1,
            pad_y: g.kh as isize - 1 - g.padding as isize,
            pad_x: g.kw as isize - 1 - g.padding as isize,
        })
    }

    /// Whether the kernel runs this plan on this CPU: output channels in whole registers,
    /// enough input channels per tap to pay for setting a tap up (not an RGB stem), and at
    /// least one tap (the first part of the reduction is what writes each output element).
    pub(super) fn runs(&self) -> bool {
        let taps = self.kh > 0 && self.kw > 0;
        self.co > 0 && self.co.is_multiple_of(LANES) && self.ci >= LANES && taps && avx512()
    }

    fn in_len(&self) -> usize {
        self.n * self.h * self.w * self.ci
    }
    fn out_len(&self) -> usize {
        self.n * self.oh * self.ow * self.co
    }
    fn weight_len(&self) -> usize {
        self.kh * self.kw * self.ci * self.co
    }
}

/// Whether the direct kernels run on this machine: a CPU with AVX-512F, and no
/// `CANDLE_RESNET_DIRECT=0` in the environment (read at each call, so that a benchmark can
/// alternate the two paths in one process).
pub(super) fn enabled() -> bool {
    avx512() && std::env::var_os("CANDLE_RESNET_DIRECT").is_none_or(|v| v != "0")
}

/// Whether this CPU has AVX-512F (checked once).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The forward of `g` from `x (N, H, W, Ci)` and `w (Co, Ci, kh, kw)`: `y (N, OH, OW, Co)`, or
/// `None` where the kernel does not run it (strided convolutions among them).
pub(super) fn forward(g: &Geo, x: &[f32], w: &[f32]) -> Option<Vec<f32>> {
    let p = Plan::forward(g);
    let taps = g.kh * g.kw;
    // Strided: measured slower than im2col + GEMM (ResNet-18's 3x3 stride-2 layers, Ice Lake).
    if g.stride != 1 || !p.runs() || w.len() != g.co * g.k() {
        return None;
    }
    let w = packed(&p, |t, c, o| w[(o * g.ci + c) * taps + t]);
    conv(&p, x, w.as_slice())
}

/// The input gradient of `g` from `w (Co, Ci, kh, kw)` and `dy (N, OH, OW, Co)`: `dx (N, H, W,
/// Ci)`, or `None` where the kernel does not run it (strided convolutions among them).
pub(super) fn grad_input(g: &Geo, w: &[f32], dy: &[f32]) -> Option<Vec<f32>> {
    let p = Plan::grad_input(g).filter(Plan::runs)?;
    let taps = g.kh * g.kw;
    if w.len() != g.co * g.k() {
        return None;
    }
    // Tap `t` of the flipped kernel is tap `taps - 1 - t` of `w`; its input channels are `w`'s
    // output channels and the other way round.
    let wf = packed(&p, |t, c, o| w[(c * g.ci + o) * taps + taps - 1 - t]);
    conv(&p, dy, wf.as_slice())
}

/// The weight gradient of `g` from `x (N, H, W, Ci)` and `dy (N, OH, OW, Co)`: `dw (Co, Ci,
/// kh, kw)`, or `None` where the kernel does not run it (strided convolutions, and more than
/// [`DW_MAX_CI`] input channels, among them).
///
/// Per 64-channel block of `dy` and fixed range of output pixels, a partial sum over the
/// range's pixels in order, [`WG_PIXELS`] at a time (that block of `dy`, 16 KiB, stays in the L1
/// cache while every tap and tile of input channels runs through it); the partials of the
/// ranges are then added in order ([`wgrad_ranges`]: a function of the geometry alone).
pub(super) fn grad_weight(g: &Geo, x: &[f32], dy: &[f32]) -> Option<Vec<f32>> {
    let p = Plan::forward(g);
    // Measured against im2col + GEMM per layer (Ice Lake, 2 threads): faster with 64 input
    // channels (56 px maps +5 %, 8 px +12 %), even at 128, slower from 256 on (7 px maps of
    // 512 channels -25 %, 2 px maps of 256 -55 %).
    if g.stride != 1 || g.ci > DW_MAX_CI || !p.runs() {
        return None;
    }
    if x.len() != p.in_len() || dy.len() != p.out_len() {
        return None;
    }
    let (taps, k) = (g.kh * g.kw, g.k());
    let pixels = p.n * p.oh * p.ow;
    let mut dw = vec![0f32; p.co * k];
    if pixels == 0 {
        return Some(dw);
    }
    let blocks = p.co.div_ceil(CO_BLOCK);
    let ranges = wgrad_ranges(blocks, pixels);
    // Per range, the blocks one after the other: block `b` at `b * 64 * k`, rows `(tap, ci)`
    // of its width, as `packed` lays out a weight.
    let part = k * p.co;
    let mut partials: Vec<f32> = Vec::with_capacity(ranges.len() * part);
    #[cfg(target_arch = "x86_64")]
    {
        let zeros = vec![0f32; p.ci];
        let out = Out(partials.as_mut_ptr());
        (0..ranges.len() * blocks).into_par_iter().for_each(|t| {
            let (r, b) = (t / blocks, t % blocks);
            // SAFETY: `runs()` checked AVX-512F; `x` and `dy` have the lengths of `p`; each
            // task writes its own block of its own range's partial.
            unsafe {
                let at = out.get().add(r * part + b * CO_BLOCK * k);
                x86::wgrad_task(&p, x, dy, &zeros, b * CO_BLOCK, ranges[r], at)
            }
        });
        // SAFETY: every (range, block) task stores its whole block of the partial in its first
        // pixel block (ranges are never empty) before reading any of it.
        unsafe { partials.set_len(ranges.len() * part) };
    }
    // dw[o][c][t] = sum over ranges, in order, of the partials' (t, c) element of channel o.
    dw.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
        let (b, j) = (o / CO_BLOCK, o % CO_BLOCK);
        let width = (p.co - b * CO_BLOCK).min(CO_BLOCK);
        for part in partials.chunks_exact(part) {
            let block = &part[b * CO_BLOCK * k..][..width * k];
            for t in 0..taps {
                for (c, d) in row.iter_mut().skip(t).step_by(taps).enumerate() {
                    *d += block[(t * p.ci + c) * width + j];
                }
            }
        }
    });
    Some(dw)
}

/// The pixel ranges `(first, count)` whose weight gradients are summed as separate partials:
/// enough (range, channel block) tasks for the threads of a small machine (16, at most 8 ranges,
/// at least 64 pixels each), few partials to add where the weight is large.
fn wgrad_ranges(blocks: usize, pixels: usize) -> Vec<(usize, usize)> {
    let count = (16 / blocks)
        .clamp(1, 8)
        .min(pixels.div_ceil(WG_PIXELS))
        .max(1);
    let per = pixels.div_ceil(count).next_multiple_of(WG_PIXELS);
    (0..pixels)
        .step_by(per)
        .map(|a| (a, per.min(pixels - a)))
        .collect()
}

/// The weight of plan `p`, element `(tap, ci, co)` given by `at`, in blocks of [`CO_BLOCK`]
/// output channels: block `b` holds rows `(tap, ci)` of its (up to) 64 channels, so the
/// `(CI_CHUNK, 64)` slice a task runs through is one contiguous 16 KiB run (rows of a wider
/// matrix, 1 or 2 KiB apart, fall into a few L1 sets and evict each other).
fn packed(p: &Plan, at: impl Fn(usize, usize, usize) -> f32 + Sync) -> Aligned {
    let k = p.kh * p.kw * p.ci;
    let mut out = Aligned::zeros(k * p.co);
    if k == 0 {
        return out;
    }
    out.as_mut_slice()
        .par_chunks_mut(CO_BLOCK * k)
        .enumerate()
        .for_each(|(b, block)| {
            let width = block.len() / k;
            for (r, row) in block.chunks_exact_mut(width).enumerate() {
                let (t, c) = (r / p.ci, r % p.ci);
                for (j, d) in row.iter_mut().enumerate() {
                    *d = at(t, c, b * CO_BLOCK + j);
                }
            }
        });
    out
}

/// An f32 buffer whose first element lies on a 64-byte boundary, so that every 16-lane row of
/// a packed weight is one cache line (the allocator aligns large blocks to 16 bytes only, and a
/// register load across two lines costs two).
struct Aligned {
    buf: Vec<f32>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn zeros(len: usize) -> Self {
        let buf = vec![0f32; len + LANES];
        let at = buf.as_ptr().align_offset(LANES * 4).min(LANES);
        Self { buf, at, len }
    }
    fn as_slice(&self) -> &[f32] {
        &self.buf[self.at..][..self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.at..][..self.len]
    }
}

/// `y` of plan `p` from `x (n, h, w, ci)` and the weight [`packed`]; `None` where the kernel
/// does not run `p` ([`Plan::runs`]).
fn conv(p: &Plan, x: &[f32], w: &[f32]) -> Option<Vec<f32>> {
    if !p.runs() || x.len() != p.in_len() || w.len() != p.weight_len() {
        return None;
    }
    let len = p.out_len();
    let mut y: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_arch = "x86_64")]
    {
        let zeros = vec![0f32; p.ci];
        // Tasks of up to TILES_PER_TASK tiles of one channel block, block-major: a thread
        // runs consecutive tasks on one block, whose weight stays in its L2 cache.
        let pixels = p.n * p.oh * p.ow;
        let per = TILES_PER_TASK * TILE;
        let chunks = pixels.div_ceil(per);
        let out = Out(y.as_mut_ptr());
        (0..p.co.div_ceil(CO_BLOCK) * chunks)
            .into_par_iter()
            .for_each(|t| {
                let (block, chunk) = (t / chunks, t % chunks);
                let first = chunk * per;
                let span = (first, per.min(pixels - first));
                // SAFETY: `runs()` checked AVX-512F; the lengths of `x` and `w` are those of
                // `p`, `y` has room for its output; tasks write disjoint parts of it (their
                // pixels x their block).
                unsafe { x86::task(p, x, w, &zeros, block * CO_BLOCK, span, out.get()) }
            });
        // SAFETY: the tasks cover every pixel of every channel block, and a task's first part
        // of the reduction stores each of its elements before any is read.
        unsafe { y.set_len(len) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    y.resize(len, 0.0); // unreachable: `runs()` is false off x86-64
    Some(y)
}

/// The output buffer as the tasks share it: each writes its own pixels of its own channels.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: the tasks that receive the pointer write disjoint elements (see `conv`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Plan, CI_CHUNK, CO_BLOCK, LANES, TILE, TILES_PER_TASK, WG_PIXELS};
    use std::arch::x86_64::*;

    /// Where output pixel `q` (flat `(n, oy, ox)` index) starts reading: its image's offset in
    /// `x` and the input row and column of tap `(0, 0)`.
    #[derive(Clone, Copy, Default)]
    struct Pix {
        img: usize,
        iy: isize,
        ix: isize,
    }

    impl Pix {
        fn of(p: &Plan, q: usize) -> Self {
            let (ox, rest) = (q % p.ow, q / p.ow);
            let (oy, n) = (rest % p.oh, rest / p.oh);
            Self {
                img: n * p.h * p.w * p.ci,
                iy: (oy * p.stride) as isize - p.pad_y,
                ix: (ox * p.stride) as isize - p.pad_x,
            }
        }
    }

    /// Output pixels `span.0..span.0 + span.1` (at most `TILES_PER_TASK` tiles), channels
    /// `cb..cb + 64` (or to `p.co`): tap by tap and [`CI_CHUNK`] input channels at a time (that
    /// slice of the weight stays in the L1 cache while every tile of the task runs through it),
    /// the tiles' sums kept in `y` between chunks.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x`, `w` have the lengths of `p`'s input and weight, `zeros` holds
    /// `p.ci` zeros, `y` is `p`'s output, of which no other thread touches these elements.
    pub(super) unsafe fn task(
        p: &Plan,
        x: &[f32],
        w: &[f32],
        zeros: &[f32],
        cb: usize,
        (first, pixels): (usize, usize),
        y: *mut f32,
    ) {
        let mut pix = [[Pix::default(); TILE]; TILES_PER_TASK];
        for (t, tile) in pix.iter_mut().enumerate() {
            for (i, px) in tile.iter_mut().enumerate() {
                let q = t * TILE + i;
                if q < pixels {
                    *px = Pix::of(p, first + q);
                }
            }
        }
        {
            let width = (p.co - cb).min(CO_BLOCK);
            let regs = width / LANES;
            let block = w.as_ptr().add(cb * p.kh * p.kw * p.ci);
            for ky in 0..p.kh {
                for kx in 0..p.kw {
                    let wt = block.add((ky * p.kw + kx) * p.ci * width);
                    for c0 in (0..p.ci).step_by(CI_CHUNK) {
                        let cs = (c0, (c0 + CI_CHUNK).min(p.ci));
                        let start = ky == 0 && kx == 0 && c0 == 0;
                        for (t, px) in pix.iter().enumerate() {
                            let t0 = t * TILE;
                            if t0 >= pixels {
                                break;
                            }
                            let r = TILE.min(pixels - t0);
                            let y = y.add((first + t0) * p.co + cb);
                            let at = Tap {
                                ky,
                                kx,
                                cs,
                                start,
                                width,
                            };
                            macro_rules! run {
                                ($($r:literal)*) => {
                                    match (r, regs) {
                                        $(
                                            ($r, 4) => tile::<$r, 4>(p, x, px, at, wt, zeros, y),
                                            ($r, 3) => tile::<$r, 3>(p, x, px, at, wt, zeros, y),
                                            ($r, 2) => tile::<$r, 2>(p, x, px, at, wt, zeros, y),
                                            ($r, 1) => tile::<$r, 1>(p, x, px, at, wt, zeros, y),
                                        )*
                                        _ => unreachable!("tile of {r} pixels x {regs} registers"),
                                    }
                                };
                            }
                            run!(1 2 3 4 5 6);
                        }
                    }
                }
            }
        }
    }

    /// Which part of the reduction a micro-tile call adds: tap `(ky, kx)`, input channels
    /// `cs.0..cs.1`; `start` when it is the first part (the sums start from zero, not from
    /// the output); `width` is the row length of the tap's weight block.
    #[derive(Clone, Copy)]
    struct Tap {
        ky: usize,
        kx: usize,
        cs: (usize, usize),
        start: bool,
        width: usize,
    }

    /// One micro-tile: `R` pixels x `V` registers of output channels, part `at` of the
    /// reduction added in registers to the sums in `y` (pixel stride `p.co`).
    ///
    /// # Safety
    /// As [`task`]; `pix` holds the tile's `R` pixels, `wt` points at tap `(at.ky, at.kx)`'s
    /// `(Ci, at.width)` weight block and `y` at the tile's first output element.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const V: usize>(
        p: &Plan,
        x: &[f32],
        pix: &[Pix; TILE],
        at: Tap,
        wt: *const f32,
        zeros: &[f32],
        y: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if !at.start {
            for (r, a) in acc.iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    *av = _mm512_loadu_ps(y.add(r * p.co + v * LANES));
                }
            }
        }
        let (h, wd) = (p.h as isize, p.w as isize);
        let mut src = [zeros.as_ptr(); R];
        for (s, px) in src.iter_mut().zip(pix) {
            let (iy, ix) = (px.iy + at.ky as isize, px.ix + at.kx as isize);
            if (0..h).contains(&iy) && (0..wd).contains(&ix) {
                *s = x
                    .as_ptr()
                    .add(px.img + (iy as usize * p.w + ix as usize) * p.ci);
            }
        }
        for c in at.cs.0..at.cs.1 {
            let wr = wt.add(c * at.width);
            let mut wv = [_mm512_setzero_ps(); V];
            for (v, reg) in wv.iter_mut().enumerate() {
                *reg = _mm512_loadu_ps(wr.add(v * LANES));
            }
            for (a, s) in acc.iter_mut().zip(&src) {
                let b = _mm512_set1_ps(*s.add(c));
                for (av, wvv) in a.iter_mut().zip(&wv) {
                    *av = _mm512_fmadd_ps(*wvv, b, *av);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                _mm512_storeu_ps(y.add(r * p.co + v * LANES), *av);
            }
        }
    }

    /// Channels `cb..cb + 64` (or to `p.co`) of the weight gradient summed over output pixels
    /// `first..first + count`, into `acc`: rows `(tap, ci)` of the block's width. Per block of
    /// [`WG_PIXELS`] pixels, tap by tap, tiles of [`TILE`] input channels.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `x`, `dy` have the lengths of `p`'s input and output, `zeros`
    /// holds `p.ci` zeros, `count > 0`, and `acc` has room for `kh * kw * ci` rows of the
    /// block's width that no other thread touches.
    pub(super) unsafe fn wgrad_task(
        p: &Plan,
        x: &[f32],
        dy: &[f32],
        zeros: &[f32],
        cb: usize,
        (first, count): (usize, usize),
        acc: *mut f32,
    ) {
        let width = (p.co - cb).min(CO_BLOCK);
        let regs = width / LANES;
        let (h, wd) = (p.h as isize, p.w as isize);
        let mut pix = [Pix::default(); WG_PIXELS];
        let mut src = [zeros.as_ptr(); WG_PIXELS];
        for q0 in (first..first + count).step_by(WG_PIXELS) {
            let n = WG_PIXELS.min(first + count - q0);
            for (i, px) in pix.iter_mut().enumerate().take(n) {
                *px = Pix::of(p, q0 + i);
            }
            let d = dy.as_ptr().add(q0 * p.co + cb);
            for ky in 0..p.kh {
                for kx in 0..p.kw {
                    for (s, px) in src.iter_mut().zip(&pix).take(n) {
                        let (iy, ix) = (px.iy + ky as isize, px.ix + kx as isize);
                        *s = if (0..h).contains(&iy) && (0..wd).contains(&ix) {
                            x.as_ptr()
                                .add(px.img + (iy as usize * p.w + ix as usize) * p.ci)
                        } else {
                            zeros.as_ptr()
                        };
                    }
                    let row = (ky * p.kw + kx) * p.ci;
                    for c0 in (0..p.ci).step_by(TILE) {
                        let at = WTap {
                            c0,
                            pixels: n,
                            co: p.co,
                            width,
                            start: q0 == first,
                        };
                        let a = acc.add((row + c0) * width);
                        macro_rules! run {
                            ($($r:literal)*) => {
                                match (TILE.min(p.ci - c0), regs) {
                                    $(
                                        ($r, 4) => wtile::<$r, 4>(&src, at, d, a),
                                        ($r, 3) => wtile::<$r, 3>(&src, at, d, a),
                                        ($r, 2) => wtile::<$r, 2>(&src, at, d, a),
                                        ($r, 1) => wtile::<$r, 1>(&src, at, d, a),
                                    )*
                                    (r, v) => unreachable!("tile of {r} channels x {v} registers"),
                                }
                            };
                        }
                        run!(1 2 3 4 5 6);
                    }
                }
            }
        }
    }

    /// A weight-gradient micro-tile's part: input channels `c0..c0 + R` of one tap over the
    /// first `pixels` pixels of a block (`dy` rows `co` apart), into rows of `width`; `start`:
    /// the first block of the range (the sums start from zero).
    #[derive(Clone, Copy)]
    struct WTap {
        c0: usize,
        pixels: usize,
        co: usize,
        width: usize,
        start: bool,
    }

    /// `R` input channels x `V` registers of output channels of one tap's weight gradient:
    /// `acc[r][v] += x[pixel][c0 + r] * dy[pixel][v]` over the block's pixels in order.
    ///
    /// # Safety
    /// As [`wgrad_task`]; `src` holds each pixel's `Ci` inputs for the tap (or zeros), `dy`
    /// points at the block's first pixel at the tile's first channel, `acc` at row `c0`.
    #[target_feature(enable = "avx512f")]
    unsafe fn wtile<const R: usize, const V: usize>(
        src: &[*const f32; WG_PIXELS],
        at: WTap,
        dy: *const f32,
        acc: *mut f32,
    ) {
        let mut sums = [[_mm512_setzero_ps(); V]; R];
        if !at.start {
            for (r, a) in sums.iter_mut().enumerate() {
                for (v, av) in a.iter_mut().enumerate() {
                    *av = _mm512_loadu_ps(acc.add(r * at.width + v * LANES));
                }
            }
        }
        for (i, s) in src.iter().enumerate().take(at.pixels) {
            let d = dy.add(i * at.co);
            let mut dv = [_mm512_setzero_ps(); V];
            for (v, reg) in dv.iter_mut().enumerate() {
                *reg = _mm512_loadu_ps(d.add(v * LANES));
            }
            let s = s.add(at.c0);
            for (r, a) in sums.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*s.add(r));
                for (av, dvv) in a.iter_mut().zip(&dv) {
                    *av = _mm512_fmadd_ps(*dvv, b, *av);
                }
            }
        }
        for (r, a) in sums.iter().enumerate() {
            for (v, av) in a.iter().enumerate() {
                _mm512_storeu_ps(acc.add(r * at.width + v * LANES), *av);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Sums of products in f64, with the sums of their magnitudes (the rounding scale): for
    /// every product of the convolution `g`, `term(x index, w index, y index)` gives the index
    /// of the sum it joins and its two factors.
    fn sums(
        g: &Geo,
        len: usize,
        term: impl Fn(usize, usize, usize) -> (usize, f32, f32),
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut sum, mut mag) = (vec![0f64; len], vec![0f64; len]);
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                            let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            let xa = ((n * g.h + iy as usize) * g.w + ix as usize) * g.ci;
                            let ya = ((n * g.oh + oy) * g.ow + ox) * g.co;
                            for o in 0..g.co {
                                for c in 0..g.ci {
                                    let wi = ((o * g.ci + c) * g.kh + ky) * g.kw + kx;
                                    let (i, a, b) = term(xa + c, wi, ya + o);
                                    let p = a as f64 * b as f64;
                                    sum[i] += p;
                                    mag[i] += p.abs();
                                }
                            }
                        }
                    }
                }
            }
        }
        (sum, mag)
    }

    /// The forward `y (n, oh, ow, co)` of `x (n, h, w, ci)` and `w (co, ci, kh, kw)`.
    fn reference(g: &Geo, x: &[f32], w: &[f32]) -> (Vec<f64>, Vec<f64>) {
        sums(g, g.n * g.p() * g.co, |xi, wi, yi| (yi, x[xi], w[wi]))
    }

    /// The input gradient `dx (n, h, w, ci)` of `dy (n, oh, ow, co)` through `w`.
    fn reference_dx(g: &Geo, w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        sums(g, g.n * g.in_len(), |xi, wi, yi| (xi, dy[yi], w[wi]))
    }

    /// The weight gradient `dw (co, ci, kh, kw)` of `x` and `dy`.
    fn reference_dw(g: &Geo, x: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        sums(g, g.co * g.k(), |xi, wi, yi| (wi, x[xi], dy[yi]))
    }

    /// Values spread over magnitudes `2^-8..2^8`, both signs, some exact zeros.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                match s % 11 {
                    0 => 0.0,
                    r => {
                        let m = ((s >> 8) % 1000) as f32 / 1000.0 + 0.5;
                        let e = ((s >> 20) % 17) as i32 - 8;
                        let signed = if r % 2 == 0 { m } else { -m };
                        signed * 2f32.powi(e)
                    }
                }
            })
            .collect()
    }

    /// f32 sums of up to `k` products: within `k` roundings of the sum of their magnitudes.
    fn assert_close(what: &str, got: &[f32], (want, mag): (Vec<f64>, Vec<f64>), k: usize) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let eps = f32::EPSILON as f64 * (k as f64 + 2.0);
        for (i, ((&g, w), m)) in got.iter().zip(&want).zip(&mag).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(
                err <= eps * m + 1e-30,
                "{what}[{i}]: {g} vs {w} (bound {})",
                eps * m
            );
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Forward and input gradient against an f64 reference over geometries that leave
        /// partial tiles, tasks and channel blocks (16..80 output channels, more than one
        /// 64-channel block), empty batches, one-pixel maps, padding wider than the kernel's
        /// reach, input channels past one chunk; the same bits with 1 and 3 threads; and
        /// `None` exactly where the kernel does not run (strided forwards, channel counts
        /// outside whole registers, a CPU without AVX-512).
        #[test]
        fn direct_convolution_matches_f64_reference(
            n in 0usize..4, h in 1usize..12, wd in 1usize..12,
            ci in prop::sample::select(vec![1usize, 16, 32, 80]),
            co in prop::sample::select(vec![8usize, 16, 48, 80, 128]),
            k in 1usize..4, stride in 1usize..3, padding in 0usize..3, seed in any::<u64>(),
        ) {
            let Ok(g) = Geo::new(&[n, ci, h, wd], &[co, ci, k, k], stride, padding) else {
                return Ok(()); // kernel larger than the padded input: refused by Geo::new
            };
            let x = values(n * h * wd * ci, seed);
            let w = values(co * ci * k * k, seed ^ 0x9e37);
            let dy = values(n * g.oh * g.ow * co, seed ^ 0x7f4a);
            let runs = avx512() && ci >= 16 && co % 16 == 0;
            let y1 = pool(1).install(|| forward(&g, &x, &w));
            let y3 = pool(3).install(|| forward(&g, &x, &w));
            prop_assert_eq!(y1.is_some(), runs && stride == 1, "forward ran: {:?}", g);
            if let (Some(y1), Some(y3)) = (y1, y3) {
                prop_assert_eq!(bits(&y1), bits(&y3), "forward bits, 1 vs 3 threads");
                assert_close("forward", &y1, reference(&g, &x, &w), g.k());
            }
            let d1 = pool(1).install(|| grad_input(&g, &w, &dy));
            let d3 = pool(3).install(|| grad_input(&g, &w, &dy));
            // The input gradient's "output channels" are the layer's input channels.
            let runs_dx = avx512() && co >= 16 && ci % 16 == 0 && stride == 1;
            prop_assert_eq!(d1.is_some(), runs_dx, "input gradient ran: {:?}", g);
            if let (Some(d1), Some(d3)) = (d1, d3) {
                prop_assert_eq!(bits(&d1), bits(&d3), "input gradient bits, 1 vs 3 threads");
                assert_close("input gradient", &d1, reference_dx(&g, &w, &dy), co * k * k);
            }
            let w1 = pool(1).install(|| grad_weight(&g, &x, &dy));
            let w3 = pool(3).install(|| grad_weight(&g, &x, &dy));
            let runs_dw = runs && stride == 1 && ci <= DW_MAX_CI;
            prop_assert_eq!(w1.is_some(), runs_dw, "weight gradient ran: {:?}", g);
            if let (Some(w1), Some(w3)) = (w1, w3) {
                prop_assert_eq!(bits(&w1), bits(&w3), "weight gradient bits, 1 vs 3 threads");
                let terms = n * g.oh * g.ow;
                assert_close("weight gradient", &w1, reference_dw(&g, &x, &dy), terms);
            }
        }
    }

    #[test]
    fn weight_gradient_over_ranges_of_several_pixel_blocks() {
        // 4 images of 15 x 15: 900 pixels in 8 ranges of 128 (two blocks each) and one of 4;
        // 208 output channels: three full channel blocks and one of 16.
        let g = Geo::new(&[4, 32, 15, 15], &[208, 32, 3, 3], 1, 1).unwrap();
        let x = values(4 * 15 * 15 * 32, 7);
        let dy = values(4 * 15 * 15 * 208, 9);
        if let Some(dw) = grad_weight(&g, &x, &dy) {
            assert_close("weight gradient", &dw, reference_dw(&g, &x, &dy), 900);
            let again = pool(2).install(|| grad_weight(&g, &x, &dy)).unwrap();
            assert_eq!(bits(&dw), bits(&again), "weight gradient bits, 2 threads");
        } else {
            assert!(!avx512(), "the kernel did not run on an AVX-512 CPU");
        }
    }

    #[test]
    fn runs_on_resnet_layers_of_this_cpu() {
        // Where the CPU has AVX-512F, the 3x3 stride-1 layers of a ResNet take this kernel in
        // both passes (a fallback would pass the value tests above silently).
        let g = Geo::new(&[2, 64, 7, 7], &[64, 64, 3, 3], 1, 1).unwrap();
        let x = values(2 * 7 * 7 * 64, 3);
        let w = values(64 * 64 * 9, 5);
        let y = forward(&g, &x, &w);
        let dx = grad_input(&g, &w, &x);
        let dw = grad_weight(&g, &x, &x);
        let has = avx512();
        assert_eq!((y.is_some(), dx.is_some(), dw.is_some()), (has, has, has));
        if let Some(y) = y {
            assert_close("forward", &y, reference(&g, &x, &w), g.k());
        }
    }
}
