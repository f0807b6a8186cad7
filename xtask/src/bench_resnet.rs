//! `cargo xtask bench-resnet`: images/s of one ResNet training step (`cargo xtask train-step`:
//! train-cars' step with its optimizer, SGD momentum 0.9, weight decay 1e-4), candle vs PyTorch
//! with the same optimizer; with
//! `--epoch`, whole training epochs end to end (JPEG decoding, augmentation, the prefetching
//! loader, steps) on a generated image folder that both read.

use crate::{build_xtask_with, cell, run_capture};
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
    /// Rounds: each implementation runs once per round, alternating; the table shows each one's
    /// median round, with the range of its rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// resnet18, resnet34 or resnet50.
    #[arg(long, default_value = "resnet18")]
    arch: String,
    /// A Python with torch and torchvision: also time the same step in PyTorch.
    #[arg(long)]
    torch: Option<String>,
    /// Threads for both (RAYON_NUM_THREADS, torch.set_num_threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Time whole epochs with data loading instead of single steps: `train-cars`'s training loop
    /// on a generated image folder (JPEGs the size of Stanford Cars photos), against a
    /// torchvision `ImageFolder` + `DataLoader` over the same files.
    #[arg(long)]
    epoch: bool,
    /// `--epoch`: training images generated.
    #[arg(long, default_value_t = 2048)]
    images: usize,
    /// `--epoch`: epochs run; the last one is reported (the first warms up).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Also time candle with candle-resnet's `onednn` feature (f32 convolutions on oneDNN;
    /// needs libdnnl, e.g. `apt install libdnnl-dev`), beside the default build. In `--epoch`
    /// mode the build of this command decides (`cargo run --release -p xtask --features onednn
    /// -- bench-resnet --epoch`).
    #[arg(long)]
    onednn: bool,
    /// Mixed precision for both (`bf16`): candle's `train-step --amp bf16` (f32 weights, bf16
    /// convolutions: on oneDNN with `--onednn` where the CPU has AMX or AVX512-BF16) against
    /// PyTorch's `torch.autocast("cpu", torch.bfloat16)`. Step mode only (an error with
    /// `--epoch`).
    #[arg(long)]
    amp: Option<String>,
    /// `--epoch`: PyTorch DataLoader worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// GLIBC_TUNABLES for the PyTorch processes (step mode). candle's training binaries already
    /// keep freed memory for reuse (`candle_resnet::alloc::reuse_freed_memory`); e.g.
    /// `glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184` gives
    /// PyTorch the same advantage (its large blocks served from the heap and kept).
    #[arg(long)]
    torch_glibc_tunables: Option<String>,
}

pub(crate) fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (size, batch) = s
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("shape {s:?} is not SIZExBATCH (e.g. 224x32)"))?;
    Ok((size.trim().parse()?, batch.trim().parse()?))
}

