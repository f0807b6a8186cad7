//! The workspace's task runner: `cargo xtask <command>` (alias in `.cargo/config.toml`).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;

mod bench_data;
mod bench_ddp;
mod bench_linear;
mod bench_resnet;
mod bench_xent;
mod cars;
mod console;
mod fake_hub;
mod fuzz_xent;
mod gpu_check;
mod soak;
mod train_step;

#[derive(Parser)]
#[command(name = "xtask", about = "Tasks of the candle-xent workspace")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a pretrained ResNet on any Hub (--dataset-repo) or local (--data-dir)
    /// image-classification dataset: the epoch chosen on validation, test evaluated once.
    Train(Box<cars::TrainArgs>),
    /// Fine-tune ResNet-18 on Stanford Cars with label smoothing (the main job; `train` with the
    /// Stanford Cars preset); `--smoke` runs the whole pipeline offline on generated data.
    TrainCars(Box<cars::TrainArgs>),
    /// Show what label smoothing buys: the train-cars recipe, seed and data once per smoothing
    /// value (--eps 0,0.05,0.1,0.2), then a comparison of accuracy and calibration
    /// (ablation.md/json, reliability diagrams side by side, test curves overlaid)
    AblateSmoothing(Box<cars::AblateArgs>),
    /// Compare named recipes with the same data, seed and budget (--recipes
    /// none,smoothing,mixup+cutmix,...; ingredients smoothing, mixup, cutmix, ema, ta, ra,
    /// jitter, erasing, droppath, clip joined with +): the same comparison files as
    /// ablate-smoothing
    Ablate(Box<cars::AblateRecipesArgs>),
    /// Evaluate a model folder or Hub repo on the test split.
    EvalCars(cars::EvalArgs),
    /// Top-5 classes of images, with a model folder or a published Hub repo.
    Predict(cars::PredictArgs),
    /// Publish the train-cars model folder to the Hugging Face Hub in one commit.
    PublishCars(cars::PublishArgs),
    /// Fetch every split into the Hub cache, decode every image, print counts.
    DownloadCars(cars::DownloadArgs),
    /// Serve a generated dataset repo (three train shards, validation, test, `img` /
    /// `fine_label` columns, splits in the card's YAML) and random ResNet-18 weights on a
    /// loopback fake of the Hub API, to try `train --dataset-repo` without the network.
    FakeHub(fake_hub::Args),
    /// Fused cross-entropy forward+backward vs the candle-nn composition (and PyTorch): time and
    /// peak RSS, one process per measurement.
    BenchXent(bench_xent::Args),
    /// Fuzz candle-xent's public API: N random calls (default 200,000) checked against an f64
    /// reference of PyTorch's formulas (no panic, clear errors, the README's precision bound,
    /// every gradient present).
    FuzzXent(fuzz_xent::Args),
    /// Fused linear cross-entropy (language-model head) vs materialised logits: time and exact
    /// peak of extra heap memory, one process per measurement.
    BenchLinear(bench_linear::Args),
    /// One ResNet training step (forward, label-smoothed loss, backward, SGD): images/s, candle
    /// vs PyTorch.
    BenchResnet(bench_resnet::Args),
    /// Data-parallel training steps: one process against MPI ranks on this machine's cores,
    /// beside PyTorch DDP over gloo with the same split.
    BenchDdp(bench_ddp::Args),
    /// Train-transform throughput (decode + crop + flip + normalise) on generated JPEGs.
    BenchData(bench_data::Args),
    /// Build (here, without a GPU) the bundle that checks candle-xent's CUDA kernels on a CUDA
    /// machine: parity vs the CPU op and PyTorch, then time and memory vs PyTorch and Liger.
    GpuCheck(gpu_check::Args),
    /// Train for a given time on a generated dataset of realistic size and record resident
    /// memory every few steps (soak.json, soak.png): a leak shows as growth.
    Soak(soak::Args),
    /// One ResNet training step timed on a device (random images), with the device memory in
    /// use after every step; one JSON line (used by the gpu-check bundle).
    TrainStep(train_step::Args),
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing with its name if it fails; returns stdout.
pub fn run_capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Builds a release example of a workspace package and returns the path of its binary.
pub fn build_example(package: &str, example: &str) -> Result<PathBuf> {
    run_capture(Command::new(env!("CARGO")).args([
        "build",
        "--release",
        "-p",
        package,
        "--example",
        example,
    ]))?;
    Ok(workspace_root()
        .join("target/release/examples")
        .join(example))
}

/// The extensions that decide which kernels run (candle's gemm, oneDNN, PyTorch), in the order
/// the bench tables list them.
const CPU_FLAGS: [&str; 5] = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"];

/// The machine a benchmark ran on, as the line above each bench table: `/proc/cpuinfo`'s model
/// name, the CPUs this process may use, and which of [`CPU_FLAGS`] the CPU has.
pub fn cpu_description() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let flags = field("flags").unwrap_or_default();
    let has: Vec<String> = CPU_FLAGS
        .iter()
        .map(|f| {
            let yes = flags.split_whitespace().any(|g| g == *f);
            format!("{f} {}", if yes { "yes" } else { "no" })
        })
        .collect();
    format!("CPU: {model}, {cpus} CPUs; {}", has.join(", "))
}

