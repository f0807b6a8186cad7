//! config.json in timm's format: checked against timm's own `PretrainedCfg` fields and a
//! config.json timm wrote (fixtures/timm, from gen_timm_fixtures.py), and folders in the flat
//! format of earlier versions keep loading.

use candle_core::{DType, Device};
use candle_finetune::config::ModelConfig;
use candle_finetune::data::{Interpolation, Preprocess};
use candle_finetune::hub::HubOptions;
use candle_finetune::pretrained::{from_pretrained, Pretrained};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::Arch;
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/timm")
        .join(name)
}

fn read_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

/// Whether `v` has the JSON shape of timm's annotated type `ty` (as `str(field.type)` prints).
fn fits(ty: &str, v: &Value) -> bool {
    if v.is_null() {
        return ty.contains("Optional") || ty.contains("NoneType");
    }
    let list_of = |f: fn(&Value) -> bool| v.as_array().is_some_and(|a| a.iter().all(f));
    if ty.contains("Tuple[int") {
        list_of(|x| x.is_u64())
    } else if ty.contains("Tuple[float") {
        list_of(|x| x.is_number())
    } else if ty.contains("Tuple[str") && !ty.starts_with("typing.Union[str") {
        list_of(|x| x.is_string())
    } else if ty.contains("bool") {
        v.is_boolean()
    } else if ty.contains("int") {
        v.is_u64() || v.is_i64()
    } else if ty.contains("float") {
        v.is_number()
    } else if ty.contains("str") {
        v.is_string()
    } else {
        false
    }
}

/// The preprocessing gen_timm_fixtures.py gave timm's own config (timm_written/config.json).
fn fixture_preprocess() -> Preprocess {
    Preprocess {
        size: 160,
        crop_pct: 0.95,
        interpolation: Interpolation::Bicubic,
        mean: [0.5, 0.4, 0.3],
        std: [0.2, 0.25, 0.3],
    }
}

fn ours(pre: &Preprocess) -> Value {
    let names: Vec<String> = ["Audi A4 \"B8\"", "chat: noir", "smart fortwo"]
        .map(String::from)
        .to_vec();
    let cfg = ModelConfig::new(Arch::ResNet18, &names, pre).with_license(Some("cc-by-4.0".into()));
    serde_json::to_value(&cfg).unwrap()
}

#[test]
fn every_pretrained_cfg_key_is_a_timm_field_of_its_type() {
    let fields = read_json("pretrained_cfg_fields.json");
    let fields = fields["fields"].as_object().unwrap();
    for pre in [Preprocess::default(), fixture_preprocess()] {
        let v = ours(&pre);
        let pc = v["pretrained_cfg"].as_object().unwrap();
        for (k, x) in pc {
            let ty = fields
                .get(k)
                .unwrap_or_else(|| panic!("pretrained_cfg.{k} is not a PretrainedCfg field"));
            assert!(
                fits(ty.as_str().unwrap(), x),
                "pretrained_cfg.{k} = {x} is not {ty}"
            );
        }
        for k in [
            "input_size",
            "interpolation",
            "crop_pct",
            "crop_mode",
            "mean",
            "std",
            "num_classes",
            "pool_size",
            "first_conv",
            "classifier",
            "license",
        ] {
            assert!(pc.contains_key(k), "pretrained_cfg lacks {k}");
        }
        // The top level: what timm's load_model_config_from_hf reads.
        let top: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in &top {
            assert!(
                [
                    "architecture",
                    "num_classes",
                    "num_features",
                    "global_pool",
                    "label_names",
                    "label_descriptions",
                    "model_args",
                    "pretrained_cfg"
                ]
                .contains(k),
                "top-level key {k} is not one timm reads"
            );
        }
        assert_eq!(
            v["pretrained_cfg"]["input_size"],
            serde_json::json!([3, pre.size, pre.size])
        );
        assert_eq!(v["num_features"], 512);
    }
}

#[test]
fn same_keys_and_shapes_as_the_config_timm_writes() {
    let timm = read_json("timm_written/config.json");
    let v = ours(&fixture_preprocess());
    for k in [
        "architecture",
        "num_classes",
        "num_features",
        "global_pool",
        "label_names",
    ] {
        assert_eq!(v[k], timm[k], "{k}");
    }
    for k in [
        "input_size",
        "interpolation",
        "crop_pct",
        "crop_mode",
        "mean",
        "std",
        "num_classes",
        "first_conv",
        "classifier",
        "license",
        "custom_load",
        "fixed_input_size",
    ] {
        assert_eq!(
            v["pretrained_cfg"][k], timm["pretrained_cfg"][k],
            "pretrained_cfg.{k}"
        );
    }
    // timm copies its 224 px pool_size ([7, 7]) whatever the input; ours is the real final map
    // (ceil(160 / 32) = 5), the same shape.
    assert_eq!(v["pretrained_cfg"]["pool_size"], serde_json::json!([5, 5]));
    assert_eq!(
        timm["pretrained_cfg"]["pool_size"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn reads_the_config_timm_wrote() {
    let text = std::fs::read_to_string(fixture("timm_written/config.json")).unwrap();
    let cfg: ModelConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg.architecture, Arch::ResNet18);
    assert_eq!(
        cfg.class_names(),
        ["Audi A4 \"B8\"", "chat: noir", "smart fortwo"]
    );
    let p = cfg.preprocess();
    assert_eq!(
        (p.size, p.crop_pct, p.interpolation),
        (160, 0.95, Interpolation::Bicubic)
    );
    assert_eq!((p.mean, p.std), ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]));
    assert_eq!(cfg.license.as_deref(), Some("cc-by-4.0"));
    // The base model's preprocessing, as the recipe reads it.
    assert_eq!(Preprocess::from_timm_config(&text).unwrap(), p);
}

