//! Offline stand-ins for the Hub: a small generated image-classification dataset written as
//! parquet shards, and random ImageNet-shaped weights, both placed into a Hub cache exactly where
//! hf-hub looks for the real ones. `cargo xtask train-cars --smoke` then runs the normal code path
//! with `HF_HUB_OFFLINE=1`.

use crate::data::{parquet::write_shard, Split, DEFAULT_DATASET_REPO, DEFAULT_DATASET_REVISION};
use crate::hub::{seed_cache, RepoKind};
use crate::pretrained::{DEFAULT_FILE, DEFAULT_REPO, DEFAULT_REVISION};
use candle_core::{DType, Device, Result};
use candle_nn::{VarBuilder, VarMap};
use image::{ImageFormat, Rgb, RgbImage};
use std::path::Path;

/// Class names of the generated dataset.
pub const SMOKE_CLASSES: [&str; 6] = [
    "red square",
    "green square",
    "blue square",
    "red disc",
    "green disc",
    "blue disc",
];

/// One generated JPEG: a coloured square or disc at a random place on a noisy background,
/// about 96 x 64 pixels.
fn picture(class: usize, seed: u64) -> Vec<u8> {
    picture_scaled(class, seed, 1)
}

/// [`picture`] with every side multiplied by `scale`.
fn picture_scaled(class: usize, seed: u64, scale: u32) -> Vec<u8> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (w, h) = (
        (96 + (rnd() % 32) as u32) * scale,
        (64 + (rnd() % 32) as u32) * scale,
    );
    let r = (14 + (rnd() % 8) as i64) * scale as i64;
    let (cx, cy) = (
        r + (rnd() % (w as u64 - 2 * r as u64)) as i64,
        r + (rnd() % (h as u64 - 2 * r as u64)) as i64,
    );
    let colour = [[220u8, 40, 40], [40, 200, 40], [40, 60, 220]][class % 3];
    let disc = class >= 3;
    let img = RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as i64 - cx, y as i64 - cy);
        let inside = if disc {
            dx * dx + dy * dy <= r * r
        } else {
            dx.abs() <= r && dy.abs() <= r
        };
        let n = (rnd() % 30) as u8;
        if inside {
            Rgb(colour)
        } else {
            Rgb([120 + n, 120 + n, 120 + n])
        }
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Jpeg)
        .expect("in-memory JPEG");
    out
}

/// An in-memory dataset of `n` generated JPEGs of the [`SMOKE_CLASSES`] (classes in turn), each
/// about `96 * scale` x `64 * scale` pixels; `salt` changes every picture (e.g. train vs test).
///
/// ```
/// let ds = candle_finetune::smoke::generated_dataset(12, 1, 0);
/// assert_eq!((ds.len(), ds.num_classes()), (12, 6));
/// assert_eq!(ds.class_counts(), [2; 6]);
/// assert!(ds.load_image(5).is_ok());
/// ```
pub fn generated_dataset(n: usize, scale: u32, salt: u64) -> crate::data::Dataset {
    use rayon::prelude::*;
    let classes = SMOKE_CLASSES.len();
    let samples = (0..n)
        .into_par_iter()
        .map(|i| crate::data::Sample {
            image: crate::data::ImageData::Encoded(
                picture_scaled(
                    i % classes,
                    salt.wrapping_mul(1 << 32) ^ i as u64,
                    scale.max(1),
                )
                .into(),
            ),
            label: (i % classes) as u32,
        })
        .collect();
    crate::data::Dataset {
        samples,
        class_names: SMOKE_CLASSES.iter().map(|s| s.to_string()).collect(),
    }
}

/// Writes the generated dataset as the two shards per split of the Stanford Cars mirror into
/// `cache` (`datasets--tanganke--stanford_cars` at the pinned revision). Returns the images per
/// split.
pub fn seed_dataset(
    cache: &Path,
    train_per_class: usize,
    test_per_class: usize,
) -> Result<(usize, usize)> {
    let names: Vec<String> = SMOKE_CLASSES.iter().map(|s| s.to_string()).collect();
    let work = cache.join("smoke-src");
    std::fs::create_dir_all(&work)?;
    let mut counts = (0, 0);
    for (split, per) in [
        (Split::Train, train_per_class),
        (Split::Test, test_per_class),
    ] {
        // The mirror's file names: the run finds them by listing the cached snapshot.
        let shards: Vec<String> = (0..2)
            .map(|i| format!("data/{}-{i:05}-of-00002.parquet", split.name()))
            .collect();
        let mut rows: Vec<Vec<(Vec<u8>, i64)>> = vec![Vec::new(); shards.len()];
        let mut k = 0;
        for c in 0..names.len() {
            for i in 0..per {
                let seed = (split == Split::Test) as u64 * 1_000_000 + (c * 1000 + i) as u64;
                rows[k % shards.len()].push((picture(c, seed), c as i64));
                k += 1;
            }
        }
        for (shard, rows) in shards.iter().zip(rows) {
            let local = work.join(shard.replace('/', "_"));
            write_shard(&local, &rows, &names).map_err(candle_core::Error::Msg)?;
            seed_cache(
                cache,
                RepoKind::Dataset,
                DEFAULT_DATASET_REPO,
                DEFAULT_DATASET_REVISION,
                shard,
                &local,
            )?;
        }
        if split == Split::Train {
            counts.0 = k;
        } else {
            counts.1 = k;
        }
    }
    Ok(counts)
}

