//! The training loop: learnability from random init, exact resumption, the non-finite-loss stop,
//! and the metrics against hand-computed values.

use candle_core::{DType, Device, Tensor};
use candle_finetune::data::{
    parquet::write_shard, Dataset, Loader, LoaderConfig, Preprocess, Transform,
};
use candle_finetune::eval::Accumulator;
use candle_finetune::train::{fit, Checkpoint, ScheduleKind, TrainConfig};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::resnet18;
use image::{ImageFormat, Rgb, RgbImage};
use std::sync::Arc;

/// Four classes told apart by colour and by the position of a bright square, with noise.
fn shapes_dataset(dir: &std::path::Path, per_class: usize, salt: u32) -> Dataset {
    let colours = [
        [200u8, 40, 40],
        [40, 200, 40],
        [40, 40, 200],
        [200, 200, 40],
    ];
    let mut rows = Vec::new();
    let mut s = 12345u32 ^ salt;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    for (c, col) in colours.iter().enumerate() {
        for _ in 0..per_class {
            let (ox, oy) = (rnd() % 20, rnd() % 20);
            let img = RgbImage::from_fn(40, 40, |x, y| {
                let n = (rnd() % 40) as i32 - 20;
                let inside = x >= ox && x < ox + 14 && y >= oy && y < oy + 14;
                let base = if inside { [255, 255, 255] } else { *col };
                Rgb(base.map(|v| (v as i32 + n).clamp(0, 255) as u8))
            });
            let mut bytes = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
                .unwrap();
            rows.push((bytes, c as i64));
        }
    }
    let names: Vec<String> = ["red", "green", "blue", "yellow"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = dir.join(format!("shapes-{salt}.parquet"));
    write_shard(&p, &rows, &names).unwrap();
    Dataset::from_parquet(&[p]).unwrap()
}

fn loaders(dir: &std::path::Path) -> (Loader, Loader) {
    let pre = Preprocess {
        size: 32,
        crop_pct: 1.0,
        ..Default::default()
    };
    let train = Arc::new(shapes_dataset(dir, 24, 1));
    let test = Arc::new(shapes_dataset(dir, 8, 2));
    let cfg = LoaderConfig {
        batch_size: 16,
        seed: 7,
        ..Default::default()
    };
    (
        Loader::new(train, Transform::for_training(pre.clone()), cfg.clone()).unwrap(),
        Loader::new(
            test,
            Transform::for_eval(pre),
            LoaderConfig {
                shuffle: false,
                ..cfg
            },
        )
        .unwrap(),
    )
}

fn model() -> (VarMap, candle_resnet::resnet::ResNet) {
    let vm = VarMap::new();
    let m = resnet18(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_resnet::init::fill_deterministic(&vm).unwrap();
    // Start from ImageNet-like statistics: neutral running stats.
    for (k, v) in vm.data().lock().unwrap().iter() {
        if k.ends_with("running_mean") {
            v.set(&v.zeros_like().unwrap()).unwrap();
        } else if k.ends_with("running_var") {
            v.set(&v.ones_like().unwrap()).unwrap();
        }
    }
    (vm, m)
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 16,
        lr: 0.02,
        warmup_epochs: 0.5,
        schedule: ScheduleKind::Cosine,
        seed: 3,
        ..Default::default()
    }
}

/// Eight epochs of 24 images (16 steps): with six (12 steps) the run ended at the edge of the
/// threshold, where the rounding of a convolution's sums decides (the im2col + GEMM path reached
/// 1.0, the direct kernels' sums in another order 0.75); with eight, both, and every mix of the
/// two per pass, reach 1.0 by the seventh epoch.
#[test]
fn learns_a_learnable_dataset_from_random_init() {
    const EPOCHS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let out = dir.path().join("run");
    let s = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &config(EPOCHS),
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    let top1: Vec<Option<f64>> = s.history.iter().map(|h| h.val_top1).collect();
    assert!(
        s.best.as_ref().unwrap().top1 >= 0.9,
        "validation top-1 per epoch: {top1:?}"
    );
    assert!(s.history.last().unwrap().train_loss < s.history[0].train_loss);
    // The run folder.
    for f in [
        "checkpoint-last.safetensors",
        "checkpoint-best.safetensors",
        "model.safetensors",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The test evaluation (eval.json) is the recipe's, once, after the run: not fit's.
    assert!(!out.join("eval.json").exists());
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), EPOCHS);
    for l in lines.lines() {
        let m: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(m["val_top1"].is_number(), "{l}");
    }
}

