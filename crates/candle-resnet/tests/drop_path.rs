//! Drop path (stochastic depth): per-block rates equal timm's (fixtures/timm/drop_path.json,
//! gen_drop_path_fixture.py), masks drop at the rate and keep the mean, the draws follow the
//! noise key, evaluation and rate 0 are unchanged, gradients flow.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::{drop_path_mask, drop_path_rates, Arch, ResNet};
use proptest::prelude::*;

#[test]
fn block_rates_are_timms() {
    let fx: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/timm/drop_path.json")).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for c in cases {
        let arch: Arch = c["arch"].as_str().unwrap().parse().unwrap();
        let rate = c["rate"].as_f64().unwrap();
        let want: Vec<f64> = c["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(drop_path_rates(arch, rate), want, "{arch} at {rate}");
    }
}

#[test]
fn masks_drop_at_the_rate_and_keep_the_mean() {
    for rate in [0.05, 0.3, 0.9] {
        let n = 40_000;
        let m = drop_path_mask(n, rate, 123);
        let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64;
        let sd = (n as f64 * rate * (1.0 - rate)).sqrt();
        assert!(
            (dropped - n as f64 * rate).abs() < 4.5 * sd,
            "rate {rate}: {dropped}"
        );
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 4.5 * sd / n as f64 / (1.0 - rate),
            "mean {mean}"
        );
        assert_ne!(m, drop_path_mask(n, rate, 124));
    }
    assert!(drop_path_mask(5, 1.0, 0).iter().all(|&v| v == 0.0));
    assert!(drop_path_mask(5, 0.0, 0).iter().all(|&v| v == 1.0));
}

fn model(vm: &VarMap, rate: f64) -> ResNet {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    candle_resnet::resnet::resnet18(4, vb)
        .unwrap()
        .with_drop_path(rate)
        .unwrap()
}

fn close(a: &Tensor, b: &Tensor) -> bool {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d == 0.0
}

#[test]
fn draws_follow_the_key_and_evaluation_is_unchanged() {
    let vm = VarMap::new();
    let plain = model(&vm, 0.0);
    let dropping = {
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        candle_resnet::resnet::resnet18(4, vb)
            .unwrap()
            .with_drop_path(0.5)
            .unwrap()
    };
    let x = Tensor::randn(0f32, 1.0, (16, 3, 32, 32), &Device::Cpu).unwrap();
    // Evaluation ignores drop path.
    assert!(close(
        &plain.forward_t(&x, false).unwrap(),
        &dropping.forward_t(&x, false).unwrap()
    ));
    // Rate 0: the key does not matter.
    plain.set_noise_key(1);
    let a = plain.forward_t(&x, true).unwrap();
    plain.set_noise_key(2);
    assert!(close(&a, &plain.forward_t(&x, true).unwrap()));
    // Rate 0.5: the same key gives the same logits, another key others, and both differ from
    // the model without drop path.
    dropping.set_noise_key(1);
    let k1 = dropping.forward_t(&x, true).unwrap();
    assert!(close(&k1, &dropping.forward_t(&x, true).unwrap()));
    dropping.set_noise_key(2);
    let k2 = dropping.forward_t(&x, true).unwrap();
    assert!(!close(&k1, &k2));
    assert!(!close(&k1, &a));
    assert_eq!(dropping.drop_path_rate(), 0.5);
}

#[test]
fn gradients_flow_through_dropped_blocks() {
    let vm = VarMap::new();
    let m = model(&vm, 0.4);
    m.set_noise_key(9);
    let x = Tensor::randn(0f32, 1.0, (8, 3, 32, 32), &Device::Cpu).unwrap();
    let loss = m
        .forward_t(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut with_grad = 0;
    for v in vm.all_vars() {
        if let Some(g) = grads.get(&v) {
            let s = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(s.is_finite());
            with_grad += 1;
        }
    }
    assert_eq!(with_grad, 62, "every trainable tensor has a gradient");
    assert!(ResNet::new(
        Arch::ResNet18,
        2,
        VarBuilder::zeros(DType::F32, &Device::Cpu)
    )
    .unwrap()
    .with_drop_path(-0.1)
    .is_err());
}

proptest! {
    #[test]
    fn masks_never_panic(batch in 0usize..200, rate in prop_oneof![0.0f64..=1.0, Just(1.0), Just(0.0)], key in any::<u64>()) {
        let m = drop_path_mask(batch, rate, key);
        prop_assert_eq!(m.len(), batch);
        let scaled = (1.0 / (1.0 - rate)) as f32;
        prop_assert!(m.iter().all(|&v| v == 0.0 || (rate < 1.0 && v == scaled)));
    }
}
