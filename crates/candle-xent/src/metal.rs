//! Metal path of the fused op: the kernels of `src/xent.metal`, compiled from source once per
//! device (`new_library_with_source`) with their pipelines cached.
//!
//! The launch geometry and the parameter block come from [`CrossEntropyOp::kernel_launch`] and
//! [`XentParamsMetal::from_params`], plain Rust that is unit-tested on every platform; the kernel
//! source itself is run on the host by the `xent-kernel-emu` tests. This file is the thin part in
//! between (buffers, encoder, dispatch) and has only been type-checked where Apple's toolchain
//! exists: see the crate README for what has and has not run on Apple hardware.
//!
//! Every forward waits for its command buffer and reads back one `u32` (the first row with an
//! out-of-range class) so that a bad target is an `Err`, as on the CPU and CUDA.

use crate::launch::{XentParamsMetal, STATS};
use crate::spec::CrossEntropyOp;
use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{bail, DType, Layout, MetalDevice, MetalStorage, Result, Storage};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline, Library};
use objc2_metal::MTLSize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const SOURCE: &str = include_str!("xent.metal");

fn merr(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("candle-xent metal: {what}: {e}"))
}

/// The pipeline of kernel `name` on `dev`, compiling the library on first use.
fn pipeline(dev: &MetalDevice, name: &str) -> Result<ComputePipeline> {
    type Libs = HashMap<DeviceId, Library>;
    type Pipes = HashMap<(DeviceId, String), ComputePipeline>;
    static LIBS: OnceLock<Mutex<Libs>> = OnceLock::new();
    static PIPES: OnceLock<Mutex<Pipes>> = OnceLock::new();
    let key = (dev.id(), name.to_string());
    let mut pipes = PIPES.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = pipes.get(&key) {
        return Ok(p.clone());
    }
    let mut libs = LIBS.get_or_init(Default::default).lock().unwrap();
    let lib = match libs.get(&dev.id()) {
        Some(l) => l.clone(),
        None => {
            let l = dev
                .metal_device()
                .new_library_with_source(SOURCE, None)
                .map_err(|e| merr("compiling xent.metal", e))?;
            libs.insert(dev.id(), l.clone());
            l
        }
    };
    let f = lib
        .get_function(name, None)
        .map_err(|e| merr(&format!("kernel {name}"), e))?;
    let p = dev
        .metal_device()
        .new_compute_pipeline_state_with_function(&f)
        .map_err(|e| merr(&format!("pipeline {name}"), e))?;
    pipes.insert(key, p.clone());
    Ok(p)
}

/// Logit type name and element size; Metal GPUs have no f64.
fn logit(dtype: DType) -> Result<(&'static str, usize)> {
    match dtype {
        DType::F32 => Ok(("f32", 4)),
        DType::F16 => Ok(("f16", 2)),
        DType::BF16 => Ok(("bf16", 2)),
        DType::F64 => bail!("cross_entropy: Metal GPUs have no f64; use f32 logits"),
        other => bail!("cross_entropy: logits must be f16, bf16 or f32 on Metal, got {other:?}"),
    }
}

fn start(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("cross_entropy: {what} must be contiguous"),
    }
}

/// Buffers and byte offsets bound to slots 1 (class targets), 2 (soft targets), 3 (weights).
/// Unused slots are bound to the logits buffer (never read).
struct Bindings {
    target: (Buffer, usize),
    soft: (Buffer, usize),
    weight: (Buffer, usize),
    target_name: &'static str,
    params: XentParamsMetal,
}

fn bindings(
    op: &CrossEntropyOp,
    x: &MetalStorage,
    t: &MetalStorage,
    tl: &Layout,
    elem: usize,
) -> Result<(Bindings, crate::launch::Launch)> {
    let (ta, tb) = start(tl, "target")?;
    let rows = op.rows();
    let logits = (x.buffer().clone(), 0);
    let (target_name, target, soft) = if op.soft {
        if tb - ta != rows * op.classes {
            bail!("cross_entropy: soft target has {} elements", tb - ta);
        }
        ("i64", logits.clone(), (t.buffer().clone(), ta * elem))
    } else {
        if tb - ta != rows {
            bail!(
                "cross_entropy: target has {} elements, expected {rows}",
                tb - ta
            );
        }
        match t.dtype() {
            DType::U32 => ("u32", (t.buffer().clone(), ta * 4), logits.clone()),
            DType::I64 => ("i64", (t.buffer().clone(), ta * 8), logits.clone()),
            other => bail!(
                "cross_entropy: class-index target must be u32 or i64 on Metal, got {other:?}"
            ),
        }
    };
    let (weight, weight_sum) = match &op.weight {
        None => (logits.clone(), None),
        Some(w) => {
            // The sum is formed on the host (once per call) and rounded once, as on the CPU.
            // (Metal has no f64: the f32 weights are copied and summed, compensated, in f64.)
            let sum = crate::math::neumaier(w.to_vec1::<f32>()?.into_iter().map(f64::from));
            let (st, l) = w.storage_and_layout();
            let Storage::Metal(ms) = &*st else {
                bail!("cross_entropy: weight must be on the logits' Metal device")
            };
            let (a, _) = start(l, "weight")?;
            ((ms.buffer().clone(), a * 4), Some(sum))
        }
    };
    let (l, p) = op.kernel_launch(elem)?;
    Ok((
        Bindings {
            target,
            soft,
            weight,
            target_name,
            params: XentParamsMetal::from_params(&p, weight_sum),
        },
        l,
    ))
}

