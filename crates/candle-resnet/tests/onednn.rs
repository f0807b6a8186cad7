//! The oneDNN route (feature `onednn`) against candle's own `conv2d` computed in f64: the three
//! passes of f32 convolutions over the geometries of `tests/conv.rs` and of a 32 px ResNet-18,
//! with batches that split unevenly over the threads, each element within the forward error
//! bound of an f32 sum of that many products; in both layouts (`conv2d_with` on `(N, C, H, W)`,
//! `conv2d_nhwc_with` on channels-last tensors).
#![cfg(feature = "onednn")]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_resnet::ops::conv::{bf16_on_onednn, conv2d_nhwc_with, conv2d_with, Backend};

/// (N, Ci, H, W, Co, k, stride, padding)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: &[Case] = &[
    (3, 2, 9, 7, 4, 3, 1, 1),
    (5, 3, 1, 1, 6, 3, 1, 1),
    (17, 4, 2, 2, 3, 3, 2, 1),
    (9, 6, 5, 5, 7, 1, 1, 0),
    (9, 6, 6, 6, 7, 1, 2, 0),
    (2, 3, 13, 11, 4, 7, 2, 3),
    (4, 2, 5, 5, 3, 3, 3, 2),
    (1, 1, 3, 3, 1, 5, 1, 3),
    // ResNet-18 at 32 px: the stem, a 3x3 block, a strided 3x3, the downsample, the last stage.
    (3, 3, 32, 32, 64, 7, 2, 3),
    (3, 64, 8, 8, 64, 3, 1, 1),
    (3, 128, 4, 4, 256, 3, 2, 1),
    (3, 64, 8, 8, 128, 1, 2, 0),
    (3, 512, 1, 1, 512, 3, 1, 1),
];

/// `(y, dx, dw)` of `sum(y * r)`: through `backend` in `dtype`, from the same f64 values.
fn passes(
    c: &Case,
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
    dtype: DType,
    backend: Option<Backend>,
) -> Result<[Tensor; 3]> {
    passes_as(c, (x, w, r), dtype, backend, false)
}

/// [`passes`], through the channels-last op where `nhwc` (the input permuted to `(N, H, W, C)`
/// on the way in and the output back, so the results compare as they are).
fn passes_as(
    c: &Case,
    (x, w, r): (&Tensor, &Tensor, &Tensor),
    dtype: DType,
    backend: Option<Backend>,
    nhwc: bool,
) -> Result<[Tensor; 3]> {
    let &(_, _, _, _, _, _, s, p) = c;
    let x = Var::from_tensor(&x.to_dtype(dtype)?)?;
    let w = Var::from_tensor(&w.to_dtype(dtype)?)?;
    let y = match backend {
        Some(b) if nhwc => {
            let xl = x.permute((0, 2, 3, 1))?.contiguous()?;
            conv2d_nhwc_with(&xl, &w, s, p, b)?.permute((0, 3, 1, 2))?
        }
        Some(b) => conv2d_with(&x, &w, s, p, b)?,
        None => x.conv2d(&w, p, s, 1, 1)?,
    };
    let g = (&y * r.to_dtype(dtype)?)?.sum_all()?.backward()?;
    let dx = g.get(&x).expect("dx").to_dtype(DType::F64)?;
    let dw = g.get(&w).expect("dw").to_dtype(DType::F64)?;
    Ok([y.detach().to_dtype(DType::F64)?, dx, dw])
}

/// Random operands of case `c` as f64 tensors holding f32 values: `(x, w, r)` with `r` the
/// weights of `sum(y * r)`, whose gradient the backward passes see.
fn operands(c: &Case) -> Result<(Tensor, Tensor, Tensor)> {
    let &(n, ci, h, wd, co, k, s, p) = c;
    let dev = Device::Cpu;
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    let f = |shape: (usize, usize, usize, usize)| {
        Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(DType::F64)
    };
    Ok((f((n, ci, h, wd))?, f((co, ci, k, k))?, f((n, co, oh, ow))?))
}

