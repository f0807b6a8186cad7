//! Channels-last batch norm (`forward_t_nhwc`, `forward_t_relu_nhwc`) against the `(N, C, H, W)`
//! module on the transpose: outputs, running statistics and the gradients of the input, gamma
//! and beta, in train and eval mode, on random shapes (one-pixel maps and one-image batches
//! included, means far above the spread), f64 to 1e-10 and f32 to 1e-5 of each quantity's scale
//! (the largest value, or the size of the terms it sums where those are larger); and the errors
//! for bad shapes. The channels-last side also runs synchronised over a world of one.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::BatchNorm2d;
use proptest::prelude::*;

mod common;
use common::{flat, outcome, ramped_batch_norm};

/// Output, running mean and variance, and the gradients of x, gamma, beta of `sum(y * r)`,
/// all in (N, C, H, W) order. `sync`: the batch norm synchronised over a world of one process
/// (the synchronised kernels' path, the same statistics).
fn run(x: &Tensor, dtype: DType, train: bool, relu: bool, nhwc: bool, sync: bool) -> Vec<Vec<f64>> {
    let (vm, bn) = ramped_batch_norm(x.dim(1).unwrap(), dtype, sync);
    let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
    let y = if nhwc {
        let t = xv.as_tensor().permute((0, 2, 3, 1)).unwrap();
        let y = if relu {
            bn.forward_t_relu_nhwc(&t, train)
        } else {
            bn.forward_t_nhwc(&t, train)
        };
        y.unwrap().permute((0, 3, 1, 2)).unwrap()
    } else if relu {
        bn.forward_t_relu(xv.as_tensor(), train).unwrap()
    } else {
        bn.forward_t(xv.as_tensor(), train).unwrap()
    };
    outcome(&y, &bn, &vm, &[xv.as_tensor()])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn nhwc_equals_the_plane_layout(
        n in 1usize..4, c in 1usize..7, h in 1usize..6, w in 1usize..6,
        train in any::<bool>(), relu in any::<bool>(), f32s in any::<bool>(), sync in any::<bool>(),
        scale in 0.01f64..100.0,
        offset in prop_oneof![Just(0.0f64), Just(1e3)],
    ) {
        // Training needs two values per channel.
        prop_assume!(!train || n * h * w >= 2);
        // With the mean far above the spread, f32 rounds the output by ~|x| * eps * gamma / std
        // in either layout, and a ReLU mask can flip where the output is that close to 0 (one
        // element's whole gradient): the offset cases run without the ReLU.
        prop_assume!(!(relu && f32s && offset > 0.0));
        // An offset far above the spread: the variance must not cancel away.
        let x = (Tensor::randn(0.5f64, scale, (n, c, h, w), &Device::Cpu).unwrap() + offset).unwrap();
        let dtype = if f32s { DType::F32 } else { DType::F64 };
        let a = run(&x, dtype, train, relu, false, false);
        let b = run(&x, dtype, train, relu, true, sync);
        let tol = if f32s { 1e-5 } else { 1e-10 };
        // The input gradient's terms are of size gamma / std * |dy| (|dy| <= 1), and its value
        // can be far smaller (zero for two values per channel): compare it, and the output, at
        // their terms' scale (f32 rounds the terms, whatever the result).
        let xs = flat(&x);
        let terms = (0..c)
            .map(|j| {
                let v: Vec<f64> = (0..n)
                    .flat_map(|b| xs[(b * c + j) * h * w..][..h * w].to_vec())
                    .collect();
                let mean = v.iter().sum::<f64>() / v.len() as f64;
                let var = v.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / v.len() as f64;
                let gamma = 0.7 + 0.1 * j as f64;
                gamma / (var + 1e-5).sqrt().min((0.5 + 0.3 * j as f64 + 1e-5).sqrt())
            })
            .fold(0.0f64, f64::max);
        for (i, what) in ["y", "running_mean", "running_var", "dx", "dgamma", "dbeta"].iter().enumerate() {
            prop_assert_eq!(a[i].len(), b[i].len(), "{} length", what);
            // The output is `x * scale + shift` (PyTorch's form): its terms are |x| * gamma / std.
            let xmax = xs.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            // Running statistics are O(1) blends that can cancel; dgamma and dbeta are sums of
            // N*H*W terms of size |dy| * |xhat| <= a few, with random signs.
            let floor = match *what {
                "dx" => 3.0 * terms,
                "y" => 2.0 * terms * xmax,
                "running_mean" | "running_var" => 1.0,
                _ => (n * h * w) as f64,
            };
            let big = a[i].iter().fold(floor, |m, v| m.max(v.abs()));
            for (p, q) in a[i].iter().zip(&b[i]) {
                prop_assert!((p - q).abs() <= tol * big, "{}: {} vs {} (largest {})", what, p, q, big);
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let bn = BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    // Channels in the wrong place, wrong rank, one value per channel in training.
    for (dims, train) in [
        (vec![2, 4, 3, 3], true),
        (vec![2, 3, 4], false),
        (vec![1, 1, 1, 4], true),
    ] {
        let x = Tensor::zeros(dims.as_slice(), DType::F32, &dev).unwrap();
        let e = bn.forward_t_nhwc(&x, train).unwrap_err().to_string();
        assert!(e.contains("batch_norm"), "{dims:?}: {e}");
        assert!(bn.forward_t_relu_nhwc(&x, train).is_err(), "{dims:?}");
    }
    // Eval mode on one value per channel is fine.
    let y = bn
        .forward_t(
            &Tensor::ones((1, 4, 1, 1), DType::F32, &dev).unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(y.dims(), &[1, 4, 1, 1]);
}