#[test]
fn resuming_gives_the_losses_of_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let full = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &config(2),
        &Device::Cpu,
        &dir.path().join("a"),
        false,
    )
    .unwrap();

    let (vm, m) = model();
    let out = dir.path().join("b");
    let interrupted = TrainConfig {
        stop_after_epoch: Some(1),
        ..config(2)
    };
    let first = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &interrupted,
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    assert_eq!(first.history.len(), 1);
    // A fresh process would rebuild the model from scratch: do the same.
    let (vm2, m2) = resnet18_fresh();
    let rest = fit(
        &m2,
        &vm2,
        &train,
        Some(&test),
        &config(2),
        &Device::Cpu,
        &out,
        true,
    )
    .unwrap();
    let mut joined = first.step_losses.clone();
    joined.extend(&rest.step_losses);
    assert_eq!(joined, full.step_losses, "per-step losses");
    assert_eq!(rest.history.len(), 2);
    assert_eq!(rest.history[1].val_top1, full.history[1].val_top1);
}

#[test]
fn a_run_stopped_mid_epoch_resumes_from_its_recovery_checkpoint_bit_for_bit() {
    use candle_finetune::train::fit_with;
    use std::ops::ControlFlow;
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let steps_per_epoch = train.num_batches() as u64;
    assert!(steps_per_epoch >= 3, "{steps_per_epoch}");
    let (vm, m) = model();
    let full = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &config(2),
        &Device::Cpu,
        &dir.path().join("a"),
        false,
    )
    .unwrap();
    let weights = |vm: &VarMap| {
        let d = vm.data().lock().unwrap();
        let mut v: Vec<(String, Vec<f32>)> = d
            .iter()
            .map(|(k, t)| {
                let x = t
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (k.clone(), x)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let full_weights = weights(&vm);
    // Stopped (as on SIGTERM) one step into the second epoch, then twice more, each time by a
    // fresh model resuming from the folder.
    let out = dir.path().join("b");
    let mut losses = Vec::new();
    let mut resume = false;
    let mut stops = vec![steps_per_epoch + 1, 1, 2];
    let last = loop {
        let (vm, m) = if resume { resnet18_fresh() } else { model() };
        let stop_after = stops.first().copied();
        let mut taken = 0u64;
        let s = fit_with(
            &m,
            &vm,
            &train,
            Some(&test),
            &config(2),
            &Device::Cpu,
            &out,
            resume,
            &mut |_: &candle_finetune::train::StepEvent| {
                taken += 1;
                match stop_after {
                    Some(n) if taken >= n => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                }
            },
        )
        .unwrap();
        losses.extend(s.step_losses.clone());
        if !s.interrupted {
            break (s, vm);
        }
        stops.remove(0);
        // The recovery checkpoint says where the epoch stands.
        let ck = Checkpoint::load(&out.join("checkpoint-last.safetensors")).unwrap();
        let p = ck.meta.partial.expect("a mid-epoch checkpoint");
        assert_eq!(ck.meta.step, losses.len() as u64);
        assert_eq!(
            p.batches as u64,
            ck.meta.step - ck.meta.epoch as u64 * steps_per_epoch
        );
        resume = true;
    };
    let (s, vm) = last;
    assert_eq!(
        losses, full.step_losses,
        "per-step losses across three stops"
    );
    assert_eq!(
        s.history.iter().map(|h| h.train_loss).collect::<Vec<_>>(),
        full.history
            .iter()
            .map(|h| h.train_loss)
            .collect::<Vec<_>>(),
        "the epochs' mean losses, sums carried over the stops"
    );
    assert_eq!(weights(&vm), full_weights, "final weights");
}

#[test]
fn recovery_checkpoints_every_n_steps_and_resume_without_one_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let out = dir.path().join("fresh");
    // --resume with nothing to resume: a fresh run, said so, not an error.
    let cfg = TrainConfig {
        checkpoint_every_steps: Some(1),
        max_batches_per_epoch: Some(3),
        keep_checkpoints: 2,
        ..config(1)
    };
    // What writes killed mid-way leave behind (the atomic write's and safetensors' temporary
    // files) is cleared; other files stay.
    std::fs::create_dir_all(&out).unwrap();
    for f in [
        ".checkpoint-last.safetensors.tmp-1",
        ".tmpAb12Cd",
        "notes.txt",
    ] {
        std::fs::write(out.join(f), b"half a checkpoint").unwrap();
    }
    let s = fit(&m, &vm, &train, Some(&test), &cfg, &Device::Cpu, &out, true).unwrap();
    assert_eq!(s.history.len(), 1);
    assert!(!out.join(".tmpAb12Cd").exists());
    assert!(!out.join(".checkpoint-last.safetensors.tmp-1").exists());
    assert!(out.join("notes.txt").exists());
    // Steps 1, 2 (recovery) and 3 (the epoch's end) were checkpointed; the newest two kept.
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-step-"))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            "checkpoint-step-00000002.safetensors",
            "checkpoint-step-00000003.safetensors"
        ]
    );
    let two = Checkpoint::load(&out.join(&kept[0])).unwrap();
    assert_eq!((two.meta.step, two.meta.partial.is_some()), (2, true));
    // At the end the epoch's own checkpoint replaces the recovery one.
    let ck = Checkpoint::load(&out.join("checkpoint-last.safetensors")).unwrap();
    assert!(ck.meta.partial.is_none() && ck.meta.epoch == 1);
    // The interval is not part of what must match on resume; zero is refused.
    assert!(TrainConfig {
        checkpoint_every_steps: Some(0),
        ..config(1)
    }
    .validate()
    .is_err());
    assert!(config(1)
        .resume_differences(&TrainConfig {
            checkpoint_every_steps: Some(5),
            checkpoint_every_minutes: 1.0,
            ..config(1)
        })
        .is_empty());
}

