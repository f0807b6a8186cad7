//! Fused linear cross-entropy: the loss of `hidden (N, H) x weight (V, H)^T (+ bias)` computed in
//! row chunks, so the `(N, V)` logits never exist at once.

use crate::op::CrossEntropyBackward;
use crate::{CrossEntropyLoss, Reduction};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// Cross-entropy of a linear layer's output without materialising the logits (Liger Kernel's
/// idea): rows are processed `chunk` at a time; for each chunk the logits, the fused loss and its
/// gradient are computed and immediately turned into the gradients of `hidden`, `weight` and
/// `bias`, which the backward pass then hands out. Every [`CrossEntropyLoss`] option applies
/// (smoothing, weights, ignore_index, z-loss, softcap); reductions `Mean` and `Sum`.
///
/// Extra memory: one chunk of logits and its gradient (`2 * chunk * V` values) plus the
/// gradients themselves, instead of the `N * V` logits and their gradient.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_xent::{CrossEntropyLoss, FusedLinearCrossEntropy};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let h = Var::randn(0f32, 1., (6, 4), &dev)?;
/// let w = Var::randn(0f32, 1., (10, 4), &dev)?;
/// let y = Tensor::new(&[1u32, 2, 3, 4, 5, 9], &dev)?;
/// let ce = CrossEntropyLoss::new().label_smoothing(0.1);
/// let fused = FusedLinearCrossEntropy::new(ce.clone()).chunk(4).forward(h.as_tensor(), w.as_tensor(), None, &y)?;
/// let plain = ce.forward(&h.as_tensor().matmul(&w.as_tensor().t()?)?, &y)?;
/// assert!((fused.to_scalar::<f32>()? - plain.to_scalar::<f32>()?).abs() < 1e-5);
/// let g = fused.backward()?;
/// assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[10, 4]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FusedLinearCrossEntropy {
    loss: CrossEntropyLoss,
    chunk: usize,
}

impl FusedLinearCrossEntropy {
    /// Wraps a configured loss (reduction `Mean` or `Sum`); default chunk 1024 rows.
    pub fn new(loss: CrossEntropyLoss) -> Self {
        Self { loss, chunk: 1024 }
    }

    /// Rows per chunk.
    pub fn chunk(mut self, rows: usize) -> Self {
        self.chunk = rows.max(1);
        self
    }

