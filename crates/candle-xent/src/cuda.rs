//! CUDA path of the fused op: launches the kernels of `src/xent.cu` (PTX built by `build.rs`).
//!
//! The geometry comes from [`crate::launch`], the same code the host emulation tests run. Every
//! forward reads back one `u64` (the first row with an out-of-range class, if any) so that a bad
//! target is an `Err`, never a silent number; that read waits for the kernel, like any host read.

use crate::launch::{XentParams, STATS};
use crate::spec::CrossEntropyOp;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/xent.ptx"));
const MODULE: &str = "candle_xent_xent";

// SAFETY: `XentParams` is `#[repr(C)]`, plain old data, laid out like the kernels' struct.
unsafe impl DeviceRepr for XentParams {}

/// Logit types with a kernel instantiation.
trait Logit: CudaDType + DeviceRepr + Copy + 'static {
    const NAME: &'static str;
    type A: CudaDType + DeviceRepr + Copy + 'static;
}
impl Logit for f32 {
    const NAME: &'static str = "f32";
    type A = f32;
}
impl Logit for f16 {
    const NAME: &'static str = "f16";
    type A = f32;
}
impl Logit for bf16 {
    const NAME: &'static str = "bf16";
    type A = f32;
}
impl Logit for f64 {
    const NAME: &'static str = "f64";
    type A = f64;
}

/// A contiguous slice of `s` as described by `l`, with its element range.
fn range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("cross_entropy: {what} must be contiguous"),
    }
}

fn dtype_err<T>(what: &str, got: DType) -> Result<T> {
    bail!("cross_entropy: {what} has an unsupported dtype {got:?} on CUDA")
}

fn launch_config(l: &crate::launch::Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid, 1, 1),
        block_dim: (l.block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The class weights (accumulator dtype) and their f64 sum, on the device, if any.
struct Weights {
    w: Option<Tensor>,
    sum: Option<Tensor>,
}

impl Weights {
    fn new(op: &CrossEntropyOp) -> Result<Self> {
        let sum = match &op.weight {
            Some(w) => Some(w.to_dtype(DType::F64)?.sum_all()?),
            None => None,
        };
        Ok(Self {
            w: op.weight.clone(),
            sum,
        })
    }
}

/// Runs one kernel. `x` is the logits pointer, `out` the gradient pointer (backward only; may
/// equal `x`), `stats` the forward's output or the backward's input. Returns the first bad row.
#[allow(clippy::too_many_arguments)]
fn run<T: Logit>(
    op: &CrossEntropyOp,
    dev: &CudaDevice,
    bwd: bool,
    x: u64,
    out: u64,
    target: &CudaStorage,
    tl: &Layout,
    stats: u64,
) -> Result<Option<(usize, i64)>> {
    let stream = dev.cuda_stream();
    let rows = op.rows();
    let weights = Weights::new(op)?;
    let w_guard = weights.w.as_ref().map(|w| w.storage_and_layout());
    let s_guard = weights.sum.as_ref().map(|s| s.storage_and_layout());
    // Device pointers are taken with their sync guards, which live until the launch is queued.
    let mut syncs = Vec::new();
    let mut w_ptr = 0u64;
    let mut s_ptr = 0u64;
    for (guard, dst) in [(&w_guard, &mut w_ptr), (&s_guard, &mut s_ptr)] {
        if let Some((st, l)) = guard {
            let Storage::Cuda(cs) = &**st else {
                bail!("cross_entropy: weight must be on the logits' CUDA device")
            };
            let (a, _) = range(l, "weight")?;
            let (p, sync) = match cs.dtype() {
                DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream),
                DType::F64 => cs.as_cuda_slice::<f64>()?.device_ptr(&stream),
                other => return dtype_err("weight", other),
            };
            *dst = p + (a * cs.dtype().size_in_bytes()) as u64;
            syncs.push(sync);
        }
    }

    let (ta, tb) = range(tl, "target")?;
    let (y_name, y_ptr, soft_ptr) = if op.soft {
        if tb - ta != rows * op.classes {
            bail!("cross_entropy: soft target has {} elements", tb - ta);
        }
        let (p, sync) = T::as_cuda_slice(target)?.device_ptr(&stream);
        syncs.push(sync);
        ("i64", 0u64, p + (ta * std::mem::size_of::<T>()) as u64)
    } else {
        if tb - ta != rows {
            bail!(
                "cross_entropy: target has {} elements, expected {rows}",
                tb - ta
            );
        }
        match target.dtype() {
            DType::U32 => {
                let (p, sync) = target.as_cuda_slice::<u32>()?.device_ptr(&stream);
                syncs.push(sync);
                ("u32", p + (ta * 4) as u64, 0u64)
            }
            DType::I64 => {
                let (p, sync) = target.as_cuda_slice::<i64>()?.device_ptr(&stream);
                syncs.push(sync);
                ("i64", p + (ta * 8) as u64, 0u64)
            }
            other => return dtype_err("class-index target (u32 or i64 expected)", other),
        }
    };
    let (l, params) = op.kernel_launch(std::mem::size_of::<T>())?;
    let cfg = launch_config(&l);
    let mut bad: CudaSlice<u64> = dev.clone_htod(&[u64::MAX])?;
    if rows > 0 {
        let func =
            dev.get_or_load_custom_func(&op.kernel_name(bwd, T::NAME, y_name), MODULE, PTX)?;
        let (bad_ptr, _bad_sync) = bad.device_ptr_mut(&stream);
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&y_ptr);
        b.arg(&soft_ptr);
        b.arg(&w_ptr);
        b.arg(&s_ptr);
        b.arg(&stats);
        if bwd {
            b.arg(&out);
        }
        b.arg(&params);
        b.arg(&bad_ptr);
        // SAFETY: the pointers cover the lengths checked above (logits, targets: rows [* C];
        // weights: C; stats: rows * STATS; out: rows * C) and the kernel stays inside them.
        unsafe { b.launch(cfg) }.w()?;
    }
    drop(syncs);
    let first = dev.clone_dtoh(&bad)?[0];
    if first == u64::MAX {
        return Ok(None);
    }
    let row = first as usize;
    let y = match target.dtype() {
        DType::U32 => {
            dev.clone_dtoh(&target.as_cuda_slice::<u32>()?.slice(ta + row..ta + row + 1))?[0] as i64
        }
        _ => dev.clone_dtoh(&target.as_cuda_slice::<i64>()?.slice(ta + row..ta + row + 1))?[0],
    };
    Ok(Some((row, y)))
}