fn resnet18_fresh() -> (VarMap, candle_resnet::resnet::ResNet) {
    let vm = VarMap::new();
    let m = resnet18(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    (vm, m)
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let out = dir.path().join("run");
    let first = TrainConfig {
        stop_after_epoch: Some(1),
        ..config(3)
    };
    fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &first,
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    let before = std::fs::read(out.join("checkpoint-last.safetensors")).unwrap();
    // The same run resumed with a learning rate that diverges (lr may change on resume).
    let wild = TrainConfig {
        lr: 1e35,
        ..config(3)
    };
    let e = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &wild,
        &Device::Cpu,
        &out,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("the loss became") && e.contains("checkpoint-last"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(out.join("checkpoint-last.safetensors")).unwrap(),
        before
    );
    assert_eq!(
        Checkpoint::load(&out.join("checkpoint-last.safetensors"))
            .unwrap()
            .meta
            .epoch,
        1
    );
}

#[test]
fn metrics_match_hand_computed_values() {
    // Three samples, three classes.
    let logits = Tensor::new(&[[2f32, 1., 0.], [0., 3., 0.], [1., 0., 0.5]], &Device::Cpu).unwrap();
    let mut acc = Accumulator::new(3);
    acc.add(&logits, &[0, 1, 2]).unwrap();
    let r = acc.finish();
    let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
    let nll =
        ((lse([2., 1., 0.]) - 2.0) + (lse([0., 3., 0.]) - 3.0) + (lse([1., 0., 0.5]) - 0.5)) / 3.0;
    assert!((r.nll - nll).abs() < 1e-12);
    assert!((r.top1 - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(r.top5, 1.0);
    let conf = [
        2f64 - lse([2., 1., 0.]),
        3.0 - lse([0., 3., 0.]),
        1.0 - lse([1., 0., 0.5]),
    ]
    .map(f64::exp);
    // Bins of width 1/15: confidences 0.665 (bin 9), 0.909 (bin 13), 0.506 (bin 7).
    let ece = ((1.0 - conf[0]) + (1.0 - conf[1]) + conf[2]) / 3.0;
    assert!((r.ece - ece).abs() < 1e-12, "{} vs {ece}", r.ece);
    assert_eq!(r.confusion[2][0], 1);
    assert_eq!(r.most_confused, vec![(2, 0, 1)]);
    assert_eq!(r.per_class_accuracy, vec![1.0, 1.0, 0.0]);
}

#[test]
fn optimizers_match_pytorch() {
    use candle_finetune::train::{Group, Optimizer, Rule};
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/optim.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let vec = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let p0 = vec(&fx["p0"]);
    let lrs = vec(&fx["lrs"]);
    let cases = [
        (
            "sgd_momentum_l2",
            Rule::Sgd {
                momentum: 0.9,
                nesterov: false,
                decoupled: false,
            },
            0.01,
        ),
        (
            "sgd_nesterov",
            Rule::Sgd {
                momentum: 0.9,
                nesterov: true,
                decoupled: false,
            },
            0.0,
        ),
        (
            "sgd_decoupled",
            Rule::Sgd {
                momentum: 0.9,
                nesterov: false,
                decoupled: true,
            },
            0.01,
        ),
        (
            "adamw",
            Rule::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.05,
        ),
    ];
    for (name, rule, wd) in cases {
        let var = candle_core::Var::from_vec(p0.clone(), 6, &Device::Cpu).unwrap();
        let group = Group {
            vars: vec![("p".into(), var.clone())],
            weight_decay: wd,
            lr_mult: 1.0,
        };
        let mut opt = Optimizer::new(rule, vec![group]).unwrap();
        for (k, g) in fx["grads"].as_array().unwrap().iter().enumerate() {
            // Save and restore the state half way: resumption must not change the trajectory.
            if k == 2 {
                let st = opt.state().unwrap();
                let group = Group {
                    vars: vec![("p".into(), var.clone())],
                    weight_decay: wd,
                    lr_mult: 1.0,
                };
                opt = Optimizer::new(rule, vec![group]).unwrap();
                opt.load_state(&st).unwrap();
            }
            let grads = std::collections::HashMap::from([(
                "p".to_string(),
                Tensor::new(vec(g).as_slice(), &Device::Cpu).unwrap(),
            )]);
            opt.step_with(&grads, lrs[k]).unwrap();
            let got = var.as_tensor().to_vec1::<f64>().unwrap();
            let want = vec(&fx["cases"][name][k]);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-12,
                    "{name} step {k}: {got:?} vs {want:?}"
                );
            }
        }
    }
}

#[test]
fn gradient_accumulation_takes_one_step_per_group_of_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let cfg = TrainConfig {
        accum_steps: 4,
        max_batches_per_epoch: Some(5),
        ..config(1)
    };
    let s = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &cfg,
        &Device::Cpu,
        &dir.path().join("acc"),
        false,
    )
    .unwrap();
    // 5 batches in groups of 4: two optimizer steps (the last one over a single batch).
    assert_eq!(s.step_losses.len(), 2);
    let ck = Checkpoint::load(&dir.path().join("acc/checkpoint-last.safetensors")).unwrap();
    assert_eq!(ck.meta.step, 2);
}

