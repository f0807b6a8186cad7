//! Mixup / CutMix against timm's `Mixup` (fixtures/timm/mixup.json, from gen_mixup_fixtures.py):
//! timm's own draws replayed through `Mixup::apply` give its mixed images and soft targets bit
//! for bit; and the draws of `Mixup::plan` keep timm's rules.

use candle_finetune::data::mixup::{Mix, MixMode, MixPlan, Mixup};
use rand::SeedableRng;
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn settings(case: &Value, classes: usize) -> Mixup {
    let c = &case["case"];
    Mixup {
        mixup_alpha: c["mixup_alpha"].as_f64().unwrap(),
        cutmix_alpha: c["cutmix_alpha"].as_f64().unwrap(),
        cutmix_minmax: c.get("cutmix_minmax").map(|m| {
            let v = f32s(m);
            [v[0] as f64, v[1] as f64]
        }),
        prob: c.get("prob").and_then(|p| p.as_f64()).unwrap_or(1.0),
        switch_prob: 0.5,
        mode: match c["mode"].as_str().unwrap() {
            "batch" => MixMode::Batch,
            "pair" => MixMode::Pair,
            _ => MixMode::Elem,
        },
        correct_lam: true,
        label_smoothing: c["label_smoothing"].as_f64().unwrap(),
        num_classes: classes,
    }
}

/// timm's recorded draws as a plan: each mixed draw, in order; CutMix ones take the next
/// recorded box and its corrected lambda.
fn replay(case: &Value) -> MixPlan {
    let lams = case["draws"]["lam"].as_array().unwrap();
    let cuts = case["draws"]["cutmix"].as_array().unwrap();
    let mut boxes = case["boxes"].as_array().unwrap().iter();
    let mixes: Vec<Mix> = lams
        .iter()
        .zip(cuts)
        .map(|(l, c)| {
            let lam = l.as_f64().unwrap();
            if lam == 1.0 {
                Mix {
                    lam: 1.0,
                    cutmix_box: None,
                }
            } else if c.as_bool().unwrap() {
                let b = boxes.next().unwrap();
                let v: Vec<usize> = b["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                Mix {
                    lam: b["lam"].as_f64().unwrap(),
                    cutmix_box: Some([v[0], v[1], v[2], v[3]]),
                }
            } else {
                Mix {
                    lam,
                    cutmix_box: None,
                }
            }
        })
        .collect();
    match case["case"]["mode"].as_str().unwrap() {
        "batch" => MixPlan::Batch(mixes[0]),
        "pair" => MixPlan::Pair(mixes),
        _ => MixPlan::Elem(mixes),
    }
}

#[test]
fn timms_draws_replayed_give_its_images_and_targets_bit_for_bit() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/timm/mixup.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case["case"]["name"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let classes = case["classes"].as_u64().unwrap() as usize;
        let labels: Vec<u32> = case["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let m = settings(case, classes);
        m.validate().unwrap();
        let mut images = f32s(&case["images"]);
        let targets = m
            .apply(
                &replay(case),
                &mut images,
                &labels,
                (shape[1], shape[2], shape[3]),
            )
            .unwrap();
        let (want_x, want_t) = (f32s(&case["mixed"]), f32s(&case["targets"]));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&images), bits(&want_x), "{name}: mixed images");
        assert_eq!(bits(&targets), bits(&want_t), "{name}: soft targets");
    }
}

#[test]
fn draws_follow_timms_rules() {
    let base = Mixup {
        mixup_alpha: 0.2,
        cutmix_alpha: 1.0,
        cutmix_minmax: None,
        prob: 1.0,
        switch_prob: 0.5,
        mode: MixMode::Batch,
        correct_lam: true,
        label_smoothing: 0.1,
        num_classes: 10,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (mut cut, mut mix) = (0, 0);
    for _ in 0..2000 {
        let MixPlan::Batch(m) = base.plan(8, 32, 24, &mut rng).unwrap() else {
            panic!("batch mode")
        };
        assert!((0.0..=1.0).contains(&m.lam), "{m:?}");
        match m.cutmix_box {
            Some([yl, yh, xl, xh]) => {
                cut += 1;
                assert!(yl <= yh && yh <= 32 && xl <= xh && xh <= 24, "{m:?}");
                // The corrected lambda is the share of the image left.
                let area = ((yh - yl) * (xh - xl)) as f64 / (32.0 * 24.0);
                assert!((m.lam - (1.0 - area)).abs() < 1e-12);
            }
            None => mix += 1,
        }
    }
    // switch_prob 0.5: about half CutMix.
    assert!((800..1200).contains(&cut), "{cut} cutmix / {mix} mixup");
    // prob 0: never mixed; modes give a draw per batch / pair / image.
    let never = Mixup {
        prob: 0.0,
        ..base.clone()
    };
    assert_eq!(
        never.plan(4, 8, 8, &mut rng).unwrap(),
        MixPlan::Batch(Mix {
            lam: 1.0,
            cutmix_box: None
        })
    );
    let MixPlan::Pair(p) = Mixup {
        mode: MixMode::Pair,
        ..base.clone()
    }
    .plan(7, 8, 8, &mut rng)
    .unwrap() else {
        panic!()
    };
    assert_eq!(p.len(), 3);
    let MixPlan::Elem(e) = Mixup {
        mode: MixMode::Elem,
        ..base.clone()
    }
    .plan(7, 8, 8, &mut rng)
    .unwrap() else {
        panic!()
    };
    assert_eq!(e.len(), 7);
    // Targets are distributions; bad input is an error.
    let mut x = vec![0.5f32; 7 * 3 * 8 * 8];
    let t = Mixup {
        mode: MixMode::Elem,
        ..base.clone()
    }
    .apply(&MixPlan::Elem(e), &mut x, &[0, 1, 2, 3, 4, 5, 9], (3, 8, 8))
    .unwrap();
    for row in t.chunks(10) {
        assert!((row.iter().map(|v| *v as f64).sum::<f64>() - 1.0).abs() < 1e-5);
    }
    assert!(base
        .apply(
            &MixPlan::Batch(Mix {
                lam: 0.5,
                cutmix_box: None
            }),
            &mut x,
            &[0, 10, 0, 0, 0, 0, 0],
            (3, 8, 8)
        )
        .is_err());
    assert!(base
        .apply(
            &MixPlan::Batch(Mix {
                lam: 0.5,
                cutmix_box: None
            }),
            &mut x[..10],
            &[0],
            (3, 8, 8)
        )
        .is_err());
    assert!(Mixup {
        cutmix_minmax: Some([0.9, 0.2]),
        ..base
    }
    .validate()
    .is_err());
}
