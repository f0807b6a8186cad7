//! Fused linear cross-entropy: the loss of `hidden (N, H) x weight (V, H)^T (+ bias)` computed in
//! row chunks, so the `(N, V)` logits never exist at once.

use crate::op::CrossEntropyBackward;
use crate::{CrossEntropyLoss, Reduction};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// Cross-entropy of a linear layer's output without materialising the logits (Liger Kernel's
/// idea): rows are processed `chunk` at a time; for each chunk the logits, the fused loss and its
/// gradient are computed and immediately turned into the gradients of `hidden`, `weight` and
/// `bias`, which the backward pass then hands out. Every [`CrossEntropyLoss`] option applies
/// (smoothing, weights, ignore_index, z-loss, softcap); reductions `Mean` and `Sum`.
///
/// Extra memory: one chunk of logits (`chunk * V` values), overwritten in place by its gradient,
/// plus the gradients themselves, instead of the `N * V` logits and their gradient. By default
/// ([`FusedLinearCrossEntropy::chunk_rows`]) a chunk's logits are about the size of the hidden
/// states (Liger Kernel's rule), and at least 256 rows.
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
    chunk: Option<usize>,
}

impl FusedLinearCrossEntropy {
    /// Wraps a configured loss (reduction `Mean` or `Sum`); chunks sized by
    /// [`FusedLinearCrossEntropy::chunk_rows`] unless [`FusedLinearCrossEntropy::chunk`] is set.
    pub fn new(loss: CrossEntropyLoss) -> Self {
        Self { loss, chunk: None }
    }

    /// Rows per chunk (at least 1), instead of the default [`FusedLinearCrossEntropy::chunk_rows`].
    pub fn chunk(mut self, rows: usize) -> Self {
        self.chunk = Some(rows.max(1));
        self
    }