#[test]
fn eval_every_skips_test_passes_but_always_evaluates_the_last_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let cfg = TrainConfig {
        eval_every: 2,
        max_batches_per_epoch: Some(1),
        ..config(3)
    };
    let out = dir.path().join("every2");
    let s = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &cfg,
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    let evaluated: Vec<bool> = s.history.iter().map(|h| h.val_top1.is_some()).collect();
    assert_eq!(evaluated, [false, true, true]);
    assert!(s.best_epoch == 2 || s.best_epoch == 3, "{}", s.best_epoch);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0]["val_top1"].is_null() && lines[1]["val_top1"].is_number());
    assert_eq!(lines[2]["skipped_images"], 0);
    let zero = TrainConfig {
        eval_every: 0,
        ..config(1)
    };
    let e = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &zero,
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("eval_every"), "{e}");
}

#[test]
fn without_a_validation_split_the_last_epoch_is_kept_and_nothing_is_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _test) = loaders(dir.path());
    let (vm, m) = model();
    let cfg = TrainConfig {
        max_batches_per_epoch: Some(1),
        ..config(3)
    };
    let out = dir.path().join("last");
    let s = fit(&m, &vm, &train, None, &cfg, &Device::Cpu, &out, false).unwrap();
    assert_eq!(
        (s.best_epoch, s.selected_on, s.best.is_none()),
        (3, candle_finetune::train::Selection::LastEpoch, true)
    );
    assert!(s.history.iter().all(|h| h.val_top1.is_none()));
    // The kept checkpoint is the last epoch's.
    let best = Checkpoint::load(&out.join("checkpoint-best.safetensors")).unwrap();
    assert_eq!(best.meta.epoch, 3);
}

