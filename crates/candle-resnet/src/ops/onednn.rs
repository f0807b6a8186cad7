//! The oneDNN route for convolutions (feature `onednn`): the three passes of a training step
//! through the C++ bridge `onednn.cpp`, which hands plain NCHW buffers to oneDNN's direct
//! convolutions (blocked layouts, no im2col) and caches one primitive per geometry, pass and
//! element type. f32 always; bf16 arithmetic where oneDNN has a native implementation for this
//! CPU (AMX or AVX512-BF16: [`bf16_native`]), on bf16 buffers ([`run_bf16`]) or on f32 buffers
//! ([`run_f32_bf16`]), with f32 accumulation and the weight gradient summed in f32.

use super::{Geo, Pass};
use candle_core::{bail, Result};
use half::bf16;
use rayon::prelude::*;
use std::ffi::{c_char, c_void};
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Must match `Geometry` in onednn.cpp.
#[repr(C)]
struct Geometry {
    n: i64,
    ci: i64,
    h: i64,
    w: i64,
    co: i64,
    kh: i64,
    kw: i64,
    stride: i64,
    padding: i64,
    oh: i64,
    ow: i64,
    /// 1: the activations are channels-last, `(N, H, W, C)`; 0: `(N, C, H, W)`.
    nhwc: i64,
}

/// Element types of the bridge (`Dt` in onednn.cpp).
const DT_F32: i32 = 0;
const DT_BF16: i32 = 1;
const DT_F32_BF16: i32 = 2;

extern "C" {
    fn cr_dnnl_conv(
        pass: i32,
        dt: i32,
        g: *const Geometry,
        a: *const c_void,
        b: *const c_void,
        out: *mut c_void,
        threads: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn cr_dnnl_impl(pass: i32, dt: i32, g: *const Geometry, buf: *mut c_char, len: usize) -> i32;
    fn cr_dnnl_version(buf: *mut c_char, len: usize);
}

/// The text the bridge wrote into `buf`, up to its NUL (all of `buf` if it has none).
fn text_of(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn pass_code(pass: Pass) -> i32 {
    match pass {
        Pass::Forward => 0,
        Pass::GradInput => 1,
        Pass::GradWeight => 2,
    }
}

/// The bridge's view of `g`, with activations channels-last where `nhwc`.
fn geometry(g: &Geo, nhwc: bool) -> Geometry {
    let to_i64 = |v: usize| i64::try_from(v).expect("a tensor dimension fits in i64");
    Geometry {
        n: to_i64(g.n),
        ci: to_i64(g.ci),
        h: to_i64(g.h),
        w: to_i64(g.w),
        co: to_i64(g.co),
        kh: to_i64(g.kh),
        kw: to_i64(g.kw),
        stride: to_i64(g.stride),
        padding: to_i64(g.padding),
        oh: to_i64(g.oh),
        ow: to_i64(g.ow),
        nhwc: i64::from(nhwc),
    }
}

/// The implementation oneDNN picks for `pass` in element type `dt` on `g` (e.g.
/// `brgconv:avx512_core_amx`, `jit:avx512_core_bf16`, `ref:any`).
fn implementation(pass: Pass, dt: i32, g: &Geo) -> Result<String> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: the bridge writes at most `buf.len()` bytes, NUL-terminated, and only reads `geo`.
    let status = unsafe {
        cr_dnnl_impl(
            pass_code(pass),
            dt,
            &geometry(g, false),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let text = text_of(&buf);
    if status != 0 {
        bail!("conv2d (oneDNN {pass:?}): {text}");
    }
    Ok(text)
}

/// Whether oneDNN runs bf16 convolutions natively on this CPU (AMX or AVX512-BF16), judged once
/// from the implementations it picks for a ResNet 3x3 convolution's three passes (see
/// [`native_bf16_isa`]): a reference or emulated implementation is slower than the f32 route,
/// which is then used instead.
pub(super) fn bf16_native() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let g = Geo::new(&[2, 64, 8, 8], &[64, 64, 3, 3], 1, 1).expect("a valid geometry");
        [Pass::Forward, Pass::GradInput, Pass::GradWeight]
            .iter()
            .all(|&p| match implementation(p, DT_BF16, &g) {
                Ok(name) => native_bf16_isa(&name),
                Err(_) => false,
            })
    })
}

