//! The description of one fused cross-entropy call: shapes, options, and what every device
//! path derives from them (row count, accumulator dtype, the out-of-range error, the GPU launch
//! geometry and kernel names). The CPU, CUDA and Metal paths depend on this module; it depends on
//! none of them.

use candle_core::{bail, DType, Layout, Result, Tensor};

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

    pub(crate) fn check_logits(&self, l: &Layout) -> Result<(usize, usize)> {
        let Some((start, end)) = data_range(l) else {
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

/// The storage range a contiguous layout covers; `(0, 0)` for zero elements, whose offset may
/// lie past the end of an empty storage (a view such as `zeros((0, 5)).narrow(1, 1, 4)`).
pub(crate) fn data_range(l: &Layout) -> Option<(usize, usize)> {
    if l.shape().elem_count() == 0 {
        return Some((0, 0));
    }
    l.contiguous_offsets()
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
        assert_eq!(m.softcap, 5.0);
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
