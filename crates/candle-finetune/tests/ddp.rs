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

/// Runs `f` on each rank of a two-rank [`LocalWorld`] at once, each on its own thread and its
/// own rayon pool, as separate processes would be (ranks sharing one pool could deadlock: a
/// worker blocked in one rank's collective, a synchronised batch norm's inside the step's
/// parallel work, may steal the other rank's step); results in rank order.
fn on_two_ranks<T: Send>(f: impl Fn(Arc<dyn Collective>) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = LocalWorld::new(2)
            .into_iter()
            .map(|r| {
                s.spawn(move || {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .unwrap()
                        .install(|| f(Arc::new(r)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The loader shard of rank `r`.
fn shard_of(r: &dyn Collective) -> Shard {
    Shard {
        rank: r.rank(),
        world: r.world_size(),
    }
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

    let results = on_two_ranks(|r| {
        // Rank 1 starts elsewhere: the run must start it from rank 0's weights.
        let (vm, m) = model(classes, r.rank() as f32);
        let shard = shard_of(r.as_ref());
        let summary = fit_distributed(
            &m,
            &vm,
            &loader(&train_ds, shard, true),
            // Validation by shards, its counts and sums added over the ranks.
            Some(&loader(&val_ds, shard, false)),
            &cfg(),
            &Device::Cpu,
            &dir.path().join(format!("ddp-rank{}", r.rank())),
            false,
            r.as_ref(),
            &mut candle_finetune::train::Silent,
        )
        .unwrap();
        (summary, weights(&vm))
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
            &mut candle_finetune::train::Silent,
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
    let results = on_two_ranks(|r| {
        let (vm, m) = model(classes, 0.0);
        let me = r.rank();
        fit_distributed(
            &m,
            &vm,
            &loader(&train_ds, shard_of(r.as_ref()), true),
            None,
            &cfg(),
            &Device::Cpu,
            dir.path(),
            false,
            r.as_ref(),
            // Rank 1 alone asks to stop after step 3.
            &mut |e: &candle_finetune::train::StepEvent| {
                if me == 1 && e.step == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap()
    });
    for s in &results {
        assert!(s.interrupted);
        assert_eq!(s.step_losses.len(), 3);
    }
    assert!(dir.path().join("checkpoint-last.safetensors").exists());
}

/// A convolution, candle-resnet's batch norm (fused with its ReLU), global average pooling and
/// a linear head: the smallest model whose training depends on batch statistics.
struct ConvBn {
    conv: candle_nn::Conv2d,
    bn: candle_resnet::BatchNorm2d,
    fc: candle_nn::Linear,
    classes: usize,
}

impl Classifier for ConvBn {
    fn logits(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let z = self.bn.forward_t_relu(&self.conv.forward(x)?, train)?;
        self.fc.forward(&z.mean((2, 3))?)
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
}

/// [`ConvBn`] with deterministic trainable weights (shifted by `offset`; running statistics
/// as initialised), its batch norm synchronised over `sync` if given.
fn conv_bn(classes: usize, offset: f32, sync: Option<Arc<dyn Collective>>) -> (VarMap, ConvBn) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let conv_cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = candle_nn::conv2d(3, 6, 3, conv_cfg, vb.pp("conv")).unwrap();
    let mut bn = candle_resnet::BatchNorm2d::new(6, vb.pp("bn")).unwrap();
    bn.set_sync(sync);
    let fc = candle_nn::linear(6, classes, vb.pp("fc")).unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        if name.contains("running") {
            continue;
        }
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 + name.len()) % 97) as f32 / 485.0 - 0.1 + offset)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    (
        vm,
        ConvBn {
            conv,
            bn,
            fc,
            classes,
        },
    )
}

fn bn_cfg() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 8,
        lr: 0.1,
        schedule: ScheduleKind::Cosine,
        seed: 5,
        ..Default::default()
    }
}

/// 48 generated images: 6 full batches of 8 (4 + 4 on two ranks), 12 steps in 2 epochs.
fn bn_data() -> Arc<Dataset> {
    Arc::new(candle_finetune::smoke::generated_dataset(48, 1, 21))
}

/// A run's summary and its final variables by name.
type Trained = (candle_finetune::train::FitSummary, Vec<(String, Vec<f32>)>);

/// Trains [`ConvBn`] on two thread ranks (global batch 8), batch norm synchronised or not;
/// returns each rank's summary and final variables.
fn bn_ranks(ds: &Arc<Dataset>, cfg: &TrainConfig, out: &std::path::Path) -> Vec<Trained> {
    on_two_ranks(|r| {
        let sync = cfg.sync_bn.then(|| r.clone());
        let (vm, m) = conv_bn(ds.num_classes(), r.rank() as f32, sync);
        let summary = fit_distributed(
            &m,
            &vm,
            &loader_with(ds, shard_of(r.as_ref()), true, cfg.batch_size),
            None,
            cfg,
            &Device::Cpu,
            &out.join(format!("rank{}", r.rank())),
            false,
            r.as_ref(),
            &mut candle_finetune::train::Silent,
        )
        .unwrap();
        (summary, weights(&vm))
    })
}

/// One process training [`ConvBn`] with `cfg`.
fn bn_single(ds: &Arc<Dataset>, cfg: &TrainConfig, out: &std::path::Path) -> Trained {
    let (vm, m) = conv_bn(ds.num_classes(), 0.0, None);
    let summary = fit(
        &m,
        &vm,
        &loader_with(ds, Shard::default(), true, cfg.batch_size),
        None,
        cfg,
        &Device::Cpu,
        out,
        false,
    )
    .unwrap();
    (summary, weights(&vm))
}

/// Largest difference of `a` from `b` relative to `b`'s largest magnitude, over the variables
/// `keep` selects.
fn max_rel_diff(
    a: &[(String, Vec<f32>)],
    b: &[(String, Vec<f32>)],
    keep: impl Fn(&str) -> bool,
) -> f32 {
    let mut worst = 0f32;
    for ((name, x), (name_b, y)) in a.iter().zip(b) {
        assert_eq!(name, name_b);
        if !keep(name) {
            continue;
        }
        let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let err = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(err / scale);
    }
    worst
}

/// Batch norm with local statistics (DDP's default): two ranks with global batch 8 train like
/// one process accumulating two micro-batches of 4, each normalised with its own statistics
/// (the running statistics differ by design: rank 0's follow its share only, the process's
/// both micro-batches; training mode never reads them).
#[test]
fn local_batch_norm_equals_one_process_accumulating_the_halves() {
    let ds = bn_data();
    let dir = tempfile::tempdir().unwrap();
    let ranks = bn_ranks(&ds, &bn_cfg(), dir.path());
    let halves = TrainConfig {
        batch_size: 4,
        accum_steps: 2,
        ..bn_cfg()
    };
    let (single, want) = bn_single(&ds, &halves, &dir.path().join("single"));
    let ((s0, w0), (s1, w1)) = (&ranks[0], &ranks[1]);
    assert_eq!(
        w0, w1,
        "both ranks end with the same variables, bit for bit"
    );
    assert_eq!(s0.step_losses, s1.step_losses);
    assert_eq!(s0.step_losses.len(), 12);
    let err = max_rel_diff(w0, &want, |n| !n.contains("running"));
    assert!(err <= 1e-5, "trainable weights differ by {err}");
    for (a, b) in s0.step_losses.iter().zip(&single.step_losses) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
    }
}

/// `--sync-bn`: two ranks with global batch 8 and synchronised batch norm train like one
/// process with batch 8, running statistics included; without synchronisation they do not
/// (so the comparison can fail).
#[test]
fn sync_batch_norm_equals_one_process_with_the_global_batch() {
    let ds = bn_data();
    let dir = tempfile::tempdir().unwrap();
    let synced = TrainConfig {
        sync_bn: true,
        ..bn_cfg()
    };
    let ranks = bn_ranks(&ds, &synced, &dir.path().join("sync"));
    let (single, want) = bn_single(&ds, &bn_cfg(), &dir.path().join("single"));
    let ((s0, w0), (_, w1)) = (&ranks[0], &ranks[1]);
    assert_eq!(
        w0, w1,
        "both ranks end with the same variables, bit for bit"
    );
    let err = max_rel_diff(w0, &want, |_| true);
    assert!(err <= 1e-5, "variables differ from one process by {err}");
    for (a, b) in s0.step_losses.iter().zip(&single.step_losses) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
    }
    let local = bn_ranks(&ds, &bn_cfg(), &dir.path().join("local"));
    let apart = max_rel_diff(&local[0].1, &want, |n| !n.contains("running"));
    assert!(
        apart > 1e-3,
        "local statistics should train differently from the global batch ({apart})"
    );
}

/// Runs `cfg` on two thread ranks of the linear model, every rank writing to (and resuming
/// from) `dirs(rank)`; returns each rank's result.
fn linear_ranks(
    ds: &Arc<Dataset>,
    cfg: &TrainConfig,
    resume: bool,
    dirs: impl Fn(usize) -> std::path::PathBuf + Sync,
) -> Vec<Result<Trained>> {
    on_two_ranks(|r| {
        let (vm, m) = model(ds.num_classes(), r.rank() as f32);
        let summary = fit_distributed(
            &m,
            &vm,
            &loader(ds, shard_of(r.as_ref()), true),
            None,
            cfg,
            &Device::Cpu,
            &dirs(r.rank()),
            resume,
            r.as_ref(),
            &mut candle_finetune::train::Silent,
        )?;
        Ok((summary, weights(&vm)))
    })
}

/// A two-rank run stopped after its first epoch and resumed (`--resume`, same world size, the
/// run folder shared) ends with the uninterrupted run's weights and losses, bit for bit; ranks
/// that cannot all see the checkpoint stop with an error instead of diverging.
#[test]
fn a_resumed_two_rank_run_equals_the_uninterrupted_one() {
    let ds = Arc::new(candle_finetune::smoke::generated_dataset(45, 1, 11));
    let dir = tempfile::tempdir().unwrap();
    let whole = linear_ranks(&ds, &cfg(), false, |_| dir.path().join("whole"));
    let (whole, want) = whole.into_iter().next().unwrap().unwrap();
    let first = TrainConfig {
        stop_after_epoch: Some(1),
        ..cfg()
    };
    let part = dir.path().join("part");
    for r in linear_ranks(&ds, &first, false, |_| part.clone()) {
        assert_eq!(r.unwrap().0.history.len(), 1);
    }
    let resumed = linear_ranks(&ds, &cfg(), true, |_| part.clone());
    for r in resumed {
        let (summary, w) = r.unwrap();
        assert_eq!(w, want, "resumed weights equal the uninterrupted run's");
        assert_eq!(summary.history.len(), whole.history.len());
        assert_eq!(summary.step_losses, whole.step_losses[6..].to_vec());
    }
    // Rank 1 looking in a folder without the checkpoint: both ranks refuse to start.
    let errs = linear_ranks(&ds, &cfg(), true, |r| {
        if r == 0 {
            part.clone()
        } else {
            dir.path().join("elsewhere")
        }
    });
    for e in errs {
        let e = e.unwrap_err().to_string();
        assert!(e.contains("1 of 2 ranks found the checkpoint"), "{e}");
    }
}
