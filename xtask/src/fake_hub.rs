//! `cargo xtask fake-hub`: serve a generated dataset repo (the common Hub shape: three train
//! shards, validation and test splits, the image in `img`, the class in the ClassLabel
//! `fine_label` beside an integer `coarse_label`, splits declared in the card's YAML) and a
//! random-weights ResNet-18 repo on a loopback fake of the Hub's API, so that `cargo xtask
//! train --dataset-repo ...` can be tried, measured and tested end to end without the network.

use anyhow::Result;
use candle_finetune::smoke::{dataset_repo_files, weights_repo_files, RepoSpec};
use hub_fake::{FakeHub, Kind};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Training images, spread over --train-shards shards.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Training shards.
    #[arg(long, default_value_t = 3)]
    pub train_shards: usize,
    /// Validation images.
    #[arg(long, default_value_t = 200)]
    pub validation: usize,
    /// Test images.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    /// Picture size multiplier (1: about 96 x 64 pixels).
    #[arg(long, default_value_t = 1)]
    pub scale: u32,
    /// Rows per parquet row group.
    #[arg(long, default_value_t = 256)]
    pub rows_per_group: usize,
    /// Id of the dataset repo.
    #[arg(long, default_value = "someone/shapes")]
    pub dataset_repo: String,
    /// Id of the weights repo.
    #[arg(long, default_value = "someone/resnet18-random")]
    pub weights_repo: String,
    /// Serve this many seconds, then stop (default: until killed).
    #[arg(long)]
    pub seconds: Option<u64>,
}

/// Starts the fake Hub with both repos on branch `main`.
pub fn start(a: &Args) -> Result<FakeHub> {
    let hub = FakeHub::start();
    let per_shard = a.images.div_ceil(a.train_shards.max(1));
    let files = dataset_repo_files(&RepoSpec {
        train_shards: a.train_shards.max(1),
        train_per_shard: per_shard,
        validation: a.validation,
        test: a.test,
        scale: a.scale,
        rows_per_group: a.rows_per_group,
    })?;
    let bytes: usize = files.iter().map(|f| f.1.len()).sum();
    let d = hub.put(Kind::Dataset, &a.dataset_repo, "main", files);
    let w = hub.put(
        Kind::Model,
        &a.weights_repo,
        "main",
        weights_repo_files(224)?,
    );
    eprintln!(
        "fake Hub at {}: dataset {} (commit {d}, {} train images in {} shards, {} validation, \
         {} test, {:.1} MB), weights {} (commit {w})",
        hub.url(),
        a.dataset_repo,
        per_shard * a.train_shards.max(1),
        a.train_shards.max(1),
        a.validation,
        a.test,
        bytes as f64 / 1e6,
        a.weights_repo
    );
    Ok(hub)
}

pub fn run(a: Args) -> Result<()> {
    let hub = start(&a)?;
    println!("HF_ENDPOINT={}", hub.url());
    eprintln!(
        "try: HF_ENDPOINT={} HF_HUB_CACHE=$(mktemp -d) cargo xtask train --dataset-repo {} \
         --dataset-revision main --weights-repo {} --weights-revision main --epochs 2 \
         --image-size 32 --batch-size 128",
        hub.url(),
        a.dataset_repo,
        a.weights_repo
    );
    match a.seconds {
        Some(s) => std::thread::sleep(std::time::Duration::from_secs(s)),
        None => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
    }
    Ok(())
}
