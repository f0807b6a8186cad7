//! The published model's template folder (models/resnet18-stanford-cars) and the card renderer.

use candle_finetune::card::{model_card, render, Outcome, Provenance, CARD_TEMPLATE};
use candle_finetune::config::ModelConfig;
use candle_finetune::data::{DatasetInfo, STANFORD_CARS_CLASSES_JSON};
use candle_finetune::eval::EvalResult;
use candle_finetune::train::Selection;
use candle_resnet::resnet::Arch;
use std::collections::BTreeMap;

fn models_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/resnet18-stanford-cars")
}

#[test]
fn the_crate_assets_are_the_published_model_files() {
    // The crate carries its own copies (so that `cargo package` works); models/ is what is
    // published. They must not drift apart.
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    for (asset, published) in [
        ("card.md", "card.md"),
        ("stanford_cars_classes.json", "classes.json"),
    ] {
        let a = std::fs::read(assets.join(asset)).unwrap();
        let b = std::fs::read(models_dir().join(published)).unwrap();
        assert!(a == b, "assets/{asset} differs from models/resnet18-stanford-cars/{published}: copy one over the other");
    }
}

#[test]
fn template_config_matches_the_class_list() {
    let classes: Vec<String> = serde_json::from_str(STANFORD_CARS_CLASSES_JSON).unwrap();
    assert_eq!(classes.len(), 196);
    let unique: std::collections::BTreeSet<&String> = classes.iter().collect();
    assert_eq!(unique.len(), 196, "class names are distinct");
    assert_eq!(classes[0], "AM General Hummer SUV 2000");
    assert_eq!(classes[195], "smart fortwo Convertible 2012");
    let text = std::fs::read_to_string(models_dir().join("config.json")).unwrap();
    let cfg: ModelConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg.class_names(), classes);
    // The config train-cars would write for these classes with the default preprocessing.
    assert_eq!(
        cfg,
        ModelConfig::new(Arch::ResNet18, &classes, &Default::default())
    );
}

#[test]
fn card_template_names_every_section_the_hub_needs() {
    for needle in [
        "{{results}}",
        "## Recipe",
        "## Intended use",
        "## Licence",
        "from_pretrained",
        "timm.create_model",
        "{{front_matter}}",
    ] {
        assert!(CARD_TEMPLATE.contains(needle), "{needle}");
    }
}

#[test]
fn render_fills_every_placeholder_or_fails() {
    let mut v = BTreeMap::new();
    v.insert("a", "1".to_string());
    v.insert("b", "two".to_string());
    assert_eq!(render("x{{a}}y{{ b }}z", &v).unwrap(), "x1ytwoz");
    let err = render("{{a}} {{missing}}", &v).unwrap_err().to_string();
    assert!(err.contains("no value for {{missing}}"), "{err}");
    assert!(render("{{a", &v)
        .unwrap_err()
        .to_string()
        .contains("unclosed"));
}

