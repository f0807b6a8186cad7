//! `cargo xtask train-step`: a ResNet training step (train-mode forward, label-smoothed loss,
//! backward, the SGD update of `train-cars`: candle-finetune's optimizer, momentum 0.9 and weight
//! decay 1e-4 by default) timed on one device with random images, and the device memory in use
//! after every step. One JSON line; `cargo xtask bench-resnet` runs it on the CPU and the GPU
//! bundle (`cargo xtask gpu-check`) with `--device cuda`, each next to PyTorch's step
//! (scripts/bench_torch_resnet.py, same optimizer settings). With `--ddp` (feature `mpi`, under
//! `mpirun -np N`) each rank steps on `batch / N` images and the gradients are averaged across
//! the ranks in buckets before the update, as in data-parallel training; `cargo xtask bench-ddp`
//! runs it.

use anyhow::{bail, Result};
use candle_core::{DType, ModuleT, Tensor};
use candle_finetune::recipe::DeviceKind;
use candle_finetune::train::{Amp, Classifier, Group, Optimizer, Rule};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::ops::conv::Backend;
use candle_resnet::params::ParamGroups;
use candle_resnet::resnet::Arch;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Architecture.
    #[arg(long, default_value = "resnet18")]
    arch: String,
    /// Parameter and activation dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Mixed precision (`--amp bf16`): f32 parameters, the images in bf16 so that the
    /// convolutions and batch norms run in bf16 against the f32 weights (train-cars' `--amp`);
    /// with `--dtype` f32 only.
    #[arg(long)]
    amp: Option<String>,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// SGD momentum (train-cars' recipe: 0.9).
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay on every parameter (L2, as torch.optim.SGD).
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// The network body's layout: `auto` (channels-last where the convolutions take the
    /// im2col + GEMM path on the CPU, the default) or `nchw` (always `(N, C, H, W)`, for
    /// comparisons).
    #[arg(long, default_value = "auto")]
    layout: String,
    /// Data-parallel over the MPI world this process was launched in (`mpirun -np N`; feature
    /// `mpi`): `--batch` is the global batch, each rank steps on its share and the gradients
    /// are averaged (25 MiB buckets) before the update. Rank 0 prints.
    #[arg(long)]
    ddp: bool,
}

