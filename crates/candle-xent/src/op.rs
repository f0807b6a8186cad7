//! The fused cross-entropy custom op: one struct, its forward (per device) and its backward.
//!
//! Forward `(logits, target) -> stats` where `stats` is `(rows, 4)` in the accumulator dtype
//! (f32, or f64 for f64 logits), one `[loss, shift, log_sum, target_weight]` row each (see
//! [`crate::launch::STATS`]). The reduction is done by [`crate::CrossEntropyLoss`] with ordinary
//! tensor ops on the `loss` column, so autograd hands the backward one upstream gradient per row.
//! Backward is itself a custom op ([`CrossEntropyBackward`]) that recomputes the softmax from the
//! saved log-sum-exp pair and writes only the gradient of the logits; on the CPU, autograd's
//! backward writes it into the buffer the thread keeps between steps
//! ([`CrossEntropyBackwardInto`], [`crate::buffer::reused_for_autograd`]).

use crate::cpu::{self, Problem, Targets, STATS};
use crate::launch::COL_LOSS;
use crate::math::Elem;
pub(crate) use crate::spec::CrossEntropyOp;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, InplaceOp3, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use half::{bf16, f16};

impl CrossEntropyOp {
    /// Class-index targets as i64, checked against `[0, C)` and `ignore_index`.
    fn class_targets(&self, s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
        let Some((start, end)) = crate::spec::data_range(l) else {
            bail!("cross_entropy: target must be contiguous")
        };
        let t: Vec<i64> = match s {
            CpuStorage::U8(v) => v[start..end].iter().map(|&y| y as i64).collect(),
            CpuStorage::U32(v) => v[start..end].iter().map(|&y| y as i64).collect(),
            CpuStorage::I16(v) => v[start..end].iter().map(|&y| y as i64).collect(),
            CpuStorage::I32(v) => v[start..end].iter().map(|&y| y as i64).collect(),
            CpuStorage::I64(v) => v[start..end].to_vec(),
            other => bail!(
                "cross_entropy: class-index target must be u8, u32, i16, i32 or i64, got {:?}",
                other.dtype()
            ),
        };
        if t.len() != self.rows() {
            bail!(
                "cross_entropy: target has {} elements, expected {}",
                t.len(),
                self.rows()
            );
        }
        let c = self.classes as i64;
        if let Some((pos, &y)) = t
            .iter()
            .enumerate()
            .find(|(_, &y)| y != self.ignore_index && !(0..c).contains(&y))
        {
            return Err(self.bad_target(pos, y));
        }
        Ok(t)
    }

    fn weight_host<A: WithDType>(&self) -> Result<Vec<A>> {
        match &self.weight {
            None => Ok(Vec::new()),
            Some(w) => w.to_vec1::<A>(),
        }
    }