#[test]
fn stanford_cars_names_only_replace_index_names() {
    use candle_finetune::data::Dataset;
    let named = Dataset {
        samples: vec![],
        class_names: vec!["a".into(), "b".into()],
    };
    assert_eq!(
        named.with_stanford_cars_names().unwrap().class_names,
        ["a", "b"]
    );
    let wrong = Dataset {
        samples: vec![],
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    let err = wrong.with_stanford_cars_names().unwrap_err().to_string();
    assert!(err.contains("10 unnamed classes"), "{err}");
}

fn card_for(dataset: DatasetInfo, classes: &[String]) -> String {
    let cfg = ModelConfig::new(Arch::ResNet18, classes, &Default::default());
    let prov = Provenance {
        base_model: "timm/resnet18.tv_in1k@abc".into(),
        base_model_hub_id: Some("timm/resnet18.tv_in1k".into()),
        dataset,
    };
    let args = serde_json::json!({"label_smoothing": 0.1, "epochs": 3, "smoke": false});
    let test = EvalResult {
        top1: 0.5,
        top5: 0.9,
        n: 10,
        ..Default::default()
    };
    let outcome = Outcome {
        test: Some(test),
        validation: Some(EvalResult {
            top1: 0.625,
            n: 8,
            ..Default::default()
        }),
        epoch: 2,
        selected_on: Selection::Validation,
        validation_source: "the dataset's validation split (8 images)".into(),
    };
    model_card(&cfg, &prov, &args, &outcome).unwrap()
}

#[test]
fn the_card_says_what_chose_the_epoch_and_reports_test_once() {
    let classes: Vec<String> = vec!["a".into(), "b".into()];
    let card = card_for(DatasetInfo::local("x"), &classes);
    assert!(card.contains("## Results (test split)"), "{card}");
    assert!(
        card.contains("Epoch 2 was chosen by its validation top-1")
            && card.contains("evaluated once, on the chosen model (its validation top-1: 62.50 %)")
            && card.contains("| top-1 accuracy | 50.00 % |")
            && card.contains("| test images | 10 |"),
        "{card}"
    );
    assert!(!card.contains("chosen by its test"), "{card}");
    assert!(card.contains("| precision | f32 |"), "{card}");
    assert!(
        card.contains("| mixing, EMA, erasing, clipping, drop path | none |"),
        "{card}"
    );
    // Without a test split: the validation figures, said to be optimistic; model-index on
    // the validation split.
    let cfg = ModelConfig::new(Arch::ResNet18, &classes, &Default::default());
    let prov = Provenance {
        base_model: "b".into(),
        base_model_hub_id: None,
        dataset: DatasetInfo::local("x"),
    };
    let v = EvalResult {
        top1: 0.75,
        n: 4,
        ..Default::default()
    };
    let o = Outcome {
        test: None,
        validation: Some(v),
        epoch: 3,
        selected_on: Selection::Validation,
        validation_source: "10 % held out".into(),
    };
    let args = serde_json::json!({"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5, "mixup_mode": "batch", "model_ema": true,
        "model_ema_decay": 0.9998, "reprob": 0.25, "remode": "pixel", "recount": 1,
        "clip_grad": 1.0, "drop_path": 0.05, "scale": [0.25, 1.0], "ratio": [0.75, 1.3333333333333333],
        "hflip": 0.5, "auto_augment": "ta_wide", "color_jitter": [0.4], "amp": "bf16"});
    let card = model_card(&cfg, &prov, &args, &o).unwrap();
    assert!(
        card.contains("| precision | bf16 mixed precision"),
        "{card}"
    );
    assert!(
        card.contains("train: RandomResizedCrop (scale 0.25-1, ratio 0.75-1.333) + horizontal flip 0.5 + TrivialAugmentWide + ColorJitter 0.4; eval:"),
        "{card}"
    );
    assert!(
        card.contains("## Results (validation split)") && card.contains("optimistic"),
        "{card}"
    );
    assert!(
        card.contains("mixup alpha 0.2 + CutMix alpha 1 (probability 1, switch 0.5, per batch); weight EMA decay 0.9998; random erasing 0.25 (pixel, 1 box); gradient norm clipped to 1; drop path 0.05"),
        "{card}"
    );
    assert!(front_matter(&card).contains("split: validation"));
    // The last epoch kept, nothing evaluated.
    let o = Outcome {
        test: None,
        validation: None,
        epoch: 5,
        selected_on: Selection::LastEpoch,
        validation_source: "none".into(),
    };
    let card = model_card(&cfg, &prov, &serde_json::json!({}), &o).unwrap();
    assert!(card.contains("Epoch 5 is the last one") && card.contains("nothing was evaluated"));
    assert!(!front_matter(&card).contains("accuracy"));
}

fn front_matter(card: &str) -> &str {
    let rest = card.strip_prefix("---\n").expect("front matter");
    &rest[..rest.find("\n---").expect("end of front matter")]
}

#[test]
fn the_card_names_the_data_actually_used() {
    let classes: Vec<String> = serde_json::from_str(STANFORD_CARS_CLASSES_JSON).unwrap();
    let cars = card_for(DatasetInfo::stanford_cars(), &classes);
    let fm = front_matter(&cars);
    assert!(
        fm.contains("license: other\nlicense_name: stanford-cars-non-commercial"),
        "{fm}"
    );
    assert!(fm.contains("datasets:\n- tanganke/stanford_cars"), "{fm}");
    assert!(fm.contains("name: resnet18-stanford-cars"), "{fm}");
    assert!(cars.contains("# resnet18 fine-tuned on Stanford Cars"));
    assert!(cars.contains("196 car models"));
    assert!(cars.contains("non-commercial research purposes only"));

    // A local folder with a dataset.json: its name and licence, nothing of Stanford Cars.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("flowers-102");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("dataset.json"),
        r#"{"name": "Oxford Flowers 102", "license": "cc-by-4.0"}"#,
    )
    .unwrap();
    let names: Vec<String> = (0..3).map(|i| format!("flower {i}")).collect();
    let info = DatasetInfo::from_dir(&data).unwrap();
    let flowers = card_for(info, &names);
    let fm = front_matter(&flowers);
    assert!(fm.contains("license: cc-by-4.0\n"), "{fm}");
    assert!(
        !fm.contains("datasets:"),
        "a local dataset has no Hub id: {fm}"
    );
    assert!(fm.contains("name: resnet18-oxford-flowers-102"), "{fm}");
    assert!(fm.contains("      name: Oxford Flowers 102\n"), "{fm}");
    assert!(flowers.contains("# resnet18 fine-tuned on Oxford Flowers 102"));
    assert!(flowers.contains("licensed `cc-by-4.0`"));
    for word in ["Stanford", "car model", "non-commercial", "Krause"] {
        assert!(
            !flowers.contains(word),
            "{word:?} in a card for flowers:\n{flowers}"
        );
    }
    let root = dir.path().to_string_lossy().into_owned();
    assert!(!flowers.contains(&root), "absolute path in the card");

    // A folder without metadata: its name, licence unknown; flags override both.
    let plain = tempfile::tempdir().unwrap();
    let birds = plain.path().join("birds");
    std::fs::create_dir(&birds).unwrap();
    let info = DatasetInfo::from_dir(&birds).unwrap();
    assert_eq!(info.name, "birds");
    let card = card_for(info.clone(), &names);
    assert!(front_matter(&card).contains("license: unknown"));
    assert!(card.contains("was not given"));
    assert!(!card.contains(&plain.path().to_string_lossy().into_owned()));
    let card = card_for(
        info.with_overrides(Some("CUB-200: birds"), Some("mit")),
        &names,
    );
    let fm = front_matter(&card);
    assert!(
        fm.contains("license: mit\n") && fm.contains("name: \"CUB-200: birds\""),
        "{fm}"
    );
}

