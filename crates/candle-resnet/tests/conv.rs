//! The im2col + GEMM convolution against candle's own `conv2d` (forward, and its autograd input
//! and weight gradients) in f64, over geometries that exercise the grouping of images into one
//! GEMM (batch sizes that leave a remainder, outputs of one pixel, pointwise and strided
//! kernels, padding wider than the image), and bit-identical results for any thread count; the
//! channels-last op (`conv2d_nhwc`) the same way, fed and read through transposes.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_resnet::ops::conv::{conv2d_nhwc, conv2d_with, Backend};
use proptest::prelude::*;

/// (N, Ci, H, W, Co, k, stride, padding)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: &[Case] = &[
    (3, 2, 9, 7, 4, 3, 1, 1),
    (5, 3, 1, 1, 6, 3, 1, 1), // one output pixel: most taps fall in the padding
    (17, 4, 2, 2, 3, 3, 2, 1), // 17 images of 1 output pixel: groups with a remainder
    (40, 3, 4, 4, 5, 3, 1, 1), // 16-pixel outputs, several groups
    (9, 6, 5, 5, 7, 1, 1, 0), // pointwise: the images are their own columns
    (9, 6, 6, 6, 7, 1, 2, 0), // strided 1x1 (a ResNet downsample)
    (2, 3, 13, 11, 4, 7, 2, 3), // the stem's geometry
    (4, 2, 5, 5, 3, 3, 3, 2), // stride 3, padding 2
    (1, 1, 3, 3, 1, 5, 1, 3), // padding wider than the image
];

fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    if b.elem_count() == 0 {
        return Ok(0.0);
    }
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-300);
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
}

/// Which convolution computes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// candle's `conv2d`: the reference.
    Candle,
    /// Ours, `(N, C, H, W)`.
    Gemm,
    /// Ours channels-last, between transposes.
    Nhwc,
}

/// (y, dx, dw) of `sum(y * r)` for a fixed random `r`.
fn run(
    x: &Var,
    w: &Var,
    stride: usize,
    padding: usize,
    path: Path,
) -> Result<(Tensor, Tensor, Tensor)> {
    // f32 with the `onednn` feature would take oneDNN (tests/onednn.rs); this file tests the
    // im2col + GEMM path.
    let y = match path {
        Path::Gemm => conv2d_with(x, w, stride, padding, Backend::Gemm)?,
        Path::Candle => x.conv2d(w, padding, stride, 1, 1)?,
        Path::Nhwc => {
            conv2d_nhwc(&x.permute((0, 2, 3, 1))?, w, stride, padding)?.permute((0, 3, 1, 2))?
        }
    };
    // A fixed, non-uniform upstream gradient (same for both paths).
    let n = y.elem_count();
    let r = Tensor::arange(0u32, n as u32, x.device())?
        .to_dtype(DType::F64)?
        .affine(0.37, 0.0)?
        .sin()?
        .to_dtype(y.dtype())?
        .reshape(y.shape())?;
    let g = (&y * r)?.sum_all()?.backward()?;
    Ok((
        y.detach(),
        g.get(x).expect("dx").clone(),
        g.get(w).expect("dw").clone(),
    ))
}

fn inputs(c: (usize, usize, usize, usize, usize, usize)) -> Result<(Var, Var)> {
    let (n, ci, h, wd, co, k) = c;
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f64, 1., (n, ci, h, wd), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f64, 1., (co, ci, k, k), &dev)?)?;
    Ok((x, w))
}

#[test]
fn forward_and_gradients_match_candle_conv2d_in_f64() -> Result<()> {
    for &(n, ci, h, wd, co, k, s, p) in CASES {
        let (x, w) = inputs((n, ci, h, wd, co, k))?;
        let (y0, dx0, dw0) = run(&x, &w, s, p, Path::Candle)?;
        for path in [Path::Gemm, Path::Nhwc] {
            let (y1, dx1, dw1) = run(&x, &w, s, p, path)?;
            assert_eq!(y1.dims(), y0.dims());
            for (what, a, b) in [("y", &y1, &y0), ("dx", &dx1, &dx0), ("dw", &dw1, &dw0)] {
                let e = max_rel(a, b)?;
                assert!(
                    e < 1e-12,
                    "{what} of case {:?} on {path:?}: relative difference {e:e}",
                    (n, ci, h, wd, co, k, s, p)
                );
            }
        }
    }
    Ok(())
}

