//! The oneDNN route for f32 convolutions (feature `onednn`): the three passes of a training step
//! through the C++ bridge `onednn.cpp`, which hands plain NCHW buffers to oneDNN's direct
//! convolutions (blocked layouts, no im2col) and caches one primitive per geometry and pass.

use super::{Geo, Pass};
use candle_core::{bail, Result};
use rayon::prelude::*;
use std::ffi::{c_char, CStr};
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
}

extern "C" {
    fn cr_dnnl_conv(
        pass: i32,
        g: *const Geometry,
        a: *const f32,
        b: *const f32,
        out: *mut f32,
        threads: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn cr_dnnl_version(buf: *mut c_char, len: usize);
}

/// The linked oneDNN's version, `MAJOR.MINOR.PATCH`.
pub(super) fn version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        let mut buf = [0 as c_char; 64];
        // SAFETY: the bridge writes at most `buf.len()` bytes, NUL-terminated.
        unsafe { cr_dnnl_version(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated by snprintf above.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Runs `pass` on the operands of `g`; the result is a fresh buffer in NCHW (OIHW for dw).
///
/// The batch is split into one run of images per rayon thread, each run a single-threaded
/// oneDNN call: oneDNN's own OpenMP team would otherwise spin-wait after every convolution
/// (libgomp's default) on the cores the rayon kernels between convolutions need, which cost a
/// quarter of a 32 px step here. The weight gradient sums the runs' partial sums in run order,
/// so results depend on the thread count but never on scheduling.
pub(super) fn run(pass: Pass, g: &Geo, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
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
        let mut partials: Vec<Vec<f32>> = (0..g.n)
            .step_by(per)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|i| {
                let (part, a, b) = run_of(i);
                let mut out = Vec::with_capacity(w);
                call(pass, &part, a, b, out.spare_capacity_mut())?;
                // SAFETY: `call` returned Ok, so all `w` elements are initialised.
                unsafe { out.set_len(w) };
                Ok(out)
            })
            .collect::<Result<_>>()?;
        let (first, rest) = partials.split_first_mut().expect("at least one image");
        first.par_chunks_mut(4096).enumerate().for_each(|(c, o)| {
            for r in rest.iter() {
                for (o, v) in o.iter_mut().zip(&r[c * 4096..]) {
                    *o += v;
                }
            }
        });
        return Ok(std::mem::take(first));
    }
    let img_out = if pass == Pass::Forward { img_y } else { img_x };
    let mut out: Vec<f32> = Vec::with_capacity(out_len);
    out.spare_capacity_mut()[..out_len]
        .par_chunks_mut(per * img_out)
        .enumerate()
        .try_for_each(|(r, o)| {
            let (part, a, b) = run_of(r * per);
            call(pass, &part, a, b, o)
        })?;
    // SAFETY: every run returned Ok, so all `out_len` elements are initialised.
    unsafe { out.set_len(out_len) };
    Ok(out)
}

/// One single-threaded oneDNN call writing all of `out`, whose length the caller sized for the
/// pass and geometry.
fn call(pass: Pass, g: &Geo, a: &[f32], b: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<()> {
    let to_i64 = |v: usize| i64::try_from(v).expect("a tensor dimension fits in i64");
    let geo = Geometry {
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
    };
    let (x, w, y) = (g.n * g.in_len(), g.co * g.k(), g.n * g.co * g.p());
    let lens = match pass {
        Pass::Forward => (x, w, y),
        Pass::GradInput => (w, y, x),
        Pass::GradWeight => (x, y, w),
    };
    if (a.len(), b.len(), out.len()) != lens {
        bail!("conv2d (oneDNN {pass:?}): buffers do not match the geometry {g:?}");
    }
    let mut err = [0 as c_char; 512];
    // SAFETY: `a`, `b` and `out` hold exactly the elements the geometry describes for this pass
    // (checked above); `a` and `b` are only read; the bridge writes every element of `out`
    // before returning 0; `err` is written NUL-terminated within its length.
    let status = unsafe {
        cr_dnnl_conv(
            match pass {
                Pass::Forward => 0,
                Pass::GradInput => 1,
                Pass::GradWeight => 2,
            },
            &geo,
            a.as_ptr(),
            b.as_ptr(),
            out.as_mut_ptr().cast::<f32>(),
            1,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if status != 0 {
        // SAFETY: NUL-terminated by the bridge.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        bail!("conv2d (oneDNN {pass:?}, {g:?}): {msg}");
    }
    Ok(())
}