/// Per element of `y`, `dx`, `dw`: the forward error bound of an f32 sum of its products. An f32
/// sum of m products is within (m + 2) u sum |products| (each product rounded once, each
/// addition once, the result rounded once); the factor 2 covers the operands' and result's
/// layout reorders, which are exact, and FMA contraction.
fn f32_bounds(
    c: &Case,
    x: &Tensor,
    w: &Tensor,
    r: &Tensor,
    reference: Option<Backend>,
) -> Result<([Tensor; 3], [usize; 3])> {
    let &(n, ci, h, wd, co, k, s, p) = c;
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    // The same sums over |x|, |w|, |r|: the scale of each element's rounding error.
    let mag = passes(c, &x.abs()?, &w.abs()?, &r.abs()?, DType::F64, reference)?;
    // Products summed per element: Ci*k*k for y, Co*k*k for dx, N*OH*OW for dw.
    let terms = [ci * k * k, co * k * k, n * oh * ow];
    let u = f64::from(f32::EPSILON) / 2.0;
    let b = |i: usize| mag[i].clone() * (2.0 * (terms[i] + 2) as f64 * u);
    Ok(([b(0)?, b(1)?, b(2)?], terms))
}

/// Asserts `|got - want| <= allowed` everywhere, naming the worst element's share of the bound.
fn assert_within(got: &Tensor, want: &Tensor, allowed: &Tensor, what: &str) -> Result<()> {
    let err = (got - want)?.abs()?;
    let over = (&err - allowed)?.max_all()?.to_scalar::<f64>()?;
    let worst = (err / (allowed + 1e-300)?)?.max_all()?.to_scalar::<f64>()?;
    assert!(over <= 0.0, "{what}: {worst:.2} of the bound");
    Ok(())
}

fn check(c: &Case, threads: usize) -> Result<()> {
    // f32-representable inputs, so the f64 reference sees exactly what oneDNN sees.
    let (x, w, r) = operands(c)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    let exact = passes(c, &x, &w, &r, DType::F64, None)?;
    let (bounds, _) = f32_bounds(c, &x, &w, &r, None)?;
    for nhwc in [false, true] {
        let ours =
            pool.install(|| passes_as(c, (&x, &w, &r), DType::F32, Some(Backend::OneDnn), nhwc))?;
        for (i, what) in ["y", "dx", "dw"].iter().enumerate() {
            let what = format!("{what} of case {c:?} with {threads} threads, nhwc {nhwc}");
            assert_within(&ours[i], &exact[i], &bounds[i], &what)?;
        }
    }
    Ok(())
}

#[test]
fn onednn_passes_are_within_the_f32_error_bound() -> Result<()> {
    for c in CASES {
        check(c, 2)?;
    }
    Ok(())
}

#[test]
fn uneven_splits_over_threads_stay_within_the_bound() -> Result<()> {
    // 3 images over 1, 2 and 3 threads: runs of 3, of 2 + 1, of 1 + 1 + 1.
    for threads in [1, 3] {
        check(&(3, 8, 6, 6, 16, 3, 1, 1), threads)?;
        check(&(3, 16, 6, 6, 8, 3, 2, 1), threads)?;
    }
    Ok(())
}

/// Whether /proc/cpuinfo's flags include `flag`.
fn cpu_flag(flag: &str) -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == flag))
}

/// What this CPU must give [`bf16_on_onednn`]: no without AMX-BF16 or AVX512-BF16, yes with
/// AMX (oneDNN 2.6 picks its AMX kernels for all three passes, measured), either with
/// AVX512-BF16 alone (it depends on the oneDNN build which passes have a native kernel).
fn expect_native(native: bool) {
    if cpu_flag("amx_bf16") {
        assert!(native, "AMX CPU, but oneDNN has no native bf16 convolution");
    } else if !cpu_flag("avx512_bf16") {
        assert!(
            !native,
            "no bf16 instructions, yet oneDNN's bf16 counted as native"
        );
    }
}