/// Prints a Markdown table: the CPU it was measured on ([`cpu_description`]), `header`, its
/// rule, then one line per row.
pub fn print_markdown_table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    println!("{}\n", cpu_description());
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for r in rows {
        println!("| {} |", r.join(" | "));
    }
}

/// A JSON value as a table cell: strings without quotes, `default` when absent.
pub fn cell(v: &serde_json::Value, default: &str) -> String {
    match v {
        serde_json::Value::Null => default.to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Of several runs of one benchmark (JSON objects), the one with the median `key` (an even
/// count: the upper of the two middle ones), gaining `range_key`: the runs' range of `key` with
/// `digits` decimals. `None` for no runs.
pub fn median_run(
    mut runs: Vec<serde_json::Value>,
    key: &str,
    range_key: &str,
    digits: usize,
) -> Option<serde_json::Value> {
    let v = |r: &serde_json::Value| r[key].as_f64().unwrap_or(f64::NAN);
    runs.sort_by(|a, b| v(a).total_cmp(&v(b)));
    let (lo, hi) = (v(runs.first()?), v(runs.last()?));
    let mut m = runs.swap_remove(runs.len() / 2);
    m[range_key] = serde_json::json!(format!("{lo:.digits$}-{hi:.digits$}"));
    Some(m)
}

/// This workspace's task runner built in release with `feature` of the xtask package turned on
/// (`None`: the default build), copied to `target/release/xtask-FEATURE` (`xtask-default`) so
/// that builds with and without the feature can run side by side.
pub fn build_xtask_with(feature: Option<&str>) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "-p", "xtask"]);
    if let Some(f) = feature {
        cmd.args(["--features", f]);
    }
    run_capture(&mut cmd)?;
    let dir = workspace_root().join("target/release");
    let built = dir.join("xtask");
    let copy = dir.join(format!("xtask-{}", feature.unwrap_or("default")));
    std::fs::copy(&built, &copy)
        .map_err(|e| anyhow::anyhow!("copying {} to {}: {e}", built.display(), copy.display()))?;
    Ok(copy)
}

/// The library's errors name its options; on the command line they are flags. Each pair: a
/// name an error may contain, the flag that sets it.
const FLAG_OF_OPTION: [(&str, &str); 8] = [
    ("DataSource::Dir", "--data-dir DIR --weights-file FILE"),
    ("DataSource::Hub::config", "--dataset-config"),
    ("ColumnChoice::image", "--image-column"),
    ("ColumnChoice::label", "--label-column"),
    ("`validation_fraction`", "--validation-fraction"),
    ("`cutmix_minmax`", "--cutmix-minmax"),
    ("TrainConfig::lr", "--lr"),
    (
        "HubOptions::timeout",
        "--timeout SECONDS (publish-cars; HF_HUB_DOWNLOAD_TIMEOUT for the others)",
    ),
];

/// The command-line spelling of the library options an error message names.
fn flag_hints(message: &str) -> Vec<String> {
    FLAG_OF_OPTION
        .iter()
        .filter(|(option, _)| message.contains(option))
        .map(|(option, flag)| format!("on the command line, {option} is {flag}"))
        .collect()
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:?}");
            eprintln!("Error: {message}");
            for hint in flag_hints(&message) {
                eprintln!("  hint: {hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // Training steps free and re-allocate the same large buffers: keep them (see
    // candle_resnet::alloc; 1.4-1.5x faster ResNet steps on CPU).
    candle_resnet::alloc::reuse_freed_memory();
    // candle's element-wise pool otherwise spins against rayon's workers (candle_resnet::threads).
    candle_resnet::threads::quiet_candle_pool();
    match Cli::parse().command {
        Cmd::Train(args) => cars::train(*args, false),
        Cmd::TrainCars(args) => cars::train(*args, true),
        Cmd::AblateSmoothing(args) => cars::ablate_smoothing(*args),
        Cmd::Ablate(args) => cars::ablate_recipes(*args),
        Cmd::EvalCars(args) => cars::eval_cars(args),
        Cmd::Predict(args) => cars::predict(args),
        Cmd::PublishCars(args) => cars::publish_cars(args),
        Cmd::DownloadCars(args) => cars::download_cars(args),
        Cmd::FakeHub(args) => fake_hub::run(args),
        Cmd::BenchXent(args) => bench_xent::run(args),
        Cmd::FuzzXent(args) => fuzz_xent::run(args),
        Cmd::BenchLinear(args) => bench_linear::run(args),
        Cmd::BenchResnet(args) => bench_resnet::run(args),
        Cmd::BenchDdp(args) => bench_ddp::run(args),
        Cmd::BenchData(args) => bench_data::run(args),
        Cmd::GpuCheck(args) => gpu_check::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::TrainStep(args) => train_step::run(args),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn library_option_names_get_their_flags() {
        let e = "dataset: several ClassLabel columns (a, b); choose one with `ColumnChoice::label`";
        assert_eq!(
            super::flag_hints(e),
            vec!["on the command line, ColumnChoice::label is --label-column"]
        );
        assert!(super::flag_hints("the loss became NaN").is_empty());
        let e = "publish: cannot create a/b: no answer within the time limit (HubOptions::timeout \
                 or HF_HUB_DOWNLOAD_TIMEOUT, default 60 s)";
        assert_eq!(super::flag_hints(e).len(), 1);
        assert!(super::flag_hints(e)[0].contains("--timeout SECONDS"));
    }
}
