//! `cargo xtask bench-resnet`: images/s of one ResNet training step, candle vs PyTorch.

use crate::{build_example, run_capture};
use anyhow::Result;
use serde_json::Value;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// resnet18, resnet34 or resnet50.
    #[arg(long, default_value = "resnet18")]
    arch: String,
    /// A Python with torch and torchvision: also time the same step in PyTorch.
    #[arg(long)]
    torch: Option<String>,
    /// Threads for both (RAYON_NUM_THREADS, torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    let exe = build_example("candle-resnet", "resnet_step")?;
    let (b, s, n) = (a.batch.to_string(), a.size.to_string(), a.steps.to_string());
    let mut rows: Vec<Value> = Vec::new();
    eprintln!("candle {} batch {b} at {s} px ...", a.arch);
    let out = run_capture(
        Command::new(&exe)
            .args([&b, &s, &n, &a.arch])
            .env("RAYON_NUM_THREADS", a.threads.to_string()),
    )?;
    rows.push(serde_json::from_str(out.trim())?);
    if let Some(py) = &a.torch {
        eprintln!("torch {} batch {b} at {s} px ...", a.arch);
        let out = run_capture(Command::new(py).args([
            "scripts/bench_torch_resnet.py",
            "--batch",
            &b,
            "--size",
            &s,
            "--steps",
            &n,
            "--arch",
            &a.arch,
            "--threads",
            &a.threads.to_string(),
        ]))?;
        rows.push(serde_json::from_str(
            out.lines().last().unwrap_or_default(),
        )?);
    }
    println!("| impl | arch | batch | px | threads | s/step | images/s |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["impl"].as_str().unwrap_or("?"),
            r["arch"].as_str().unwrap_or("?"),
            r["batch"],
            r["size"],
            r["threads"],
            r["median_step_s"],
            r["images_per_s"]
        );
    }
    Ok(())
}