/// The files of a model repo holding random 1000-class ResNet-18 weights (`model.safetensors`,
/// torchvision names) and a timm-style `config.json` at `size` pixels: a stand-in for
/// `timm/resnet18.tv_in1k` that needs no download.
///
/// ```
/// let files = candle_finetune::smoke::weights_repo_files(64).unwrap();
/// assert_eq!(files.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(), ["model.safetensors", "config.json"]);
/// ```
pub fn weights_repo_files(size: u32) -> Result<Vec<(String, Vec<u8>)>> {
    let work = tempfile::tempdir()?;
    let vm = VarMap::new();
    candle_resnet::resnet::resnet18(1000, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let w = work.path().join("model.safetensors");
    candle_resnet::export::export_safetensors(&vm, 0, &w)?;
    let cfg = serde_json::json!({
        "architecture": "resnet18",
        "num_classes": 1000,
        "pretrained_cfg": {
            "input_size": [3, size, size], "interpolation": "bilinear", "crop_pct": 0.875,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]
        }
    });
    Ok(vec![
        (DEFAULT_FILE.to_string(), std::fs::read(&w)?),
        (
            "config.json".to_string(),
            serde_json::to_vec_pretty(&cfg).map_err(candle_core::Error::wrap)?,
        ),
    ])
}

/// Writes [`weights_repo_files`] as `timm/resnet18.tv_in1k` at the pinned revision into
/// `cache`.
pub fn seed_weights(cache: &Path, size: u32) -> Result<()> {
    let work = cache.join("smoke-src");
    std::fs::create_dir_all(&work)?;
    for (name, bytes) in weights_repo_files(size)? {
        let local = work.join(&name);
        std::fs::write(&local, bytes)?;
        seed_cache(
            cache,
            RepoKind::Model,
            DEFAULT_REPO,
            DEFAULT_REVISION,
            &name,
            &local,
        )?;
    }
    Ok(())
}

/// The shape of a generated Hub dataset repo ([`dataset_repo_files`]): what the `datasets`
/// library writes for a dataset such as CIFAR-100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    /// Training shards (`data/train-0000k-of-0000N.parquet`).
    pub train_shards: usize,
    /// Images per training shard.
    pub train_per_shard: usize,
    /// Validation images (`data/validation-00000-of-00001.parquet`; 0: no validation split).
    pub validation: usize,
    /// Test images (`data/test-00000-of-00001.parquet`; 0: no test split).
    pub test: usize,
    /// Picture size multiplier (1: about 96 x 64 pixels).
    pub scale: u32,
    /// Rows per parquet row group (0: one group per shard).
    pub rows_per_group: usize,
}

/// The files of a generated dataset repo in the common Hub shape: shards of [`SMOKE_CLASSES`]
/// pictures with the image in column `img`, the class in the ClassLabel column `fine_label`
/// beside a plain integer column `coarse_label`, and a `README.md` whose YAML declares the
/// splits (`configs: data_files`), the features (`dataset_info`) and the licence (`cc-by-4.0`).
///
/// ```
/// use candle_finetune::smoke::{dataset_repo_files, RepoSpec};
/// let files = dataset_repo_files(&RepoSpec { train_shards: 3, train_per_shard: 4, validation: 2,
///     test: 2, scale: 1, rows_per_group: 0 }).unwrap();
/// let names: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
/// assert!(names.contains(&"data/train-00002-of-00003.parquet") && names.contains(&"README.md"));
/// ```
pub fn dataset_repo_files(spec: &RepoSpec) -> Result<Vec<(String, Vec<u8>)>> {
    use crate::data::parquet::{write_shard_with, ShardLayout};
    let names: Vec<String> = SMOKE_CLASSES.iter().map(|s| s.to_string()).collect();
    let layout = ShardLayout {
        image_column: "img".into(),
        label_column: "fine_label".into(),
        extra_integer_column: Some("coarse_label".into()),
        rows_per_group: spec.rows_per_group,
    };
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    let mut shard = |name: String, n: usize, salt: u64| -> Result<()> {
        let ds = generated_dataset(n, spec.scale, salt);
        let rows: Vec<(Vec<u8>, i64)> = (0..ds.len())
            .map(|i| {
                ds.encoded(i)
                    .map(|b| (b.to_vec(), ds.samples[i].label as i64))
                    .map_err(candle_core::Error::Msg)
            })
            .collect::<Result<_>>()?;
        let p = dir.path().join("shard.parquet");
        write_shard_with(&p, &rows, &names, &layout).map_err(candle_core::Error::Msg)?;
        files.push((name, std::fs::read(&p)?));
        Ok(())
    };
    let t = spec.train_shards;
    for k in 0..t {
        shard(
            format!("data/train-{k:05}-of-{t:05}.parquet"),
            spec.train_per_shard,
            10 + k as u64,
        )?;
    }
    let mut data_files = vec![("train", "data/train-*")];
    if spec.validation > 0 {
        shard(
            "data/validation-00000-of-00001.parquet".into(),
            spec.validation,
            2,
        )?;
        data_files.push(("validation", "data/validation-*"));
    }
    if spec.test > 0 {
        shard("data/test-00000-of-00001.parquet".into(), spec.test, 3)?;
        data_files.push(("test", "data/test-*"));
    }
    let mut card =
        String::from("---\nlicense: cc-by-4.0\nconfigs:\n- config_name: default\n  data_files:\n");
    for (split, path) in data_files {
        card += &format!("  - split: {split}\n    path: {path}\n");
    }
    card += "dataset_info:\n  features:\n  - name: img\n    dtype: image\n  - name: fine_label\n    dtype:\n      class_label:\n        names:\n";
    for (i, n) in names.iter().enumerate() {
        card += &format!("          '{i}': {n}\n");
    }
    card += "  - name: coarse_label\n    dtype: int64\n---\n\n# Generated shapes\n\nPictures of coloured squares and discs, generated for tests.\n";
    files.push(("README.md".into(), card.into_bytes()));
    Ok(files)
}
