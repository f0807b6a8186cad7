//! `candle_resnet::backward` against candle's own `Tensor::backward` on the same graph: the same
//! variables get a gradient, of the same shape and dtype, with the same values (a zero's sign
//! aside: candle's `+0.0 + g` turns `-0.0` into `+0.0`).

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::init::{det_tensor, fill_deterministic};
use proptest::prelude::*;

/// Each variable's gradient from `grads` (name-sorted), as `(name, dims, dtype, values)`; `-0.0`
/// read as `+0.0`.
type Filed = Vec<(String, Option<(Vec<usize>, DType, Vec<f64>)>)>;

fn filed(vm: &VarMap, grads: &candle_core::backprop::GradStore) -> Filed {
    let data = vm.data().lock().unwrap();
    let mut out: Filed = data
        .iter()
        .map(|(name, var)| {
            let g = grads.get(var.as_tensor()).map(|g| {
                let v: Vec<f64> = g
                    .to_dtype(DType::F64)
                    .and_then(|t| t.flatten_all()?.to_vec1())
                    .unwrap();
                let v = v.into_iter().map(|x| x + 0.0).collect();
                (g.dims().to_vec(), g.dtype(), v)
            });
            (name.clone(), g)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A loss over a ResNet-18 on `n` images of `size` px; `extra`: plus `1e-3 |w|^2` of one
/// convolution's weight (used outside its block too) and of the classifier's.
fn loss(
    vm: &VarMap,
    n: usize,
    size: usize,
    dtype: DType,
    channels_last: bool,
    extra: Option<&str>,
) -> Result<Tensor> {
    let model = candle_resnet::resnet18(5, VarBuilder::from_varmap(vm, dtype, &Device::Cpu))?
        .with_channels_last(channels_last);
    fill_deterministic(vm)?;
    let x = det_tensor("input", &[n, 3, size, size], 0.0, 1.0)?.to_dtype(dtype)?;
    let logits = model.forward_t(&x, true)?;
    let target = Tensor::from_iter((0..n as u32).map(|i| i % 5), &Device::Cpu)?;
    let ce = candle_nn::loss::cross_entropy(&logits, &target)?;
    match extra {
        Some(name) => {
            let data = vm.data().lock().unwrap();
            let decay = |k: &str| data[k].as_tensor().sqr()?.sum_all()? * 1e-3;
            (ce + decay(name)?)? + decay("fc.weight")?
        }
        None => Ok(ce),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// Same gradients as `Tensor::backward`, for every variable; the plain backward run after
    /// it still files every weight's gradient itself (the collection ends with the call).
    #[test]
    fn backward_files_what_candle_files(
        n in 2usize..4, size in 1usize..33, f64_: bool, channels_last: bool,
        extra in prop::option::of(prop::sample::select(vec![
            "conv1.weight", "layer1.0.conv2.weight", "layer3.0.downsample.0.weight",
        ])),
    ) {
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        let vm = VarMap::new();
        let l = loss(&vm, n, size, dtype, channels_last, extra).unwrap();
        let direct = filed(&vm, &candle_resnet::backward(&l).unwrap());
        let plain = filed(&vm, &l.backward().unwrap());
        prop_assert_eq!(direct.len(), plain.len());
        for ((name, d), (other, p)) in direct.iter().zip(&plain) {
            prop_assert_eq!(name, other);
            let conv = name.contains("conv") || name.contains("downsample.0");
            prop_assert!(!conv || d.is_some(), "no gradient for {}", name);
            match (d, p) {
                (Some((dd, dt, dv)), Some((pd, pt, pv))) => {
                    prop_assert_eq!((dd, dt), (pd, pt), "{}: shape or dtype", name);
                    let first = dv.iter().zip(pv).position(|(a, b)| a != b);
                    prop_assert!(first.is_none(), "{}[{:?}]: {:?} vs candle's {:?}", name, first,
                        first.map(|i| dv[i]), first.map(|i| pv[i]));
                }
                (d, p) => prop_assert_eq!(d.is_some(), p.is_some(), "{}: filed or not", name),
            }
        }
    }

    /// Any graph: without fused segments (plain candle ops, any shape, a variable used twice)
    /// it is `Tensor::backward`.
    #[test]
    fn backward_of_a_plain_graph_is_candles(
        rows in 0usize..4, cols in 1usize..5, f64_: bool, seed in 0u64..1000,
    ) {
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        let v = Var::from_tensor(
            &Tensor::arange(0u32, (rows * cols) as u32, &Device::Cpu).unwrap()
                .to_dtype(DType::F64).unwrap()
                .affine(0.1, seed as f64 * 1e-3).unwrap()
                .reshape((rows, cols)).unwrap()
                .to_dtype(dtype).unwrap(),
        ).unwrap();
        let y = (v.as_tensor().sqr().unwrap() + v.as_tensor().sin().unwrap()).unwrap().sum_all().unwrap();
        let a = candle_resnet::backward(&y).unwrap();
        let b = y.backward().unwrap();
        let bits = |g: &candle_core::backprop::GradStore| -> Vec<f64> {
            g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        prop_assert_eq!(bits(&a), bits(&b));
    }
}