/// A direct convolution in f64 loops, the reference of the property test (candle's own
/// `conv2d` gradient fails on strides that do not divide the input): `(y, dx, dw)` of
/// `sum(y * r)` for `x (N, Ci, H, W)`, `w (Co, Ci, k, k)`, with `r` as in [`run`].
fn direct(
    x: &[f64],
    (n, ci, h, wd): (usize, usize, usize, usize),
    w: &[f64],
    (co, k): (usize, usize),
    (s, p): (usize, usize),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
    let mut y = vec![0.0; n * co * oh * ow];
    let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
    for b in 0..n {
        for o in 0..co {
            for oy in 0..oh {
                for ox in 0..ow {
                    let at = ((b * co + o) * oh + oy) * ow + ox;
                    let r = (at as f64 * 0.37).sin();
                    for c in 0..ci {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (
                                    (oy * s + ky) as isize - p as isize,
                                    (ox * s + kx) as isize - p as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * ci + c) * h + iy as usize) * wd + ix as usize;
                                let wi = ((o * ci + c) * k + ky) * k + kx;
                                y[at] += x[xi] * w[wi];
                                dx[xi] += r * w[wi];
                                dw[wi] += r * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (y, dx, dw)
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .expect("values")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// `conv2d_nhwc` in f32 and f64 on random geometries (empty batches, one-pixel maps,
    /// strides that do not divide the input), fed a transposed (strided) view, against a direct
    /// convolution in f64: f64 within 1e-12 of the largest value, f32 within the rounding bound
    /// of its sums (`4 (terms + 2) eps` times the sum of magnitudes).
    #[test]
    fn nhwc_matches_a_direct_convolution(
        n in 0usize..4, ci in 1usize..5, h in 1usize..9, wd in 1usize..9,
        // Both orientations of the weight gradient's sums (column-major up to 64 channels).
        co in prop_oneof![1usize..6, 62usize..68],
        k in 1usize..6, stride in 1usize..4, padding in 0usize..3, f32s in any::<bool>(),
    ) {
        prop_assume!(h + 2 * padding >= k && wd + 2 * padding >= k);
        let (x, w) = inputs((n, ci, h, wd, co, k)).expect("inputs");
        let (xs, ws) = (flat(&x), flat(&w));
        let geo = ((n, ci, h, wd), (co, k), (stride, padding));
        let (y0, dx0, dw0) = direct(&xs, geo.0, &ws, geo.1, geo.2);
        let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
        // Sums of magnitudes (|r| <= 1 in the gradients' sums).
        let (ya, _, _) = direct(&abs(&xs), geo.0, &abs(&ws), geo.1, geo.2);
        let pixels = n * ((h + 2 * padding - k) / stride + 1) * ((wd + 2 * padding - k) / stride + 1);
        let xmax = abs(&xs).into_iter().fold(0.0, f64::max);
        let wsum: f64 = abs(&ws).iter().sum();
        let (xv, wv) = if f32s {
            (Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap(),
             Var::from_tensor(&w.to_dtype(DType::F32).unwrap()).unwrap())
        } else {
            (x, w)
        };
        let (y1, dx1, dw1) = run(&xv, &wv, stride, padding, Path::Nhwc).expect("nhwc");
        prop_assert_eq!(y1.dims()[0], n);
        for (what, ours, exact, terms, mag) in [
            ("y", flat(&y1), &y0, ci * k * k, ya.clone()),
            ("dx", flat(&dx1), &dx0, co * k * k, vec![wsum; dx0.len()]),
            ("dw", flat(&dw1), &dw0, pixels, vec![xmax * pixels as f64; dw0.len()]),
        ] {
            prop_assert_eq!(ours.len(), exact.len(), "{} length", what);
            for ((a, b), m) in ours.iter().zip(exact.iter()).zip(&mag) {
                let tol = if f32s {
                    4.0 * (terms as f64 + 2.0) * f32::EPSILON as f64 * m + 1e-30
                } else {
                    1e-12 * (m + 1.0)
                };
                prop_assert!((a - b).abs() <= tol, "{}: {} vs {} (bound {:e})", what, a, b, tol);
            }
        }
    }
}

/// Channels-last geometries whose im2col matrices are built and multiplied in blocks of rows
/// (at least four groups of images; blocks shorter than a group, straddling images; the weight
/// gradient both column- and row-major), in f64 against a direct convolution.
#[test]
fn blocked_im2col_matches_a_direct_convolution() -> Result<()> {
    let cases = [
        (5, 16, 32, 32, 8, 3, 1, 1),
        (4, 16, 64, 64, 70, 3, 2, 1),
        (12, 24, 20, 20, 66, 3, 1, 1),
        (64, 16, 8, 8, 32, 3, 1, 1),
    ];
    for (n, ci, h, wd, co, k, s, p) in cases {
        let (x, w) = inputs((n, ci, h, wd, co, k))?;
        let exact = direct(&flat(&x), (n, ci, h, wd), &flat(&w), (co, k), (s, p));
        let (y, dx, dw) = run(&x, &w, s, p, Path::Nhwc)?;
        for (what, ours, exact) in [("y", y, exact.0), ("dx", dx, exact.1), ("dw", dw, exact.2)] {
            let ours = flat(&ours);
            assert_eq!(ours.len(), exact.len(), "{what} length");
            let big = exact.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (i, (a, b)) in ours.iter().zip(&exact).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * big,
                    "{:?} {what}[{i}]: {a} vs {b}",
                    (n, ci, h, wd, co, k, s, p)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn results_are_bit_identical_for_any_thread_count() -> Result<()> {
    // Large enough that images are grouped and groups are split across threads.
    let cases = [(64, 16, 8, 8, 32, 3, 1, 1), (8, 8, 20, 20, 16, 3, 2, 1)];
    for (n, ci, h, wd, co, k, s, p) in cases {
        let (x, w) = inputs((n, ci, h, wd, co, k))?;
        let (x, w) = (
            Var::from_tensor(&x.to_dtype(DType::F32)?)?,
            Var::from_tensor(&w.to_dtype(DType::F32)?)?,
        );
        for path in [Path::Gemm, Path::Nhwc] {
            let mut seen: Option<Vec<Vec<u32>>> = None;
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let out = pool.install(|| run(&x, &w, s, p, path))?;
                let bits = [out.0, out.1, out.2]
                    .iter()
                    .map(|t| {
                        t.flatten_all()?
                            .to_vec1::<f32>()
                            .map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                    })
                    .collect::<Result<Vec<_>>>()?;
                match &seen {
                    None => seen = Some(bits),
                    Some(first) => assert!(
                        first == &bits,
                        "case {:?} on {path:?}: {threads} threads changed the result",
                        (n, ci, h, wd, co, k, s, p)
                    ),
                }
            }
        }
    }
    Ok(())
}

// With the feature, tests/onednn.rs checks the backend choice instead.
#[cfg(not(feature = "onednn"))]
#[test]
fn the_default_backend_is_gemm_without_the_onednn_feature() -> Result<()> {
    let x = Tensor::ones((1, 2, 4, 4), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones((3, 2, 3, 3), DType::F32, &Device::Cpu)?;
    let auto = Backend::Auto.describe();
    assert!(auto.ends_with("im2col + GEMM"), "Backend::Auto is {auto:?}");
    let e = conv2d_with(&x, &w, 1, 1, Backend::OneDnn)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`onednn` feature"), "{e}");
    // The channels-last op likewise: an error for oneDNN, Auto the same bits as conv2d_nhwc.
    use candle_resnet::ops::conv::conv2d_nhwc_with;
    let xl = Tensor::randn(0f32, 1., (2, 5, 5, 2), &Device::Cpu)?;
    for b in [Backend::OneDnn, Backend::OneDnnBf16] {
        let e = conv2d_nhwc_with(&xl, &w, 1, 1, b).unwrap_err().to_string();
        assert!(e.contains("`onednn` feature"), "{e}");
    }
    let (auto, gemm) = (
        conv2d_nhwc_with(&xl, &w, 1, 1, Backend::Auto)?,
        conv2d_nhwc(&xl, &w, 1, 1)?,
    );
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    assert_eq!(bits(&auto)?, bits(&gemm)?);
    // conv2d itself is the GEMM path: the centre output sums 2 x 3 x 3 ones.
    let y = candle_resnet::ops::conv::conv2d(&x, &w, 1, 1)?;
    assert_eq!(y.get(0)?.get(0)?.get(1)?.get(1)?.to_scalar::<f32>()?, 18.0);
    Ok(())
}

#[test]
fn nhwc_bad_input_is_an_error_naming_the_problem() {
    let dev = Device::Cpu;
    let t = |dims: &[usize], dt: DType| Tensor::zeros(dims, dt, &dev).expect("zeros");
    let w = t(&[4, 3, 3, 3], DType::F32);
    let cases = [
        (t(&[2, 8, 8], DType::F32), w.clone(), 1, "(N, H, W, Ci)"),
        (
            t(&[2, 8, 8, 3], DType::F32),
            t(&[4, 3, 3], DType::F32),
            1,
            "(N, H, W, Ci)",
        ),
        (t(&[2, 8, 8, 5], DType::F32), w.clone(), 1, "channels"),
        (
            t(&[2, 1, 1, 3], DType::F32),
            t(&[4, 3, 5, 5], DType::F32),
            1,
            "smaller than",
        ),
        (t(&[2, 8, 8, 3], DType::F32), w.clone(), 0, "stride"),
    ];
    for (x, w, stride, want) in cases {
        let e = conv2d_nhwc(&x, &w, stride, 0)
            .expect_err("bad input accepted")
            .to_string();
        assert!(e.contains(want), "{:?} / {:?}: {e}", x.dims(), w.dims());
    }
    // Mismatched dtypes: refused (by candle's convolution, which the op hands them to).
    assert!(conv2d_nhwc(&t(&[1, 4, 4, 3], DType::F64), &w, 1, 1).is_err());
}
