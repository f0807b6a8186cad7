//! `cargo xtask soak`: train for a given time on a generated dataset of realistic size and
//! record the process's resident memory every few steps (JSON and PNG). Memory that grows with
//! the number of steps is a leak; this is how a leak shows before a real run dies of it.

use anyhow::Result;
use candle_core::{DType, Device};
use candle_finetune::data::{Loader, LoaderConfig, Preprocess, Transform};
use candle_finetune::train::{fit_with, Amp, OptimizerKind, TrainConfig};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::Arch;
use serde::Serialize;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds of training (the run stops after the step that crosses it).
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Training images (generated JPEGs, six classes).
    #[arg(long, default_value_t = 10_000)]
    images: usize,
    /// Test images, evaluated after every epoch.
    #[arg(long, default_value_t = 1_000)]
    test_images: usize,
    /// Input side in pixels: 32 (a quick soak) or 224 (the Stanford Cars size).
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accum_steps: usize,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    optimizer: OptimizerKind,
    /// Every regulariser of the recipe on: mixup 0.2 + CutMix 1.0, TrivialAugmentWide, colour
    /// jitter 0.4, random erasing 0.25, weight EMA, gradient clipping at 1, drop path 0.05.
    #[arg(long)]
    all_options: bool,
    /// Mixed precision (`bf16`), as train-cars' `--amp`: on a CPU with native bf16 on oneDNN
    /// (the `onednn` build) the convolutions compute in bf16.
    #[arg(long, value_enum, default_value_t = Amp::F32)]
    amp: Amp,
    /// Sample the resident memory every this many optimizer steps.
    #[arg(long, default_value_t = 5)]
    every: u64,
    /// Output folder: soak.json, soak.png and the run's files.
    #[arg(long, default_value = "out/soak")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Sample {
    step: u64,
    epoch: usize,
    elapsed_s: f64,
    rss_mib: f64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    images: usize,
    image_size: u32,
    batch_size: usize,
    accum_steps: usize,
    optimizer: String,
    all_options: bool,
    steps: u64,
    epochs_started: usize,
    seconds: f64,
    rss_start_mib: f64,
    rss_peak_mib: f64,
    rss_end_mib: f64,
    /// Growth from the sample a quarter into the run to the last one (after the warm-up).
    rss_growth_after_warmup_mib: f64,
    /// VmHWM of the process: the highest resident set it ever had.
    vm_hwm_mib: f64,
    samples: Vec<Sample>,
}

/// `VmRSS` and `VmHWM` of this process in MiB (Linux); 0 elsewhere.
pub(crate) fn rss_mib() -> (f64, f64) {
    candle_resnet::alloc::resident_mib().unwrap_or((0.0, 0.0))
}

