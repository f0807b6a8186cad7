//! The weight EMA against timm's `ModelEmaV3` (fixtures/timm/ema.json, gen_ema_fixtures.py):
//! the same decays and, after each of six updates of a Linear + BatchNorm1d model, the same
//! averaged weights and running statistics to f32 round-off.

use candle_core::{Device, Tensor};
use candle_finetune::train::Ema;
use candle_nn::VarMap;
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn set_all(vm: &VarMap, state: &Value) {
    let d = vm.data().lock().unwrap();
    for (k, v) in state.as_object().unwrap() {
        let t = d.get(k).unwrap();
        let x = Tensor::from_vec(f32s(v), t.shape(), &Device::Cpu).unwrap();
        t.set(&x).unwrap();
    }
}

#[test]
fn the_average_follows_timms_model_ema_v3() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/timm/ema.json")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let warmup = case["warmup"].as_bool().unwrap();
        let vm = VarMap::new();
        {
            let mut d = vm.data().lock().unwrap();
            for (k, v) in case["init"].as_object().unwrap() {
                let n = v.as_array().unwrap().len();
                let t = Tensor::from_vec(f32s(v), n, &Device::Cpu).unwrap();
                d.insert(k.clone(), candle_core::Var::from_tensor(&t).unwrap());
            }
        }
        let mut ema = Ema::new(&vm, case["decay"].as_f64().unwrap(), warmup).unwrap();
        let mut worst = 0f32;
        for s in case["steps"].as_array().unwrap() {
            let step = s["step"].as_u64().unwrap();
            assert!(
                (ema.decay_at(step) - s["decay"].as_f64().unwrap()).abs() < 1e-15,
                "warmup {warmup} step {step}"
            );
            set_all(&vm, &s["model"]);
            ema.update(&vm, step).unwrap();
            for (name, t) in ema.values() {
                let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = f32s(&s["ema"][name]);
                for (g, w) in got.iter().zip(&want) {
                    worst = worst.max((g - w).abs() / w.abs().max(1.0));
                }
            }
        }
        assert!(
            worst <= 4.0 * f32::EPSILON,
            "warmup {warmup}: worst relative difference {worst:e}"
        );
    }
}

#[test]
fn swapping_the_average_in_and_out_restores_the_model() {
    let vm = VarMap::new();
    {
        let mut d = vm.data().lock().unwrap();
        let t = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        d.insert("w".into(), candle_core::Var::from_tensor(&t).unwrap());
    }
    let mut ema = Ema::new(&vm, 0.5, false).unwrap();
    vm.data().lock().unwrap()["w"]
        .set(&Tensor::new(&[3f32, 2., 1.], &Device::Cpu).unwrap())
        .unwrap();
    ema.update(&vm, 2).unwrap(); // decay 0.5: the midpoint
    let saved = ema.swap_in(&vm).unwrap();
    let w = || {
        vm.data().lock().unwrap()["w"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(w(), [2., 2., 2.]);
    Ema::restore(&vm, &saved).unwrap();
    assert_eq!(w(), [3., 2., 1.]);
    assert!(Ema::new(&vm, 1.5, false).is_err());
}
