//! The fused cross-entropy custom op: one struct, its forward (per device) and its backward.
//!
//! Forward `(logits, target) -> stats` where `stats` is `(rows, 3)` in the accumulator dtype
//! (f32, or f64 for f64 logits), one `[loss, lse, target_weight]` triple per row. The reduction
//! is done by [`crate::CrossEntropyLoss`] with ordinary tensor ops on the `loss` column, so
//! autograd hands the backward one upstream gradient per row. Backward is itself a custom op
//! ([`CrossEntropyBackward`]) that recomputes the softmax from the saved `lse` and writes only the
//! gradient of the logits.

use crate::cpu::{self, Problem, Targets, STATS};
use crate::math::Elem;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Tensor,
    WithDType,
};
use half::{bf16, f16};

/// Parameters of one fused cross-entropy call (validated by the caller).
#[derive(Debug, Clone)]
pub(crate) struct CrossEntropyOp {
    /// Product of the dims before the class dim.
    pub outer: usize,
    pub classes: usize,
    /// Product of the dims after the class dim.
    pub inner: usize,
    pub smoothing: f64,
    pub ignore_index: i64,
    /// z-loss coefficient (0: off).
    pub z_loss: f64,
    /// Logit soft-cap (None: off).
    pub softcap: Option<f64>,
    /// Write the gradient over the logits (opt-in; see `CrossEntropyLoss::inplace_grad`).
    pub inplace_grad: bool,
    /// Class weights `(C,)` in the accumulator dtype, on the logits' device.
    pub weight: Option<Tensor>,
    /// Probability targets (same shape and dtype as the logits) instead of class indices.
    pub soft: bool,
    /// Shape of a class-index target, used to report the position of a bad class.
    pub target_dims: Vec<usize>,
}

impl CrossEntropyOp {
    pub fn rows(&self) -> usize {
        self.outer * self.inner
    }

    /// The accumulator dtype for a logits dtype.
    pub fn acc_dtype(dtype: DType) -> DType {
        if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    fn position(&self, flat: usize) -> Vec<usize> {
        let mut idx = vec![0; self.target_dims.len()];
        let mut rem = flat;
        for (i, &d) in self.target_dims.iter().enumerate().rev() {
            idx[i] = rem % d.max(1);
            rem /= d.max(1);
        }
        idx
    }

    /// Class-index targets as i64, checked against `[0, C)` and `ignore_index`.
    fn class_targets(&self, s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
        let Some((start, end)) = l.contiguous_offsets() else {
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

    /// The error for class `y` at flat target position `flat` (every device reports it alike).
    pub(crate) fn bad_target(&self, flat: usize, y: i64) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "cross_entropy: target class {y} at position {:?} is out of range for {} classes \
             (expected 0..{} or ignore_index {})",
            self.position(flat),
            self.classes,
            self.classes,
            self.ignore_index
        ))
        .bt()
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
            // Summed in f64 so the smoothing term does not depend on summation order.
            A::from_f64(weight.iter().map(|w| w.to_f64()).sum())
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
        let w = self.weight_host::<T::A>()?;
        let p = self.problem(&w);
        let stats = contiguous_slice::<T::A>(ss, sl, "backward stats")?;
        if stats.len() != self.rows() * STATS {
            bail!(
                "cross_entropy backward: stats have {} elements",
                stats.len()
            );
        }
        let mut grad = vec![T::from_acc(<T::A as crate::math::Acc>::ZERO); x.len()];
        if self.soft {
            let t = contiguous_slice::<T>(ts, tl, "soft target")?;
            cpu::backward(x, &Targets::Soft(t), stats, &p, &mut grad);
        } else {
            let t = self.class_targets(ts, tl)?;
            cpu::backward(x, &Targets::<T>::Hard(&t), stats, &p, &mut grad);
        }
        Ok(T::to_cpu_storage_owned(grad))
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

    pub(crate) fn check_logits(&self, l: &Layout) -> Result<(usize, usize)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("cross_entropy: logits must be contiguous")
        };
        if end - start != self.rows() * self.classes {
            bail!(
                "cross_entropy: logits have {} elements, expected {}",
                end - start,
                self.rows() * self.classes
            );
        }
        Ok((start, end))
    }
}

