//! `ResNet::infer` on any input `forward_t(x, false)` takes: batches of 0, 1 and more, odd image
//! sizes, f32 / f64 / bf16, strided views, both body layouts. It must give `forward_t`'s bits
//! (whose values tests/resnet_torchvision.rs checks against torchvision), or the same error, and
//! never panic.

mod common;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::init::fill_deterministic;
use candle_resnet::resnet::resnet18;
use proptest::prelude::*;

fn bits(t: &Tensor) -> Vec<u64> {
    common::flat(t).into_iter().map(f64::to_bits).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn infer_is_forward_t_eval_on_any_input(
        batch in prop_oneof![Just(0usize), Just(1), 2usize..4],
        h in 8usize..40,
        w in 8usize..40,
        dtype in prop_oneof![Just(DType::F32), Just(DType::F64), Just(DType::BF16)],
        channels_last in any::<bool>(),
        strided in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let vm = VarMap::new();
        let m = resnet18(7, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap()
            .with_channels_last(channels_last);
        fill_deterministic(&vm).unwrap();
        let mut x = Tensor::rand(-2f32, 2., (batch, 3, h + 2, w * 2), &Device::Cpu).unwrap();
        // A seed-dependent shift so cases differ beyond the generator's draws.
        x = (x + (seed % 7) as f64 * 0.1).unwrap().to_dtype(dtype).unwrap();
        let x = if strided {
            // Every other column, two rows in: a non-contiguous view.
            x.narrow(2, 1, h).unwrap().reshape((batch, 3, h, w, 2)).unwrap().narrow(4, 0, 1).unwrap().squeeze(4).unwrap()
        } else {
            x.narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap().contiguous().unwrap()
        };
        let got = m.infer(&x);
        let want = m.forward_t(&x, false);
        match (got, want) {
            (Ok(g), Ok(e)) => {
                prop_assert_eq!(g.dims(), &[batch, 7]);
                prop_assert_eq!(g.dims(), e.dims());
                prop_assert_eq!(g.dtype(), e.dtype());
                prop_assert!(bits(&g) == bits(&e), "values differ");
            }
            (Err(g), Err(e)) => prop_assert_eq!(g.to_string(), e.to_string()),
            (g, e) => prop_assert!(false, "infer {:?} but forward_t {:?}", g.map(|t| t.dims().to_vec()), e.map(|t| t.dims().to_vec())),
        }
    }
}
