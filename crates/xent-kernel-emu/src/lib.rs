//! Host emulation of candle-xent's CUDA kernels.
//!
//! `build.rs` compiles `candle-xent/src/xent.cu` (the very file nvcc turns into PTX) as C++ with
//! a shim for the CUDA built-ins (`emu/cuda_shim.h`): every thread of a block is a fiber,
//! `__syncthreads` a barrier the threads leave in ascending order in one round and descending in
//! the next (a missing barrier reads a value not yet written, or one already overwritten), warp
//! shuffles go through a per-warp exchange buffer between barriers, and a deadlock ends the
//! process with a message. [`Problem`] launches the kernels with the geometry `candle_xent::launch` computes
//! for the CUDA path, so the tests exercise the same grouping, reductions, alignment handling and
//! out-of-range reporting a GPU would run.
//!
//! It shows that the kernel *logic* is right (indexing, reductions across threads, formulas,
//! in-place safety, error reporting). It cannot show GPU-only facts: device math's last ulp,
//! memory-model subtleties the shim happens to order more strictly, speed, or that the PTX
//! loads on a given driver. Those are checked by `cargo xtask gpu-check` on a CUDA machine.
//!
//! ```
//! use xent_kernel_emu::{Problem, Targets};
//! let p = Problem::new(1, 3, 1);
//! let stats = p.forward(&[0f32, 0.2, 0.7], Targets::I64(&[2])).unwrap();
//! // [loss, shift, log_sum, target weight] for the single row: lse = shift + log_sum.
//! let lse = (1f32 + 0.2f32.exp() + 0.7f32.exp()).ln();
//! assert!((stats[0] - (lse - 0.7)).abs() < 1e-6);
//! assert_eq!(stats[1], 0.7);
//! assert!((stats[1] + stats[2] - lse).abs() < 1e-6);
//! assert_eq!(stats[3], 1.0);
//! ```

use candle_xent::launch::{self, Launch, XentParams, XentParamsMetal};
pub use candle_xent::launch::{COL_LOSS, COL_TARGET_WEIGHT, STATS};
use half::{bf16, f16};
use std::os::raw::{c_int, c_uint, c_void};

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn xent_emu_run(
        bwd: c_int,
        strided: c_int,
        dtype: c_int,
        ytype: c_int,
        grid: c_uint,
        block: c_uint,
        x: *const c_void,
        y: *const c_void,
        soft: *const c_void,
        w: *const c_void,
        wsum: *const f64,
        stats: *mut c_void,
        out: *mut c_void,
        p: *const XentParams,
        bad: *mut u64,
    ) -> c_int;

    #[allow(clippy::too_many_arguments)]
    fn xent_emu_metal_run(
        bwd: c_int,
        strided: c_int,
        dtype: c_int,
        ytype: c_int,
        grid: c_uint,
        block: c_uint,
        x: *const c_void,
        y: *const c_void,
        soft: *const c_void,
        w: *const c_void,
        p: *const XentParamsMetal,
        stats: *mut c_void,
        out: *mut c_void,
        bad: *mut u32,
    ) -> c_int;
}

/// Which kernel source runs: `src/xent.cu` or `src/xent.metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// The CUDA kernels.
    #[default]
    Cuda,
    /// The Metal kernels (no f64).
    Metal,
}

/// Logit element types of the kernels and their accumulator type.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Accumulator (f32, or f64 for f64 logits).
    type Acc: Copy + Default + PartialEq + std::fmt::Debug;
    /// Kernel dtype code.
    const CODE: c_int;
    /// Widening conversion to f64.
    fn as_f64(self) -> f64;
    /// Rounding conversion from f64.
    fn round_from(v: f64) -> Self;
    /// Accumulator from f64.
    fn acc(v: f64) -> Self::Acc;
}

macro_rules! elem {
    ($t:ty, $acc:ty, $code:expr, $to:expr, $from:expr) => {
        impl Elem for $t {
            type Acc = $acc;
            const CODE: c_int = $code;
            fn as_f64(self) -> f64 {
                $to(self)
            }
            fn round_from(v: f64) -> Self {
                $from(v)
            }
            fn acc(v: f64) -> $acc {
                v as $acc
            }
        }
    };
}
elem!(f32, f32, 0, |v: f32| v as f64, |v: f64| v as f32);
elem!(f16, f32, 1, f16::to_f64, f16::from_f64);
elem!(bf16, f32, 2, bf16::to_f64, bf16::from_f64);
elem!(f64, f64, 3, |v: f64| v, |v: f64| v);