    /// The reduced loss of `hidden (N, H) x weight (V, H)^T + bias (V)` against class targets
    /// `(N,)`; differentiable in `hidden`, `weight` and `bias`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        target: &Tensor,
    ) -> Result<Tensor> {
        let r = self.forward_with_grad(hidden, weight, bias, target)?;
        let zeros;
        let bias_t = match bias {
            Some(b) => b,
            None => {
                zeros = Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?;
                &zeros
            }
        };
        let value = r
            .loss
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let op = Precomputed {
            value,
            gh: r.grad_hidden,
            gw: r.grad_weight,
            gb: r.grad_bias,
        };
        hidden
            .apply_op3(weight, bias_t, op)?
            .to_dtype(hidden.dtype())
    }

    /// The loss and its gradients without autograd: the memory-lean path. Beyond the inputs and
    /// the returned gradients it holds one chunk of logits (`chunk * V` values), overwritten in
    /// place by its gradient, and (on CPU) accumulates the weight gradient in place.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_xent::{CrossEntropyLoss, FusedLinearCrossEntropy};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let h = Tensor::randn(0f32, 1., (6, 4), &dev)?;
    /// let w = Tensor::randn(0f32, 1., (10, 4), &dev)?;
    /// let y = Tensor::new(&[1u32, 2, 3, 4, 5, 9], &dev)?;
    /// let r = FusedLinearCrossEntropy::new(CrossEntropyLoss::new()).chunk(4)
    ///     .forward_with_grad(&h, &w, None, &y)?;
    /// assert_eq!((r.grad_hidden.dims(), r.grad_weight.dims()), (&[6, 4][..], &[10, 4][..]));
    /// # Ok(()) }
    /// ```
    pub fn forward_with_grad(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        target: &Tensor,
    ) -> Result<LinearGrads> {
        let (n, h) = hidden.dims2()?;
        let (v, h2) = weight.dims2()?;
        if h != h2 {
            bail!("fused_linear_cross_entropy: hidden has {h} features, weight expects {h2}");
        }
        if let Some(b) = bias {
            if b.dims() != [v] {
                bail!(
                    "fused_linear_cross_entropy: bias must have shape ({v},), got {:?}",
                    b.dims()
                );
            }
        }
        if target.dims() != [n] {
            bail!(
                "fused_linear_cross_entropy: target must have shape ({n},), got {:?}",
                target.dims()
            );
        }
        let red = self.loss.get_reduction();
        if red == Reduction::None {
            bail!("fused_linear_cross_entropy: reduction None is not supported (use Mean or Sum)");
        }
        let ignore = self.loss.get_ignore_index();
        let ys = target.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?;
        if let Some((pos, y)) = ys
            .iter()
            .enumerate()
            .find(|(_, &y)| y != ignore && !(0..v as i64).contains(&y))
        {
            bail!("fused_linear_cross_entropy: target class {y} at position [{pos}] is out of range for {v} classes");
        }
        // The mean's denominator over all rows, so that each chunk can be reduced with Sum.
        let denom = match red {
            Reduction::Mean => self.loss.target_weight_sum(v, target)?,
            _ => 1.0,
        };
        let chunk_loss = self.loss.clone().reduction(Reduction::Sum);
        let wt = weight.detach();
        let hd = hidden.detach();
        let mut total = 0f64;
        let mut gh = Vec::new();
        let mut gw: Option<Tensor> = None;
        // CPU f32/f64: accumulate the weight gradient in place with one GEMM per chunk.
        let mut gw_acc = GradAcc::new(weight)?;
        let mut gb: Option<Tensor> = None;
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let hc = hd.narrow(0, start, len)?;
            let mut logits = hc.matmul(&wt.t()?)?;
            if let Some(b) = bias {
                logits = logits.broadcast_add(&b.detach())?;
            }
            // Loss of the chunk, then its gradient written over the chunk's logits.
            let (op, logits, tc) = chunk_loss.prepare(&logits, &target.narrow(0, start, len)?)?;
            let stats = logits.apply_op2_no_bwd(&tc, &op)?;
            total += stats
                .narrow(1, 0, 1)?
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            let g_rows =
                Tensor::full(1.0 / denom, (len, 1), stats.device())?.to_dtype(stats.dtype())?;
            let bstats = Tensor::cat(&[&stats.narrow(1, 1, 2)?, &g_rows], 1)?.contiguous()?;
            logits.inplace_op3(&tc, &bstats, &CrossEntropyBackward { op })?;
            let g = logits;
            gh.push(g.matmul(&wt)?);
            if !gw_acc.add(&g, &hc)? {
                let gwc = g.t()?.matmul(&hc)?;
                gw = Some(match gw {
                    None => gwc,
                    Some(a) => (a + gwc)?,
                });
            }
            if bias.is_some() {
                let gbc = g.sum(0)?;
                gb = Some(match gb {
                    None => gbc,
                    Some(a) => (a + gbc)?,
                });
            }
            start += len;
        }
        let grad_weight = match gw_acc.finish(weight)? {
            Some(t) => t,
            None => gw.unwrap_or(weight.zeros_like()?),
        };
        Ok(LinearGrads {
            loss: Tensor::new(total / denom, hidden.device())?.to_dtype(hidden.dtype())?,
            grad_hidden: if gh.is_empty() {
                hidden.zeros_like()?
            } else {
                Tensor::cat(&gh, 0)?
            },
            grad_weight,
            grad_bias: gb,
        })
    }
}

/// The result of [`FusedLinearCrossEntropy::forward_with_grad`].
#[derive(Debug, Clone)]
pub struct LinearGrads {
    /// The reduced loss (a scalar in the hidden states' dtype).
    pub loss: Tensor,
    /// Gradient of the loss with respect to `hidden`, `(N, H)`.
    pub grad_hidden: Tensor,
    /// Gradient with respect to `weight`, `(V, H)`.
    pub grad_weight: Tensor,
    /// Gradient with respect to `bias`, `(V,)`, when a bias was given.
    pub grad_bias: Option<Tensor>,
}

/// Carries the eagerly computed loss value and gradients through autograd.
struct Precomputed {
    value: f64,
    gh: Tensor,
    gw: Tensor,
    gb: Option<Tensor>,
}

