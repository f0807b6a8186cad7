//! `cargo xtask bench-xent`: the figures of candle-xent's CPU benchmark.

use crate::{build_example, cell, run_capture, workspace_root};
use anyhow::{Context, Result};
use serde_json::Value;
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Shapes ROWSxCLASSES, comma separated.
    #[arg(long, default_value = "4096x32000,8192x32000")]
    shapes: String,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Rounds: every mode (and PyTorch) runs once per round, alternating, so that the machine's
    /// drift reaches them alike; the table shows each one's median round, with the range of its
    /// rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Skip the (slow, memory-hungry) composition from candle-nn ops.
    #[arg(long)]
    no_composed: bool,
    /// A Python with torch installed: also time `F.cross_entropy(label_smoothing=0.1)`.
    #[arg(long)]
    torch: Option<String>,
    /// Threads for every measurement (RAYON_NUM_THREADS and torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// GLIBC_TUNABLES for every process, candle's and PyTorch's alike: e.g.
    /// `glibc.malloc.hugetlb=1` serves glibc's large blocks on transparent huge pages.
    #[arg(long)]
    glibc_tunables: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let exe = build_example("candle-xent", "xent_step")?;
    let mut rows: Vec<Value> = Vec::new();
    for shape in a.shapes.split(',') {
        let (n, c) = shape
            .split_once('x')
            .with_context(|| format!("shape {shape} is not ROWSxCLASSES"))?;
        let mut modes = vec!["bound", "fused", "fused-grad", "accumulate"];
        if !a.no_composed {
            modes.push("composed");
        }
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); modes.len() + 1];
        for round in 1..=a.rounds.max(1) {
            for (mode, out) in modes.iter().zip(runs.iter_mut()) {
                eprintln!("round {round}: {shape} {mode} ...");
                let mut cmd = Command::new(&exe);
                cmd.args([n, c, mode, &a.reps.to_string()])
                    .env("RAYON_NUM_THREADS", a.threads.to_string());
                if let Some(t) = &a.glibc_tunables {
                    cmd.env("GLIBC_TUNABLES", t);
                }
                let o = run_capture(&mut cmd)?;
                out.push(serde_json::from_str(o.trim())?);
            }
            if let Some(py) = &a.torch {
                eprintln!("round {round}: {shape} torch ...");
                let mut cmd = Command::new(py);
                if let Some(t) = &a.glibc_tunables {
                    cmd.env("GLIBC_TUNABLES", t);
                }
                let o = run_capture(cmd.args([
                    "scripts/bench_torch_xent.py",
                    "--rows",
                    n,
                    "--classes",
                    c,
                    "--threads",
                    &a.threads.to_string(),
                    "--reps",
                    &a.reps.to_string(),
                ]))?;
                let line = o.lines().last().unwrap_or_default();
                runs[modes.len()].push(serde_json::from_str(line)?);
            }
        }
        // Each mode against PyTorch round by round (the two ran minutes apart at most, so the
        // machine's drift cancels better than between the medians).
        if a.torch.is_some() {
            let ms = |v: &Value| v["median_ms"].as_f64().unwrap_or(f64::NAN);
            let torch: Vec<f64> = runs[modes.len()].iter().map(ms).collect();
            for mode_runs in &mut runs[..modes.len()] {
                let mut ratios: Vec<f64> = mode_runs
                    .iter()
                    .zip(&torch)
                    .map(|(r, t)| t / ms(r))
                    .collect();
                ratios.sort_by(f64::total_cmp);
                if let (Some(lo), Some(hi)) = (ratios.first(), ratios.last()) {
                    let med = ratios[ratios.len() / 2];
                    for r in mode_runs.iter_mut() {
                        r["vs_torch_rounds"] =
                            serde_json::json!(format!("{med:.2}x ({lo:.2}-{hi:.2}x)"));
                    }
                }
            }
        }
        rows.extend(
            runs.into_iter()
                .filter_map(|r| crate::median_run(r, "median_ms", "rounds_ms", 0)),
        );
    }
    let table = rows.iter().map(|r| {
        let shape = (r["rows"].as_u64(), r["classes"].as_u64());
        let find = |m: &str| {
            rows.iter()
                .find(|o| (o["rows"].as_u64(), o["classes"].as_u64()) == shape && o["mode"] == m)
                .and_then(|o| o["median_ms"].as_f64())
        };
        let t = r["median_ms"].as_f64().unwrap_or(f64::NAN);
        let faster = |base: Option<f64>| match (r["mode"].as_str(), base) {
            (Some("bound"), _) | (_, None) => "-".to_string(),
            (_, Some(b)) => format!("{:.2}x", b / t),
        };
        let of_bound = match (r["mode"].as_str(), find("bound")) {
            (Some("bound"), _) | (_, None) => "-".to_string(),
            (_, Some(b)) => format!("{:.2}x", t / b),
        };
        let mode = match r["mode"].as_str() {
            Some("bound") => format!(
                "memory bound (read {} ms + copy {} ms; {} / {} GiB/s)",
                r["read_ms"], r["copy_ms"], r["read_gib_s"], r["copy_gib_s"]
            ),
            other => other.unwrap_or("?").to_string(),
        };
        vec![
            format!("{}x{}", shape.0.unwrap_or(0), shape.1.unwrap_or(0)),
            mode,
            format!("{t:.0}"),
            cell(&r["rounds_ms"], "-"),
            cell(&r["peak_rss_mib"], "-"),
            of_bound,
            faster(find("composed")),
            faster(find("torch")),
            match r["mode"].as_str() {
                Some("bound") | Some("torch") => "-".to_string(),
                _ => cell(&r["vs_torch_rounds"], "-"),
            },
        ]
    });
    println!(
        "Allocator: glibc {}.",
        a.glibc_tunables
            .as_deref()
            .map_or("defaults".to_string(), |t| format!(
                "with GLIBC_TUNABLES={t}"
            ))
    );
    crate::print_markdown_table(
        &[
            "shape",
            "mode",
            "median ms",
            "rounds' ms",
            "peak RSS MiB",
            "time / memory bound",
            "speed-up vs composed",
            "speed-up vs torch",
            "vs torch, round by round: median (range)",
        ],
        table,
    );
    let path = workspace_root().join("target/bench-xent.json");
    std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
