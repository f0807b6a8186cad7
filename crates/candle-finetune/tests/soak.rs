//! Memory soak: hundreds of optimizer steps must not grow the live heap.
//!
//! The failure it guards against: optimizer buffers built from tensors that still carry candle's
//! autograd graph keep every earlier step's activations and gradients alive (hundreds of MB per
//! ResNet step). This binary counts live heap bytes with its own global
//! allocator (exact, unlike RSS) and checks that, after a warm-up, they stop growing: for SGD
//! (momentum with L2 weight decay, decoupled weight decay, Nesterov), AdamW and gradient
//! accumulation on a small convolutional network, and for the whole training loop (`fit_with`)
//! on a ResNet-18.
//!
//! One `#[test]` only: a second test running in parallel would allocate into the same counter.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_finetune::data::{
    Dataset, ImageData, Loader, LoaderConfig, Preprocess, Sample, Transform,
};
use candle_finetune::train::{
    fit_with, GradAccumulator, Group, Optimizer, OptimizerKind, Rule, TrainConfig,
};
use candle_nn::{Linear, VarBuilder, VarMap};
use candle_resnet::batchnorm::BatchNorm2d;
use candle_resnet::params::ParamGroups;
use candle_resnet::resnet::{resnet18, torch_linear};
use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

struct Counting;
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

const MB: i64 = 1 << 20;

/// conv 3x3 (3 -> 16) + batch norm + ReLU, conv 3x3 stride 2 (16 -> 32) + batch norm + ReLU,
/// global average pool, linear to 10 classes: every kind of state the ResNet has.
struct SmallNet {
    w1: Tensor,
    bn1: BatchNorm2d,
    w2: Tensor,
    bn2: BatchNorm2d,
    fc: Linear,
}

impl SmallNet {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            w1: vb.get_with_hints((16, 3, 3, 3), "conv1.weight", init)?,
            bn1: BatchNorm2d::new(16, vb.pp("bn1"))?,
            w2: vb.get_with_hints((32, 16, 3, 3), "conv2.weight", init)?,
            bn2: BatchNorm2d::new(32, vb.pp("bn2"))?,
            fc: torch_linear(32, 10, vb.pp("fc"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = candle_resnet::ops::conv::conv2d(x, &self.w1, 1, 1)?;
        let y = self.bn1.forward_t(&y, true)?.relu()?;
        let y = candle_resnet::ops::conv::conv2d(&y, &self.w2, 2, 1)?;
        let y = self.bn2.forward_t(&y, true)?.relu()?;
        self.fc.forward(&y.mean((2, 3))?)
    }
}

/// Runs `steps` optimizer steps of `rule` (with `accum` micro-batches each) on the small net and
/// returns the live heap after every step.
fn small_net_run(rule: Rule, weight_decay: f64, accum: usize, steps: usize) -> Vec<i64> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let net = SmallNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let g = ParamGroups::from_varmap(&vm);
    let mut decay = g.head_decay.vars;
    decay.extend(g.backbone_decay.vars);
    let mut no_decay = g.head_no_decay.vars;
    no_decay.extend(g.backbone_no_decay.vars);
    let all: Vec<_> = decay.iter().chain(&no_decay).cloned().collect();
    let groups = vec![
        Group {
            vars: decay,
            weight_decay,
            lr_mult: 1.0,
        },
        Group {
            vars: no_decay,
            weight_decay: 0.0,
            lr_mult: 1.0,
        },
    ];
    let mut opt = Optimizer::new(rule, groups).unwrap();
    let mut acc = GradAccumulator::new(all);
    let x = Tensor::randn(0f32, 1., (8, 3, 12, 12), &dev).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &dev).unwrap();
    let loss_fn = candle_xent::CrossEntropyLoss::new().label_smoothing(0.1);
    let mut trace = Vec::with_capacity(steps);
    for _ in 0..steps {
        for _ in 0..accum {
            let loss = loss_fn.forward(&net.forward(&x).unwrap(), &y).unwrap();
            acc.add(&(loss / accum as f64).unwrap().backward().unwrap())
                .unwrap();
        }
        opt.step_with(&acc.take(), 0.01).unwrap();
        trace.push(live());
    }
    drop((opt, net, vm));
    trace
}