/// The world `--ddp` asks for: MPI's (feature `mpi`), or one process.
fn world(ddp: bool) -> Result<std::sync::Arc<dyn candle_ddp::Collective>> {
    if !ddp {
        return Ok(std::sync::Arc::new(candle_ddp::Single));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(std::sync::Arc::new(candle_ddp::mpi::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    bail!("--ddp needs MPI: build xtask with --features mpi and launch it with mpirun")
}

/// Device memory in use (total - free), MiB; `None` where the device cannot say (CPU).
fn device_used_mib(dev: &candle_core::Device) -> Option<f64> {
    match dev {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            dev.synchronize().ok()?;
            // The device's own context, whatever thread this is.
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some((total - free) as f64 / (1u64 << 20) as f64)
        }
        _ => None,
    }
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("--dtype must be f32, bf16 or f16, got {other}"),
    };
    let dev = a.device.device()?;
    // bf16 as train-cars runs it: the model takes the precision's convolution backend and says
    // which dtype its images enter in (f32 where the convolutions compute in bf16 themselves).
    let amp = match (a.amp.as_deref(), dtype) {
        (None, _) | (Some("f16"), DType::F32) => None,
        (Some("bf16"), DType::F32) => Some(Amp::Bf16),
        (Some(other), _) => bail!("--amp takes bf16 or f16 with --dtype f32, got {other}"),
    };
    let arch: Arch = a.arch.parse().map_err(anyhow::Error::msg)?;
    let world = world(a.ddp)?;
    let (rank, ranks) = (world.rank(), world.world_size());
    if !a.batch.is_multiple_of(ranks) {
        bail!("--batch {} does not split into {ranks} ranks", a.batch);
    }
    let per_rank = a.batch / ranks;
    let vm = VarMap::new();
    let channels_last = match a.layout.as_str() {
        "auto" => true,
        "nchw" => false,
        other => bail!("--layout must be auto or nchw, got {other}"),
    };
    let mut model = arch
        .build(196, VarBuilder::from_varmap(&vm, dtype, &dev))?
        .with_channels_last(channels_last);
    if let Some(amp) = amp {
        model = model.with_conv_backend(amp.conv_backend(&dev));
    }
    let input_dtype = match (amp, a.amp.as_deref()) {
        (Some(amp), _) => model.input_dtype(amp),
        (None, Some("f16")) => DType::F16,
        (None, _) => dtype,
    };
    let trainable = ParamGroups::from_varmap(&vm).trainable(false);
    let vars = trainable
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, v)| (format!("p{i}"), v))
        .collect();
    let rule = Rule::Sgd {
        momentum: a.momentum,
        nesterov: false,
        decoupled: false,
    };
    let group = Group {
        vars,
        weight_decay: a.weight_decay,
        lr_mult: 1.0,
    };
    let mut opt = Optimizer::new(rule, vec![group])?;
    let x = Tensor::randn(0f32, 1., (per_rank, 3, a.size, a.size), &dev)?.to_dtype(input_dtype)?;
    let labels: Vec<u32> = (0..per_rank)
        .map(|i| ((rank * per_rank + i) % 196) as u32)
        .collect();
    let y = Tensor::new(labels.as_slice(), &dev)?;
    let mut times = Vec::with_capacity(a.steps);
    let mut memory = Vec::with_capacity(a.steps + 1);
    let mut last_loss = f64::NAN;
    for step in 0..=a.steps {
        // Every rank starts the step together, so that the time is the step's, not a wait.
        world.barrier()?;
        let t0 = Instant::now();
        let run = || -> candle_core::Result<f64> {
            let logits = model.forward_t(&x, true)?;
            let loss = candle_xent::cross_entropy(&logits, &y, 0.1)?;
            let mut grads = candle_resnet::backward(&loss)?;
            if ranks > 1 {
                let mine = trainable
                    .iter()
                    .map(|v| match grads.get(v.as_tensor()) {
                        Some(g) => Ok(g.clone()),
                        None => v.as_tensor().zeros_like(),
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let mean = candle_ddp::all_reduce_mean(
                    world.as_ref(),
                    &mine,
                    candle_ddp::DEFAULT_BUCKET_BYTES,
                )?;
                for (v, g) in trainable.iter().zip(mean) {
                    grads.insert(v.as_tensor(), g);
                }
            }
            opt.step(&grads, a.lr)?;
            loss.to_dtype(DType::F64)?.to_scalar::<f64>()
        };
        let l = candle_resnet::threads::on_cpu_worker(&dev, run)?;
        last_loss = l;
        dev.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if step > 0 {
            times.push(dt);
        }
        if let Some(m) = device_used_mib(&dev) {
            memory.push(m);
        }
    }
    if rank != 0 {
        return Ok(());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let med = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let out = serde_json::json!({
        "impl": "candle",
        "device": format!("{:?}", a.device).to_lowercase(),
        "arch": a.arch,
        "dtype": a.dtype,
        "amp": a.amp,
        "batch": a.batch,
        "size": a.size,
        "steps": a.steps,
        "median_step_s": med,
        "images_per_s": a.batch as f64 / med,
        "threads": candle_core::utils::get_num_threads(),
        "ranks": ranks,
        // The process's highest resident set, comparable with PyTorch's ru_maxrss.
        "peak_rss_mib": crate::soak::rss_mib().1.round(),
        "conv": match input_dtype {
            DType::BF16 if candle_resnet::ops::conv::bf16_on_onednn(Backend::Auto) => {
                format!("{}, bf16 tensors", Backend::Auto.describe())
            }
            _ => model.conv_backend().describe(),
        },
        "layout": if model.runs_channels_last(&x) { "nhwc" } else { "nchw" },
        "last_loss": last_loss,
        "device_used_mib": memory,
    });
    println!("{out}");
    Ok(())
}