#[test]
fn undecodable_images_are_skipped_and_counted_in_the_metrics() {
    use candle_finetune::data::{ImageData, Sample};
    let dir = tempfile::tempdir().unwrap();
    let good = shapes_dataset(dir.path(), 2, 5); // 8 PNGs
    let mut jpeg = Vec::new();
    RgbImage::from_fn(40, 40, |x, y| Rgb([x as u8 * 6, y as u8 * 6, 90]))
        .write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg)
        .unwrap();
    let mut ds = good.clone();
    for cut in [jpeg.len() / 3, jpeg.len() - 2] {
        ds.samples.push(Sample {
            image: ImageData::Encoded(jpeg[..cut].to_vec().into()),
            label: 0,
        });
    }
    let ds = Arc::new(ds);
    let pre = Preprocess {
        size: 32,
        crop_pct: 1.0,
        ..Default::default()
    };
    let lcfg = LoaderConfig {
        batch_size: 16,
        ..Default::default()
    };
    let train = Loader::new(
        ds.clone(),
        Transform::for_training(pre.clone()),
        lcfg.clone(),
    )
    .unwrap();
    let test = Loader::new(ds, Transform::for_eval(pre), lcfg).unwrap();
    let (vm, m) = model();
    let out = dir.path().join("skips");
    let s = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &config(1),
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    let h = &s.history[0];
    assert_eq!(
        (h.skipped_train, h.skipped_validation, h.skipped_images),
        (2, 2, 4)
    );
    let line: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()).unwrap();
    assert_eq!(line["skipped_images"], 4);
    assert_eq!(
        s.best.as_ref().unwrap().n,
        8,
        "only decodable test images are scored"
    );
}

/// A classifier without batch norm (flatten + one linear layer named like ResNet's head), so
/// that a group of micro-batches and one batch of the same images have the same gradient.
struct LinearHead(candle_nn::Linear);

impl candle_finetune::train::Classifier for LinearHead {
    fn logits(&self, images: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        candle_core::Module::forward(&self.0, &images.flatten_from(1)?)
    }
    fn num_classes(&self) -> usize {
        4
    }
}

/// A `LinearHead` over 3x32x32 images with the values of `init` (or its own random ones).
fn linear_head(init: Option<&VarMap>) -> (VarMap, LinearHead) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(3 * 32 * 32, 4, vb.pp("fc")).unwrap();
    if let Some(src) = init {
        let src = src.data().lock().unwrap();
        for (k, v) in vm.data().lock().unwrap().iter() {
            v.set(src[k].as_tensor()).unwrap();
        }
    }
    (vm, LinearHead(fc))
}

/// With `accum_steps`, one optimizer step over micro-batches of 16 and 8 images equals one
/// step over the 24 images at once: the group's gradient is that of its mean loss, also when the
/// epoch ends mid-group (3 steps asked, 2 micro-batches there). Before, each micro-batch's loss
/// was divided by `accum_steps`: 0.5 (mean of 16) + 0.5 (mean of 8), and 2/3 of the gradient for
/// the short group.
#[test]
fn accumulated_gradient_equals_one_large_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(shapes_dataset(dir.path(), 6, 9));
    let pre = Preprocess {
        size: 32,
        crop_pct: 1.0,
        ..Default::default()
    };
    let loader = |batch_size| {
        Loader::new(
            data.clone(),
            Transform::for_training(pre.clone()),
            LoaderConfig {
                batch_size,
                seed: 7,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let test = Loader::new(
        data.clone(),
        Transform::for_eval(pre.clone()),
        LoaderConfig {
            batch_size: 24,
            shuffle: false,
            ..Default::default()
        },
    )
    .unwrap();
    let (small, whole) = (loader(16), loader(24));
    for accum in [2, 3] {
        let (vm_a, a) = linear_head(None);
        let (vm_b, b) = linear_head(Some(&vm_a));
        let cfg = TrainConfig {
            lr: 0.5,
            weight_decay: 0.0,
            warmup_epochs: 0.0,
            ..config(1)
        };
        let out = dir.path().join(format!("acc{accum}"));
        let grouped = TrainConfig {
            accum_steps: accum,
            ..cfg.clone()
        };
        let s = fit(
            &a,
            &vm_a,
            &small,
            Some(&test),
            &grouped,
            &Device::Cpu,
            &out.join("a"),
            false,
        )
        .unwrap();
        let one = fit(
            &b,
            &vm_b,
            &whole,
            Some(&test),
            &cfg,
            &Device::Cpu,
            &out.join("b"),
            false,
        )
        .unwrap();
        assert_eq!((s.step_losses.len(), one.step_losses.len()), (1, 1));
        // The step's loss is the images' mean either way.
        assert!((s.step_losses[0] - one.step_losses[0]).abs() < 1e-5);
        let (da, db) = (vm_a.data().lock().unwrap(), vm_b.data().lock().unwrap());
        let mut worst = 0f32;
        for (k, va) in da.iter() {
            let x = va
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let y = db[k]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs() / scale);
            }
        }
        assert!(
            worst < 1e-5,
            "accum {accum}: weights differ by {worst:e} (relative)"
        );
    }
}