    /// The default rows per chunk for `n` rows of `h` features and `v` classes: the power of two
    /// at or above `n * h / v`, so that a chunk of logits holds about as many values as the
    /// hidden states, but at least 256 rows (below that the CPU GEMMs re-read the weight too
    /// often and slow down) and at most `n`.
    ///
    /// ```
    /// use candle_xent::FusedLinearCrossEntropy;
    /// // Llama-3 head, 8192 tokens: 256 rows, 128 MiB of f32 logits per chunk instead of 4 GiB.
    /// assert_eq!(FusedLinearCrossEntropy::chunk_rows(8192, 2048, 128_256), 256);
    /// assert_eq!(FusedLinearCrossEntropy::chunk_rows(65_536, 4096, 32_000), 16_384);
    /// assert_eq!(FusedLinearCrossEntropy::chunk_rows(100, 512, 1000), 100);
    /// ```
    pub fn chunk_rows(n: usize, h: usize, v: usize) -> usize {
        let rows = (n.saturating_mul(h)).div_ceil(v.max(1)).max(1);
        rows.checked_next_power_of_two()
            .unwrap_or(rows)
            .max(256)
            .min(n)
            .max(1)
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
    /// place by its gradient (two for a moment while a bias is added); on CPU (f32, f64) the
    /// GEMMs write straight into the gradient buffers, so nothing else grows with the chunk or
    /// the vocabulary. Elsewhere the gradients are summed with tensor ops, which allocate a
    /// weight-sized temporary per chunk.
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
        let (n, h) = match hidden.dims() {
            &[n, h] => (n, h),
            d => bail!("fused_linear_cross_entropy: hidden must be (N, H), got shape {d:?}"),
        };
        let (v, h2) = match weight.dims() {
            &[v, h2] => (v, h2),
            d => bail!("fused_linear_cross_entropy: weight must be (V, H), got shape {d:?}"),
        };
        if h != h2 {
            bail!("fused_linear_cross_entropy: hidden has {h} features, weight expects {h2}");
        }
        if v == 0 {
            bail!(
                "fused_linear_cross_entropy: weight has 0 classes (shape {:?})",
                weight.dims()
            );
        }
        let dtype = hidden.dtype();
        if !matches!(
            dtype,
            candle_core::DType::F16
                | candle_core::DType::BF16
                | candle_core::DType::F32
                | candle_core::DType::F64
        ) {
            bail!(
                "fused_linear_cross_entropy: hidden must be f16, bf16, f32 or f64, got {dtype:?}"
            );
        }
        if weight.dtype() != dtype || bias.is_some_and(|b| b.dtype() != dtype) {
            bail!(
                "fused_linear_cross_entropy: hidden ({dtype:?}), weight ({:?}) and bias ({:?}) \
                 must have one dtype",
                weight.dtype(),
                bias.map(|b| b.dtype())
            );
        }
        // Every option is checked here, so that a call with no rows rejects what one with rows
        // would.
        self.loss.checked_smoothing(v)?;
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
        if target.dtype().is_float() {
            bail!(
                "fused_linear_cross_entropy: target must hold class indices (integers), got {:?}",
                target.dtype()
            );
        }
        if let Some(d) = self.loss.get_class_dim().filter(|&d| d != 1) {
            bail!(
                "fused_linear_cross_entropy: the logits are (N, V), so the class dimension is 1; \
                 the loss has class_dim({d})"
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
        let mut total = 0f64;
        let mut gh = Vec::new();
        let mut gw: Option<Tensor> = None;
        // CPU f32/f64: GEMMs straight into the two gradient buffers, no per-chunk temporaries;
        // they read the operands' memory, so strided hidden states are made contiguous once.
        let mut cpu = CpuGrads::new(&wt, hidden, n)?;
        let hd = match cpu {
            CpuGrads::Off => hidden.detach(),
            _ => hidden.detach().contiguous()?,
        };
        // Gradients summed over chunks are accumulated in f32 (f64 for f64), as the kernels do:
        // a running f16 sum would add one f16 rounding per chunk.
        let acc = crate::spec::CrossEntropyOp::acc_dtype(dtype);
        let mut gb: Option<Tensor> = match bias {
            Some(_) => Some(Tensor::zeros(v, acc, hidden.device())?),
            None => None,
        };
        let chunk = self.chunk.unwrap_or_else(|| Self::chunk_rows(n, h, v));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let hc = hd.narrow(0, start, len)?;
            let mut logits = hc.matmul(&wt.t()?)?;
            if let Some(b) = bias {
                logits = logits.broadcast_add(&b.detach())?;
            }
            // Loss of the chunk, then its gradient written over the chunk's logits.
            let (op, logits, tc) = chunk_loss.prepare(&logits, &target.narrow(0, start, len)?)?;
            let stats = logits.apply_op2_no_bwd(&tc, &op)?;
            total += stats
                .narrow(1, crate::launch::COL_LOSS, 1)?
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            let g_rows =
                Tensor::full(1.0 / denom, (len, 1), stats.device())?.to_dtype(stats.dtype())?;
            let bstats = crate::op::backward_stats(&stats, &g_rows)?;
            logits.inplace_op3(&tc, &bstats, &CrossEntropyBackward { op })?;
            let g = logits;
            if matches!(cpu, CpuGrads::Off) {
                gh.push(g.matmul(&wt)?);
                let gwc = g.t()?.matmul(&hc)?.to_dtype(acc)?;
                gw = Some(match gw {
                    None => gwc,
                    Some(a) => (a + gwc)?,
                });
            } else {
                cpu.add(&g, &hc, &wt, start)?;
            }
            if let Some(a) = gb.take() {
                gb = Some((a + g.to_dtype(acc)?.sum(0)?)?);
            }
            start += len;
        }
        let (grad_hidden, grad_weight) = match cpu.finish(hidden.device())? {
            Some(g) => g,
            None => (
                if gh.is_empty() {
                    Tensor::zeros((n, h), dtype, hidden.device())?
                } else {
                    Tensor::cat(&gh, 0)?
                },
                match gw {
                    Some(g) => g.to_dtype(dtype)?,
                    None => Tensor::zeros((v, h), dtype, hidden.device())?,
                },
            ),
        };
        let grad_bias = match gb {
            Some(g) => Some(g.to_dtype(dtype)?),
            None => None,
        };
        Ok(LinearGrads {
            loss: Tensor::new(total / denom, hidden.device())?.to_dtype(dtype)?,
            grad_hidden,
            grad_weight,
            grad_bias,
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

impl Precomputed {
    /// The loss value as a one-element storage: f64 for f64 hidden states, f32 otherwise (the
    /// caller casts to the hidden states' dtype).
    fn value_storage(&self, dtype: candle_core::DType) -> CpuStorage {
        match dtype {
            candle_core::DType::F64 => CpuStorage::F64(vec![self.value]),
            _ => CpuStorage::F32(vec![self.value as f32]),
        }
    }
}

/// The forward only places the precomputed value on the inputs' device (every backend: this op
/// launches no kernel); the backward hands out the precomputed gradients.
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
        Ok((self.value_storage(s1.dtype()), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let value = self.value_storage(s1.dtype());
        Ok((
            s1.device().storage_from_cpu_storage_owned(value)?,
            Shape::from(()),
        ))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let value = self.value_storage(s1.dtype());
        Ok((
            s1.device().storage_from_cpu_storage_owned(value)?,
            Shape::from(()),
        ))
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

/// The gradients of `hidden` and `weight` computed by GEMMs straight into their final buffers,
/// for contiguous CPU f32/f64 operands (elsewhere [`CpuGrads::add`] returns false and the caller
/// uses tensor ops): `dH[chunk] = G W` and `dW += G^T H[chunk]`, with no `(rows, H)` pieces to
/// concatenate and no `(V, H)` temporary per chunk.
enum CpuGrads {
    F32(GradBufs<f32>),
    F64(GradBufs<f64>),
    Off,
}

/// `gh (n x h)` and `gw (v x h)`, row-major.
struct GradBufs<T> {
    gh: Vec<T>,
    gw: Vec<T>,
    n: usize,
    v: usize,
    h: usize,
}

impl CpuGrads {
    /// On for contiguous CPU f32/f64 weights with hidden states of the same dtype.
    fn new(weight: &Tensor, hidden: &Tensor, n: usize) -> Result<Self> {
        let (v, h) = weight.dims2()?;
        if !weight.device().is_cpu() || !weight.is_contiguous() || hidden.dtype() != weight.dtype()
        {
            return Ok(CpuGrads::Off);
        }
        Ok(match weight.dtype() {
            candle_core::DType::F32 => CpuGrads::F32(GradBufs::new(n, v, h)),
            candle_core::DType::F64 => CpuGrads::F64(GradBufs::new(n, v, h)),
            _ => CpuGrads::Off,
        })
    }

    /// Adds the chunk of rows starting at `start` with gradient `g (rows, V)` and hidden states
    /// `hc (rows, H)`, which must be contiguous CPU tensors of this dtype.
    fn add(&mut self, g: &Tensor, hc: &Tensor, w: &Tensor, start: usize) -> Result<()> {
        let done = match self {
            CpuGrads::F32(b) => b.add(g, hc, w, start)?,
            CpuGrads::F64(b) => b.add(g, hc, w, start)?,
            CpuGrads::Off => false,
        };
        if !done {
            bail!("fused_linear_cross_entropy: internal error: the CPU gradient GEMMs need contiguous operands");
        }
        Ok(())
    }

    fn finish(self, device: &candle_core::Device) -> Result<Option<(Tensor, Tensor)>> {
        Ok(match self {
            CpuGrads::F32(b) => Some(b.finish(device)?),
            CpuGrads::F64(b) => Some(b.finish(device)?),
            CpuGrads::Off => None,
        })
    }
}

impl<T: candle_core::WithDType + num_one::One> GradBufs<T> {
    fn new(n: usize, v: usize, h: usize) -> Self {
        Self {
            gh: vec![T::zero(); n * h],
            gw: vec![T::zero(); v * h],
            n,
            v,
            h,
        }
    }

    fn add(&mut self, g: &Tensor, hc: &Tensor, w: &Tensor, start: usize) -> Result<bool> {
        let rows = g.dim(0)?;
        let (gs, gl) = g.storage_and_layout();
        let (hs, hl) = hc.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Some(gv), Some(hv), Some(wv)) = (
            cpu_slice::<T>(&gs, gl),
            cpu_slice::<T>(&hs, hl),
            cpu_slice::<T>(&ws, wl),
        ) else {
            return Ok(false);
        };
        let (v, h) = (self.v, self.h);
        if gv.len() != rows * v || hv.len() != rows * h || wv.len() != v * h {
            return Ok(false);
        }
        gemm_ab(
            &mut self.gh[start * h..(start + rows) * h],
            gv,
            wv,
            rows,
            v,
            h,
        );
        gemm_at_b(&mut self.gw, gv, hv, rows, v, h);
        Ok(true)
    }

    fn finish(self, device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::from_vec(self.gh, (self.n, self.h), device)?,
            Tensor::from_vec(self.gw, (self.v, self.h), device)?,
        ))
    }
}

/// The contiguous values of a CPU tensor of dtype `T`, if it is one.
fn cpu_slice<'a, T: candle_core::WithDType>(s: &'a Storage, l: &Layout) -> Option<&'a [T]> {
    let (a, b) = l.contiguous_offsets()?;
    match s {
        Storage::Cpu(c) => c.as_slice::<T>().ok().map(|x| &x[a..b]),
        _ => None,
    }
}

/// `out (rows x h) = g (rows x v) x w (v x h)`, all row-major.
fn gemm_ab<T: 'static + Copy + num_one::One>(
    out: &mut [T],
    g: &[T],
    w: &[T],
    rows: usize,
    v: usize,
    h: usize,
) {
    assert!(out.len() == rows * h && g.len() == rows * v && w.len() == v * h);
    if rows == 0 || h == 0 {
        return;
    }
    // SAFETY: the slices have exactly the sizes the strides address (checked above) and `out`
    // does not alias the inputs. `read_dst` is false, so `out`'s previous values are not read.
    unsafe {
        gemm::gemm(
            rows,
            h,
            v,
            out.as_mut_ptr(),
            1,
            h as isize,
            false,
            g.as_ptr(),
            1,
            v as isize,
            w.as_ptr(),
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

/// `acc (v x h) += g^T x hc` with `g (rows x v)` and `hc (rows x h)` row-major.
///
/// The gemm crate packs its whole right-hand operand when the output is wide: here that is all
/// of `g`, a second chunk-sized buffer. The product is therefore taken in bands of
/// [`GW_BAND_ELEMS`]` / rows` classes, so the packing buffer stays a few MiB whatever the chunk.
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
    let band = (GW_BAND_ELEMS / rows).clamp(64, v.max(64));
    let mut v0 = 0;
    while v0 < v {
        let vb = band.min(v - v0);
        // SAFETY: `acc[v0 * h..]` holds `vb` rows of `h` values, `g[v0..]` addresses `rows` rows
        // of stride `v` with `vb` columns each, `hc` is `rows x h`; all within the slices checked
        // above, and `acc` does not alias the inputs.
        unsafe {
            gemm::gemm(
                vb,
                h,
                rows,
                acc.as_mut_ptr().add(v0 * h),
                1,
                h as isize,
                true,
                g.as_ptr().add(v0),
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
        v0 += vb;
    }
}

/// Values of the gradient chunk that one weight-gradient GEMM call covers (256 Ki: 1 MiB in f32).
const GW_BAND_ELEMS: usize = 1 << 18;

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
