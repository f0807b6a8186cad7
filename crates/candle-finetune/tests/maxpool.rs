//! The fused max-pool against a composition of strided slices and against finite differences.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_finetune::maxpool::MaxPool2d;

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
