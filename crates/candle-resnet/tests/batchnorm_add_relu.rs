//! `forward_t_add_relu` (the batch norm, the residual and the ReLU as one op) against the batch
//! norm followed by `add_relu`: the same output, running statistics and gradients of the input,
//! the residual, gamma and beta, bit for bit, in both layouts, f32 and f64, train and eval,
//! synchronised (a world of one) or not, on random shapes with outputs at exactly zero; and the
//! errors and fallbacks for residuals the op cannot take.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::BatchNorm2d;
use proptest::prelude::*;

mod common;
use common::{flat, outcome, ramped_batch_norm};

#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    train: bool,
    nhwc: bool,
    sync: bool,
    fused: bool,
}

/// Output, running mean and variance, and the gradients of x, the residual, gamma and beta of
/// `sum(y * r)`, in the layout the tensors were given.
fn run(x: &Tensor, res: &Tensor, case: Case) -> Vec<Vec<f64>> {
    let c = if case.nhwc { x.dim(3) } else { x.dim(1) }.unwrap();
    let (vm, bn) = ramped_batch_norm(c, case.dtype, case.sync);
    let xv = Var::from_tensor(&x.to_dtype(case.dtype).unwrap()).unwrap();
    let rv = Var::from_tensor(&res.to_dtype(case.dtype).unwrap()).unwrap();
    let (xt, rt) = (xv.as_tensor(), rv.as_tensor());
    let y = match (case.fused, case.nhwc) {
        (true, true) => bn.forward_t_add_relu_nhwc(xt, rt, case.train),
        (true, false) => bn.forward_t_add_relu(xt, rt, case.train),
        (false, true) => bn
            .forward_t_nhwc(xt, case.train)
            .and_then(|y| candle_resnet::ops::relu::add_relu(&y, rt)),
        (false, false) => bn
            .forward_t(xt, case.train)
            .and_then(|y| candle_resnet::ops::relu::add_relu(&y, rt)),
    }
    .unwrap();
    outcome(&y, &bn, &vm, &[xt, rt])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn fused_equals_batch_norm_then_add_relu(
        n in 1usize..4, c in 1usize..7, h in 1usize..6, w in 1usize..6,
        train in any::<bool>(), nhwc in any::<bool>(), f32s in any::<bool>(), sync in any::<bool>(),
        scale in 0.01f64..100.0, zeros in any::<bool>(),
    ) {
        prop_assume!(!train || n * h * w >= 2);
        let dims = if nhwc { (n, h, w, c) } else { (n, c, h, w) };
        let x = Tensor::randn(0.5f64, scale, dims, &Device::Cpu).unwrap();
        // With `zeros`, the residual cancels the eval-mode output of some elements exactly
        // (and the ReLU sees 0 there); otherwise it is random.
        let res = if zeros {
            Tensor::zeros(dims, DType::F64, &Device::Cpu).unwrap()
        } else {
            Tensor::randn(0f64, 1.0, dims, &Device::Cpu).unwrap()
        };
        let dtype = if f32s { DType::F32 } else { DType::F64 };
        let case = Case { dtype, train, nhwc, sync, fused: false };
        let two = run(&x, &res, case);
        let one = run(&x, &res, Case { fused: true, ..case });
        let names = ["y", "running_mean", "running_var", "dx", "dresidual", "dgamma", "dbeta"];
        for ((a, b), what) in two.iter().zip(&one).zip(names) {
            prop_assert!(!a.is_empty() || what == "dgamma" || what == "dbeta" || !train, "{} missing", what);
            prop_assert_eq!(a.len(), b.len(), "{} length", what);
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                prop_assert!(p.to_bits() == q.to_bits(), "{}[{}]: {} vs {} ({:?})", what, i, p, q, case);
            }
        }
    }
}

#[test]
fn residuals_the_op_cannot_take() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let bn = BatchNorm2d::new(3, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 4, 4), &dev).unwrap();
    // Another shape: an error naming both, in either layout and mode.
    let wrong = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
    for train in [true, false] {
        let e = bn
            .forward_t_add_relu(&x, &wrong, train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape") || e.contains("differ"), "{e}");
        let xn = x.permute((0, 2, 3, 1)).unwrap();
        assert!(bn.forward_t_add_relu_nhwc(&xn, &wrong, train).is_err());
    }
    // Another dtype: the two ops' behaviour (candle's add rejects the mix).
    let f64r = Tensor::zeros((2, 3, 4, 4), DType::F64, &dev).unwrap();
    assert!(bn.forward_t_add_relu(&x, &f64r, true).is_err());
    // A residual of zeros: relu(bn(x)).
    let zero = x.zeros_like().unwrap();
    let y = bn.forward_t_add_relu(&x, &zero, true).unwrap();
    let z = candle_resnet::ops::relu::relu(&bn.forward_t(&x, true).unwrap()).unwrap();
    assert_eq!(flat(&y), flat(&z));
}