#[test]
fn bf16_passes_are_within_the_f32_accumulation_and_bf16_rounding_bound() -> Result<()> {
    // oneDNN is asked for bf16 where its kernels for this CPU are native (see expect_native).
    expect_native(bf16_on_onednn(Backend::OneDnn));
    assert!(!bf16_on_onednn(Backend::Gemm));
    let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F64);
    for c in CASES {
        // bf16-representable inputs: the f64 reference sees what the bf16 passes see.
        let (x, w, r) = operands(c)?;
        let (x, w, r) = (bf(&x)?, bf(&w)?, bf(&r)?);
        let ours = passes(c, &x, &w, &r, DType::BF16, Some(Backend::OneDnn))?;
        let exact = passes(c, &x, &w, &r, DType::F64, None)?;
        let (bounds, _) = f32_bounds(c, &x, &w, &r, None)?;
        for (i, what) in ["y", "dx", "dw"].iter().enumerate() {
            // The f32 accumulation's bound, then one rounding to bf16: at most one bf16 unit
            // in the last place, 2^-7 relative at worst.
            let allowed = (&bounds[i] + (exact[i].abs()? * 2f64.powi(-7))?)?;
            assert_within(
                &ours[i],
                &exact[i],
                &allowed,
                &format!("bf16 {what} of case {c:?}"),
            )?;
        }
    }
    Ok(())
}

#[test]
fn bf16_arithmetic_on_f32_tensors_is_bf16_products_accumulated_in_f32() -> Result<()> {
    let native = Backend::OneDnnBf16.bf16_arithmetic();
    expect_native(native);
    assert!(!Backend::OneDnn.bf16_arithmetic() && !Backend::Auto.bf16_arithmetic());
    let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F64);
    for (c, nhwc) in CASES.iter().flat_map(|c| [(c, false), (c, true)]) {
        // f32 values that bf16 cannot hold: the rounding on the way in must show.
        let (x, w, r) = operands(c)?;
        let ours = passes_as(c, (&x, &w, &r), DType::F32, Some(Backend::OneDnnBf16), nhwc)?;
        // What bf16 operands with f32 accumulation give, and what f32 operands give.
        let rounded = passes(c, &bf(&x)?, &bf(&w)?, &bf(&r)?, DType::F64, None)?;
        let exact = passes(c, &x, &w, &r, DType::F64, None)?;
        let (bounds, terms) = f32_bounds(c, &x, &w, &r, None)?;
        let mag = passes(c, &x.abs()?, &w.abs()?, &r.abs()?, DType::F64, None)?;
        for (i, what) in ["y", "dx", "dw"].iter().enumerate() {
            // The f32 accumulation bound, plus, in bf16 arithmetic, two bf16 roundings on the
            // sum of |products| (2^-7 of it): most kernels match bf16 operands summed in f32 to
            // f32's last bits (1e-8 relative, measured), but some of oneDNN's AMX kernels pass
            // partial sums or results through bf16 (the 1x1 forward: 5e-4 of the largest
            // output; a strided weight gradient: just over one rounding), as PyTorch's
            // autocast rounds every result.
            let (want, allowed) = if native {
                (
                    &rounded[i],
                    (&bounds[i] + (mag[i].clone() * 2f64.powi(-7))?)?,
                )
            } else {
                (&exact[i], bounds[i].clone())
            };
            let what = format!("{what} of case {c:?}, nhwc {nhwc}");
            assert_within(&ours[i], want, &allowed, &what)?;
            if native && terms[i] <= 64 {
                // Against the unrounded operands the error is bf16's: f32 arithmetic stays
                // within the f32 bound (ratio <= 1), bf16 arithmetic exceeds it several times
                // over (2^-9 per operand against the bound's 2 (m + 2) 2^-24; for sums of many
                // more products the loose bound outgrows bf16's random-walk error).
                let off = (&ours[i] - &exact[i])?.abs()?;
                let ratio = (off / (&bounds[i] + 1e-300)?)?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert!(ratio > 4.0, "{what}: operands not rounded ({ratio:.1})");
            }
        }
    }
    Ok(())
}

#[test]
fn the_auto_backend_is_onednn_and_named_so() {
    let auto = Backend::Auto.describe();
    // The environment may opt out (CANDLE_RESNET_ONEDNN=0); by default the feature turns it on.
    if std::env::var("CANDLE_RESNET_ONEDNN").as_deref() == Ok("0") {
        assert!(auto.ends_with("im2col + GEMM"), "Backend::Auto is {auto:?}");
    } else {
        assert!(auto.starts_with("oneDNN "), "Backend::Auto is {auto:?}");
    }
    assert!(Backend::OneDnn.describe().starts_with("oneDNN "));
}