/// Encodes one kernel: logits (slot 0), targets (1-3), params (4), stats (5), flag (6) and, for
/// the backward, the gradient (7). Waits for it and returns the first bad row, if any.
#[allow(clippy::too_many_arguments)]
fn dispatch(
    dev: &MetalDevice,
    name: &str,
    l: &crate::launch::Launch,
    b: &Bindings,
    x: (&Buffer, usize),
    stats: (&Buffer, usize),
    stats_is_output: bool,
    out: Option<(&Buffer, usize)>,
) -> Result<Option<usize>> {
    let pipe = pipeline(dev, name)?;
    let bad = dev.new_buffer_with_data(&[u32::MAX])?;
    if l.grid > 0 {
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        enc.set_input_buffer(0, Some(x.0), x.1);
        enc.set_input_buffer(1, Some(&b.target.0), b.target.1);
        enc.set_input_buffer(2, Some(&b.soft.0), b.soft.1);
        enc.set_input_buffer(3, Some(&b.weight.0), b.weight.1);
        enc.set_bytes(4, &b.params);
        if stats_is_output {
            enc.set_output_buffer(5, Some(stats.0), stats.1);
        } else {
            enc.set_input_buffer(5, Some(stats.0), stats.1);
        }
        enc.set_output_buffer(6, Some(&bad), 0);
        if let Some((o, off)) = out {
            enc.set_output_buffer(7, Some(o), off);
        }
        let size = |n: u32| MTLSize {
            width: n as usize,
            height: 1,
            depth: 1,
        };
        enc.dispatch_thread_groups(size(l.grid), size(l.block));
    }
    dev.wait_until_completed()?;
    // SAFETY: a 4-byte shared buffer, written by the kernel, read after the GPU finished.
    let first = unsafe { *(bad.contents() as *const u32) };
    Ok((first != u32::MAX).then_some(first as usize))
}

/// The class at flat position `row` of a class-index target (error path only).
fn target_at(t: &MetalStorage, tl: &Layout, row: usize) -> Result<i64> {
    let (ta, _) = start(tl, "target")?;
    Ok(match t.to_cpu_storage()? {
        candle_core::CpuStorage::U32(v) => v[ta + row] as i64,
        candle_core::CpuStorage::I64(v) => v[ta + row],
        other => bail!("cross_entropy: target dtype {:?}", other.dtype()),
    })
}

/// Forward on Metal: `(rows, STATS)` f32 stats.
pub(crate) fn forward(
    op: &CrossEntropyOp,
    x: &MetalStorage,
    xl: &Layout,
    t: &MetalStorage,
    tl: &Layout,
) -> Result<MetalStorage> {
    let (tname, elem) = logit(x.dtype())?;
    let (xa, _) = op.check_logits(xl)?;
    let dev = x.device().clone();
    let (b, l) = bindings(op, x, t, tl, elem)?;
    let rows = op.rows();
    let stats = dev.new_buffer(rows * STATS + 1, DType::F32, "candle-xent-stats")?;
    let name = op.kernel_name(false, tname, b.target_name);
    let bad = dispatch(
        &dev,
        &name,
        &l,
        &b,
        (x.buffer(), xa * elem),
        (&stats, 0),
        true,
        None,
    )?;
    if let Some(row) = bad {
        return Err(op.bad_target(row, target_at(t, tl, row)?));
    }
    Ok(MetalStorage::new(stats, dev, rows * STATS, DType::F32))
}

/// Backward on Metal from `[shift, log_sum, target_weight, g]` per row: a new gradient, or (`in_place`)
/// the gradient written over the logits (then `None` is returned).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    op: &CrossEntropyOp,
    x: &MetalStorage,
    xl: &Layout,
    t: &MetalStorage,
    tl: &Layout,
    stats: &MetalStorage,
    sl: &Layout,
    in_place: bool,
) -> Result<Option<MetalStorage>> {
    let (tname, elem) = logit(x.dtype())?;
    let (xa, xb) = op.check_logits(xl)?;
    let (sa, sb) = start(sl, "backward stats")?;
    if sb - sa != op.rows() * STATS || stats.dtype() != DType::F32 {
        bail!(
            "cross_entropy backward: stats must be {} f32 values",
            op.rows() * STATS
        );
    }
    let dev = x.device().clone();
    let (b, l) = bindings(op, x, t, tl, elem)?;
    let name = op.kernel_name(true, tname, b.target_name);
    let grad: Option<Arc<Buffer>> = if in_place {
        None
    } else {
        Some(dev.new_buffer((xb - xa).max(1), x.dtype(), "candle-xent-grad")?)
    };
    let out = match &grad {
        Some(g) => (&**g, 0),
        None => (x.buffer(), xa * elem),
    };
    let bad = dispatch(
        &dev,
        &name,
        &l,
        &b,
        (x.buffer(), xa * elem),
        (stats.buffer(), sa * 4),
        false,
        Some(out),
    )?;
    if let Some(row) = bad {
        return Err(op.bad_target(row, target_at(t, tl, row)?));
    }
    Ok(grad.map(|g| MetalStorage::new(g, dev, xb - xa, x.dtype())))
}
