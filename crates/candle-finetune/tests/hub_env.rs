//! `HF_HUB_OFFLINE` and `HF_HUB_CACHE` from the environment. One test in its own binary: it sets
//! process-wide variables.

use candle_finetune::hub::{seed_cache, HubOptions, RepoKind};
use candle_finetune::pretrained::WeightsSource;

#[test]
fn environment_selects_cache_and_offline_mode() {
    let cache = tempfile::tempdir().unwrap();
    let src = cache.path().join("w.safetensors");
    std::fs::write(&src, b"not really weights").unwrap();
    let rev = "2222222222222222222222222222222222222222";
    seed_cache(
        cache.path(),
        RepoKind::Model,
        "env/test",
        rev,
        "model.safetensors",
        &src,
    )
    .unwrap();
    let source = WeightsSource::Hub {
        repo: "env/test".into(),
        revision: "main".into(),
        file: "model.safetensors".into(),
    };

    for (value, offline) in [
        ("1", true),
        ("TRUE", true),
        ("yes", true),
        ("0", false),
        ("false", false),
    ] {
        std::env::set_var("HF_HUB_OFFLINE", value);
        assert_eq!(
            HubOptions::from_env().offline,
            offline,
            "HF_HUB_OFFLINE={value}"
        );
    }
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let p = HubOptions::from_env().resolve(&source).unwrap();
    assert!(p.starts_with(cache.path()));
    assert_eq!(std::fs::read(p).unwrap(), b"not really weights");
    // HF_HOME/hub is the fallback when HF_HUB_CACHE is unset.
    std::env::remove_var("HF_HUB_CACHE");
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("hub")).unwrap();
    seed_cache(
        &home.path().join("hub"),
        RepoKind::Model,
        "env/test",
        rev,
        "model.safetensors",
        &src,
    )
    .unwrap();
    std::env::set_var("HF_HOME", home.path());
    let p = HubOptions::from_env().resolve(&source).unwrap();
    assert!(p.starts_with(home.path()));
}