/// Whether an implementation name `KIND:ISA` names a bf16 ISA: `brgconv:avx512_core_amx` and
/// `jit:avx512_core_bf16` are native; `jit_bf16:avx512_core` is the bf16 kernel emulated with
/// AVX-512F instructions (an Ice Lake Xeon: no AVX512-BF16), `ref:any` the reference loops.
/// Only the part after the colon names the instructions; the kind may say `bf16` either way.
fn native_bf16_isa(name: &str) -> bool {
    match name.rsplit_once(':') {
        Some((kind, isa)) => {
            !kind.starts_with("ref") && (isa.contains("amx") || isa.contains("bf16"))
        }
        None => false,
    }
}

/// The linked oneDNN's version, `MAJOR.MINOR.PATCH`.
pub(super) fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut buf = [0 as c_char; 64];
        // SAFETY: the bridge writes at most `buf.len()` bytes, NUL-terminated.
        unsafe { cr_dnnl_version(buf.as_mut_ptr(), buf.len()) };
        text_of(&buf)
    })
}

/// Runs `pass` on the operands of `g`, activations in NCHW, or channels-last `(N, H, W, C)`
/// where `nhwc`; the result is a fresh buffer in the same layout (OIHW for dw).
///
/// The batch is split into one run of images per rayon thread, each run a single-threaded
/// oneDNN call: oneDNN's own OpenMP team would otherwise spin-wait after every convolution
/// (libgomp's default) on the cores the rayon kernels between convolutions need, which cost a
/// quarter of a 32 px step here. The weight gradient sums the runs' partial sums in run order,
/// so results depend on the thread count but never on scheduling.
pub(super) fn run(pass: Pass, g: &Geo, nhwc: bool, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
    run_typed::<f32, f32>(pass, DT_F32, (g, nhwc), a, b)
}

/// [`run`] on f32 buffers with bf16 arithmetic: the operands rounded to bf16 on their way into
/// oneDNN's layout, f32 accumulation, f32 results (some kernels pass partial sums or results
/// through bf16 on the way).
pub(super) fn run_f32_bf16(
    pass: Pass,
    g: &Geo,
    nhwc: bool,
    a: &[f32],
    b: &[f32],
) -> Result<Vec<f32>> {
    run_typed::<f32, f32>(pass, DT_F32_BF16, (g, nhwc), a, b)
}

/// [`run`] in bf16 (NCHW): the operands and the forward / input-gradient results in bf16, the
/// weight gradient's per-thread parts in f32, summed there and rounded to bf16 once.
pub(super) fn run_bf16(pass: Pass, g: &Geo, a: &[bf16], b: &[bf16]) -> Result<Vec<bf16>> {
    match pass {
        Pass::GradWeight => Ok(run_typed::<bf16, f32>(pass, DT_BF16, (g, false), a, b)?
            .into_iter()
            .map(bf16::from_f32)
            .collect()),
        _ => run_typed::<bf16, bf16>(pass, DT_BF16, (g, false), a, b),
    }
}

