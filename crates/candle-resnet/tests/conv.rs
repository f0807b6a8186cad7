//! The im2col + GEMM convolution against candle's own `conv2d` (forward, and its autograd input
//! and weight gradients) in f64, over geometries that exercise the grouping of images into one
//! GEMM (batch sizes that leave a remainder, outputs of one pixel, pointwise and strided
//! kernels, padding wider than the image), and bit-identical results for any thread count.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_resnet::ops::conv::{conv2d_with, Backend};

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
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-300);
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? / scale)
}

/// (y, dx, dw) of `sum(y * r)` for a fixed random `r`.
fn run(
    x: &Var,
    w: &Var,
    stride: usize,
    padding: usize,
    ours: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    // f32 with the `onednn` feature would take oneDNN (tests/onednn.rs); this file tests the
    // im2col + GEMM path.
    let y = if ours {
        conv2d_with(x, w, stride, padding, Backend::Gemm)?
    } else {
        x.conv2d(w, padding, stride, 1, 1)?
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
        let (y0, dx0, dw0) = run(&x, &w, s, p, false)?;
        let (y1, dx1, dw1) = run(&x, &w, s, p, true)?;
        assert_eq!(y1.dims(), y0.dims());
        for (what, a, b) in [("y", &y1, &y0), ("dx", &dx1, &dx0), ("dw", &dw1, &dw0)] {
            let e = max_rel(a, b)?;
            assert!(
                e < 1e-12,
                "{what} of case {:?}: relative difference {e:e}",
                (n, ci, h, wd, co, k, s, p)
            );
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
        let mut seen: Option<Vec<Vec<u32>>> = None;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let out = pool.install(|| run(&x, &w, s, p, true))?;
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
                    "case {:?}: {threads} threads changed the result",
                    (n, ci, h, wd, co, k, s, p)
                ),
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
    assert_eq!(Backend::Auto.describe(), "im2col + GEMM");
    let e = conv2d_with(&x, &w, 1, 1, Backend::OneDnn)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`onednn` feature"), "{e}");
    // conv2d itself is the GEMM path: the centre output sums 2 x 3 x 3 ones.
    let y = candle_resnet::ops::conv::conv2d(&x, &w, 1, 1)?;
    assert_eq!(y.get(0)?.get(0)?.get(1)?.get(1)?.to_scalar::<f32>()?, 18.0);
    Ok(())
}