fn forward_typed<T: Logit>(
    op: &CrossEntropyOp,
    x: &CudaStorage,
    xl: &Layout,
    target: &CudaStorage,
    tl: &Layout,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let stream = dev.cuda_stream();
    let (a, _) = op.check_logits(xl)?;
    let (x_ptr, x_sync) = T::as_cuda_slice(x)?.device_ptr(&stream);
    // One spare element keeps the allocation non-empty when there are no rows.
    // SAFETY: the kernel writes all `rows * STATS` values before anything reads them.
    let mut stats = unsafe { dev.alloc::<T::A>(op.rows() * STATS + 1)? };
    let (s_ptr, s_sync) = stats.device_ptr_mut(&stream);
    let x_ptr = x_ptr + (a * std::mem::size_of::<T>()) as u64;
    let bad = run::<T>(op, &dev, false, x_ptr, 0, target, tl, s_ptr)?;
    drop((x_sync, s_sync));
    if let Some((row, y)) = bad {
        return Err(op.bad_target(row, y));
    }
    Ok(<T::A as CudaDType>::wrap_cuda_slice(stats, dev))
}

/// Forward on CUDA: `(rows, STATS)` stats in the accumulator dtype.
pub(crate) fn forward(
    op: &CrossEntropyOp,
    x: &CudaStorage,
    xl: &Layout,
    target: &CudaStorage,
    tl: &Layout,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => forward_typed::<f32>(op, x, xl, target, tl),
        DType::F16 => forward_typed::<f16>(op, x, xl, target, tl),
        DType::BF16 => forward_typed::<bf16>(op, x, xl, target, tl),
        DType::F64 => forward_typed::<f64>(op, x, xl, target, tl),
        other => dtype_err("logits", other),
    }
}

