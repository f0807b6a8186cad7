//! `cargo xtask bench-resnet`: images/s of one ResNet training step, candle vs PyTorch.

use crate::{build_example, run_capture};
use anyhow::Result;
use serde_json::Value;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Shapes to time, `SIZExBATCH` (image side in pixels x images per step), comma-separated:
    /// the Stanford Cars step and the small-image, large-batch step.
    #[arg(long, value_delimiter = ',', default_value = "224x32,32x128")]
    shapes: Vec<String>,
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

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (size, batch) = s
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("shape {s:?} is not SIZExBATCH (e.g. 224x32)"))?;
    Ok((size.trim().parse()?, batch.trim().parse()?))
}

pub fn run(a: Args) -> Result<()> {
    let exe = build_example("candle-resnet", "resnet_step")?;
    let n = a.steps.to_string();
    let mut rows: Vec<Value> = Vec::new();
    for shape in &a.shapes {
        let (size, batch) = parse_shape(shape)?;
        let (b, s) = (batch.to_string(), size.to_string());
        eprintln!("candle {} batch {b} at {s} px ...", a.arch);
        let out = run_capture(
            Command::new(&exe)
                .args([&b, &s, &n, &a.arch])
                .env("RAYON_NUM_THREADS", a.threads.to_string()),
        )?;
        let candle: Value = serde_json::from_str(out.trim())?;
        let mut torch = None;
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
            torch = Some(serde_json::from_str::<Value>(
                out.lines().last().unwrap_or_default(),
            )?);
        }
        if let Some(t) = &torch {
            let ratio = candle["images_per_s"].as_f64().unwrap_or(0.0)
                / t["images_per_s"].as_f64().unwrap_or(f64::NAN);
            let mut c = candle.clone();
            c["vs_torch"] = serde_json::json!(format!("{ratio:.2}x"));
            rows.push(c);
            rows.push(t.clone());
        } else {
            rows.push(candle);
        }
    }
    println!(
        "| impl | arch | batch | px | threads | s/step | images/s | peak RSS MiB | vs PyTorch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["impl"].as_str().unwrap_or("?"),
            r["arch"].as_str().unwrap_or("?"),
            r["batch"],
            r["size"],
            r["threads"],
            r["median_step_s"],
            r["images_per_s"],
            r["peak_rss_mib"],
            r["vs_torch"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