/// `--resume` continues a run only with its own settings and data: another label smoothing,
/// batch size or dataset is a clear error naming what differs (it used to start a different
/// run from the middle of the first).
#[test]
fn resuming_with_other_settings_or_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let (vm, m) = model();
    let out = dir.path().join("run");
    let first = TrainConfig {
        stop_after_epoch: Some(1),
        ..config(2)
    };
    fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &first,
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    let other = TrainConfig {
        label_smoothing: 0.3,
        accum_steps: 2,
        ..config(2)
    };
    let e = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &other,
        &Device::Cpu,
        &out,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cannot resume")
            && e.contains("label_smoothing: 0.1 -> 0.3")
            && e.contains("accum_steps: 1 -> 2"),
        "{e}"
    );
    // Other data: the test split as training data.
    let e = fit(
        &m,
        &vm,
        &test,
        Some(&test),
        &config(2),
        &Device::Cpu,
        &out,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("other data (96 images"), "{e}");
    // The same settings and data resume.
    let rest = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &config(2),
        &Device::Cpu,
        &out,
        true,
    )
    .unwrap();
    assert_eq!(rest.history.len(), 2);
}

#[test]
fn mixup_and_cutmix_train_on_soft_targets_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let mixed = TrainConfig {
        mixup_alpha: 0.4,
        cutmix_alpha: 1.0,
        max_batches_per_epoch: Some(3),
        ..config(2)
    };
    // The training loader of a configuration (mixing when it says so).
    let loader_of = |cfg: &TrainConfig| {
        Loader::new(
            train.dataset().clone(),
            Transform::for_training(Preprocess {
                size: 32,
                crop_pct: 1.0,
                ..Default::default()
            }),
            LoaderConfig {
                batch_size: 16,
                seed: cfg.seed,
                mixup: cfg.mixup(4),
                ..Default::default()
            },
        )
        .unwrap()
    };
    // Mixed batches carry soft targets that are distributions.
    let b = loader_of(&mixed).epoch(0).next().unwrap().unwrap();
    let t = b.targets.expect("soft targets").to_vec2::<f32>().unwrap();
    assert!(t.iter().all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    assert!(
        t.iter()
            .any(|r| r.iter().filter(|v| **v > 0.1).count() == 2),
        "mixed rows"
    );
    let run = |cfg: &TrainConfig, out: &str, resume: bool| {
        let (vm, m) = if resume { resnet18_fresh() } else { model() };
        let l = loader_of(cfg);
        fit(
            &m,
            &vm,
            &l,
            Some(&test),
            cfg,
            &Device::Cpu,
            &dir.path().join(out),
            resume,
        )
        .unwrap()
    };
    let full = run(&mixed, "full", false);
    let plain = run(
        &TrainConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            ..mixed.clone()
        },
        "plain",
        false,
    );
    assert_ne!(
        full.step_losses, plain.step_losses,
        "mixing changes the losses"
    );
    assert_resumes_exactly(&run, &mixed, &full.step_losses);
    // Bad settings are errors.
    let bad = TrainConfig {
        mixup_prob: 1.5,
        ..mixed
    };
    assert!(bad.validate().is_err());
}

/// `run(cfg, folder, resume)` stopped after epoch 1 into "resumed", then resumed there, has the
/// step losses `full` of the uninterrupted run, bit for bit.
fn assert_resumes_exactly(
    run: &dyn Fn(&TrainConfig, &str, bool) -> candle_finetune::train::FitSummary,
    cfg: &TrainConfig,
    full: &[f64],
) {
    let first = run(
        &TrainConfig {
            stop_after_epoch: Some(1),
            ..cfg.clone()
        },
        "resumed",
        false,
    );
    let rest = run(cfg, "resumed", true);
    let mut joined = first.step_losses.clone();
    joined.extend(&rest.step_losses);
    assert_eq!(joined, full, "the same draws after a resume");
}

