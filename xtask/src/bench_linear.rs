//! `cargo xtask bench-linear`: fused linear cross-entropy against the materialised logits
//! (candle-xent's `linear_step` example, one process per measurement so that each peak is its own).

use crate::{build_example, run_capture, workspace_root};
use anyhow::{Context, Result};
use serde_json::Value;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Shapes NxHxV (rows, hidden features, classes), comma separated. The shape,
    /// 8192x2048x128256, takes ~20 GB and ~10 min on 2 cores.
    #[arg(long, default_value = "2048x1024x32000,8192x1024x32000")]
    shapes: String,
    /// Modes of `linear_step`, comma separated (materialised is the baseline of the ratios).
    #[arg(long, default_value = "materialised,fused-grad,fused")]
    modes: String,
    /// Rows per chunk for the fused modes, comma separated; 0 = `FusedLinearCrossEntropy::chunk_rows`.
    #[arg(long, default_value = "0")]
    chunks: String,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

pub fn run(a: Args) -> Result<()> {
    let exe = build_example("candle-xent", "linear_step")?;
    let mut rows: Vec<Value> = Vec::new();
    for shape in a.shapes.split(',') {
        let dims: Vec<&str> = shape.split('x').collect();
        let [n, h, v] = dims[..] else {
            anyhow::bail!("shape {shape} is not NxHxV");
        };
        for mode in a.modes.split(',') {
            let chunks: Vec<&str> = if mode == "materialised" {
                vec!["0"]
            } else {
                a.chunks.split(',').collect()
            };
            for chunk in chunks {
                eprintln!("{shape} {mode} chunk {chunk} ...");
                let out = run_capture(Command::new(&exe).args([
                    n,
                    h,
                    v,
                    mode,
                    chunk,
                    &a.reps.to_string(),
                ]))
                .with_context(|| format!("{shape} {mode}"))?;
                let mut r: Value = serde_json::from_str(out.trim())?;
                r["shape"] = Value::from(shape);
                rows.push(r);
            }
        }
    }
    let table = rows.iter().map(|r| {
        let base = rows
            .iter()
            .find(|o| o["shape"] == r["shape"] && o["mode"] == "materialised")
            .and_then(|o| o["median_s"].as_f64());
        let t = r["median_s"].as_f64().unwrap_or(f64::NAN);
        let extra = r["extra_heap_peak_mib"].as_f64().unwrap_or(f64::NAN);
        let logits = r["logits_mib"].as_f64().unwrap_or(f64::NAN);
        let fused = r["mode"] != "materialised";
        vec![
            r["shape"].as_str().unwrap_or("?").to_string(),
            r["mode"].as_str().unwrap_or("?").to_string(),
            if fused {
                r["chunk"].to_string()
            } else {
                "-".into()
            },
            format!("{t:.2}"),
            base.map_or("-".into(), |b| format!("{:.2}x", t / b)),
            format!("{extra:.1}"),
            if fused {
                format!("{:.1} %", 100.0 * extra / logits)
            } else {
                "-".into()
            },
        ]
    });
    crate::print_markdown_table(
        &[
            "N x H x V",
            "mode",
            "chunk",
            "median s",
            "x materialised",
            "extra peak MiB",
            "% of logits",
        ],
        table,
    );
    let path = workspace_root().join("target/bench-linear.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
