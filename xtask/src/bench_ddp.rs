//! `cargo xtask bench-ddp`: data-parallel training steps on this machine's cores, one process
//! with every thread against several MPI ranks with a share of the threads each, side by side
//! with PyTorch DDP over gloo with the same split (scripts/bench_torch_ddp.py). Each row is
//! a ResNet training step on random images (forward, label-smoothed loss, backward, gradient
//! averaging across the ranks, SGD with momentum), the median of `--steps`, global images/s.
//!
//! The MPI rows need the `mpi` feature's binary, which the command builds
//! (`cargo build --release -p xtask --features mpi`), and `mpirun` (Open MPI).

use crate::bench_resnet::fixed;
use crate::{build_xtask_with, cell, run_capture};
use anyhow::{bail, Result};
use serde_json::Value;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Step shapes, `PXxBATCH` (image side x global batch), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32x128,224x32")]
    shapes: Vec<String>,
    /// Timed steps per row (after one warm-up step).
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Ranks of the data-parallel rows; the threads are split evenly between them.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Threads of the whole machine (the one-process rows use them all).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Architecture.
    #[arg(long, default_value = "resnet18")]
    arch: String,
    /// Python with torch and torchvision: adds PyTorch's rows (DDP over gloo).
    #[arg(long)]
    torch: Option<String>,
}

fn last_json(out: &str) -> Result<Value> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("no JSON line in the output:\n{out}"))?;
    Ok(serde_json::from_str(line)?)
}

pub fn run(a: Args) -> Result<()> {
    if a.ranks < 2 || !a.threads.is_multiple_of(a.ranks) {
        bail!(
            "--ranks {} must be at least 2 and divide --threads {}",
            a.ranks,
            a.threads
        );
    }
    let exe = build_xtask_with(Some("mpi"))?;
    let per = a.threads / a.ranks;
    let root = root_flag();
    let mut rows: Vec<Value> = Vec::new();
    for shape in &a.shapes {
        let (size, batch) = crate::bench_resnet::parse_shape(shape)?;
        if !batch.is_multiple_of(a.ranks) {
            bail!(
                "batch {batch} of {shape} does not split into {} ranks",
                a.ranks
            );
        }
        let (b, s, n) = (batch.to_string(), size.to_string(), a.steps.to_string());
        let step_args = ["train-step", "--batch", &b, "--size", &s, "--steps", &n];
        eprintln!(
            "candle: 1 process x {} threads, batch {b} at {s} px ...",
            a.threads
        );
        let mut one = last_json(&run_capture(
            Command::new(&exe)
                .args(step_args)
                .args(["--arch", &a.arch])
                .env("RAYON_NUM_THREADS", a.threads.to_string()),
        )?)?;
        one["split"] = format!("1 x {}", a.threads).into();
        eprintln!("candle: {} ranks x {per} threads (mpirun) ...", a.ranks);
        let mut mpi = Command::new("mpirun");
        mpi.args(root.iter())
            .args([
                "--oversubscribe",
                "--bind-to",
                "none",
                "-np",
                &a.ranks.to_string(),
            ])
            .args(["-x", &format!("RAYON_NUM_THREADS={per}")])
            .arg(&exe)
            .args(step_args)
            .args(["--arch", &a.arch, "--ddp"]);
        let mut ddp = last_json(&run_capture(&mut mpi)?)?;
        ddp["split"] = format!("{} x {per}", a.ranks).into();
        let mut group = vec![one, ddp];
        if let Some(py) = &a.torch {
            for (ranks, threads) in [(1, a.threads), (a.ranks, per)] {
                eprintln!("torch: {ranks} x {threads}, batch {b} at {s} px ...");
                let mut t = last_json(&run_capture(Command::new(py).args([
                    "scripts/bench_torch_ddp.py",
                    "--world",
                    &ranks.to_string(),
                    "--threads",
                    &threads.to_string(),
                    "--batch",
                    &b,
                    "--size",
                    &s,
                    "--steps",
                    &n,
                    "--arch",
                    &a.arch,
                ]))?)?;
                t["split"] = format!("{ranks} x {threads}").into();
                group.push(t);
            }
            // Each candle row against PyTorch's with the same split.
            for i in 0..2 {
                let ratio = group[i]["images_per_s"].as_f64().unwrap_or(0.0)
                    / group[i + 2]["images_per_s"].as_f64().unwrap_or(f64::NAN);
                group[i]["vs_torch"] = format!("{ratio:.2}x").into();
            }
        }
        for pair in [(1, 0), (3, 2)] {
            if pair.0 < group.len() {
                let r = group[pair.0]["images_per_s"].as_f64().unwrap_or(0.0)
                    / group[pair.1]["images_per_s"].as_f64().unwrap_or(f64::NAN);
                group[pair.0]["vs_one"] = format!("{r:.2}x").into();
            }
        }
        rows.extend(group);
    }
    crate::print_markdown_table(
        &[
            "impl",
            "ranks x threads",
            "arch",
            "global batch",
            "px",
            "s/step",
            "images/s",
            "vs 1 process",
            "vs PyTorch, same split",
        ],
        rows.iter().map(|r| {
            vec![
                cell(&r["impl"], "?"),
                cell(&r["split"], "?"),
                cell(&r["arch"], "?"),
                cell(&r["batch"], "?"),
                cell(&r["size"], "?"),
                fixed(&r["median_step_s"], 3),
                fixed(&r["images_per_s"], 1),
                cell(&r["vs_one"], ""),
                cell(&r["vs_torch"], ""),
            ]
        }),
    );
    Ok(())
}

/// Open MPI refuses to start as root without `--allow-run-as-root` (containers, CI).
fn root_flag() -> Option<&'static str> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    root.then_some("--allow-run-as-root")
}