pub fn run(a: Args) -> Result<()> {
    if a.epoch {
        return run_epochs(a);
    }
    // The default build first, then (--onednn) the feature build, each its own binary.
    let mut exes = vec![build_xtask_with(None)?];
    if a.onednn {
        exes.push(build_xtask_with(Some("onednn"))?);
    }
    let n = a.steps.to_string();
    let mut rows: Vec<Value> = Vec::new();
    for shape in &a.shapes {
        let (size, batch) = parse_shape(shape)?;
        let (b, s) = (batch.to_string(), size.to_string());
        // Every implementation once per round, alternating, so that the machine's drift
        // reaches them alike; each row is the round with the median images/s.
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); exes.len() + 1];
        for round in 1..=a.rounds.max(1) {
            for (exe, out) in exes.iter().zip(runs.iter_mut()) {
                eprintln!(
                    "round {round}: candle {} batch {b} at {s} px ({}) ...",
                    a.arch,
                    exe.display()
                );
                let mut cmd = Command::new(exe);
                cmd.args(["train-step", "--batch", &b, "--size", &s, "--steps", &n])
                    .args(["--arch", &a.arch])
                    .env("RAYON_NUM_THREADS", a.threads.to_string());
                if let Some(amp) = &a.amp {
                    cmd.args(["--amp", amp]);
                }
                let o = run_capture(&mut cmd)?;
                out.push(serde_json::from_str::<Value>(
                    o.lines().last().unwrap_or_default(),
                )?);
            }
            if let Some(py) = &a.torch {
                eprintln!("round {round}: torch {} batch {b} at {s} px ...", a.arch);
                let mut cmd = Command::new(py);
                cmd.args([
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
                ]);
                if let Some(amp) = &a.amp {
                    cmd.args(["--amp", amp]);
                }
                if let Some(t) = &a.torch_glibc_tunables {
                    cmd.env("GLIBC_TUNABLES", t);
                }
                let o = run_capture(&mut cmd)?;
                let mut t = serde_json::from_str::<Value>(o.lines().last().unwrap_or_default())?;
                if a.torch_glibc_tunables.is_some() {
                    t["conv"] = serde_json::json!("oneDNN (PyTorch), heap kept");
                }
                runs[exes.len()].push(t);
            }
        }
        let mut meds: Vec<Value> = runs
            .into_iter()
            .filter_map(|r| crate::median_run(r, "images_per_s", "images_per_s_range", 1))
            .collect();
        let torch = (a.torch.is_some()).then(|| meds.pop()).flatten();
        for mut c in meds {
            if let Some(t) = &torch {
                let ratio = c["images_per_s"].as_f64().unwrap_or(0.0)
                    / t["images_per_s"].as_f64().unwrap_or(f64::NAN);
                c["vs_torch"] = serde_json::json!(format!("{ratio:.2}x"));
            }
            rows.push(c);
        }
        rows.extend(torch);
    }
    crate::print_markdown_table(
        &[
            "impl",
            "convolutions",
            "precision",
            "arch",
            "batch",
            "px",
            "threads",
            "s/step",
            "images/s",
            "rounds' images/s",
            "peak RSS MiB",
            "vs PyTorch",
        ],
        rows.iter().map(|r| {
            vec![
                cell(&r["impl"], "?"),
                cell(&r["conv"], "oneDNN (PyTorch)"),
                match r["amp"].as_str() {
                    Some(amp) => format!("{amp} mixed"),
                    None => cell(&r["dtype"], "f32"),
                },
                cell(&r["arch"], "?"),
                cell(&r["batch"], "?"),
                cell(&r["size"], "?"),
                cell(&r["threads"], "?"),
                fixed(&r["median_step_s"], 3),
                fixed(&r["images_per_s"], 1),
                cell(&r["images_per_s_range"], ""),
                fixed(&r["peak_rss_mib"], 0),
                cell(&r["vs_torch"], ""),
            ]
        }),
    );
    Ok(())
}

/// A JSON number with `digits` decimals (`?` when absent).
pub(crate) fn fixed(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "?".to_string(), |x| format!("{x:.digits$}"))
}

/// Writes `n` generated JPEGs (about 480-640 x 320-480 pixels, six classes) as an image folder
/// `dir/{train,test}/<class>/<i>.jpg`, the layout both `train-cars --data-dir` and torchvision's
/// `ImageFolder` read.
fn write_image_folder(dir: &std::path::Path, n: usize, test: usize) -> Result<()> {
    use candle_finetune::data::ImageData;
    for (split, count, salt) in [("train", n, 1u64), ("test", test, 2)] {
        let ds = candle_finetune::smoke::generated_dataset(count, 5, salt);
        for (i, s) in ds.samples.iter().enumerate() {
            let class = &ds.class_names[s.label as usize];
            let folder = dir.join(split).join(class);
            std::fs::create_dir_all(&folder)?;
            let ImageData::Encoded(bytes) = &s.image else {
                anyhow::bail!("generated images are encoded in memory");
            };
            std::fs::write(folder.join(format!("{i:05}.jpg")), bytes)?;
        }
    }
    Ok(())
}

