//! The published model's template folder (models/resnet18-stanford-cars) and the card renderer.

use candle_finetune::card::{render, ModelConfig, CARD_TEMPLATE, STANFORD_CARS_CLASSES_JSON};
use candle_finetune::resnet::Arch;
use std::collections::BTreeMap;

fn models_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/resnet18-stanford-cars")
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
        "## Results",
        "## Recipe",
        "## Intended use",
        "non-commercial",
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
