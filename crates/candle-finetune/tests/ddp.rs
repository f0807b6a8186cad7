//! Data-parallel training with DDP's semantics, two ranks as threads of this process
//! (candle_ddp::local::LocalWorld): with a model without batch norm, 2 ranks with global batch
//! B train to the weights and losses of 1 process with batch B (f32 round-off) over 24 SGD
//! steps, an uneven last batch included; both ranks end bit-identical though rank 1 starts from
//! other weights; validation evaluated by shards reports the one-process metrics; rank 0 alone
//! writes files. Removing the gradient averaging fails it (the ranks'
//! checksums differ at the first epoch's end).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_ddp::{local::LocalWorld, Collective};
use candle_finetune::data::{Dataset, Loader, LoaderConfig, Preprocess, Shard, Transform};
use candle_finetune::train::{fit, fit_distributed, Classifier, ScheduleKind, TrainConfig};
use candle_nn::{VarBuilder, VarMap};
use std::ops::ControlFlow;
use std::sync::Arc;

struct Linear(candle_nn::Linear, usize);

impl Classifier for Linear {
    fn logits(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.0.forward(&x.flatten_from(1)?)
    }
    fn num_classes(&self) -> usize {
        self.1
    }
}

/// A linear classifier of 8 px images with deterministic weights (shifted by `offset`).
fn model(classes: usize, offset: f32) -> (VarMap, Linear) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let lin = candle_nn::linear(192, classes, vb).unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 + name.len()) % 97) as f32 / 970.0 - 0.05 + offset)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    (vm, Linear(lin, classes))
}

fn weights(vm: &VarMap) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<_> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn cfg() -> TrainConfig {
    TrainConfig {
        epochs: 4,
        batch_size: 8,
        lr: 0.05,
        schedule: ScheduleKind::Cosine,
        seed: 3,
        ..Default::default()
    }
}

fn loader(ds: &Arc<Dataset>, shard: Shard, train: bool) -> Loader {
    loader_with(ds, shard, train, 8)
}