/// The card declares timm (a library the Hub knows) and quotes every user-given string of the
/// front matter, so names with `:`, `#`, quotes or a leading `-` stay one YAML scalar.
#[test]
fn front_matter_is_timm_and_escapes_user_strings() {
    let info = DatasetInfo {
        name: "cars: \"the #1 set\"".into(),
        hub_id: Some("me/cars: v2".into()),
        license: Some("- other".into()),
        license_name: Some("my licence: v1".into()),
        ..DatasetInfo::stanford_cars()
    };
    let card = card_for(info, &["a".to_string(), "b".to_string()]);
    let fm = front_matter(&card);
    assert!(fm.starts_with("library_name: timm\n"), "{fm}");
    assert!(fm.contains("- timm\n- candle\n"), "{fm}");
    assert!(fm.contains("license: \"- other\"\n"), "{fm}");
    assert!(fm.contains("license_name: \"my licence: v1\"\n"), "{fm}");
    assert!(fm.contains("datasets:\n- \"me/cars: v2\"\n"), "{fm}");
    assert!(fm.contains("name: \"cars: \\\"the #1 set\\\"\""), "{fm}");
    assert!(fm.contains("base_model: timm/resnet18.tv_in1k\n"), "{fm}");
    assert!(fm.contains("split: test"), "{fm}");
    assert!(card.contains("timm.create_model(\"hf-hub:OWNER/NAME\", pretrained=True)"));
    assert!(card.contains("p.predict("));
}
