//! Random erasing against timm's `RandomErasing` (fixtures/timm/erasing.json,
//! gen_erasing_fixtures.py): the share of images erased, the erased area and the box sides over
//! 20,000 draws agree with timm's within 4 standard errors; fills and errors.

use candle_finetune::data::erasing::{EraseBox, EraseMode, RandomErasing};
use rand::SeedableRng;
use serde_json::Value;

#[test]
fn erased_share_area_and_shape_follow_timm() {
    let fx: Value = serde_json::from_str(include_str!("fixtures/timm/erasing.json")).unwrap();
    let (h, w, calls) = (32usize, 24usize, fx["calls"].as_u64().unwrap() as usize);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for case in fx["cases"].as_array().unwrap() {
        let count = case["count"].as_u64().unwrap() as usize;
        let e = RandomErasing::timm(0.5, EraseMode::Const, count);
        e.validate().unwrap();
        let (mut erased, mut areas, mut hs, mut ws) = (0usize, Vec::new(), Vec::new(), Vec::new());
        for _ in 0..calls {
            let mut img = vec![1f32; 3 * h * w];
            let boxes = e.plan(h, w, &mut rng);
            e.apply(&boxes, &mut img, (3, h, w), &mut rng).unwrap();
            let zeros: Vec<(usize, usize)> = (0..h * w)
                .filter(|&k| img[k] == 0.0)
                .map(|k| (k / w, k % w))
                .collect();
            if zeros.is_empty() {
                continue;
            }
            erased += 1;
            areas.push(zeros.len() as f64 / (h * w) as f64);
            let rows = zeros.iter().map(|z| z.0);
            let cols = zeros.iter().map(|z| z.1);
            hs.push((rows.clone().max().unwrap() - rows.min().unwrap() + 1) as f64);
            ws.push((cols.clone().max().unwrap() - cols.min().unwrap() + 1) as f64);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let share = erased as f64 / calls as f64;
        let want_share = case["erased_share"].as_f64().unwrap();
        // Binomial standard error of each share; the difference of two has sqrt(2) of it.
        let se = (0.25 / calls as f64).sqrt() * 2f64.sqrt();
        assert!(
            (share - want_share).abs() < 4.0 * se,
            "count {count}: erased {share} vs timm {want_share}"
        );
        let sd = case["area_sd"].as_f64().unwrap();
        let n = case["n"].as_f64().unwrap();
        let se = sd * (1.0 / n + 1.0 / areas.len() as f64).sqrt();
        let want_area = case["area_mean"].as_f64().unwrap();
        assert!(
            (mean(&areas) - want_area).abs() < 4.0 * se,
            "count {count}: mean area {} vs timm {want_area} (se {se})",
            mean(&areas)
        );
        if count == 1 {
            for (got, key) in [(mean(&hs), "height_mean"), (mean(&ws), "width_mean")] {
                let want = case[key].as_f64().unwrap();
                assert!((got - want).abs() < 0.25, "{key}: {got} vs timm {want}");
            }
        }
    }
}

#[test]
fn fills_and_bad_input() {
    let b = [EraseBox {
        top: 1,
        left: 2,
        height: 3,
        width: 4,
    }];
    let (c, h, w) = (3, 8, 8);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let inside = |k: usize| {
        let (y, x) = ((k % (h * w)) / w, k % w);
        (1..4).contains(&y) && (2..6).contains(&x)
    };
    for mode in [EraseMode::Const, EraseMode::Rand, EraseMode::Pixel] {
        let e = RandomErasing::timm(1.0, mode, 1);
        let mut img = vec![7f32; c * h * w];
        e.apply(&b, &mut img, (c, h, w), &mut rng).unwrap();
        assert!(
            (0..img.len())
                .filter(|&k| !inside(k))
                .all(|k| img[k] == 7.0),
            "{mode:?}"
        );
        let channel = |ch: usize| -> Vec<f32> {
            (0..h * w)
                .filter(|&k| inside(k))
                .map(|k| img[ch * h * w + k])
                .collect()
        };
        match mode {
            EraseMode::Const => assert!(channel(0).iter().all(|v| *v == 0.0)),
            EraseMode::Rand => {
                for ch in 0..c {
                    let v = channel(ch);
                    assert!(v.iter().all(|x| *x == v[0]) && v[0] != 7.0);
                }
            }
            EraseMode::Pixel => {
                let v = channel(0);
                assert!(v.windows(2).any(|p| p[0] != p[1]));
            }
        }
    }
    let e = RandomErasing::timm(1.0, EraseMode::Const, 1);
    let mut img = vec![0f32; 10];
    assert!(e.apply(&b, &mut img, (c, h, w), &mut rng).is_err());
    let mut img = vec![0f32; c * h * w];
    let outside = [EraseBox {
        top: 6,
        left: 0,
        height: 3,
        width: 1,
    }];
    assert!(e.apply(&outside, &mut img, (c, h, w), &mut rng).is_err());
    assert!(RandomErasing::timm(1.5, EraseMode::Const, 1)
        .validate()
        .is_err());
    assert!(RandomErasing::timm(0.5, EraseMode::Const, 0)
        .validate()
        .is_err());
    // Probability 0 never erases; tiny images are left alone.
    let never = RandomErasing::timm(0.0, EraseMode::Pixel, 1);
    assert!(never.plan(32, 32, &mut rng).is_empty());
    // On a 1 x 1 image every box rounds to nothing (as timm's): no pixel changes.
    let mut one = vec![5f32; 3];
    let boxes = e.plan(1, 1, &mut rng);
    e.apply(&boxes, &mut one, (3, 1, 1), &mut rng).unwrap();
    assert_eq!(one, [5.0; 3]);
}

#[test]
fn the_loader_erases_deterministically() {
    use candle_finetune::data::{Loader, LoaderConfig, Preprocess, Transform};
    let ds = std::sync::Arc::new(candle_finetune::smoke::generated_dataset(8, 1, 0));
    let batch = |erasing: Option<RandomErasing>| {
        let l = Loader::new(
            ds.clone(),
            Transform::for_training(Preprocess {
                size: 24,
                ..Default::default()
            }),
            LoaderConfig {
                batch_size: 8,
                erasing,
                ..Default::default()
            },
        )
        .unwrap();
        let b = l.epoch(0).next().unwrap().unwrap();
        b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let erase = || Some(RandomErasing::timm(1.0, EraseMode::Const, 1));
    let (plain, a, b) = (batch(None), batch(erase()), batch(erase()));
    assert_eq!(a, b, "the same draws every time (and after a resume)");
    assert_ne!(plain, a);
    // Only erased pixels differ, and they are zeros.
    assert!(plain.iter().zip(&a).all(|(p, e)| p == e || *e == 0.0));
}
