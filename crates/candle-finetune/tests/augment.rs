//! Augmentation against torchvision.transforms.v2 (fixtures/torchvision/augment.json,
//! gen_augment_fixtures.py): every TrivialAugmentWide / RandAugment op, hue and ColorJitter on
//! fixed parameters, the magnitude tables of both policies; the policies' draws; the training
//! transform with augmentation; no panic on any image size or magnitude; clear errors.

use base64::Engine;
use candle_finetune::data::augment::{
    linspace_f32, Augment, AutoAugment, ColorJitter, JitterDraw, Op, OpKind,
};
use candle_finetune::data::{imageops, sample_rng, Preprocess, Transform};
use candle_finetune::train::TrainConfig;
use image::RgbImage;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::HashMap;

fn fixture() -> Value {
    serde_json::from_str(include_str!("fixtures/torchvision/augment.json")).unwrap()
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().unwrap())
        .unwrap()
}

/// CHW bytes -> an RGB image.
fn from_chw(chw: &[u8], h: usize, w: usize) -> RgbImage {
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = |c: usize| chw[c * h * w + y as usize * w + x as usize];
        image::Rgb([at(0), at(1), at(2)])
    })
}

fn images(fx: &Value) -> HashMap<String, RgbImage> {
    fx["images"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let (h, w) = (v["h"].as_u64().unwrap(), v["w"].as_u64().unwrap());
            (
                k.clone(),
                from_chw(&b64(&v["data"]), h as usize, w as usize),
            )
        })
        .collect()
}

fn fill_of(v: &Value) -> [u8; 3] {
    match v {
        Value::Null => [0; 3],
        Value::Number(n) => [n.as_u64().unwrap() as u8; 3],
        Value::Array(a) => [0, 1, 2].map(|i| a[i].as_u64().unwrap() as u8),
        _ => panic!("fill {v}"),
    }
}