/// Targets of one call.
#[derive(Clone, Copy)]
pub enum Targets<'a, T> {
    /// Class indices as u32.
    U32(&'a [u32]),
    /// Class indices as i64.
    I64(&'a [i64]),
    /// Probabilities laid out like the logits.
    Soft(&'a [T]),
}

/// Out-of-range class target reported by a kernel: the first such row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTarget {
    /// Row index `n * inner + d`.
    pub row: usize,
}

/// One cross-entropy problem: logits viewed as `(outer, classes, inner)` and the loss options.
#[derive(Debug, Clone)]
pub struct Problem {
    /// Product of the dims before the class dim.
    pub outer: usize,
    /// Number of classes.
    pub classes: usize,
    /// Product of the dims after the class dim.
    pub inner: usize,
    /// Label smoothing.
    pub smoothing: f64,
    /// Ignored target value.
    pub ignore_index: i64,
    /// z-loss coefficient.
    pub z_loss: f64,
    /// Logit soft-cap.
    pub softcap: Option<f64>,
    /// Class weights.
    pub weight: Option<Vec<f64>>,
    /// Threads per row for the row kernels; `None`: what the GPU path would choose.
    pub group: Option<u32>,
    /// Kernel source to run.
    pub source: Source,
}

impl Problem {
    /// A problem with PyTorch's defaults (no smoothing, no weights, `ignore_index = -100`).
    pub fn new(outer: usize, classes: usize, inner: usize) -> Self {
        Self {
            outer,
            classes,
            inner,
            smoothing: 0.0,
            ignore_index: -100,
            z_loss: 0.0,
            softcap: None,
            weight: None,
            group: None,
            source: Source::Cuda,
        }
    }

    /// Number of rows (`outer * inner`).
    pub fn rows(&self) -> usize {
        self.outer * self.inner
    }

    /// The launch the kernels get.
    pub fn launch(&self, elem_bytes: usize) -> Launch {
        if self.inner > 1 {
            launch::strided_launch(self.rows())
        } else if let Some(g) = self.group {
            launch::rows_launch_with_group(self.rows(), g)
        } else {
            launch::rows_launch(self.rows(), self.classes, elem_bytes)
        }
    }

    fn params(&self, soft: bool, group: u32) -> XentParams {
        XentParams {
            outer: self.outer as i64,
            classes: self.classes as i64,
            inner: self.inner as i64,
            smoothing: self.smoothing,
            ignore_index: self.ignore_index,
            z_loss: self.z_loss,
            softcap: self.softcap.unwrap_or(0.0),
            group: group as i64,
            weighted: self.weight.is_some() as i64,
            soft: soft as i64,
        }
    }

    #[allow(clippy::type_complexity)]
    fn run<T: Elem>(
        &self,
        bwd: bool,
        x: *const T,
        n_x: usize,
        targets: Targets<'_, T>,
        stats: *mut T::Acc,
        out: *mut T,
    ) -> Result<(), BadTarget> {
        assert_eq!(n_x, self.rows() * self.classes, "logits length");
        let (ytype, y, soft): (c_int, *const c_void, *const c_void) = match targets {
            Targets::U32(t) => {
                assert_eq!(t.len(), self.rows(), "target length");
                (0, t.as_ptr().cast(), std::ptr::null())
            }
            Targets::I64(t) => {
                assert_eq!(t.len(), self.rows(), "target length");
                (1, t.as_ptr().cast(), std::ptr::null())
            }
            Targets::Soft(t) => {
                assert_eq!(t.len(), n_x, "soft target length");
                (1, std::ptr::null(), t.as_ptr().cast())
            }
        };
        let w: Option<Vec<T::Acc>> = self
            .weight
            .as_ref()
            .map(|w| w.iter().map(|&v| T::acc(v)).collect());
        let wsum: f64 = self.weight.as_ref().map_or(0.0, |w| w.iter().sum());
        let l = self.launch(std::mem::size_of::<T>());
        let p = self.params(matches!(targets, Targets::Soft(_)), l.group.max(32));
        if self.rows() == 0 {
            return Ok(());
        }
        let w_ptr = w
            .as_ref()
            .map_or(std::ptr::null(), |v| v.as_ptr().cast::<c_void>());
        let strided = (self.inner > 1) as c_int;
        let first_bad: Option<usize> = match self.source {
            Source::Cuda => {
                let mut bad = u64::MAX;
                // SAFETY: every pointer covers the lengths checked above (stats and out by the
                // callers); the kernels read and write only inside them.
                let rc = unsafe {
                    xent_emu_run(
                        bwd as c_int,
                        strided,
                        T::CODE,
                        ytype,
                        l.grid,
                        l.block,
                        x.cast(),
                        y,
                        soft,
                        w_ptr,
                        &wsum,
                        stats.cast(),
                        out.cast(),
                        &p,
                        &mut bad,
                    )
                };
                assert_eq!(rc, 0, "unknown kernel type");
                (bad != u64::MAX).then_some(bad as usize)
            }
            Source::Metal => {
                assert!(T::CODE != 3, "Metal has no f64 kernels");
                let mp = XentParamsMetal::from_params(&p, self.weight.as_ref().map(|_| wsum));
                let mut bad = u32::MAX;
                // SAFETY: as above; the Metal kernels take the same buffers.
                let rc = unsafe {
                    xent_emu_metal_run(
                        bwd as c_int,
                        strided,
                        T::CODE,
                        ytype,
                        l.grid,
                        l.block,
                        x.cast(),
                        y,
                        soft,
                        w_ptr,
                        &mp,
                        stats.cast(),
                        out.cast(),
                        &mut bad,
                    )
                };
                assert_eq!(rc, 0, "unknown kernel type");
                (bad != u32::MAX).then_some(bad as usize)
            }
        };
        match first_bad {
            None => Ok(()),
            Some(row) => Err(BadTarget { row }),
        }
    }

    /// Forward kernel: `[loss, shift, log_sum, target_weight]` per row ([`STATS`] values).
    pub fn forward<T: Elem>(&self, x: &[T], t: Targets<'_, T>) -> Result<Vec<T::Acc>, BadTarget> {
        let mut stats = vec![T::Acc::default(); self.rows() * STATS];
        self.run(
            false,
            x.as_ptr(),
            x.len(),
            t,
            stats.as_mut_ptr(),
            std::ptr::null_mut(),
        )?;
        Ok(stats)
    }

    /// The backward's input from the forward's stats: `[shift, log_sum, target_weight, g(r)]`
    /// per row `r`.
    pub fn backward_stats<A: Copy>(&self, stats: &[A], g: impl Fn(usize) -> A) -> Vec<A> {
        assert_eq!(stats.len(), self.rows() * STATS, "stats length");
        stats
            .chunks(STATS)
            .enumerate()
            .flat_map(|(r, s)| {
                let mut b = s[COL_LOSS + 1..].to_vec();
                b.push(g(r));
                b
            })
            .collect()
    }

    /// Backward kernel from `[shift, log_sum, target_weight, g]` per row: the gradient of the
    /// logits.
    pub fn backward<T: Elem>(
        &self,
        x: &[T],
        t: Targets<'_, T>,
        stats: &[T::Acc],
    ) -> Result<Vec<T>, BadTarget> {
        assert_eq!(stats.len(), self.rows() * STATS, "stats length");
        let mut out = vec![T::round_from(0.0); x.len()];
        self.run(
            true,
            x.as_ptr(),
            x.len(),
            t,
            stats.as_ptr() as *mut T::Acc,
            out.as_mut_ptr(),
        )?;
        Ok(out)
    }

    /// Backward kernel run in place: `xg` holds the logits on entry and the gradient on exit.
    pub fn backward_inplace<T: Elem>(
        &self,
        xg: &mut [T],
        t: Targets<'_, T>,
        stats: &[T::Acc],
    ) -> Result<(), BadTarget> {
        assert_eq!(stats.len(), self.rows() * STATS, "stats length");
        let ptr = xg.as_mut_ptr();
        self.run(
            true,
            ptr as *const T,
            xg.len(),
            t,
            stats.as_ptr() as *mut T::Acc,
            ptr,
        )
    }
}