fn run_epochs(a: Args) -> Result<()> {
    use candle_finetune::{data::DataSource, recipe::FineTune};
    if let Some(amp) = &a.amp {
        // The epoch loops of both sides run in f32; a flag they would ignore is an error.
        anyhow::bail!("bench-resnet --epoch times f32 epochs only; --amp {amp} applies to steps");
    }
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("images");
    eprintln!(
        "writing {} generated JPEGs to {} ...",
        a.images,
        data.display()
    );
    write_image_folder(&data, a.images, 64)?;
    let mut rows = Vec::new();
    for shape in &a.shapes {
        let (size, batch) = parse_shape(shape)?;
        eprintln!("candle {} epochs at {size} px, batch {batch} ...", a.arch);
        let (mut run, _cache) = FineTune {
            image_size: Some(size as u32),
            out: tmp.path().join(format!("out-{size}")),
            ..FineTune::default()
        }
        .smoke()?;
        run.data = DataSource::Dir(data.clone());
        run.dataset_info = Some(candle_finetune::data::DatasetInfo::local(
            "generated images",
        ));
        run.arch = a.arch.parse().map_err(anyhow::Error::msg)?;
        run.train.batch_size = batch;
        run.train.epochs = a.epochs;
        run.train.eval_every = a.epochs;
        // Timing epochs: no images held out, the same ones trained as by the PyTorch script.
        run.validation_fraction = 0.0;
        let report = run.run_with(&mut crate::console::Console::default())?;
        let last = report
            .fit
            .history
            .last()
            .ok_or_else(|| anyhow::anyhow!("the run recorded no epoch"))?;
        let mut c = serde_json::json!({
            "impl": "candle", "conv": candle_resnet::ops::conv::Backend::Auto.describe(),
            "arch": a.arch, "batch": batch, "size": size,
            "threads": a.threads, "images_per_s": (last.images_per_s * 10.0).round() / 10.0,
            "data_wait_s": (last.data_wait_s * 100.0).round() / 100.0,
            "loader_ms_per_image": (last.loader_ms_per_image * 100.0).round() / 100.0,
        });
        if let Some(py) = &a.torch {
            eprintln!("torch {} epochs at {size} px, batch {batch} ...", a.arch);
            let out = run_capture(Command::new(py).args([
                "scripts/bench_torch_epoch.py",
                "--data",
                &data.to_string_lossy(),
                "--size",
                &size.to_string(),
                "--batch",
                &batch.to_string(),
                "--epochs",
                &a.epochs.to_string(),
                "--arch",
                &a.arch,
                "--threads",
                &a.threads.to_string(),
                "--workers",
                &a.workers.to_string(),
            ]))?;
            let t: Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
            let ratio = c["images_per_s"].as_f64().unwrap_or(0.0)
                / t["images_per_s"].as_f64().unwrap_or(f64::NAN);
            c["vs_torch"] = serde_json::json!(format!("{ratio:.2}x"));
            rows.push(c);
            rows.push(t);
        } else {
            rows.push(c);
        }
    }
    crate::print_markdown_table(
        &[
            "impl",
            "convolutions",
            "arch",
            "batch",
            "px",
            "threads",
            "epoch images/s",
            "waited for data s",
            "loader ms/image (CPU)",
            "vs PyTorch",
        ],
        rows.iter().map(|r| {
            vec![
                cell(&r["impl"], "?"),
                cell(&r["conv"], "oneDNN (PyTorch)"),
                cell(&r["arch"], "?"),
                cell(&r["batch"], "?"),
                cell(&r["size"], "?"),
                cell(&r["threads"], "?"),
                cell(&r["images_per_s"], "?"),
                cell(&r["data_wait_s"], "?"),
                cell(&r["loader_ms_per_image"], "?"),
                cell(&r["vs_torch"], ""),
            ]
        }),
    );
    Ok(())
}