/// Runs one fixture case through our ops.
fn run_case(case: &Value, img: &RgbImage) -> RgbImage {
    let op = case["op"].as_str().unwrap();
    let p = &case["params"];
    let mut out = img.clone();
    match op {
        "Hue" => imageops::adjust_hue(&mut out, p["factor"].as_f64().unwrap()),
        "ColorJitter" => {
            let order: Vec<usize> = p["order"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            JitterDraw {
                order: [order[0], order[1], order[2], order[3]],
                brightness: p["brightness"].as_f64(),
                contrast: p["contrast"].as_f64(),
                saturation: p["saturation"].as_f64(),
                hue: p["hue"].as_f64(),
            }
            .apply(&mut out)
        }
        name => Op {
            kind: OpKind::from_name(name).unwrap_or_else(|| panic!("op {name}")),
            magnitude: p["magnitude"].as_f64().unwrap(),
        }
        .apply(&mut out, fill_of(&p["fill"])),
    }
    out
}

/// Values that differ from torchvision's, and the largest difference.
fn compare(got: &RgbImage, want_chw: &[u8]) -> (usize, u8) {
    let (w, h) = (got.width() as usize, got.height() as usize);
    assert_eq!(want_chw.len(), 3 * h * w, "output size");
    let want = from_chw(want_chw, h, w);
    got.as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .fold((0, 0), |(n, m), (a, b)| (n + 1, m.max(a.abs_diff(*b))))
}

/// Every op agrees with torchvision value for value: the float ops compute in `f32` in
/// torchvision's order with its fused multiply-adds, so even the values at a rounding boundary
/// of a blend, a mean or a sampling coordinate come out the same (111 cases).
#[test]
fn ops_match_torchvision() {
    let fx = fixture();
    let imgs = images(&fx);
    let mut ops = std::collections::BTreeSet::new();
    let cases = fx["cases"].as_array().unwrap();
    for case in cases {
        let op = case["op"].as_str().unwrap();
        let img = &imgs[case["image"].as_str().unwrap()];
        let got = run_case(case, img);
        let (n, max) = compare(&got, &b64(&case["output"]));
        assert_eq!(
            n, 0,
            "{op} on {} with {}: {n} values differ from torchvision's (by up to {max})",
            case["image"], case["params"]
        );
        ops.insert(op);
    }
    // 14 auto-augment ops, hue, ColorJitter.
    assert_eq!(ops.len(), 16, "every op has cases: {ops:?}");
    assert!(cases.len() > 100);
}

#[test]
fn magnitude_tables_match_torchvision() {
    let fx = fixture();
    let t = &fx["tables"];
    let (h, w, bins) = (
        t["h"].as_u64().unwrap() as u32,
        t["w"].as_u64().unwrap() as u32,
        t["bins"].as_u64().unwrap() as usize,
    );
    for (key, policy) in [
        ("ta_wide", AutoAugment::TrivialAugmentWide { bins }),
        (
            "rand_augment",
            AutoAugment::RandAugment {
                num_ops: 2,
                magnitude: 9,
                bins,
            },
        ),
    ] {
        let table = t[key].as_object().unwrap();
        assert_eq!(table.len(), OpKind::ALL.len());
        for (name, want) in table {
            let kind = OpKind::from_name(name).unwrap();
            let (got, signed) = policy.magnitudes(kind, h, w);
            assert_eq!(signed, want["signed"].as_bool().unwrap(), "{key} {name}");
            let want: Option<Vec<f32>> = want["values"]
                .as_array()
                .map(|v| v.iter().map(|x| x.as_f64().unwrap() as f32).collect());
            assert_eq!(got, want, "{key} {name}");
        }
    }
}

#[test]
fn linspace_is_torchs() {
    // torch.linspace(0, 0.99, 31) in f32 (PyTorch 2.15): values 19 and 25 are one ulp off a
    // separately rounded `end - step * (steps - 1 - i)`; ours rounds once, as torch does.
    let v = linspace_f32(0.0, 0.99, 31);
    assert_eq!((v[3], v[30]), (0.099, 0.99));
    let step = 0.99f32 / 30.0;
    let two_roundings = |i: usize| 0.99f32 - step * (30 - i) as f32;
    assert_ne!(v[19], two_roundings(19));
    assert_eq!(linspace_f32(1.0, 0.0, 3), vec![1.0, 0.5, 0.0]);
    assert!(linspace_f32(0.0, 1.0, 0).is_empty());
    assert_eq!(linspace_f32(2.0, 5.0, 1), vec![2.0]);
}

#[test]
fn trivial_augment_draws_each_op_bin_and_sign_uniformly() {
    let ta = AutoAugment::TrivialAugmentWide { bins: 31 };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let n = 28_000usize;
    let mut counts: HashMap<OpKind, usize> = HashMap::new();
    let (mut negative, mut signed_draws, mut top_bin) = (0usize, 0usize, 0usize);
    for _ in 0..n {
        let ops = ta.sample(224, 224, &mut rng);
        assert_eq!(ops.len(), 1);
        let op = ops[0];
        *counts.entry(op.kind).or_default() += 1;
        if op.kind == OpKind::Rotate {
            signed_draws += 1;
            negative += (op.magnitude < 0.0) as usize;
            top_bin += (op.magnitude.abs() == 135.0) as usize;
        }
    }
    let p = 1.0 / 14.0;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    for k in OpKind::ALL {
        let c = counts.get(&k).copied().unwrap_or(0) as f64;
        assert!(
            (c - n as f64 * p).abs() < 4.5 * sd,
            "{k:?} drawn {c} times of {n}"
        );
    }
    let s = signed_draws as f64;
    assert!((negative as f64 - s / 2.0).abs() < 4.5 * (s / 4.0).sqrt());
    let want = s / 31.0;
    assert!(
        (top_bin as f64 - want).abs() < 4.5 * want.sqrt(),
        "top bin {top_bin} of {s}"
    );
}

#[test]
fn rand_augment_draws_num_ops_at_the_fixed_bin() {
    let ra: AutoAugment = "rand-m5-n3".parse().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for _ in 0..500 {
        let ops = ra.sample(24, 32, &mut rng);
        assert_eq!(ops.len(), 3);
        for op in ops {
            let (m, _) = ra.magnitudes(op.kind, 24, 32);
            let want = m.map(|v| v[5] as f64).unwrap_or(0.0);
            assert_eq!(op.magnitude.abs(), want, "{op:?}");
        }
    }
    assert!("rand-m31".parse::<AutoAugment>().is_err());
    assert!("rand-m40-mmax50".parse::<AutoAugment>().is_ok());
}

#[test]
fn color_jitter_draws_a_permutation_and_factors_in_range() {
    let j = ColorJitter::timm(&[0.4, 0.3, 0.2, 0.1]).unwrap().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let (mut sum_b, mut firsts) = (0.0, [0usize; 4]);
    let n = 8000;
    for _ in 0..n {
        let d = j.sample(&mut rng);
        let mut o = d.order;
        o.sort();
        assert_eq!(o, [0, 1, 2, 3]);
        firsts[d.order[0]] += 1;
        let b = d.brightness.unwrap();
        assert!((0.6..1.4).contains(&b));
        assert!((0.7..1.3).contains(&d.contrast.unwrap()));
        assert!((0.8..1.2).contains(&d.saturation.unwrap()));
        assert!((-0.1..0.1).contains(&d.hue.unwrap()));
        sum_b += b;
    }
    assert!((sum_b / n as f64 - 1.0).abs() < 0.01);
    for f in firsts {
        assert!((f as f64 - n as f64 / 4.0).abs() < 4.5 * (n as f64 * 0.1875).sqrt());
    }
    assert_eq!(ColorJitter::timm(&[0.0]).unwrap(), None);
    let only_b = ColorJitter::timm(&[0.5, 0.0, 0.0]).unwrap().unwrap();
    assert_eq!((only_b.contrast, only_b.hue), (None, None));
}

fn photo(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    })
}