// Used by the GPU backends (and unit-tested on every platform).
#[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
impl CrossEntropyOp {
    /// Launch geometry and parameter block of the GPU kernels (CUDA and Metal) for logits of
    /// `elem_bytes` bytes: the row kernels when rows are contiguous, the strided ones otherwise.
    pub(crate) fn kernel_launch(
        &self,
        elem_bytes: usize,
    ) -> Result<(crate::launch::Launch, crate::launch::XentParams)> {
        use crate::launch;
        let rows = self.rows();
        let l = if self.inner > 1 {
            launch::strided_launch(rows)
        } else {
            launch::rows_launch(rows, self.classes, elem_bytes)
        };
        if l.grid as usize != rows.div_ceil((l.block / l.group.max(1)) as usize)
            || rows.div_ceil((l.block / l.group.max(1)) as usize) > i32::MAX as usize
        {
            bail!("cross_entropy: {rows} rows exceed one GPU launch");
        }
        let p = launch::XentParams {
            outer: self.outer as i64,
            classes: self.classes as i64,
            inner: self.inner as i64,
            smoothing: self.smoothing,
            ignore_index: self.ignore_index,
            z_loss: self.z_loss,
            softcap: self.softcap.unwrap_or(0.0),
            group: l.group.max(launch::WARP) as i64,
            weighted: self.weight.is_some() as i64,
            soft: self.soft as i64,
        };
        Ok((l, p))
    }

    /// Entry point name in `xent.cu` / `xent.metal`: `xent_{fwd,bwd}[_strided]_{logit}_{target}`.
    pub(crate) fn kernel_name(&self, bwd: bool, logit: &str, target: &str) -> String {
        format!(
            "xent_{}{}_{logit}_{target}",
            if bwd { "bwd" } else { "fwd" },
            if self.inner > 1 { "_strided" } else { "" }
        )
    }
}

fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
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
        // Only the loss column carries a gradient: lse and the target weight are internal.
        let g = grad_res.narrow(1, 0, 1)?;
        let stats = Tensor::cat(&[&res.narrow(1, 1, 2)?.detach(), &g], 1)?.contiguous()?;
        if self.inplace_grad {
            logits.inplace_op3(target, &stats, &CrossEntropyBackward { op: self.clone() })?;
            return Ok((Some(logits.clone()), None));
        }
        let grad = self.backward_with_stats(logits, target, &stats)?;
        // Soft targets are treated as constants; see the crate docs.
        Ok((Some(grad), None))
    }
}

impl CrossEntropyOp {
    /// Gradient of `sum_i g_i loss_i` w.r.t. the logits, from `stats = [lse, target_weight, g]`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn op(outer: usize, classes: usize, inner: usize) -> CrossEntropyOp {
        CrossEntropyOp {
            outer,
            classes,
            inner,
            smoothing: 0.1,
            ignore_index: -100,
            z_loss: 0.0,
            softcap: Some(5.0),
            inplace_grad: false,
            weight: None,
            soft: false,
            target_dims: vec![outer * inner],
        }
    }

    #[test]
    fn gpu_arguments_follow_the_layout() {
        let (l, p) = op(16, 131_072, 1).kernel_launch(2).unwrap();
        assert_eq!((l.grid, l.block, l.group), (16, 1024, 1024));
        assert_eq!((p.group, p.softcap, p.soft, p.weighted), (1024, 5.0, 0, 0));
        assert_eq!(
            op(16, 10, 1).kernel_name(false, "f32", "u32"),
            "xent_fwd_f32_u32"
        );
        let k = op(2, 10, 300);
        let (l, p) = k.kernel_launch(4).unwrap();
        assert_eq!((l.grid, l.block, p.group), (3, 256, 32));
        assert_eq!(
            k.kernel_name(true, "bf16", "i64"),
            "xent_bwd_strided_bf16_i64"
        );
        // Metal parameters: derived values rounded once from f64.
        let m = crate::launch::XentParamsMetal::from_params(&p, Some(7.5));
        assert_eq!(m.eps_over_c, (0.1f64 / 10.0) as f32);
        assert_eq!(m.softcap_inv, (1.0f64 / 5.0) as f32);
        assert_eq!(m.weight_sum, 7.5);
    }

    #[test]
    fn every_kernel_name_exists_in_both_sources() {
        let cu = include_str!("xent.cu");
        let metal = include_str!("xent.metal");
        for bwd in [false, true] {
            for inner in [1, 3] {
                let name = op(2, 10, inner).kernel_name(bwd, "T", "Y");
                let stem = name.strip_suffix("_T_Y").unwrap();
                assert!(
                    cu.contains(&format!("void {stem}_##TN##_##YN(")),
                    "{stem} in xent.cu"
                );
                assert!(
                    metal.contains(&format!("(\"{stem}_\" #TN \"_\" #YN)")),
                    "{stem} in xent.metal"
                );
            }
        }
        for (t, cu_t, metal_t) in [
            ("f32", "float", "float"),
            ("f16", "__half", "half"),
            ("bf16", "__nv_bfloat16", "bfloat"),
        ] {
            for (y, cu_y, metal_y) in [("u32", "uint32_t", "uint"), ("i64", "int64_t", "long")] {
                assert!(cu.contains(&format!("XENT_INSTANTIATE({cu_t}, {t}, {cu_y}, {y})")));
                assert!(
                    metal.contains(&format!("XENT_INSTANTIATE({metal_t}, {t}, {metal_y}, {y})"))
                );
            }
        }
    }
}
