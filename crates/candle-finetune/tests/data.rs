//! The data pipeline on data the test makes: parquet shards with real JPEG/PNG bytes in a
//! temporary Hub cache (read back offline through hf-hub), an image folder with corrupt, empty,
//! greyscale and palette images, exact transform geometry, and determinism.

use candle_finetune::data::{
    parquet::write_shard, random_resized_crop_box, sample_rng, Dataset, Interpolation, Loader,
    LoaderConfig, Preprocess, Split, Transform, DEFAULT_DATASET_REPO, DEFAULT_DATASET_REVISION,
};
use candle_finetune::hub::{seed_cache, HubOptions, RepoKind};
use image::{ImageFormat, Rgb, RgbImage};
use std::io::Cursor;
use std::sync::Arc;

fn encode(img: &RgbImage, fmt: ImageFormat) -> Vec<u8> {
    let mut v = Vec::new();
    img.write_to(&mut Cursor::new(&mut v), fmt).unwrap();
    v
}

/// A colourful image whose pixels encode the class and position.
fn picture(w: u32, h: u32, class: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([class.wrapping_mul(40), (x % 256) as u8, (y % 256) as u8])
    })
}

#[test]
fn stanford_cars_layout_reads_back_offline_through_the_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let names: Vec<String> = [
        "AM General Hummer SUV 2000",
        "Acura RL Sedan 2012",
        "Audi S5 Coupe 2012",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut expected = Vec::new();
    let shards = [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ];
    for (k, shard) in shards.iter().enumerate() {
        let rows: Vec<(Vec<u8>, i64)> = (0..5)
            .map(|i| {
                let label = ((i + k) % 3) as i64;
                let img = picture(30 + i as u32, 20, label as u8);
                // PNG (lossless) for even rows, JPEG for odd rows.
                let fmt = if i % 2 == 0 {
                    ImageFormat::Png
                } else {
                    ImageFormat::Jpeg
                };
                expected.push((label, img.clone(), fmt));
                (encode(&img, fmt), label)
            })
            .collect();
        let local = work.path().join(format!("{k}.parquet"));
        write_shard(&local, &rows, &names).unwrap();
        seed_cache(
            cache.path(),
            RepoKind::Dataset,
            DEFAULT_DATASET_REPO,
            DEFAULT_DATASET_REVISION,
            shard,
            &local,
        )
        .unwrap();
    }
    let opts = HubOptions {
        cache_dir: Some(cache.path().into()),
        offline: true,
        endpoint: None,
        token: None,
        timeout: None,
    };
    let ds = Dataset::stanford_cars(&opts, Split::Train).unwrap();
    assert_eq!(ds.class_names, names);
    assert_eq!(ds.len(), 10);
    assert_eq!(ds.class_counts(), [3, 4, 3]); // labels i % 3 and (i + 1) % 3
    for (i, (label, img, fmt)) in expected.iter().enumerate() {
        assert_eq!(ds.samples[i].label as i64, *label);
        let got = ds.load_image(i).unwrap();
        assert_eq!(got.dimensions(), img.dimensions());
        if *fmt == ImageFormat::Png {
            assert_eq!(got.as_raw(), img.as_raw(), "PNG row {i} is lossless");
        }
    }
    // The test split is not in the cached snapshot: a clear error naming the split.
    let e = Dataset::stanford_cars(&opts, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no test split"), "{e}");
    // A file that is not parquet.
    let bad = work.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    let e = Dataset::from_parquet(&[bad]).unwrap_err().to_string();
    assert!(e.contains("bad.parquet"), "{e}");
}

#[test]
fn image_folder_decodes_grey_and_palette_and_skips_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a_red");
    let b = dir.path().join("b_grey");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(
        a.join("0.jpg"),
        encode(&picture(64, 48, 1), ImageFormat::Jpeg),
    )
    .unwrap();
    // Palette PNG: two colours.
    {
        let f = std::fs::File::create(a.join("1.png")).unwrap();
        let mut enc = png::Encoder::new(f, 4, 2);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 0, 255]);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 1, 0, 1, 1, 0, 1, 0]).unwrap();
    }
    let grey = image::GrayImage::from_fn(40, 30, |x, _| image::Luma([(x * 6) as u8]));
    let mut grey_jpg = Vec::new();
    grey.write_to(&mut Cursor::new(&mut grey_jpg), ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(b.join("grey.JPEG"), &grey_jpg).unwrap();
    let jpg = encode(&picture(64, 48, 2), ImageFormat::Jpeg);
    std::fs::write(b.join("truncated.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    std::fs::write(b.join("empty.png"), b"").unwrap();
    std::fs::write(b.join("notes.txt"), b"ignored").unwrap();

    let ds = Arc::new(Dataset::from_image_folder(dir.path()).unwrap());
    assert_eq!(ds.class_names, ["a_red", "b_grey"]);
    assert_eq!(ds.len(), 5);
    let pal = ds.load_image(1).unwrap();
    assert_eq!(pal.get_pixel(0, 0).0, [255, 0, 0]);
    assert_eq!(pal.get_pixel(1, 0).0, [0, 0, 255]);
    let g = ds.load_image(3).unwrap(); // sorted: empty.png, grey.JPEG, truncated.jpg
    assert!(g.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    assert!(ds.load_image(2).unwrap_err().contains("empty"));
    assert!(ds.load_image(4).unwrap_err().contains("truncated"));

    let t = Transform::for_training(Preprocess {
        size: 16,
        ..Default::default()
    });
    let loader = Loader::new(
        ds,
        t,
        LoaderConfig {
            batch_size: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut epoch = loader.epoch(0);
    let mut seen = 0;
    for b in epoch.by_ref() {
        let b = b.unwrap();
        assert_eq!(b.images.dims()[1..], [3, 16, 16]);
        assert_eq!(b.labels.dims(), [b.indices.len()]);
        seen += b.indices.len();
    }
    let report = epoch.finish();
    assert_eq!((seen, report.images), (3, 3));
    let mut skipped: Vec<usize> = report.skipped.iter().map(|s| s.0).collect();
    skipped.sort();
    assert_eq!(skipped, [2, 4]);
    assert!(report.to_string().contains("2 skipped"));
}

#[test]
fn eval_transform_is_resize_then_exact_center_crop() {
    // size 4, crop_pct 0.5: shorter side resized to 8. An 8 x 16 image is already there, so the
    // output is exactly the centered 4 x 4 crop at left = round((8-4)/2) = 2, top = round((16-4)/2) = 6.
    let img = RgbImage::from_fn(8, 16, |x, y| Rgb([(x * 20) as u8, (y * 10) as u8, 7]));
    for interpolation in [
        Interpolation::Bilinear,
        Interpolation::Nearest,
        Interpolation::Bicubic,
    ] {
        let pre = Preprocess {
            size: 4,
            crop_pct: 0.5,
            interpolation,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let t = Transform::for_eval(pre);
        let mut out = vec![0f32; 3 * 16];
        t.apply(&img, 0, 0, 0, &mut out).unwrap();
        for y in 0..4 {
            for x in 0..4 {
                let p = img.get_pixel(x + 2, y + 6).0;
                for c in 0..3 {
                    let got = out[c * 16 + (y * 4 + x) as usize] * 255.0;
                    assert!(
                        (got - p[c] as f32).abs() < 1e-3,
                        "{interpolation:?} ({x},{y}) c{c}: {got} vs {}",
                        p[c]
                    );
                }
            }
        }
    }
    // torchvision's Resize(256) + CenterCrop(224) on 600 x 400: 384 x 256, crop at (80, 16).
    let (b, rw, rh) = candle_finetune::data::center_crop_box(600, 400, 256, 224);
    assert_eq!((rw, rh), (384, 256));
    assert!(
        (b.left - 80.0 * 600.0 / 384.0).abs() < 1e-9 && (b.top - 16.0 * 400.0 / 256.0).abs() < 1e-9
    );
    assert!((b.width - 224.0 * 600.0 / 384.0).abs() < 1e-9);
}

#[test]
fn train_transform_crops_flips_and_is_reproducible() {
    let img = RgbImage::from_fn(60, 40, |x, y| {
        Rgb([(x * 4) as u8, (y * 6) as u8, ((x + y) * 2) as u8])
    });
    let pre = Preprocess {
        size: 12,
        interpolation: Interpolation::Nearest,
        mean: [0.0; 3],
        std: [1.0; 3],
        ..Default::default()
    };
    let t = Transform::for_training(pre);
    let mut flips = [0, 0];
    for index in 0..40u64 {
        let (b, flip) = t.geometry(60, 40, 3, 1, index);
        flips[flip as usize] += 1;
        let mut out = vec![0f32; 3 * 144];
        t.apply(&img, 3, 1, index, &mut out).unwrap();
        // Nearest neighbour: output column x samples source column left + floor((x + 0.5) * w / 12).
        for y in 0..12usize {
            for x in 0..12usize {
                let xs = if flip { 11 - x } else { x };
                let sx = b.left as usize + ((xs as f64 + 0.5) * b.width / 12.0) as usize;
                let sy = b.top as usize + ((y as f64 + 0.5) * b.height / 12.0) as usize;
                let p = img.get_pixel(sx as u32, sy as u32).0;
                let got = (out[y * 12 + x] * 255.0).round() as u8;
                assert_eq!(got, p[0], "index {index} ({x},{y}) box {b:?} flip {flip}");
            }
        }
        // Same (seed, epoch, index): same output; another epoch: another crop.
        let mut again = vec![0f32; 3 * 144];
        t.apply(&img, 3, 1, index, &mut again).unwrap();
        assert_eq!(out, again);
    }
    assert!(flips[0] > 5 && flips[1] > 5, "{flips:?}");
    assert_ne!(t.geometry(60, 40, 3, 1, 0), t.geometry(60, 40, 3, 2, 0));

    // RandomResizedCrop statistics: area fraction in [0.08, 1], aspect in [3/4, 4/3] up to rounding.
    let mut rng = sample_rng(9, 9, 9);
    let mut mean_area = 0.0;
    for _ in 0..2000 {
        let b = random_resized_crop_box(600, 400, &mut rng);
        let frac = b.width * b.height / 240000.0;
        assert!((0.079..=1.0).contains(&frac), "{b:?}");
        let ratio = b.width / b.height;
        assert!((0.74..=1.35).contains(&ratio) || b.width == 533.0, "{b:?}");
        mean_area += frac / 2000.0;
    }
    // Accepted draws are uniform over the part of (area, log-aspect) space where the box fits:
    // integrate that region numerically for the expected mean area.
    let (lr0, lr1) = ((0.75f64).ln(), (4.0f64 / 3.0).ln());
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..400 {
        let s = 0.08 + 0.92 * (i as f64 + 0.5) / 400.0;
        for j in 0..400 {
            let a = (lr0 + (lr1 - lr0) * (j as f64 + 0.5) / 400.0).exp();
            if (s * 240000.0 * a).sqrt() <= 600.0 && (s * 240000.0 / a).sqrt() <= 400.0 {
                num += s;
                den += 1.0;
            }
        }
    }
    let want = num / den;
    assert!(
        (mean_area - want).abs() < 0.02,
        "mean area {mean_area} vs {want}"
    );
}

#[test]
fn batches_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    for c in 0..2 {
        let d = dir.path().join(format!("c{c}"));
        std::fs::create_dir(&d).unwrap();
        for i in 0..5 {
            std::fs::write(
                d.join(format!("{i}.jpg")),
                encode(&picture(50 + i, 40, c as u8), ImageFormat::Jpeg),
            )
            .unwrap();
        }
    }
    let ds = Arc::new(Dataset::from_image_folder(dir.path()).unwrap());
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let t = Transform::for_training(Preprocess {
                size: 20,
                ..Default::default()
            });
            let l = Loader::new(
                ds.clone(),
                t,
                LoaderConfig {
                    batch_size: 4,
                    seed: 5,
                    ..Default::default()
                },
            )
            .unwrap();
            l.epoch(2)
                .map(|b| {
                    let b = b.unwrap();
                    (
                        b.indices,
                        b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one.iter().map(|b| b.0.len()).sum::<usize>(), 10);
    // Shuffled: not the identity order.
    let order: Vec<usize> = one.iter().flat_map(|b| b.0.clone()).collect();
    assert_ne!(order, (0..10).collect::<Vec<_>>());
}

#[test]
fn timm_config_is_parsed_and_validated() {
    let cfg = r#"{"architecture":"resnet18","num_classes":1000,"pretrained_cfg":{"input_size":[3,224,224],
        "interpolation":"bilinear","crop_pct":0.875,"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225]}}"#;
    assert_eq!(
        Preprocess::from_timm_config(cfg).unwrap(),
        Preprocess::default()
    );
    assert!(Preprocess::from_timm_config(r#"{"pretrained_cfg":{"crop_pct":1.5}}"#).is_err());
    assert!(
        Preprocess::from_timm_config(r#"{"pretrained_cfg":{"interpolation":"lanczos"}}"#).is_err()
    );
    assert!(Preprocess::from_timm_config("not json").is_err());
}

#[test]
fn cmyk_jpeg_decodes_to_rgb() {
    // 8 x 8 pure cyan and pure yellow halves in CMYK (C, M, Y, K).
    let mut px = Vec::new();
    for _y in 0..8 {
        for x in 0..8 {
            px.extend_from_slice(if x < 4 {
                &[255u8, 0, 0, 0]
            } else {
                &[0u8, 0, 255, 0]
            });
        }
    }
    let mut jpg = Vec::new();
    jpeg_encoder::Encoder::new(&mut jpg, 100)
        .encode(&px, 8, 8, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    let rgb = candle_finetune::data::decode_rgb(&jpg).unwrap();
    let near = |p: [u8; 3], q: [u8; 3]| {
        p.iter()
            .zip(q)
            .all(|(a, b)| (*a as i32 - b as i32).abs() < 24)
    };
    assert!(
        near(rgb.get_pixel(1, 1).0, [0, 255, 255]),
        "cyan: {:?}",
        rgb.get_pixel(1, 1)
    );
    assert!(
        near(rgb.get_pixel(6, 6).0, [255, 255, 0]),
        "yellow: {:?}",
        rgb.get_pixel(6, 6)
    );
}

#[test]
fn drop_last_and_unshuffled_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("k")).unwrap();
    for i in 0..5 {
        std::fs::write(
            dir.path().join("k").join(format!("{i}.png")),
            encode(&picture(10, 10, 0), ImageFormat::Png),
        )
        .unwrap();
    }
    let ds = Arc::new(Dataset::from_image_folder(dir.path()).unwrap());
    let t = Transform::for_eval(Preprocess {
        size: 8,
        ..Default::default()
    });
    let cfg = LoaderConfig {
        batch_size: 2,
        shuffle: false,
        drop_last: true,
        ..Default::default()
    };
    let l = Loader::new(ds, t, cfg).unwrap();
    assert_eq!(l.num_batches(), 2);
    let idx: Vec<Vec<usize>> = l.epoch(0).map(|b| b.unwrap().indices).collect();
    assert_eq!(idx, vec![vec![0, 1], vec![2, 3]]);
}

/// An image size of 0 is a clear error when the loader is made (it made the producer thread
/// panic, which ended every epoch silently with no batch), and an epoch's report is still
/// there after the iterator has reached its end.
#[test]
fn zero_image_size_is_an_error_and_the_report_survives_the_end() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("k")).unwrap();
    for i in 0..3 {
        std::fs::write(
            dir.path().join("k").join(format!("{i}.png")),
            encode(&picture(10, 10, 0), ImageFormat::Png),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("k").join("bad.png"), b"not a png").unwrap();
    let ds = Arc::new(Dataset::from_image_folder(dir.path()).unwrap());
    let t = |size| {
        Transform::for_eval(Preprocess {
            size,
            ..Default::default()
        })
    };
    let cfg = LoaderConfig {
        batch_size: 2,
        shuffle: false,
        ..Default::default()
    };
    let e = Loader::new(ds.clone(), t(0), cfg.clone()).err().unwrap();
    assert!(e.to_string().contains("image size must be positive"), "{e}");
    let l = Loader::new(ds, t(8), cfg).unwrap();
    let mut it = l.epoch(0);
    let n: usize = it.by_ref().map(|b| b.unwrap().indices.len()).sum();
    assert_eq!(n, 3);
    let report = it.finish();
    assert_eq!((report.images, report.skipped.len()), (3, 1));
}

#[test]
fn local_folders_have_validation_splits_in_parquet_and_image_folders() {
    use candle_finetune::data::features::ColumnChoice;
    use candle_finetune::data::DataSource;
    use candle_finetune::hub::HubOptions;
    // Parquet named by split, under data/.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let names: Vec<String> = ["a", "b"].map(String::from).to_vec();
    for (split, n) in [("train", 6), ("validation", 3), ("test", 2)] {
        let rows: Vec<(Vec<u8>, i64)> = (0..n)
            .map(|i| {
                (
                    encode(&picture(20, 20, i as u8), ImageFormat::Png),
                    (i % 2) as i64,
                )
            })
            .collect();
        write_shard(
            &dir.path()
                .join(format!("data/{split}-00000-of-00001.parquet")),
            &rows,
            &names,
        )
        .unwrap();
    }
    let d = DataSource::Dir(dir.path().into())
        .open(&HubOptions::default(), &ColumnChoice::default())
        .unwrap();
    assert_eq!(
        (
            d.train.len(),
            d.validation.as_ref().map(|v| v.len()),
            d.test.as_ref().map(|t| t.len())
        ),
        (6, Some(3), Some(2))
    );
    assert_eq!(d.train.class_names, names);
    // Image folders: train/, val/ (a validation name), test/; a class missing from val is fine,
    // the labels follow train's class order.
    let dir = tempfile::tempdir().unwrap();
    for (split, classes) in [
        ("train", vec!["cat", "dog"]),
        ("val", vec!["dog"]),
        ("test", vec!["cat", "dog"]),
    ] {
        for c in classes {
            let d = dir.path().join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            picture(16, 16, 1).save(d.join("0.png")).unwrap();
        }
    }
    let d = DataSource::Dir(dir.path().into())
        .open(&HubOptions::default(), &ColumnChoice::default())
        .unwrap();
    let val = d.validation.unwrap();
    assert_eq!(
        (val.len(), val.samples[0].label),
        (1, 1),
        "dog is class 1 of train"
    );
    assert_eq!(d.test.unwrap().len(), 2);
    // A class in val that train does not have is an error naming it.
    std::fs::create_dir_all(dir.path().join("val/bird")).unwrap();
    picture(16, 16, 2)
        .save(dir.path().join("val/bird/0.png"))
        .unwrap();
    let e = DataSource::Dir(dir.path().into())
        .open(&HubOptions::default(), &ColumnChoice::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bird"), "{e}");
}

#[test]
fn the_validation_choice_follows_the_data_and_the_fraction() {
    use candle_finetune::data::holdout::stratified;
    use candle_finetune::recipe::train_validation;
    let ds = candle_finetune::smoke::generated_dataset(60, 1, 0); // 10 per class
                                                                  // The data's own validation split wins over any fraction.
    let own = candle_finetune::smoke::generated_dataset(12, 1, 1);
    let tv = train_validation(ds.clone(), Some(own), 0.5, 0).unwrap();
    assert_eq!((tv.train.len(), tv.validation.unwrap().len()), (60, 12));
    assert!(tv.source.contains("validation split"));
    // A fraction: stratified, seeded (the same images for the same seed), disjoint.
    let (t1, v1) = stratified(&ds, 0.2, 9).unwrap();
    let (_, v2) = stratified(&ds, 0.2, 9).unwrap();
    let (_, v3) = stratified(&ds, 0.2, 10).unwrap();
    let key = |d: &candle_finetune::data::Dataset| {
        (0..d.len())
            .map(|i| d.encoded(i).unwrap().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&v1), key(&v2));
    assert_ne!(key(&v1), key(&v3));
    assert_eq!(v1.class_counts(), [2; 6]);
    assert_eq!(t1.len() + v1.len(), 60);
    assert!(key(&v1).iter().all(|b| !key(&t1).contains(b)));
    // Zero: everything trains, nothing chooses.
    let tv = train_validation(ds.clone(), None, 0.0, 0).unwrap();
    assert!(tv.validation.is_none() && tv.train.len() == 60);
    // Out of range, and a fraction that leaves no image.
    assert!(train_validation(ds.clone(), None, 1.0, 0).is_err());
    assert!(train_validation(ds.clone(), None, -0.1, 0).is_err());
    let one = candle_finetune::smoke::generated_dataset(1, 1, 0);
    let e = train_validation(one, None, 0.1, 0).unwrap_err().to_string();
    assert!(e.contains("`validation_fraction`"), "{e}");
}
