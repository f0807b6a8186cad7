//! The fine-tuning recipe end to end, as `cargo xtask train` / `train-cars` run it: the offline
//! smoke run, and a local image folder with local weights whose model folder must describe that
//! data.

use candle_finetune::data::DataSource;
use candle_finetune::pretrained::WeightsSource;
use candle_finetune::recipe::FineTune;
use candle_finetune::train::{ScheduleKind, TrainConfig};
use candle_nn::{VarBuilder, VarMap};
use image::{Rgb, RgbImage};

const FILES: [&str; 8] = [
    "model.safetensors",
    "config.json",
    "README.md",
    "eval.json",
    "metrics.jsonl",
    "curves.png",
    "reliability.png",
    "training_args.json",
];

#[test]
fn smoke_run_writes_the_whole_model_folder_offline() {
    let out = tempfile::tempdir().unwrap();
    let (recipe, cache) = FineTune {
        out: out.path().join("smoke"),
        ..Default::default()
    }
    .smoke()
    .unwrap();
    assert!(recipe.hub.offline && recipe.hub.cache_dir.as_deref() == Some(cache.path()));
    let report = recipe.run().unwrap();
    assert_eq!(report.fit.history.len(), 2);
    assert_eq!(report.config.num_classes, 6);
    for f in FILES {
        let len = std::fs::metadata(report.out.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    // The epoch is chosen on 10 % of train held out (the smoke data has no validation split);
    // the 36 test images are evaluated once, for that epoch.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.out.join("eval.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            eval["split"].as_str(),
            eval["selected_on"].as_str(),
            eval["images"].as_u64()
        ),
        (Some("test"), Some("validation"), Some(36)),
        "{eval}"
    );
    assert_eq!(eval["epoch"].as_u64(), Some(report.fit.best_epoch as u64));
    assert_eq!(report.test.as_ref().unwrap().n, 36);
    let val = report.fit.best.as_ref().unwrap();
    assert_eq!(
        val.n, 10,
        "10 % of 96 training images, stratified over 6 classes"
    );
    let metrics = std::fs::read_to_string(report.out.join("metrics.jsonl")).unwrap();
    for l in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(m["val_top1"].is_number(), "{l}");
    }
    let card = std::fs::read_to_string(report.out.join("README.md")).unwrap();
    assert!(card.contains("Smoke run") && card.contains("generated smoke-test shapes"));
    assert!(card.contains("chosen by its validation top-1") && card.contains("evaluated once"));
    assert!(
        !card.contains("Stanford"),
        "the smoke data is not Stanford Cars"
    );
}

#[test]
fn a_local_dataset_and_weights_file_give_a_card_about_that_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("my-flowers");
    for split in ["train", "test"] {
        for (c, colour) in [("daisy", [230u8, 230, 40]), ("rose", [200, 20, 40])] {
            let d = data.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..4u32 {
                RgbImage::from_fn(40, 36, |x, y| {
                    Rgb(colour.map(|v| v.wrapping_add(((x + y + i) % 7) as u8)))
                })
                .save(d.join(format!("{i}.png")))
                .unwrap();
            }
        }
    }
    std::fs::write(
        data.join("dataset.json"),
        r#"{"name": "My Flowers", "license": "cc-by-4.0", "classes": "flower species"}"#,
    )
    .unwrap();
    let weights = dir.path().join("init.safetensors");
    let vm = VarMap::new();
    candle_resnet::resnet18(
        1000,
        VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu),
    )
    .unwrap();
    candle_resnet::export::export_safetensors(&vm, 0, &weights).unwrap();
    let out = dir.path().join("run");
    let report = FineTune {
        data: DataSource::Dir(data.clone()),
        weights: WeightsSource::File(weights),
        train: TrainConfig {
            epochs: 1,
            batch_size: 4,
            lr: 0.01,
            schedule: ScheduleKind::Cosine,
            ..Default::default()
        },
        image_size: Some(32),
        out: out.clone(),
        ..Default::default()
    }
    .run()
    .unwrap();
    assert_eq!(report.config.class_names(), ["daisy", "rose"]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("fine-tuned on My Flowers") && card.contains("2 flower species"));
    assert!(card.contains("license: cc-by-4.0") && card.contains("local file init.safetensors"));
    let root = dir.path().to_string_lossy().into_owned();
    for f in [
        "README.md",
        "config.json",
        "training_args.json",
        "eval.json",
    ] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(!text.contains(&root), "{f} holds the local path {root}");
        assert!(!text.contains("Stanford"), "{f} mentions Stanford Cars");
    }
}
