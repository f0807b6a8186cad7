//! The fused max-pool against a composition of strided slices and against finite differences.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_resnet::ops::maxpool::MaxPool2d;

/// 3x3 / stride 2 / padding 1 from 9 strided views of a -inf padded input and `maximum`.
fn composed(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    let ninf = Tensor::full(f64::NEG_INFINITY, (n, c, h + 2, w + 2), x.device())
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    let p = ninf
        .slice_assign(&[0..n, 0..c, 1..h + 1, 1..w + 1], x)
        .unwrap();
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        for dx in 0..3 {
            let rows: Vec<u32> = (0..oh).map(|i| (i * 2 + dy) as u32).collect();
            let cols: Vec<u32> = (0..ow).map(|j| (j * 2 + dx) as u32).collect();
            let v = p
                .index_select(&Tensor::new(rows.as_slice(), x.device()).unwrap(), 2)
                .unwrap()
                .index_select(&Tensor::new(cols.as_slice(), x.device()).unwrap(), 3)
                .unwrap();
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v).unwrap(),
            });
        }
    }
    out.unwrap()
}

#[test]
fn forward_matches_composition_for_odd_and_even_sizes() {
    let dev = Device::Cpu;
    for (h, w) in [(7, 9), (8, 8), (112, 112), (1, 1), (2, 3)] {
        let x = Tensor::randn(0f32, 1., (2, 3, h, w), &dev).unwrap();
        let got = MaxPool2d::new(3, 2, 1).forward(&x).unwrap();
        let want = composed(&x);
        assert_eq!(got.dims(), want.dims());
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1., (1, 2, 6, 5), &dev).unwrap();
    let up = Tensor::randn(0f64, 1., (1, 2, 3, 3), &dev).unwrap();
    let pool = MaxPool2d::new(3, 2, 1);
    let v = Var::from_tensor(&x).unwrap();
    let g = (pool.forward(v.as_tensor()).unwrap() * &up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g
        .get(v.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let f = |xs: &[f64]| {
        let t = Tensor::from_vec(xs.to_vec(), (1, 2, 6, 5), &dev).unwrap();
        (pool.forward(&t).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for k in 0..xs.len() {
        let (mut p, mut m) = (xs.clone(), xs.clone());
        p[k] += 1e-6;
        m[k] -= 1e-6;
        let fd = (f(&p) - f(&m)) / 2e-6;
        assert!((fd - g[k]).abs() < 1e-6, "element {k}: {fd} vs {}", g[k]);
    }
    let ones = Tensor::ones((1, 1, 4, 4), DType::F32, &dev).unwrap();
    let v = Var::from_tensor(&ones.affine(0.0, 1.0).unwrap()).unwrap();
    let g = pool
        .forward(v.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g
        .get(v.as_tensor())
        .unwrap()
        .i((0, 0))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // All-equal input: each output picks the first in-bounds element of its window, as PyTorch:
    // output (i, j) covers rows 2i-1..2i+2 and columns 2j-1..2j+2.
    assert_eq!(
        g,
        vec![
            vec![1., 1., 0., 0.],
            vec![1., 1., 0., 0.],
            vec![0., 0., 0., 0.],
            vec![0., 0., 0., 0.]
        ]
    );
}

#[test]
fn nan_propagates_and_bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[[[1f32, f32::NAN], [0., 2.]]]], &dev).unwrap();
    let y = MaxPool2d::new(2, 2, 0).forward(&x).unwrap();
    assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    assert!(MaxPool2d::new(3, 2, 1)
        .forward(&Tensor::zeros((3, 4, 4), DType::F32, &dev).unwrap())
        .is_err());
    assert!(MaxPool2d::new(3, 2, 2)
        .forward(&Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap())
        .is_err());
    assert!(MaxPool2d::new(5, 1, 0)
        .forward(&Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap())
        .is_err());
}

/// Values and input gradient (for upstream `up`) of a pool through `f`, in f64.
fn value_and_grad(
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    x: &Tensor,
    up: &Tensor,
) -> (Vec<f64>, Vec<f64>) {
    let v = Var::from_tensor(x).unwrap();
    let y = f(v.as_tensor()).unwrap();
    let g = (&y * up.to_dtype(y.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let flat = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    (flat(&y), flat(g.get(v.as_tensor()).unwrap()))
}

#[test]
fn composed_path_equals_the_kernel_with_ties_nan_and_inf() {
    // The tensor-op path CUDA and Metal run, checked here on the CPU against the fused kernel:
    // small integers make ties everywhere (first maximal element must win), plus NaN and -inf.
    let dev = Device::Cpu;
    let cases = [
        (3, 2, 1, 7, 9),
        (3, 2, 1, 8, 8),
        (3, 2, 1, 1, 1),
        (2, 2, 0, 6, 4),
        (3, 1, 1, 5, 5),
        (5, 3, 2, 11, 7),
        (2, 1, 0, 3, 3),
    ];
    for (case, &(k, s, p, h, w)) in cases.iter().enumerate() {
        let pool = MaxPool2d::new(k, s, p);
        let n = 2 * 3 * h * w;
        let mut xs: Vec<f64> = (0..n).map(|i| ((i * 7919 + case) % 5) as f64).collect();
        if n > 10 {
            xs[3] = f64::NAN;
            xs[n - 2] = f64::NAN;
            xs[n / 2] = f64::NEG_INFINITY;
        }
        let x64 = Tensor::from_vec(xs, (2, 3, h, w), &dev).unwrap();
        let y_dims = pool.forward(&x64).unwrap().dims().to_vec();
        let ups: Vec<f64> = (0..y_dims.iter().product::<usize>())
            .map(|i| ((i * 31) % 7) as f64 - 3.0)
            .collect();
        let up = Tensor::from_vec(ups, y_dims.as_slice(), &dev).unwrap();
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let x = x64.to_dtype(dtype).unwrap();
            let (ya, ga) = value_and_grad(|t| pool.forward(t), &x, &up);
            let (yb, gb) = value_and_grad(|t| pool.forward_composed(t), &x, &up);
            // The channels-last kernel, between transposes.
            let nhwc = |t: &Tensor| {
                pool.forward_nhwc(&t.permute((0, 2, 3, 1))?)?
                    .permute((0, 3, 1, 2))
            };
            let (yc, gc) = value_and_grad(nhwc, &x, &up);
            let what = format!("case {case} k{k} s{s} p{p} {h}x{w} {dtype:?}");
            let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // NaN has one bit pattern after the f64 conversion, so bits compare NaN positions too.
            assert_eq!(bits(&ya), bits(&yb), "{what}: values");
            assert_eq!(ga, gb, "{what}: gradient (integer sums, exact)");
            assert_eq!(bits(&ya), bits(&yc), "{what}: channels-last values");
            assert_eq!(ga, gc, "{what}: channels-last gradient");
        }
    }
    let pool = MaxPool2d::new(3, 2, 1);
    assert!(pool
        .forward_composed(&Tensor::zeros((3, 4, 4), DType::F32, &dev).unwrap())
        .is_err());
    assert!(MaxPool2d::new(3, 2, 2)
        .forward_composed(&Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap())
        .is_err());
}

#[test]
fn signed_zeros_tie_and_the_first_one_wins() {
    // -0.0 and +0.0 compare equal: PyTorch keeps the first in row-major order, value and
    // gradient both.
    let dev = Device::Cpu;
    let pool = MaxPool2d::new(2, 2, 0);
    for (first, second) in [(-0.0f32, 0.0f32), (0.0, -0.0)] {
        let x = Var::new(&[[[[first, second], [second, second]]]], &dev).unwrap();
        let y = pool.forward(&x).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(
            v.to_bits(),
            first.to_bits(),
            "value of window starting {first:?}"
        );
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            gx,
            vec![1.0, 0.0, 0.0, 0.0],
            "gradient of window starting {first:?}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]
    /// The channels-last pool against the `(N, C, H, W)` kernel on the transpose, bit for bit
    /// (values and gradients), on random geometries (empty batches and channels included),
    /// every float dtype, and inputs with ties, NaN and infinities.
    #[test]
    fn nhwc_pool_equals_the_plane_kernel(
        n in 0usize..3, c in 0usize..5, h in 1usize..9, w in 1usize..9,
        k in 1usize..4, s in 1usize..4, p in 0usize..2, dtype in 0usize..4, seed in 0usize..1000,
    ) {
        let pool = MaxPool2d::new(k, s, p);
        let dev = Device::Cpu;
        let len = n * c * h * w;
        let xs: Vec<f64> = (0..len)
            .map(|i| match (i * 7919 + seed) % 23 {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => f64::NEG_INFINITY,
                3 => -0.0,
                v => (v % 6) as f64 - 2.5,
            })
            .collect();
        let x = Tensor::from_vec(xs, (n, c, h, w), &dev).unwrap();
        let dtype = [DType::F64, DType::F32, DType::BF16, DType::F16][dtype];
        let x = x.to_dtype(dtype).unwrap();
        let plane = pool.forward(&x);
        let nhwc = pool.forward_nhwc(&x.permute((0, 2, 3, 1)).unwrap());
        // A kernel the padded input cannot hold (or padding over half the kernel): both refuse.
        proptest::prop_assert_eq!(plane.is_ok(), nhwc.is_ok());
        let Ok(y) = plane else { return Ok(()) };
        let ups: Vec<f64> = (0..y.elem_count()).map(|i| ((i * 31) % 7) as f64 - 3.0).collect();
        let up = Tensor::from_vec(ups, y.dims(), &dev).unwrap();
        let (ya, ga) = value_and_grad(|t| pool.forward(t), &x, &up);
        let (yb, gb) = value_and_grad(
            |t| pool.forward_nhwc(&t.permute((0, 2, 3, 1))?)?.permute((0, 3, 1, 2)),
            &x,
            &up,
        );
        let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        proptest::prop_assert_eq!(bits(&ya), bits(&yb));
        proptest::prop_assert_eq!(bits(&ga), bits(&gb));
    }
}