/// Growth of the live heap over the last `window` entries of `trace`.
fn growth(trace: &[i64], window: usize) -> i64 {
    trace[trace.len() - 1] - trace[trace.len() - 1 - window]
}

/// A 10-class in-memory PNG dataset of `n` 16 x 16 images.
fn tiny_dataset(n: usize) -> Arc<Dataset> {
    let samples = (0..n)
        .map(|i| {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                image::Rgb([(x * 16) as u8, (y * 16) as u8, (i * 25 % 256) as u8])
            });
            let mut bytes = Vec::new();
            img.write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
            Sample {
                image: ImageData::Encoded(bytes.into()),
                label: (i % 10) as u32,
            }
        })
        .collect();
    Arc::new(Dataset {
        samples,
        class_names: (0..10).map(|i| format!("c{i}")).collect(),
    })
}

#[test]
fn live_heap_stays_flat_over_hundreds_of_steps() {
    let sgd = |nesterov, decoupled| Rule::Sgd {
        momentum: 0.9,
        nesterov,
        decoupled,
    };
    let adamw = Rule::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let cases = [
        ("SGD momentum + L2", sgd(false, false), 1e-2, 1),
        ("SGD decoupled weight decay", sgd(false, true), 1e-2, 1),
        ("SGD Nesterov", sgd(true, false), 1e-2, 1),
        ("AdamW", adamw, 5e-2, 1),
        (
            "SGD momentum, 3 accumulated micro-batches",
            sgd(false, false),
            1e-2,
            3,
        ),
    ];
    let mut report = Vec::new();
    for (name, rule, wd, accum) in cases {
        // 400 steps: warm-up over the first 200, growth measured over the last 200.
        let trace = small_net_run(rule, wd, accum, 400);
        let g = growth(&trace, 200);
        report.push(format!("{name}: {:+} bytes over the last 200 steps", g));
        assert!(
            g < MB,
            "{name}: the live heap grew by {g} bytes over the last 200 of 400 steps \
             (after step 200: {} bytes, after step 400: {} bytes)",
            trace[199],
            trace[399]
        );
    }

    // The whole loop (loader, batch norm statistics, accumulation, optimizer, per-epoch
    // checkpoints and metrics) on a ResNet-18: 80 steps of SGD with momentum over 10 epochs,
    // 2 micro-batches each. A step whose graph survived would keep >= 45 MB (the gradients).
    let dir = tempfile::tempdir().unwrap();
    let pre = Preprocess {
        size: 16,
        crop_pct: 1.0,
        ..Default::default()
    };
    let lcfg = LoaderConfig {
        batch_size: 4,
        seed: 1,
        prefetch: 2,
        ..Default::default()
    };
    let train = Loader::new(
        tiny_dataset(64),
        Transform::for_training(pre.clone()),
        lcfg.clone(),
    )
    .unwrap();
    let test = Loader::new(
        tiny_dataset(8),
        Transform::for_eval(pre),
        LoaderConfig {
            shuffle: false,
            ..lcfg
        },
    )
    .unwrap();
    let vm = VarMap::new();
    let model = resnet18(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let cfg = TrainConfig {
        epochs: 10,
        batch_size: 4,
        accum_steps: 2,
        lr: 0.01,
        optimizer: OptimizerKind::Sgd,
        eval_every: 5,
        ..Default::default()
    };
    let mut trace = Vec::new();
    let summary = fit_with(
        &model,
        &vm,
        &train,
        Some(&test),
        &cfg,
        &Device::Cpu,
        dir.path(),
        false,
        &mut |e: &candle_finetune::train::StepEvent| {
            trace.push((e.step, live()));
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert_eq!(summary.step_losses.len(), 80);
    assert_eq!(trace.len(), 80);
    // Same point of an epoch (its last step) in epoch 3 and epoch 10.
    let (at3, at10) = (trace[23].1, trace[79].1);
    report.push(format!(
        "fit, ResNet-18: {:+} bytes from step 24 to step 80",
        at10 - at3
    ));
    eprintln!("{}", report.join("\n"));
    assert!(
        at10 - at3 < MB,
        "fit: the live heap grew by {} bytes from step 24 to step 80 ({at3} -> {at10})",
        at10 - at3
    );
}