#[test]
fn unsupported_preprocessing_is_a_clear_error() {
    let e = Preprocess::from_timm_config(r#"{"pretrained_cfg": {"crop_mode": "squash"}}"#);
    assert!(e.unwrap_err().contains("crop_mode \"squash\""));
    let e = Preprocess::from_timm_config(r#"{"pretrained_cfg": {"input_size": [3, 224, 160]}}"#);
    assert!(e.unwrap_err().contains("input_size"));
    let e: Result<ModelConfig, _> = serde_json::from_str(
        r#"{"architecture": "vit_base", "num_classes": 2, "pretrained_cfg": {}}"#,
    );
    assert!(e.unwrap_err().to_string().contains("unknown architecture"));
    let e: Result<ModelConfig, _> = serde_json::from_str(
        r#"{"architecture": "resnet18", "num_classes": 3, "label_names": ["a"], "pretrained_cfg": {}}"#,
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("1 label_names for num_classes 3"));
}

/// A model folder with `config` as its config.json (text) and random weights for `n` classes,
/// loaded back with `from_pretrained`.
fn random_folder(config: &str, n: usize) -> (tempfile::TempDir, Pretrained) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let varmap = VarMap::new();
    Arch::ResNet18
        .build(
            n,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
    varmap.save(dir.path().join("model.safetensors")).unwrap();
    let p = from_pretrained(
        &HubOptions::default(),
        dir.path().to_str().unwrap(),
        None,
        &Device::Cpu,
    )
    .unwrap();
    (dir, p)
}

/// A folder written before the timm format (flat config.json with id2label, image_size, ...)
/// loads with `from_pretrained`, class names in order.
#[test]
fn a_folder_in_the_old_format_still_loads() {
    let old: Value = read_json("legacy_config.json");
    let n = old["num_classes"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(fixture("legacy_config.json")).unwrap();
    let (_dir, p) = random_folder(&text, n);
    assert_eq!(p.labels.len(), n);
    for (i, name) in p.labels.iter().enumerate() {
        assert_eq!(old["id2label"][i.to_string()], *name);
    }
    assert_eq!(
        p.config.image_size,
        old["image_size"].as_u64().unwrap() as u32
    );
    // Written back, it is in timm's format with the same content.
    let again: ModelConfig =
        serde_json::from_value(serde_json::to_value(&p.config).unwrap()).unwrap();
    assert_eq!(again, p.config);
}

/// `Pretrained::predict`: the config's preprocessing, softmax, top-k, most probable first;
/// an undecodable image is an error naming it.
#[test]
fn predict_gives_the_top_classes_of_each_image() {
    use candle_finetune::data::Preprocess;
    let names: Vec<String> = ["b", "a", "c", "d"].map(String::from).to_vec();
    let pre = Preprocess {
        size: 32,
        ..Default::default()
    };
    let cfg = ModelConfig::new(Arch::ResNet18, &names, &pre);
    let (_dir, p) = random_folder(&serde_json::to_string(&cfg).unwrap(), names.len());
    let png = |shade: u8| {
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([shade, (x * 6) as u8, (y * 8) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let top = p.predict(&[png(10), png(200)], 3).unwrap();
    assert_eq!(top.len(), 2);
    for t in &top {
        assert_eq!(t.len(), 3);
        assert!(t.windows(2).all(|w| w[0].1 >= w[1].1), "{t:?}");
        assert!(t
            .iter()
            .all(|(n, pr)| names.contains(n) && (0.0..=1.0).contains(pr)));
    }
    // k larger than the class count: every class once, probabilities summing to 1.
    let all = p.predict(&[png(10)], 10).unwrap();
    assert_eq!(all[0].len(), 4);
    let s: f32 = all[0].iter().map(|(_, pr)| pr).sum();
    assert!((s - 1.0).abs() < 1e-5, "{s}");
    let e = p
        .predict(&[png(10), b"not an image".to_vec()], 1)
        .unwrap_err();
    assert!(e.to_string().contains("image 1"), "{e}");
    assert!(p.predict::<Vec<u8>>(&[], 5).unwrap().is_empty());
}
