//! The README's first command, `cargo xtask train-cars --smoke`, as a user runs it: the binary
//! generates its dataset and weights in a temporary Hub cache, trains two epochs offline and
//! writes the model folder. (CI also runs this test on the oneDNN build.)

use std::path::Path;
use std::process::Command;

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn train_cars_smoke_writes_the_model_folder_chosen_on_validation() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("smoke");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["train-cars", "--smoke", "--eval-every", "1", "--out"])
        .arg(&out_dir)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the xtask binary runs");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    for f in [
        "model.safetensors",
        "config.json",
        "README.md",
        "eval.json",
        "metrics.jsonl",
        "curves.png",
        "reliability.png",
        "training_args.json",
    ] {
        let len = std::fs::metadata(out_dir.join(f)).map_or(0, |m| m.len());
        assert!(len > 0, "{f} missing or empty\n{log}");
    }
    let eval = json(&out_dir.join("eval.json"));
    assert_eq!(eval["split"], "test", "{eval}");
    assert_eq!(eval["selected_on"], "validation", "{eval}");
    let epochs = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        epochs.lines().count(),
        2,
        "two epochs, each evaluated:\n{epochs}"
    );
    let config = json(&out_dir.join("config.json"));
    assert_eq!(config["architecture"], "resnet18", "{config}");
}