/// TrivialAugmentWide, colour jitter and drop path change training, and a resumed run draws
/// what the uninterrupted one drew (the augmentation from the images' streams, the drop-path
/// masks from the noise key of each batch).
#[test]
fn augmentation_and_drop_path_train_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let aug = TrainConfig {
        auto_augment: Some("ta_wide".into()),
        color_jitter: Some(vec![0.3]),
        drop_path: 0.2,
        max_batches_per_epoch: Some(3),
        ..config(2)
    };
    let run = |cfg: &TrainConfig, out: &str, resume: bool| {
        let (vm, m) = if resume { resnet18_fresh() } else { model() };
        let m = m.with_drop_path(cfg.drop_path).unwrap();
        let l = Loader::new(
            train.dataset().clone(),
            Transform::for_training(Preprocess {
                size: 32,
                crop_pct: 1.0,
                ..Default::default()
            })
            .with_augment(cfg.augment().unwrap()),
            LoaderConfig {
                batch_size: 16,
                seed: cfg.seed,
                ..Default::default()
            },
        )
        .unwrap();
        fit(
            &m,
            &vm,
            &l,
            Some(&test),
            cfg,
            &Device::Cpu,
            &dir.path().join(out),
            resume,
        )
        .unwrap()
    };
    let full = run(&aug, "full", false);
    let no_drop = run(
        &TrainConfig {
            drop_path: 0.0,
            ..aug.clone()
        },
        "no-drop",
        false,
    );
    let no_aug = run(
        &TrainConfig {
            auto_augment: None,
            color_jitter: None,
            ..aug.clone()
        },
        "no-aug",
        false,
    );
    assert_ne!(
        full.step_losses, no_drop.step_losses,
        "drop path changes the losses"
    );
    assert_ne!(
        full.step_losses, no_aug.step_losses,
        "augmentation changes the losses"
    );
    assert_resumes_exactly(&run, &aug, &full.step_losses);
}

/// bf16 on the CPU is flagged as slower than f32 (the CLI's warning) exactly where oneDNN's
/// native bf16 convolutions are missing: always without the `onednn` feature.
#[test]
fn bf16_on_a_cpu_without_onednn_bf16_is_flagged_slow() {
    use candle_finetune::train::Amp;
    use candle_resnet::ops::conv::Backend;
    assert!(!Amp::F32.slower_than_f32_on_cpu());
    if !cfg!(feature = "onednn") {
        assert!(Amp::Bf16.slower_than_f32_on_cpu());
    }
    assert_eq!(
        Amp::Bf16.slower_than_f32_on_cpu(),
        !Backend::OneDnnBf16.bf16_arithmetic()
    );
}

/// `--amp bf16`: the step runs in bf16 (its loss differs from f32's by a bf16-sized amount), the
/// master weights stay f32, and the step tracks the f32 step (the loss within 1 %, the head's
/// update within 10 % of its size; measured 0.1 % and 3.7 %).
#[test]
fn bf16_mixed_precision_keeps_f32_master_weights_and_tracks_f32() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let cfg = TrainConfig {
        max_batches_per_epoch: Some(1),
        ..config(1)
    };
    let run = |amp: candle_finetune::train::Amp, out: &str| {
        let (vm, m) = model();
        let start: Vec<(String, Tensor)> = sorted_vars(&vm);
        let s = fit(
            &m,
            &vm,
            &train,
            Some(&test),
            &TrainConfig { amp, ..cfg.clone() },
            &Device::Cpu,
            &dir.path().join(out),
            false,
        )
        .unwrap();
        (s, start, sorted_vars(&vm))
    };
    let (f32_run, start, f32_vars) = run(candle_finetune::train::Amp::F32, "f32");
    let (bf16_run, _, bf16_vars) = run(candle_finetune::train::Amp::Bf16, "bf16");
    assert_eq!(f32_run.step_losses.len(), bf16_run.step_losses.len());
    let mut differs = false;
    for (i, (a, b)) in f32_run
        .step_losses
        .iter()
        .zip(&bf16_run.step_losses)
        .enumerate()
    {
        assert!(
            (a - b).abs() <= 0.01 * a.abs(),
            "step {i}: loss f32 {a} vs bf16 {b}"
        );
        differs |= a != b;
    }
    assert!(differs, "the bf16 run computed in bf16");
    // Master weights: f32, moved by the steps, and close to the f32 run's.
    let (mut moved, mut gap) = (0f64, 0f64);
    for (((name, s), (_, a)), (_, b)) in start.iter().zip(&f32_vars).zip(&bf16_vars) {
        assert_eq!(b.dtype(), DType::F32, "{name}");
        if name.contains("running") {
            continue;
        }
        let d = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        // The head: its gradient is the least amplified by the deep, freshly initialised
        // backbone (at this init bf16 moves conv1's gradient by ~40 % in PyTorch's autocast
        // too, the head's by ~6 %).
        if name.starts_with("fc.") {
            moved += d(a, s);
            gap += d(a, b);
        }
    }
    assert!(moved > 0.0);
    let rel = (gap / moved).sqrt();
    eprintln!("the head's bf16 update differs from f32's by {rel:.3} of its size");
    assert!(
        rel < 0.1,
        "the head's bf16 update differs from f32's by {rel} of its size"
    );
}