#[test]
fn a_wrong_geometry_is_an_error_not_a_crash() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
    let w = Tensor::zeros((5, 4, 3, 3), DType::F32, &dev)?; // 4 input channels, x has 3
    let e = conv2d_with(&x, &w, 1, 1, Backend::OneDnn)
        .unwrap_err()
        .to_string();
    assert!(e.contains("channels"), "{e}");
    let xl = Tensor::zeros((2, 4, 4, 3), DType::F32, &dev)?;
    for b in [Backend::OneDnn, Backend::OneDnnBf16] {
        let e = conv2d_nhwc_with(&xl, &w, 1, 1, b).unwrap_err().to_string();
        assert!(e.contains("channels"), "{e}");
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Any geometry, empty batches included, through both bf16 routes: no panic, the shapes of
    /// candle's convolution, and values within the bf16 routes' bounds of the f64 result.
    #[test]
    fn bf16_routes_hold_on_any_geometry(
        n in 0usize..4, ci in 1usize..6, h in 1usize..9, wd in 1usize..9, co in 1usize..6,
        k in 1usize..4, s in 1usize..3, p in 0usize..2, tensors in proptest::bool::ANY,
        channels_last in proptest::bool::ANY,
    ) {
        proptest::prop_assume!(k <= h + 2 * p && k <= wd + 2 * p);
        let c: Case = (n, ci, h, wd, co, k, s, p);
        let (x, w, r) = operands(&c).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F64).unwrap();
        // bf16 tensors take bf16-valued operands; f32 tensors with bf16 arithmetic any f32.
        let (x, w, r) = if tensors { (bf(&x), bf(&w), bf(&r)) } else { (x, w, r) };
        let (dtype, backend) = if tensors {
            (DType::BF16, Backend::OneDnn)
        } else {
            (DType::F32, Backend::OneDnnBf16)
        };
        // bf16 tensors have no channels-last oneDNN route; f32 tensors take either layout.
        let nhwc = channels_last && !tensors;
        let ours = passes_as(&c, (&x, &w, &r), dtype, Some(backend), nhwc).unwrap();
        if n == 0 {
            // An empty batch: the empty output and input gradient, a zero weight gradient.
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
            proptest::prop_assert_eq!(ours[0].dims(), &[0, co, oh, ow]);
            proptest::prop_assert_eq!(ours[1].dims(), &[0, ci, h, wd]);
            proptest::prop_assert_eq!(ours[2].dims(), &[co, ci, k, k]);
            let dw_max = ours[2].abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            proptest::prop_assert_eq!(dw_max, 0.0);
            return Ok(());
        }
        // The reference: the f64 im2col + GEMM route (checked against candle's f64 convolution
        // in tests/conv.rs; candle's own backward fails where the stride does not divide the
        // input, e.g. 6 px at stride 2, which this test reaches).
        let f64_ref = Some(Backend::Gemm);
        let want = passes(&c, &bf(&x), &bf(&w), &bf(&r), DType::F64, f64_ref).unwrap();
        let (bounds, _) = f32_bounds(&c, &x, &w, &r, f64_ref).unwrap();
        let mag = passes(&c, &x.abs().unwrap(), &w.abs().unwrap(), &r.abs().unwrap(), DType::F64, f64_ref).unwrap();
        for i in 0..3 {
            proptest::prop_assert_eq!(ours[i].dims(), want[i].dims());
            // The larger of the two routes' bounds: the f32 one plus 2^-7 of the sum of
            // |products| (which also covers one bf16 rounding of the result).
            let allowed = (&bounds[i] + (mag[i].clone() * 2f64.powi(-7)).unwrap()).unwrap();
            assert_within(&ours[i], &want[i], &allowed, &format!("pass {i} of {c:?}, bf16 tensors {tensors}, nhwc {nhwc}")).unwrap();
        }
    }
}