/// With pixel values kept as they are (mean 0, std 1/255), the training transform equals: the
/// crop and flip of the plain transform, flipped *before* the ops, then the ops drawn from the
/// rest of the sample's stream.
#[test]
fn transform_flips_then_runs_the_drawn_ops() {
    let pre = Preprocess {
        size: 24,
        mean: [0.0; 3],
        std: [1.0 / 255.0; 3],
        ..Default::default()
    };
    let aug = Augment {
        auto_augment: Some(AutoAugment::TrivialAugmentWide { bins: 31 }),
        color_jitter: ColorJitter::timm(&[0.3]).unwrap(),
        ..Default::default()
    };
    let plain = Transform::for_training(pre.clone());
    let augmented = Transform::for_training(pre).with_augment(aug.clone());
    let img = photo(50, 37);
    let s = 24usize;
    let (mut flips, mut changed) = (0, 0);
    for index in 0..40u64 {
        let mut base = vec![0f32; 3 * s * s];
        plain.apply(&img, 9, 1, index, &mut base).unwrap();
        // The plain transform's pixels, as an image (values are exact small integers).
        let mut want = RgbImage::from_fn(s as u32, s as u32, |x, y| {
            let at = |c: usize| base[c * s * s + y as usize * s + x as usize].round() as u8;
            image::Rgb([at(0), at(1), at(2)])
        });
        // The same draws as the transform: crop, flip, then the ops.
        let mut rng = sample_rng(9, 1, index);
        let (_, flip) = {
            let b = candle_finetune::data::random_resized_crop_box_in(
                50, 37, aug.scale, aug.ratio, &mut rng,
            );
            (b, rng.random_bool(aug.hflip))
        };
        flips += flip as usize;
        aug.apply_pixel_ops(&mut want, &mut rng);
        let mut got = vec![0f32; 3 * s * s];
        augmented.apply(&img, 9, 1, index, &mut got).unwrap();
        let got_img = RgbImage::from_fn(s as u32, s as u32, |x, y| {
            let at = |c: usize| got[c * s * s + y as usize * s + x as usize].round() as u8;
            image::Rgb([at(0), at(1), at(2)])
        });
        assert_eq!(got_img, want, "image {index}");
        changed += (got != base) as usize;
    }
    assert!(
        flips > 5 && changed > 20,
        "flips {flips}, changed {changed}"
    );
}

