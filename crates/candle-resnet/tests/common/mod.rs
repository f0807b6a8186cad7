//! Shared by the parity tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::BatchNorm2d;

/// A `c`-channel batch norm in `dtype` whose four tensors are distinct ramps over the channels
/// (so that a channel mix-up shows), synchronised over a world of one process when `sync`.
pub fn ramped_batch_norm(c: usize, dtype: DType, sync: bool) -> (VarMap, BatchNorm2d) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut bn = BatchNorm2d::new(c, VarBuilder::from_varmap(&vm, dtype, &dev)).unwrap();
    if sync {
        bn.set_sync(Some(std::sync::Arc::new(candle_ddp::Single)));
    }
    {
        let data = vm.data().lock().unwrap();
        let ramp = |a: f64, b: f64| {
            Tensor::arange(0u32, c as u32, &dev)
                .and_then(|t| t.to_dtype(DType::F64)?.affine(a, b)?.to_dtype(dtype))
                .unwrap()
        };
        data["weight"].set(&ramp(0.1, 0.7)).unwrap();
        data["bias"].set(&ramp(-0.05, 0.2)).unwrap();
        data["running_mean"].set(&ramp(0.02, -0.1)).unwrap();
        data["running_var"].set(&ramp(0.3, 0.5)).unwrap();
    }
    (vm, bn)
}

/// Upstream gradient weights for a `dims`-shaped output: `sin(0.37 i)` in `dtype`.
pub fn sine_weights(dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::arange(0u32, n as u32, &Device::Cpu)
        .and_then(|t| {
            t.to_dtype(DType::F64)?
                .affine(0.37, 0.0)?
                .sin()?
                .to_dtype(dtype)
        })
        .and_then(|t| t.reshape(dims))
        .unwrap()
}

/// What a batch-norm test compares after `y = f(inputs)`: the output, the running mean and
/// variance, then the gradients of `sum(y * sine_weights)` for each of `inputs`, gamma and
/// beta (empty where there is none).
pub fn outcome(y: &Tensor, bn: &BatchNorm2d, vm: &VarMap, inputs: &[&Tensor]) -> Vec<Vec<f64>> {
    let r = sine_weights(y.dims(), y.dtype());
    let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let data = vm.data().lock().unwrap();
    let grad = |t: &Tensor| g.get(t).map(flat).unwrap_or_default();
    let mut out = vec![flat(y), flat(bn.running_mean()), flat(bn.running_var())];
    out.extend(inputs.iter().map(|t| grad(t)));
    out.push(grad(data["weight"].as_tensor()));
    out.push(grad(data["bias"].as_tensor()));
    out
}

/// A tensor's values as f64.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1())
        .expect("values")
}

/// The largest `|got - want|` relative to the largest `|want|` (test helper for parity checks).
pub fn max_rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let g = got
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let w = want
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f64, f64::max)
}