fn sorted_vars(vm: &VarMap) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn the_weight_ema_is_evaluated_chosen_when_better_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let cfg = TrainConfig {
        model_ema: true,
        model_ema_decay: 0.9,
        max_batches_per_epoch: Some(3),
        ..config(2)
    };
    let (vm, m) = model();
    let full = fit(
        &m,
        &vm,
        &train,
        Some(&test),
        &cfg,
        &Device::Cpu,
        &dir.path().join("full"),
        false,
    )
    .unwrap();
    assert!(full.history.iter().all(|h| h.ema_val_top1.is_some()));
    // The chosen model is the better of the two on validation.
    let last = &full.history[full.best_epoch - 1];
    let (raw, ema) = (last.val_top1.unwrap(), last.ema_val_top1.unwrap());
    assert_eq!(full.best_is_ema, ema > raw, "raw {raw} ema {ema}");
    let best = Checkpoint::load(&dir.path().join("full/checkpoint-best.safetensors")).unwrap();
    assert_eq!(best.meta.best_is_ema, full.best_is_ema);
    assert!(!best.ema_values().is_empty());
    // Stopped after epoch 1 and resumed by a fresh model: the same losses and the same EMA.
    let (vm1, m1) = model();
    let out = dir.path().join("resumed");
    let first = fit(
        &m1,
        &vm1,
        &train,
        Some(&test),
        &TrainConfig {
            stop_after_epoch: Some(1),
            ..cfg.clone()
        },
        &Device::Cpu,
        &out,
        false,
    )
    .unwrap();
    let (vm2, m2) = resnet18_fresh();
    let rest = fit(
        &m2,
        &vm2,
        &train,
        Some(&test),
        &cfg,
        &Device::Cpu,
        &out,
        true,
    )
    .unwrap();
    let mut joined = first.step_losses.clone();
    joined.extend(&rest.step_losses);
    assert_eq!(joined, full.step_losses);
    let a = Checkpoint::load(&dir.path().join("full/checkpoint-last.safetensors")).unwrap();
    let b = Checkpoint::load(&out.join("checkpoint-last.safetensors")).unwrap();
    let flat = |v: Vec<(String, candle_core::Tensor)>| {
        let mut v: Vec<(String, Vec<f32>)> = v
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_eq!(
        flat(a.ema_values()),
        flat(b.ema_values()),
        "EMA after a resume"
    );
}

#[test]
fn gradient_clipping_bounds_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = loaders(dir.path());
    let fc = |vm: &VarMap| {
        vm.data().lock().unwrap()["fc.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let moved = |clip: Option<f64>, out: &str| {
        let (vm, m) = model();
        let before = fc(&vm);
        let cfg = TrainConfig {
            clip_grad: clip,
            momentum: 0.0,
            weight_decay: 0.0,
            max_batches_per_epoch: Some(1),
            ..config(1)
        };
        fit(
            &m,
            &vm,
            &train,
            Some(&test),
            &cfg,
            &Device::Cpu,
            &dir.path().join(out),
            false,
        )
        .unwrap();
        let after = fc(&vm);
        before
            .iter()
            .zip(&after)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let free = moved(None, "free");
    let clipped = moved(Some(1e-3), "clipped");
    // One SGD step moves the head by lr * its gradient; clipped, the whole gradient has norm
    // 1e-3, so the head moves by at most lr * 1e-3 (warmup lr at step 0 is below the peak).
    assert!(free > 1e-4, "{free}");
    assert!(clipped <= 0.02 * 1e-3 * (1.0 + 1e-4), "{clipped}");
    assert!(TrainConfig {
        clip_grad: Some(0.0),
        ..config(1)
    }
    .validate()
    .is_err());
}