#[test]
fn crop_range_and_flip_probability_are_used() {
    let pre = Preprocess {
        size: 8,
        ..Default::default()
    };
    // The whole image at its own ratio, never flipped: the same as a plain resize.
    let t = Transform::for_training(pre).with_augment(Augment {
        scale: [1.0, 1.0],
        ratio: [1.5, 1.5],
        hflip: 0.0,
        ..Default::default()
    });
    for index in 0..20 {
        let (b, flip) = t.geometry(60, 40, 0, 0, index);
        assert_eq!(
            (b.left, b.top, b.width, b.height, flip),
            (0.0, 0.0, 60.0, 40.0, false)
        );
    }
    let always = Transform::for_training(Preprocess::default()).with_augment(Augment {
        hflip: 1.0,
        ..Default::default()
    });
    assert!((0..20).all(|i| always.geometry(60, 40, 0, 0, i).1));
    // Small crops stay within the range.
    let small = Transform::for_training(Preprocess::default()).with_augment(Augment {
        scale: [0.1, 0.2],
        ..Default::default()
    });
    for i in 0..200 {
        let (b, _) = small.geometry(100, 100, 3, 0, i);
        let area = b.width * b.height / 1e4;
        assert!((0.08..=0.22).contains(&area), "area {area}");
    }
}

#[test]
fn bad_settings_are_errors_naming_the_value() {
    let e = |cfg: TrainConfig| cfg.augment().unwrap_err().to_string();
    assert!(e(TrainConfig {
        scale: vec![0.9, 0.1],
        ..Default::default()
    })
    .contains("crop scale"));
    assert!(e(TrainConfig {
        ratio: vec![0.0, 1.0],
        ..Default::default()
    })
    .contains("crop ratio"));
    assert!(e(TrainConfig {
        hflip: 1.5,
        ..Default::default()
    })
    .contains("hflip"));
    assert!(e(TrainConfig {
        auto_augment: Some("autoaug-v0".into()),
        ..Default::default()
    })
    .contains("ta_wide"));
    assert!(e(TrainConfig {
        color_jitter: Some(vec![0.4, 0.4]),
        ..Default::default()
    })
    .contains("1, 3 or 4"));
    assert!(e(TrainConfig {
        color_jitter: Some(vec![0.4, 0.4, 0.4, 0.7]),
        ..Default::default()
    })
    .contains("hue"));
    assert!(TrainConfig {
        scale: vec![f64::NAN, 1.0],
        ..Default::default()
    }
    .validate()
    .is_err());
}

fn any_op() -> impl Strategy<Value = Op> {
    (
        0..OpKind::ALL.len(),
        prop_oneof![
            -1e6f64..1e6,
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.0),
            -2.0f64..2.0
        ],
    )
        .prop_map(|(k, magnitude)| Op {
            kind: OpKind::ALL[k],
            magnitude,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any op at any magnitude on any image size, 1 x 1 included, keeps the size and does not
    /// panic; hue and the jitter likewise.
    #[test]
    fn ops_never_panic(w in 1u32..40, h in 1u32..40, op in any_op(), hue in -0.5f64..=0.5,
                       fill in any::<[u8; 3]>()) {
        let mut img = photo(w, h);
        op.apply(&mut img, fill);
        prop_assert_eq!(img.dimensions(), (w, h));
        imageops::adjust_hue(&mut img, hue);
        prop_assert_eq!(img.dimensions(), (w, h));
    }

    /// The training transform with every augmentation on, on any image size and output size.
    #[test]
    fn augmented_transform_never_panics(w in 1u32..60, h in 1u32..60, size in 1u32..20,
                                        index in 0u64..1000) {
        let t = Transform::for_training(Preprocess { size, ..Default::default() })
            .with_augment(Augment {
                auto_augment: Some(AutoAugment::RandAugment { num_ops: 3, magnitude: 30, bins: 31 }),
                color_jitter: ColorJitter::timm(&[0.4, 0.4, 0.4, 0.5]).unwrap(),
                scale: [0.01, 1.0],
                ratio: [0.1, 10.0],
                ..Default::default()
            });
        let mut out = vec![0f32; (3 * size * size) as usize];
        t.apply(&photo(w, h), 1, 2, index, &mut out).unwrap();
        prop_assert!(out.iter().all(|v| v.is_finite()));
    }
}