fn stats_range<T: Logit>(op: &CrossEntropyOp, l: &Layout) -> Result<u64> {
    let (a, b) = range(l, "backward stats")?;
    if b - a != op.rows() * STATS {
        bail!("cross_entropy backward: stats have {} elements", b - a);
    }
    Ok((a * std::mem::size_of::<T::A>()) as u64)
}

fn backward_typed<T: Logit>(
    op: &CrossEntropyOp,
    x: &CudaStorage,
    xl: &Layout,
    target: &CudaStorage,
    tl: &Layout,
    stats: &CudaStorage,
    sl: &Layout,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let stream = dev.cuda_stream();
    let (a, b) = op.check_logits(xl)?;
    let (x_ptr, x_sync) = T::as_cuda_slice(x)?.device_ptr(&stream);
    let x_ptr = x_ptr + (a * std::mem::size_of::<T>()) as u64;
    let s_off = stats_range::<T>(op, sl)?;
    let (s_ptr, s_sync) = <T::A as CudaDType>::as_cuda_slice(stats)?.device_ptr(&stream);
    // SAFETY: the kernel writes every element of every row.
    let mut grad = unsafe { dev.alloc::<T>((b - a).max(1))? };
    let (g_ptr, g_sync) = grad.device_ptr_mut(&stream);
    let bad = run::<T>(op, &dev, true, x_ptr, g_ptr, target, tl, s_ptr + s_off)?;
    drop((x_sync, s_sync, g_sync));
    if let Some((row, y)) = bad {
        return Err(op.bad_target(row, y));
    }
    Ok(T::wrap_cuda_slice(grad, dev))
}

/// Backward on CUDA: the gradient of the logits from `[shift, log_sum, target_weight, g]` per row.
pub(crate) fn backward(
    op: &CrossEntropyOp,
    x: &CudaStorage,
    xl: &Layout,
    target: &CudaStorage,
    tl: &Layout,
    stats: &CudaStorage,
    sl: &Layout,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => backward_typed::<f32>(op, x, xl, target, tl, stats, sl),
        DType::F16 => backward_typed::<f16>(op, x, xl, target, tl, stats, sl),
        DType::BF16 => backward_typed::<bf16>(op, x, xl, target, tl, stats, sl),
        DType::F64 => backward_typed::<f64>(op, x, xl, target, tl, stats, sl),
        other => dtype_err("logits", other),
    }
}

fn backward_inplace_typed<T: Logit>(
    op: &CrossEntropyOp,
    xg: &mut CudaStorage,
    xl: &Layout,
    target: &CudaStorage,
    tl: &Layout,
    stats: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    let dev = xg.device().clone();
    let stream = dev.cuda_stream();
    let (a, _) = op.check_logits(xl)?;
    let s_off = stats_range::<T>(op, sl)?;
    let (s_ptr, s_sync) = <T::A as CudaDType>::as_cuda_slice(stats)?.device_ptr(&stream);
    let (ptr, x_sync) = T::as_cuda_slice_mut(xg)?.device_ptr_mut(&stream);
    let ptr = ptr + (a * std::mem::size_of::<T>()) as u64;
    let bad = run::<T>(op, &dev, true, ptr, ptr, target, tl, s_ptr + s_off)?;
    drop((x_sync, s_sync));
    if let Some((row, y)) = bad {
        return Err(op.bad_target(row, y));
    }
    Ok(())
}

/// Backward on CUDA written over the logits.
pub(crate) fn backward_inplace(
    op: &CrossEntropyOp,
    xg: &mut CudaStorage,
    xl: &Layout,
    target: &CudaStorage,
    tl: &Layout,
    stats: &CudaStorage,
    sl: &Layout,
) -> Result<()> {
    match xg.dtype() {
        DType::F32 => backward_inplace_typed::<f32>(op, xg, xl, target, tl, stats, sl),
        DType::F16 => backward_inplace_typed::<f16>(op, xg, xl, target, tl, stats, sl),
        DType::BF16 => backward_inplace_typed::<bf16>(op, xg, xl, target, tl, stats, sl),
        DType::F64 => backward_inplace_typed::<f64>(op, xg, xl, target, tl, stats, sl),
        other => dtype_err("logits", other),
    }
}