    fn problem<'a, A: crate::math::Acc>(&self, weight: &'a [A]) -> Problem<'a, A> {
        let weight_sum = if weight.is_empty() {
            A::from_f64(self.classes as f64)
        } else {
            // Compensated, in f64: the smoothing term needs it exact for any C.
            A::from_f64(crate::math::neumaier(weight.iter().map(|w| w.to_f64())))
        };
        Problem {
            outer: self.outer,
            classes: self.classes,
            inner: self.inner,
            smoothing: self.smoothing,
            ignore_index: self.ignore_index,
            z_loss: self.z_loss,
            softcap: self.softcap,
            weight,
            weight_sum,
        }
    }

    fn cpu_forward<T: Elem + WithDType>(
        &self,
        x: &[T],
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<CpuStorage>
    where
        T::A: WithDType,
    {
        let w = self.weight_host::<T::A>()?;
        let p = self.problem(&w);
        let stats = if self.soft {
            let t = contiguous_slice::<T>(ts, tl, "soft target")?;
            cpu::forward(x, &Targets::Soft(t), &p)
        } else {
            let t = self.class_targets(ts, tl)?;
            cpu::forward(x, &Targets::<T>::Hard(&t), &p)
        };
        Ok(T::A::to_cpu_storage_owned(stats))
    }

    fn cpu_backward<T: Elem + WithDType>(
        &self,
        x: &[T],
        ts: &CpuStorage,
        tl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<CpuStorage>
    where
        T::A: WithDType,
    {
        let mut grad: Vec<T> = crate::buffer::zeroed(x.len());
        self.cpu_backward_into(x, ts, tl, ss, sl, &mut grad)?;
        Ok(T::to_cpu_storage_owned(grad))
    }

    /// The backward kernel writing every element of `grad` (`x`'s length; its previous contents
    /// are never read).
    fn cpu_backward_into<T: Elem + WithDType>(
        &self,
        x: &[T],
        ts: &CpuStorage,
        tl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        grad: &mut [T],
    ) -> Result<()>
    where
        T::A: WithDType,
    {
        let w = self.weight_host::<T::A>()?;
        let p = &self.problem(&w);
        let stats = contiguous_slice::<T::A>(ss, sl, "backward stats")?;
        if stats.len() != self.rows() * STATS || grad.len() != x.len() {
            bail!(
                "cross_entropy backward: stats have {} elements and the gradient {}, for {} rows of {}",
                stats.len(),
                grad.len(),
                self.rows(),
                self.classes
            );
        }
        if self.soft {
            let t = contiguous_slice::<T>(ts, tl, "soft target")?;
            cpu::backward(x, &Targets::Soft(t), stats, p, grad);
        } else {
            let t = self.class_targets(ts, tl)?;
            cpu::backward(x, &Targets::<T>::Hard(&t), stats, p, grad);
        }
        Ok(())
    }

    fn cpu_backward_inplace<T: Elem + WithDType>(
        &self,
        xg: &mut [T],
        ts: &CpuStorage,
        tl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<()>
    where
        T::A: WithDType,
    {
        let w = self.weight_host::<T::A>()?;
        let p = self.problem(&w);
        let stats = contiguous_slice::<T::A>(ss, sl, "backward stats")?;
        if self.soft {
            let t = contiguous_slice::<T>(ts, tl, "soft target")?;
            cpu::backward_inplace(xg, &Targets::Soft(t), stats, &p);
        } else {
            let t = self.class_targets(ts, tl)?;
            cpu::backward_inplace(xg, &Targets::<T>::Hard(&t), stats, &p);
        }
        Ok(())
    }
}

fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((start, end)) = crate::spec::data_range(l) else {
        bail!("cross_entropy: {what} must be contiguous")
    };
    match T::cpu_storage_as_slice(s) {
        Ok(v) => Ok(&v[start..end]),
        Err(_) => bail!(
            "cross_entropy: {what} must have dtype {:?}, got {:?}",
            T::DTYPE,
            s.dtype()
        ),
    }
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "candle-xent-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = self.check_logits(l1)?;
        let out = match s1 {
            CpuStorage::F32(v) => self.cpu_forward::<f32>(&v[a..b], s2, l2)?,
            CpuStorage::F64(v) => self.cpu_forward::<f64>(&v[a..b], s2, l2)?,
            CpuStorage::F16(v) => self.cpu_forward::<f16>(&v[a..b], s2, l2)?,
            CpuStorage::BF16(v) => self.cpu_forward::<bf16>(&v[a..b], s2, l2)?,
            other => bail!(
                "cross_entropy: logits must be f16, bf16, f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, Shape::from((self.rows(), STATS))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::forward(self, s1, l1, s2, l2)?;
        Ok((out, Shape::from((self.rows(), STATS))))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let out = crate::metal::forward(self, s1, l1, s2, l2)?;
        Ok((out, Shape::from((self.rows(), STATS))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        target: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the loss column carries a gradient: the log-sum-exp pair and the target weight are internal.
        let g = grad_res.narrow(1, COL_LOSS, 1)?;
        let stats = backward_stats(res, &g)?;
        if self.inplace_grad {
            logits.inplace_op3(target, &stats, &CrossEntropyBackward { op: self.clone() })?;
            return Ok((Some(logits.clone()), None));
        }
        // Soft targets are treated as constants; see the crate docs.
        if logits.device().is_cpu() {
            let into = CrossEntropyBackwardInto {
                op: self.clone(),
                target: target.clone(),
            };
            let grad = crate::buffer::reused_for_autograd(logits, |dst| {
                dst.inplace_op3(logits, &stats, &into)
            })?;
            return Ok((Some(grad), None));
        }
        let grad = self.backward_with_stats(logits, target, &stats)?;
        Ok((Some(grad), None))
    }
}

/// The backward's per-row input `[shift, log_sum, target_weight, g]`: the forward's `stats`
/// without the loss column, then the rows' upstream gradients `g` (`(rows, 1)`).
pub(crate) fn backward_stats(stats: &Tensor, g: &Tensor) -> Result<Tensor> {
    let kept = stats.narrow(1, COL_LOSS + 1, STATS - 1)?.detach();
    Tensor::cat(&[&kept, g], 1)?.contiguous()
}

impl CrossEntropyOp {
    /// Gradient of `sum_i g_i loss_i` w.r.t. the logits, from
    /// `stats = [shift, log_sum, target_weight, g]` (see [`backward_stats`]).
    pub fn backward_with_stats(
        &self,
        logits: &Tensor,
        target: &Tensor,
        stats: &Tensor,
    ) -> Result<Tensor> {
        let stats = stats.contiguous()?;
        logits.apply_op3_no_bwd(target, &stats, &CrossEntropyBackward { op: self.clone() })
    }
}

/// The backward kernel of [`CrossEntropyOp`], as a custom op of `(logits, target, stats)`.
pub(crate) struct CrossEntropyBackward {
    pub op: CrossEntropyOp,
}

impl InplaceOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "candle-xent-cross-entropy-backward-inplace"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let op = &self.op;
        let (a, b) = op.check_logits(l1)?;
        match s1 {
            CpuStorage::F32(v) => op.cpu_backward_inplace::<f32>(&mut v[a..b], s2, l2, s3, l3),
            CpuStorage::F64(v) => op.cpu_backward_inplace::<f64>(&mut v[a..b], s2, l2, s3, l3),
            CpuStorage::F16(v) => op.cpu_backward_inplace::<f16>(&mut v[a..b], s2, l2, s3, l3),
            CpuStorage::BF16(v) => op.cpu_backward_inplace::<bf16>(&mut v[a..b], s2, l2, s3, l3),
            other => bail!(
                "cross_entropy backward: logits must be f16, bf16, f32 or f64, got {:?}",
                other.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::backward_inplace(&self.op, s1, l1, s2, l2, s3, l3)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &mut candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::metal::backward(&self.op, s1, l1, s2, l2, s3, l3, true).map(|_| ())
    }
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "candle-xent-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.op;
        let (a, b) = op.check_logits(l1)?;
        let out = match s1 {
            CpuStorage::F32(v) => op.cpu_backward::<f32>(&v[a..b], s2, l2, s3, l3)?,
            CpuStorage::F64(v) => op.cpu_backward::<f64>(&v[a..b], s2, l2, s3, l3)?,
            CpuStorage::F16(v) => op.cpu_backward::<f16>(&v[a..b], s2, l2, s3, l3)?,
            CpuStorage::BF16(v) => op.cpu_backward::<bf16>(&v[a..b], s2, l2, s3, l3)?,
            other => bail!(
                "cross_entropy backward: logits must be f16, bf16, f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::backward(&self.op, s1, l1, s2, l2, s3, l3)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let out = crate::metal::backward(&self.op, s1, l1, s2, l2, s3, l3, false)?
            .expect("out-of-place backward returns the gradient");
        Ok((out, l1.shape().clone()))
    }
}

/// The CPU backward kernel of [`CrossEntropyOp`] writing into a buffer it is handed (`dst`, the
/// logits' shape and dtype, contiguous; see [`crate::buffer::reused_for_autograd`]), from
/// `(logits, stats)` and the target it holds.
pub(crate) struct CrossEntropyBackwardInto {
    pub op: CrossEntropyOp,
    pub target: Tensor,
}

impl InplaceOp3 for CrossEntropyBackwardInto {
    fn name(&self) -> &'static str {
        "candle-xent-cross-entropy-backward-into"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let op = &self.op;
        let (a, b) = op.check_logits(l2)?;
        let (c, d) = op.check_logits(dl)?;
        let (tg, tl) = self.target.storage_and_layout();
        let Storage::Cpu(ts) = &*tg else {
            bail!("cross_entropy backward: target is not on the CPU")
        };
        match (dst, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(x)) => {
                op.cpu_backward_into(&x[a..b], ts, tl, s3, l3, &mut g[c..d])
            }
            (CpuStorage::F64(g), CpuStorage::F64(x)) => {
                op.cpu_backward_into(&x[a..b], ts, tl, s3, l3, &mut g[c..d])
            }
            (CpuStorage::F16(g), CpuStorage::F16(x)) => {
                op.cpu_backward_into(&x[a..b], ts, tl, s3, l3, &mut g[c..d])
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(x)) => {
                op.cpu_backward_into(&x[a..b], ts, tl, s3, l3, &mut g[c..d])
            }
            (g, x) => bail!(
                "cross_entropy backward: gradient buffer {:?} for logits {:?}",
                g.dtype(),
                x.dtype()
            ),
        }
    }
}
