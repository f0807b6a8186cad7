//! `cargo xtask bench-data`: train-transform throughput on generated 600 x 400 JPEGs.

use crate::{build_example, run_capture};
use anyhow::Result;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Number of generated JPEGs.
    #[arg(long, default_value_t = 512)]
    images: usize,
}

pub fn run(a: Args) -> Result<()> {
    let exe = build_example("candle-finetune", "data_bench")?;
    let out = run_capture(Command::new(exe).arg(a.images.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    crate::print_markdown_table(
        &[
            "images",
            "mean JPEG KiB",
            "decode only, 1 thread",
            "train transform, 1 thread",
            "threads",
            "train transform, all threads",
        ],
        [vec![
            v["images"].to_string(),
            v["mean_jpeg_kb"].to_string(),
            format!("{} img/s", v["decode_only_1_thread"]),
            format!("{} img/s", v["train_transform_1_thread"]),
            v["threads"].to_string(),
            format!("{} img/s", v["train_transform_all_threads"]),
        ]],
    );
    Ok(())
}