impl CustomOp3 for Precomputed {
    fn name(&self) -> &'static str {
        "candle-xent-fused-linear-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.value]),
            _ => CpuStorage::F32(vec![self.value as f32]),
        };
        Ok((out, Shape::from(())))
    }
    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // `loss.backward()` hands 1: then the precomputed gradients are returned as they are
        // (no weight-sized copy).
        let scale = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let scaled = |t: &Tensor, dtype| -> Result<Tensor> {
            if scale == 1.0 {
                t.to_dtype(dtype)
            } else {
                t.affine(scale, 0.0)?.to_dtype(dtype)
            }
        };
        let gh = scaled(&self.gh, h.dtype())?;
        let gw = scaled(&self.gw, w.dtype())?;
        let gb = match &self.gb {
            Some(b) => Some(scaled(b, b.dtype())?),
            None => None,
        };
        Ok((Some(gh), Some(gw), gb))
    }
}

/// In-place accumulation of `dW (V, H) += G^T (V, rows) x H (rows, H)` with the gemm crate, for
/// contiguous CPU f32/f64 tensors (elsewhere [`GradAcc::add`] returns false and the caller uses
/// tensor ops). Saves the `V x H` temporaries of an add per chunk.
enum GradAcc {
    F32(Vec<f32>, usize, usize),
    F64(Vec<f64>, usize, usize),
    Off,
}

impl GradAcc {
    fn new(weight: &Tensor) -> Result<Self> {
        let (v, h) = weight.dims2()?;
        if !weight.device().is_cpu() {
            return Ok(GradAcc::Off);
        }
        Ok(match weight.dtype() {
            candle_core::DType::F32 => GradAcc::F32(vec![0.0; v * h], v, h),
            candle_core::DType::F64 => GradAcc::F64(vec![0.0; v * h], v, h),
            _ => GradAcc::Off,
        })
    }

    fn add(&mut self, g: &Tensor, hc: &Tensor) -> Result<bool> {
        let rows = g.dim(0)?;
        let (g, hc) = (g.contiguous()?, hc.contiguous()?);
        let (gs, gl) = g.storage_and_layout();
        let (hs, hl) = hc.storage_and_layout();
        let (Some((ga, gb)), Some((ha, hb))) = (gl.contiguous_offsets(), hl.contiguous_offsets())
        else {
            return Ok(false);
        };
        match (self, &*gs, &*hs) {
            (
                GradAcc::F32(acc, v, h),
                Storage::Cpu(CpuStorage::F32(gv)),
                Storage::Cpu(CpuStorage::F32(hv)),
            ) => {
                gemm_at_b(acc, &gv[ga..gb], &hv[ha..hb], rows, *v, *h);
                Ok(true)
            }
            (
                GradAcc::F64(acc, v, h),
                Storage::Cpu(CpuStorage::F64(gv)),
                Storage::Cpu(CpuStorage::F64(hv)),
            ) => {
                gemm_at_b(acc, &gv[ga..gb], &hv[ha..hb], rows, *v, *h);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn finish(self, weight: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self {
            GradAcc::F32(acc, v, h) => Some(Tensor::from_vec(acc, (v, h), weight.device())?),
            GradAcc::F64(acc, v, h) => Some(Tensor::from_vec(acc, (v, h), weight.device())?),
            GradAcc::Off => None,
        })
    }
}

/// `acc (v x h) += g^T x hc` with `g (rows x v)` and `hc (rows x h)` row-major.
fn gemm_at_b<T: 'static + Copy + num_one::One>(
    acc: &mut [T],
    g: &[T],
    hc: &[T],
    rows: usize,
    v: usize,
    h: usize,
) {
    assert!(acc.len() == v * h && g.len() == rows * v && hc.len() == rows * h);
    if rows == 0 || v == 0 || h == 0 {
        return;
    }
    // SAFETY: the three slices have exactly the sizes the strides address (checked above) and
    // `acc` does not alias the inputs.
    unsafe {
        gemm::gemm(
            v,
            h,
            rows,
            acc.as_mut_ptr(),
            1,
            h as isize,
            true,
            g.as_ptr(),
            v as isize,
            1,
            hc.as_ptr(),
            1,
            h as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

mod num_one {
    pub trait One {
        fn one() -> Self;
    }
    impl One for f32 {
        fn one() -> Self {
            1.0
        }
    }
    impl One for f64 {
        fn one() -> Self {
            1.0
        }
    }
}