fn loader_with(ds: &Arc<Dataset>, shard: Shard, train: bool, batch_size: usize) -> Loader {
    let pre = Preprocess {
        size: 8,
        crop_pct: 1.0,
        ..Default::default()
    };
    let t = if train {
        Transform::for_training(pre)
    } else {
        Transform::for_eval(pre)
    };
    Loader::new(
        ds.clone(),
        t,
        LoaderConfig {
            batch_size,
            seed: 3,
            shuffle: train,
            shard,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn two_ranks_train_like_one_process_with_the_global_batch() {
    compare(cfg(), 24);
}

/// Accumulation over 2 micro-batches of 4 (global), grouped by position on both ranks, equals
/// one process accumulating the same micro-batches.
#[test]
fn accumulation_across_ranks_equals_one_process() {
    compare(
        TrainConfig {
            accum_steps: 2,
            batch_size: 4,
            ..cfg()
        },
        24,
    );
}

fn compare(cfg_run: TrainConfig, steps: usize) {
    let cfg = || cfg_run.clone();
    let b = cfg_run.batch_size;
    let loader = |ds: &Arc<Dataset>, shard: Shard, train: bool| loader_with(ds, shard, train, b);
    // 45 images: 5 full batches and one of 5 (2 + 3 images on the ranks).
    let train_ds = Arc::new(candle_finetune::smoke::generated_dataset(45, 1, 11));
    let val_ds = Arc::new(candle_finetune::smoke::generated_dataset(12, 1, 12));
    let classes = train_ds.num_classes();
    let dir = tempfile::tempdir().unwrap();
    let (vm, m) = model(classes, 0.0);
    let single = fit(
        &m,
        &vm,
        &loader(&train_ds, Shard::default(), true),
        Some(&loader(&val_ds, Shard::default(), false)),
        &cfg(),
        &Device::Cpu,
        &dir.path().join("single"),
        false,
    )
    .unwrap();
    let want = weights(&vm);
    assert_eq!(single.step_losses.len(), steps);

    let ranks = LocalWorld::new(2);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|r| {
                let (train_ds, val_ds, dir) = (&train_ds, &val_ds, dir.path());
                s.spawn(move || {
                    // Rank 1 starts elsewhere: the run must start it from rank 0's weights.
                    let (vm, m) = model(classes, r.rank() as f32);
                    let shard = Shard {
                        rank: r.rank(),
                        world: r.world_size(),
                    };
                    let summary = fit_distributed(
                        &m,
                        &vm,
                        &loader(train_ds, shard, true),
                        // Validation by shards, its counts and sums added over the ranks.
                        Some(&loader(val_ds, shard, false)),
                        &cfg(),
                        &Device::Cpu,
                        &dir.join(format!("ddp-rank{}", r.rank())),
                        false,
                        r,
                        &mut |_| ControlFlow::Continue(()),
                    )
                    .unwrap();
                    (summary, weights(&vm))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (s0, w0) = &results[0];
    let (s1, w1) = &results[1];
    assert_eq!(w0, w1, "both ranks end with the same weights, bit for bit");
    assert_eq!(s0.step_losses, s1.step_losses);
    assert_eq!(s0.best_epoch, single.best_epoch);
    for ((name, a), (_, b)) in w0.iter().zip(&want) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale.max(1.0), "{name}: {err} of {scale}");
    }
    for (a, b) in s0.step_losses.iter().zip(&single.step_losses) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "loss {a} vs one process {b}"
        );
    }
    // The sharded validation reports the whole split's metrics, as one process does.
    assert_eq!(s0.history.len(), single.history.len());
    for (a, b) in s0.history.iter().zip(&single.history) {
        assert_eq!(a.val_top1, b.val_top1, "epoch {}", a.epoch);
        assert_eq!(a.val_top5, b.val_top5);
        let (x, y) = (a.val_nll.unwrap(), b.val_nll.unwrap());
        assert!((x - y).abs() <= 1e-4 * y.abs(), "NLL {x} vs {y}");
    }
    assert_eq!(
        s0.history.iter().map(|m| m.val_nll).collect::<Vec<_>>(),
        s1.history.iter().map(|m| m.val_nll).collect::<Vec<_>>()
    );
    // Rank 0 alone writes.
    assert!(dir.path().join("ddp-rank0/metrics.jsonl").exists());
    assert!(dir
        .path()
        .join("ddp-rank0/checkpoint-last.safetensors")
        .exists());
    let rank1: Vec<_> = std::fs::read_dir(dir.path().join("ddp-rank1"))
        .unwrap()
        .collect();
    assert!(rank1.is_empty(), "rank 1 wrote {rank1:?}");
}

#[test]
fn settings_ranks_cannot_share_are_errors() {
    let train_ds = Arc::new(candle_finetune::smoke::generated_dataset(16, 1, 11));
    let classes = train_ds.num_classes();
    let dir = tempfile::tempdir().unwrap();
    let ranks = LocalWorld::new(2);
    // Each call fails before its first collective, so one thread per rank is not needed.
    let (vm, m) = model(classes, 0.0);
    let run = |cfg: &TrainConfig, shard: Shard| {
        fit_distributed(
            &m,
            &vm,
            &loader(&train_ds, shard, true),
            None,
            cfg,
            &Device::Cpu,
            dir.path(),
            false,
            &ranks[1],
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err()
        .to_string()
    };
    let e = run(&cfg(), Shard::default());
    assert!(e.contains("rank 1 of 2"), "{e}");
}

/// A stop asked on one rank only (a signal, a time budget) stops every rank at the same step,
/// rank 0 writing the recovery checkpoint; nobody is left waiting in a collective.
#[test]
fn a_stop_on_one_rank_stops_all_at_the_same_step() {
    let train_ds = Arc::new(candle_finetune::smoke::generated_dataset(45, 1, 11));
    let classes = train_ds.num_classes();
    let dir = tempfile::tempdir().unwrap();
    let ranks = LocalWorld::new(2);
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|r| {
                let (train_ds, dir) = (&train_ds, dir.path());
                s.spawn(move || {
                    let (vm, m) = model(classes, 0.0);
                    let shard = Shard {
                        rank: r.rank(),
                        world: r.world_size(),
                    };
                    let me = r.rank();
                    fit_distributed(
                        &m,
                        &vm,
                        &loader(train_ds, shard, true),
                        None,
                        &cfg(),
                        &Device::Cpu,
                        dir,
                        false,
                        r,
                        // Rank 1 alone asks to stop after step 3.
                        &mut |e| {
                            if me == 1 && e.step == 3 {
                                ControlFlow::Break(())
                            } else {
                                ControlFlow::Continue(())
                            }
                        },
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for s in &results {
        assert!(s.interrupted);
        assert_eq!(s.step_losses.len(), 3);
    }
    assert!(dir.path().join("checkpoint-last.safetensors").exists());
}
