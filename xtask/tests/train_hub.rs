//! `cargo xtask train` against a Hub dataset repo, end to end, as a user runs it: the binary
//! with `HF_ENDPOINT` pointing at a loopback fake of the Hub serving a three-shard repo (image in
//! `img`, class in the ClassLabel `fine_label` beside an integer `coarse_label`, splits in the
//! card's YAML) and random weights.

use candle_finetune::smoke::{dataset_repo_files, weights_repo_files, RepoSpec};
use hub_fake::{FakeHub, Kind};
use std::process::Command;

#[test]
fn train_downloads_every_shard_chooses_on_validation_and_reports_test_once() {
    let hub = FakeHub::start();
    let spec = RepoSpec {
        train_shards: 3,
        train_per_shard: 40,
        validation: 24,
        test: 18,
        scale: 1,
        rows_per_group: 16,
    };
    hub.put(
        Kind::Dataset,
        "someone/shapes",
        "main",
        dataset_repo_files(&spec).unwrap(),
    );
    hub.put(
        Kind::Model,
        "someone/w",
        "main",
        weights_repo_files(224).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "train",
            "--dataset-repo",
            "someone/shapes",
            "--dataset-revision",
            "main",
            "--weights-repo",
            "someone/w",
            "--weights-revision",
            "main",
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--batch-size",
            "128",
            "--out",
        ])
        .arg(&out)
        .env("HF_ENDPOINT", hub.url())
        .env("HF_HUB_CACHE", dir.path().join("cache"))
        .env("HF_HOME", dir.path().join("home"))
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    // Every shard downloaded, every training image used.
    let shards = hub
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.url.contains("/resolve/") && r.url.contains("/data/"))
        .count();
    assert_eq!(shards, 5, "3 train + validation + test shards");
    assert!(
        log.contains("120 train / 24 validation / 18 test images, 6 classes"),
        "{log}"
    );
    let ck =
        candle_finetune::train::Checkpoint::load(&out.join("checkpoint-last.safetensors")).unwrap();
    assert_eq!(ck.meta.data.unwrap().images, 120);
    // The epoch chosen on validation; test evaluated once, for it.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(
        (
            eval["split"].as_str(),
            eval["selected_on"].as_str(),
            eval["images"].as_u64()
        ),
        (Some("test"), Some("validation"), Some(18)),
        "{eval}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let val: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["val_top1"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(val.len(), 2);
    let chosen = eval["epoch"].as_u64().unwrap() as usize;
    assert!(
        val.iter().all(|v| *v <= val[chosen - 1]),
        "{val:?} epoch {chosen}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("## Results (test split)")
            && card.contains("chosen by its validation top-1")
            && card.contains("license: cc-by-4.0")
            && card.contains("cargo xtask train`"),
        "{card}"
    );
}

#[test]
fn train_without_data_says_what_to_give() {
    let run = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["train", "--epochs", "1"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(
        log.contains("--dataset-repo") && log.contains("--data-dir"),
        "{log}"
    );
}