/// The passes on inputs of type `I` (`dt`), results of type `O` (the weight gradient's type when
/// `pass` is [`Pass::GradWeight`], else `I`); activations channels-last where `nhwc`. Either
/// layout keeps each image's elements together, so the batch splits the same way.
fn run_typed<I, O>(pass: Pass, dt: i32, (g, nhwc): (&Geo, bool), a: &[I], b: &[I]) -> Result<Vec<O>>
where
    I: Copy + Send + Sync,
    O: Copy + Send + Sync + std::ops::AddAssign,
{
    let (x, w, y) = (g.n * g.in_len(), g.co * g.k(), g.n * g.co * g.p());
    let (want_a, want_b, out_len) = match pass {
        Pass::Forward => (x, w, y),
        Pass::GradInput => (w, y, x),
        Pass::GradWeight => (x, y, w),
    };
    if a.len() != want_a || b.len() != want_b {
        bail!(
            "conv2d (oneDNN {pass:?}): operands of {} and {} elements, the geometry {g:?} needs \
             {want_a} and {want_b}",
            a.len(),
            b.len()
        );
    }
    let per =
        g.n.div_ceil(rayon::current_num_threads().clamp(1, g.n.max(1)));
    let (img_x, img_y) = (g.in_len(), g.co * g.p());
    // The operands of the run of images starting at `i`: (geometry, a, b).
    let run_of = |i: usize| {
        let n = per.min(g.n - i);
        let part = Geo { n, ..*g };
        let (xs, ys) = (i * img_x..(i + n) * img_x, i * img_y..(i + n) * img_y);
        match pass {
            Pass::Forward => (part, &a[xs], b),
            Pass::GradInput => (part, a, &b[ys]),
            Pass::GradWeight => (part, &a[xs], &b[ys]),
        }
    };
    if pass == Pass::GradWeight {
        let mut partials: Vec<Vec<O>> = (0..g.n)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|i| {
                let (part, a, b) = run_of(i);
                let mut out = Vec::with_capacity(w);
                call(pass, dt, (&part, nhwc), a, b, out.spare_capacity_mut())?;
                // SAFETY: `call` returned Ok, so all `w` elements are initialised.
                unsafe { out.set_len(w) };
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let (first, rest) = partials.split_first_mut().expect("at least one image");
        first.par_chunks_mut(4096).enumerate().for_each(|(c, o)| {
            for r in rest.iter() {
                for (o, v) in o.iter_mut().zip(&r[c * 4096..]) {
                    *o += *v;
                }
            }
        });
        return Ok(std::mem::take(first));
    }
    let img_out = if pass == Pass::Forward { img_y } else { img_x };
    let mut out: Vec<O> = Vec::with_capacity(out_len);
    out.spare_capacity_mut()[..out_len]
        .par_chunks_mut(per * img_out)
        .enumerate()
        .try_for_each(|(r, o)| {
            let (part, a, b) = run_of(r * per);
            call(pass, dt, (&part, nhwc), a, b, o)
        })?;
    // SAFETY: every run returned Ok, so all `out_len` elements are initialised.
    unsafe { out.set_len(out_len) };
    Ok(out)
}

/// One single-threaded oneDNN call writing all of `out`, whose length the caller sized for the
/// pass and geometry; `I` and `O` are the element types `dt` means for this pass.
fn call<I, O>(
    pass: Pass,
    dt: i32,
    (g, nhwc): (&Geo, bool),
    a: &[I],
    b: &[I],
    out: &mut [MaybeUninit<O>],
) -> Result<()> {
    let (x, w, y) = (g.n * g.in_len(), g.co * g.k(), g.n * g.co * g.p());
    let lens = match pass {
        Pass::Forward => (x, w, y),
        Pass::GradInput => (w, y, x),
        Pass::GradWeight => (x, y, w),
    };
    if (a.len(), b.len(), out.len()) != lens {
        bail!("conv2d (oneDNN {pass:?}): buffers do not match the geometry {g:?}");
    }
    let sizes = match (dt, pass) {
        (DT_F32 | DT_F32_BF16, _) => (4, 4),
        (DT_BF16, Pass::GradWeight) => (2, 4),
        (DT_BF16, _) => (2, 2),
        _ => bail!("conv2d (oneDNN): unknown element type {dt}"),
    };
    if (std::mem::size_of::<I>(), std::mem::size_of::<O>()) != sizes {
        bail!("conv2d (oneDNN {pass:?}): buffer element sizes do not match element type {dt}");
    }
    let mut err = [0 as c_char; 512];
    // SAFETY: `a`, `b` and `out` hold exactly the elements the geometry describes for this pass
    // (checked above), of the sizes the bridge reads and writes for `dt` and `pass` (checked
    // above); `a` and `b` are only read; the bridge writes every element of `out` before
    // returning 0; `err` is written NUL-terminated within its length.
    let status = unsafe {
        cr_dnnl_conv(
            pass_code(pass),
            dt,
            &geometry(g, nhwc),
            a.as_ptr().cast::<c_void>(),
            b.as_ptr().cast::<c_void>(),
            out.as_mut_ptr().cast::<c_void>(),
            1,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if status != 0 {
        bail!("conv2d (oneDNN {pass:?}, {g:?}): {}", text_of(&err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::native_bf16_isa;

    #[test]
    fn only_the_isa_half_of_a_name_makes_bf16_native() {
        for native in [
            "brgconv:avx512_core_amx",
            "brg_conv_bwd_w:avx512_core_amx",
            "jit:avx512_core_bf16",
            "jit_bf16:avx512_core_bf16",
        ] {
            assert!(native_bf16_isa(native), "{native}");
        }
        for emulated in [
            "jit_bf16:avx512_core",
            "brgconv_bf16:avx512_core",
            "jit:avx2",
            "ref:any",
            "ref:bf16",
            "gemm:jit",
            "bf16",
            "",
        ] {
            assert!(!native_bf16_isa(emulated), "{emulated}");
        }
    }
}