pub fn run(a: Args) -> Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let cfg = config(&a)?;
    let (train, test, classes) = data(&a, &cfg)?;
    let vm = VarMap::new();
    let model = Arch::ResNet18
        .build(
            classes,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )?
        .with_drop_path(cfg.drop_path)?
        .with_conv_backend(cfg.amp.conv_backend(&Device::Cpu));
    let (rss0, _) = rss_mib();
    let (samples, last) = train_sampling(&a, &cfg, (&model, &vm), (&train, &test), rss0)?;
    let report = summarise(&a, samples, last, rss0);
    std::fs::write(
        a.out.join("soak.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    plot(&a, &report)?;
    println!(
        "soak: {} steps in {:.0} s ({} epochs started); RSS start {:.0} MiB, peak {:.0} MiB, end {:.0} MiB, growth after warm-up {:+.1} MiB; {}",
        report.steps,
        report.seconds,
        report.epochs_started,
        report.rss_start_mib,
        report.rss_peak_mib,
        report.rss_end_mib,
        report.rss_growth_after_warmup_mib,
        a.out.join("soak.json").display()
    );
    Ok(())
}

/// The run's training settings: the recipe's defaults at the asked size, optimizer and
/// precision (every regulariser on with `--all-options`); the time budget ends it.
fn config(a: &Args) -> Result<TrainConfig> {
    let cfg = TrainConfig {
        epochs: 1000, // the time budget ends the run
        batch_size: a.batch_size,
        accum_steps: a.accum_steps,
        lr: 0.02,
        optimizer: a.optimizer,
        amp: a.amp,
        ..Default::default()
    };
    let cfg = if a.all_options {
        TrainConfig {
            mixup_alpha: 0.2,
            cutmix_alpha: 1.0,
            auto_augment: Some("ta_wide".into()),
            color_jitter: Some(vec![0.4]),
            reprob: 0.25,
            model_ema: true,
            model_ema_warmup: true,
            clip_grad: Some(1.0),
            drop_path: 0.05,
            ..cfg
        }
    } else {
        cfg
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Generated JPEGs about 1.5x the input side (96 x 64 at scale 1), as a dataset's photos would
/// be, and their training and test loaders; also the number of classes.
fn data(a: &Args, cfg: &TrainConfig) -> Result<(Loader, Loader, usize)> {
    let t_gen = Instant::now();
    // Pictures about 1.5x the input side (96 x 64 at scale 1), as a dataset's photos would be.
    let scale = (a.image_size as f64 * 1.5 / 64.0).ceil().max(1.0) as u32;
    let train_ds = Arc::new(candle_finetune::smoke::generated_dataset(
        a.images, scale, 1,
    ));
    let test_ds = Arc::new(candle_finetune::smoke::generated_dataset(
        a.test_images,
        scale,
        2,
    ));
    eprintln!(
        "soak: {} train / {} test generated JPEGs (~{} x {} px) in {:.1} s",
        a.images,
        a.test_images,
        96 * scale,
        64 * scale,
        t_gen.elapsed().as_secs_f64()
    );
    let pre = Preprocess {
        size: a.image_size,
        ..Default::default()
    };
    let lcfg = LoaderConfig {
        batch_size: a.batch_size,
        prefetch: 3,
        ..Default::default()
    };
    let train = Loader::new(
        train_ds.clone(),
        Transform::for_training(pre.clone()).with_augment(cfg.augment()?),
        LoaderConfig {
            mixup: cfg.mixup(train_ds.num_classes()),
            erasing: cfg.erasing(),
            ..lcfg.clone()
        },
    )?;
    let test = Loader::new(
        test_ds,
        Transform::for_eval(pre),
        LoaderConfig {
            shuffle: false,
            ..lcfg
        },
    )?;
    Ok((train, test, train_ds.num_classes()))
}

/// Trains until the time budget and samples the resident memory every `--every` steps (and at
/// the last); returns the samples and the last (step, epoch).
fn train_sampling(
    a: &Args,
    cfg: &TrainConfig,
    (model, vm): (&candle_resnet::resnet::ResNet, &VarMap),
    (train, test): (&Loader, &Loader),
    rss0: f64,
) -> Result<(Vec<Sample>, (u64, usize))> {
    let mut samples = vec![Sample {
        step: 0,
        epoch: 0,
        elapsed_s: 0.0,
        rss_mib: rss0,
    }];
    let mut last = (0u64, 0usize);
    let budget = a.seconds as f64;
    fit_with(
        model,
        vm,
        train,
        Some(test),
        cfg,
        &Device::Cpu,
        &a.out,
        false,
        &mut |e: &candle_finetune::train::StepEvent| {
            last = (e.step, e.epoch);
            let done = e.elapsed_s >= budget;
            if e.step.is_multiple_of(a.every) || done {
                samples.push(Sample {
                    step: e.step,
                    epoch: e.epoch,
                    elapsed_s: e.elapsed_s,
                    rss_mib: rss_mib().0,
                });
            }
            if done {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )?;
    Ok((samples, last))
}

/// The run's figures from its samples (growth measured from the sample a quarter of the way in,
/// after the warm-up).
fn summarise(a: &Args, samples: Vec<Sample>, last: (u64, usize), rss0: f64) -> Report {
    let (rss_end, hwm) = rss_mib();
    let peak = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    let warm = &samples[samples.len() / 4];
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        images: a.images,
        image_size: a.image_size,
        batch_size: a.batch_size,
        accum_steps: a.accum_steps,
        optimizer: format!("{:?}", a.optimizer).to_lowercase(),
        all_options: a.all_options,
        steps: last.0,
        epochs_started: last.1,
        seconds: samples.last().map_or(0.0, |s| s.elapsed_s),
        rss_start_mib: rss0,
        rss_peak_mib: peak,
        rss_end_mib: rss_end,
        rss_growth_after_warmup_mib: samples.last().map_or(0.0, |s| s.rss_mib) - warm.rss_mib,
        vm_hwm_mib: hwm,
        samples,
    };
    report
}

/// `soak.png`: resident memory against the optimizer step.
fn plot(a: &Args, report: &Report) -> Result<()> {
    let pts: Vec<(f64, f64)> = report
        .samples
        .iter()
        .map(|s| (s.step as f64, s.rss_mib))
        .collect();
    candle_finetune::plot::line(
        &a.out.join("soak.png"),
        &format!(
            "resident memory, ResNet-18 {} px batch {}{} ({} steps, {} epochs started)",
            a.image_size,
            a.batch_size,
            if a.all_options {
                ", every regulariser"
            } else {
                ""
            },
            report.steps,
            report.epochs_started
        ),
        "optimizer step",
        "RSS (MiB)",
        &pts,
    )?;
    Ok(())
}
