//! The public loss API: [`CrossEntropyLoss`] and the [`cross_entropy`] shortcut.

use crate::spec::CrossEntropyOp;
use crate::Reduction;
use candle_core::{bail, DType, Result, Tensor};

/// How label smoothing spreads its mass `eps` over the classes.
///
/// The two conventions in use are one family: `OtherClasses` with `eps` is `Uniform` with
/// `eps * C / (C - 1)` (both give the target class `1 - eps` and every other class
/// `eps / (C - 1)`), which is how every backend computes it, so it is as exact as `Uniform`.
///
/// ```
/// use candle_xent::Smoothing;
/// assert_eq!(Smoothing::default(), Smoothing::Uniform);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Smoothing {
    /// `eps / C` to every class, the target included, which keeps `1 - eps + eps / C`: PyTorch's
    /// `cross_entropy(label_smoothing=eps)`, Keras's `label_smoothing`, the NVIDIA and
    /// Wangleiofficial losses of the seed thread.
    #[default]
    Uniform,
    /// `eps / (C - 1)` to every other class and `1 - eps` to the target: the seed thread's
    /// `LabelSmoothingLoss(classes, smoothing)` (Devin Yang) and `SmoothCrossEntropyLoss`
    /// (Shital Shah). Needs `C >= 2` and `eps <= (C - 1) / C` (beyond it the target would get
    /// less than an other class; the loss stays a sum of non-negative parts only up to there).
    /// With probability targets `t`: `(1 - eps') t + eps' / C`, `eps' = eps * C / (C - 1)`.
    OtherClasses,
}

impl Smoothing {
    /// The `Uniform` smoothing equal to `eps` under this convention, for `classes` classes.
    fn to_uniform(self, eps: f64, classes: usize) -> Result<f64> {
        match self {
            Smoothing::Uniform => Ok(eps),
            Smoothing::OtherClasses if eps == 0.0 => Ok(0.0),
            Smoothing::OtherClasses => {
                if classes < 2 {
                    bail!(
                        "cross_entropy: Smoothing::OtherClasses spreads label_smoothing over the \
                         other classes, but the input has {classes} class"
                    );
                }
                let c = classes as f64;
                let max = (c - 1.0) / c;
                if eps > max {
                    bail!(
                        "cross_entropy: label_smoothing {eps} with Smoothing::OtherClasses and \
                         {classes} classes gives the target less mass than each other class; \
                         use at most (C - 1) / C = {max}"
                    );
                }
                // eps <= (C - 1) / C keeps this <= 1; clamp the last rounding.
                Ok((eps * c / (c - 1.0)).min(1.0))
            }
        }
    }
}

/// Cross-entropy between logits and class indices or class probabilities, with PyTorch's
/// semantics for label smoothing, class weights, `ignore_index` and reductions, computed by one
/// fused kernel.
///
/// Defaults: no smoothing, no class weights, `ignore_index = -100`, [`Reduction::Mean`], class
/// dimension 1 (0 for an unbatched `(C,)` input).
///
/// **Input**: logits `(C)`, `(N, C)` or `(N, C, d1, .., dk)` in f16, bf16, f32 or f64.
///
/// **Target**: class indices (u8, u32, i16, i32 or i64) shaped like the input without its class
/// dimension, or probabilities with the input's shape and dtype.
///
/// **Returned dtype**: the input's dtype. All sums, including the reduction, are carried out in
/// f32 (f64 for f64 input) and only the final value is rounded, so half-precision inputs give
/// finite losses where PyTorch's f16 path overflows (e.g. `C = 50,000` with smoothing 0.1). A
/// `Sum` of many large losses can still exceed the f16 range, as in any f16 tensor.
///
/// **Gradients** flow into the logits through [`Tensor::backward`]. Probability targets are
/// treated as constants (no gradient flows into the target tensor).
///
/// **Where we differ from PyTorch on purpose**: a negative `label_smoothing` is an error (PyTorch
/// silently treats it as 0).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_xent::{CrossEntropyLoss, Reduction};
/// # fn main() -> candle_core::Result<()> {
/// let logits = Tensor::new(&[[0f32, 0.2, 0.7, 0.1, 0.], [0., 0.9, 0.2, 0.2, 1.], [1., 0.2, 0.7, 0.9, 1.]], &Device::Cpu)?;
/// let target = Tensor::new(&[2i64, 1, 0], &Device::Cpu)?;
/// let loss = CrossEntropyLoss::new()
///     .label_smoothing(0.3)
///     .reduction(Reduction::Mean)
///     .forward(&logits, &target)?;
/// assert!((loss.to_scalar::<f32>()? - 1.3882861).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CrossEntropyLoss {
    label_smoothing: f64,
    smoothing: Smoothing,
    weight: Option<Tensor>,
    ignore_index: i64,
    reduction: Reduction,
    class_dim: Option<usize>,
    z_loss: f64,
    softcap: Option<f64>,
    inplace_grad: bool,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        Self::new()
    }
}

impl CrossEntropyLoss {
    /// A loss with PyTorch's defaults: no smoothing, no weights, `ignore_index = -100`, mean.
    ///
    /// ```
    /// let loss = candle_xent::CrossEntropyLoss::new();
    /// assert_eq!(loss.get_ignore_index(), -100);
    /// ```
    pub fn new() -> Self {
        Self {
            label_smoothing: 0.0,
            smoothing: Smoothing::Uniform,
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            class_dim: None,
            z_loss: 0.0,
            softcap: None,
            inplace_grad: false,
        }
    }

    /// Label smoothing `eps` in `[0, 1]`: the target becomes `(1 - eps) * onehot + eps / C`.
    /// Values outside `[0, 1]` (or NaN) make [`CrossEntropyLoss::forward`] return an error.
    ///
    /// ```
    /// let loss = candle_xent::CrossEntropyLoss::new().label_smoothing(0.1);
    /// assert_eq!(loss.get_label_smoothing(), 0.1);
    /// ```
    pub fn label_smoothing(mut self, eps: f64) -> Self {
        self.label_smoothing = eps;
        self
    }

    /// Where label smoothing puts its mass `eps` (default [`Smoothing::Uniform`], PyTorch's and
    /// Keras's): see [`Smoothing`].
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_xent::{CrossEntropyLoss, Smoothing};
    /// # fn main() -> candle_core::Result<()> {
    /// // The seed thread's example: 5 classes, 3 rows, smoothing 0.3 spread over the 4 other
    /// // classes (its `LabelSmoothingLoss(classes=5, ...)` and `SmoothCrossEntropyLoss`).
    /// let logits = Tensor::new(
    ///     &[[0f32, 0.2, 0.7, 0.1, 0.], [0., 0.9, 0.2, 0.2, 1.], [1., 0.2, 0.7, 0.9, 1.]],
    ///     &Device::Cpu,
    /// )?;
    /// let target = Tensor::new(&[2u32, 1, 0], &Device::Cpu)?;
    /// let other = CrossEntropyLoss::new()
    ///     .label_smoothing(0.3)
    ///     .smoothing(Smoothing::OtherClasses)
    ///     .forward(&logits, &target)?;
    /// assert!((other.to_scalar::<f32>()? - 1.4178).abs() < 1e-4);
    /// // PyTorch's label_smoothing=0.3 (eps / C on every class) gives the thread's other number.
    /// let uniform = CrossEntropyLoss::new().label_smoothing(0.3).forward(&logits, &target)?;
    /// assert!((uniform.to_scalar::<f32>()? - 1.3883).abs() < 1e-4);
    /// # Ok(()) }
    /// ```
    pub fn smoothing(mut self, convention: Smoothing) -> Self {
        self.smoothing = convention;
        self
    }

    /// Per-class weights, a float tensor of shape `(C,)` on the input's device. The weight of each
    /// class scales its term of the smoothing sum as well as the true-class term, and the mean
    /// divides by the summed weights of the (non-ignored) targets, as in PyTorch.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let w = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    /// let loss = candle_xent::CrossEntropyLoss::new().weight(w);
    /// ```
    pub fn weight(mut self, weight: Tensor) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Target value whose elements contribute neither loss, gradient nor mean weight
    /// (default -100). Only meaningful for class-index targets.
    ///
    /// ```
    /// let loss = candle_xent::CrossEntropyLoss::new().ignore_index(0);
    /// assert_eq!(loss.get_ignore_index(), 0);
    /// ```
    pub fn ignore_index(mut self, index: i64) -> Self {
        self.ignore_index = index;
        self
    }

    /// How the per-element losses are reduced (default [`Reduction::Mean`]).
    ///
    /// ```
    /// use candle_xent::{CrossEntropyLoss, Reduction};
    /// let loss = CrossEntropyLoss::new().reduction(Reduction::Sum);
    /// ```
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// The class dimension, for layouts other than PyTorch's. Default: 1, or 0 for a 1-D input.
    /// For `(B, T, V)` language-model logits use `class_dim(2)` (with `(B, T)` targets): the
    /// kernel reads the layout in place, no permute copy.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, DType};
    /// # fn main() -> candle_core::Result<()> {
    /// let logits = Tensor::zeros((2, 3, 7), DType::F32, &Device::Cpu)?;
    /// let target = Tensor::zeros((2, 3), DType::U32, &Device::Cpu)?;
    /// let loss = candle_xent::CrossEntropyLoss::new().class_dim(2).forward(&logits, &target)?;
    /// assert!((loss.to_scalar::<f32>()? - 7f32.ln()).abs() < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn class_dim(mut self, dim: usize) -> Self {
        self.class_dim = Some(dim);
        self
    }

    /// PaLM's z-loss: adds `z * lse^2` to the loss of every non-ignored element (`lse` the
    /// log-sum-exp of its logits), gradient included, in the same pass. It keeps the softmax
    /// normaliser near 1 in large-vocabulary training; 1e-4 is the usual value. Reduced like the
    /// rest of the loss (so the mean divides by the same denominator).
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let x = Tensor::new(&[[3f32, 3.]], &Device::Cpu).unwrap();
    /// let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
    /// let l = candle_xent::CrossEntropyLoss::new().z_loss(0.5).forward(&x, &y).unwrap();
    /// let lse = 3.0 + 2f32.ln();
    /// assert!((l.to_scalar::<f32>().unwrap() - (2f32.ln() + 0.5 * lse * lse)).abs() < 1e-5);
    /// ```
    pub fn z_loss(mut self, z: f64) -> Self {
        self.z_loss = z;
        self
    }

    /// Gemma 2's logit soft-capping: the loss (and its gradient) sees `cap * tanh(x / cap)`
    /// instead of the logits `x`, computed on the fly in the same pass.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let x = Tensor::new(&[[1000f32, 0.]], &Device::Cpu).unwrap();
    /// let y = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    /// let l = candle_xent::CrossEntropyLoss::new().softcap(30.0).forward(&x, &y).unwrap();
    /// assert!((l.to_scalar::<f32>().unwrap() - 30.0).abs() < 1e-3); // the capped gap
    /// ```
    pub fn softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Opt-in: the backward pass writes the gradient over the logits' own buffer (as Liger
    /// Kernel does), so training needs no separate logits-sized gradient allocation from this op.
    /// **The logits tensor holds the gradient after `backward()`**: use it only when nothing
    /// reads the logits afterwards, including the backward of the op that produced them (fine for
    /// a linear layer's output; wrong after e.g. `exp`). CPU only for now; elsewhere ignored.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor, Var};
    /// let x = Var::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
    /// let logits = (x.as_tensor() * 1.0).unwrap(); // a fresh buffer the loss may overwrite
    /// let y = Tensor::new(&[2u32], &Device::Cpu).unwrap();
    /// let loss = candle_xent::CrossEntropyLoss::new().inplace_grad(true).forward(&logits, &y).unwrap();
    /// let g = loss.backward().unwrap();
    /// let sum: f32 = g.get(x.as_tensor()).unwrap().sum_all().unwrap().to_scalar().unwrap();
    /// assert!(sum.abs() < 1e-6);
    /// ```
    pub fn inplace_grad(mut self, on: bool) -> Self {
        self.inplace_grad = on;
        self
    }

    /// The configured label smoothing.
    ///
    /// ```
    /// assert_eq!(candle_xent::CrossEntropyLoss::new().get_label_smoothing(), 0.0);
    /// ```
    pub fn get_label_smoothing(&self) -> f64 {
        self.label_smoothing
    }

    /// The configured smoothing convention.
    ///
    /// ```
    /// use candle_xent::{CrossEntropyLoss, Smoothing};
    /// assert_eq!(CrossEntropyLoss::new().get_smoothing(), Smoothing::Uniform);
    /// ```
    pub fn get_smoothing(&self) -> Smoothing {
        self.smoothing
    }

    /// The configured ignore index.
    ///
    /// ```
    /// assert_eq!(candle_xent::CrossEntropyLoss::new().get_ignore_index(), -100);
    /// ```
    pub fn get_ignore_index(&self) -> i64 {
        self.ignore_index
    }

    /// The configured reduction.
    ///
    /// ```
    /// use candle_xent::{CrossEntropyLoss, Reduction};
    /// assert_eq!(CrossEntropyLoss::new().get_reduction(), Reduction::Mean);
    /// ```
    pub fn get_reduction(&self) -> Reduction {
        self.reduction
    }

    /// The class dimension set with [`CrossEntropyLoss::class_dim`], if any.
    ///
    /// ```
    /// use candle_xent::CrossEntropyLoss;
    /// assert_eq!(CrossEntropyLoss::new().get_class_dim(), None);
    /// assert_eq!(CrossEntropyLoss::new().class_dim(2).get_class_dim(), Some(2));
    /// ```
    pub fn get_class_dim(&self) -> Option<usize> {
        self.class_dim
    }

    /// Computes the loss. See the type-level docs for the accepted shapes and dtypes.
    ///
    /// # Errors
    ///
    /// An `Err` naming the problem, never a panic: an input that is not f16/bf16/f32/f64 or has
    /// no class dimension; a class-index target whose shape is not the input's without the
    /// class dimension (for `(B, T, V)` logits with `(B, T)` targets: [`Self::class_dim`]`(2)`),
    /// float class indices, or a probability target of another shape or dtype; a class index
    /// outside `0..C` other than `ignore_index` (with its position); `label_smoothing` outside
    /// `[0, 1]`; a weight of the wrong shape, dtype or device; input and target on different
    /// devices.
    ///
    /// # Memory
    ///
    /// On the CPU, when the logits take 8 MiB or more, `backward()` writes their gradient into a
    /// buffer the calling thread keeps for its next backward pass (fresh pages cost as much as
    /// the kernel); the gradients autograd hands you are never that buffer.
    /// [`crate::free_grad_buffer`] releases it.
    ///
    /// # Precision
    ///
    /// For finite logits up to 1e30 in magnitude, each loss and gradient element is within half
    /// an ulp of the output dtype plus 8 units of the accumulation type (f32 for f16/bf16/f32,
    /// f64 for f64) times `|loss| + 1` per row (`|loss| + rows` for a sum) or the largest
    /// gradient term; the crate README states the bound in full.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var, DType};
    /// use candle_xent::CrossEntropyLoss;
    /// # fn main() -> candle_core::Result<()> {
    /// let logits = Var::zeros((4, 10), DType::F32, &Device::Cpu)?;
    /// let target = Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu)?;
    /// let loss = CrossEntropyLoss::new().label_smoothing(0.1).forward(&logits, &target)?;
    /// let grads = loss.backward()?;
    /// let g = grads.get(&logits).expect("gradient");
    /// assert_eq!(g.dims(), &[4, 10]);
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (op, input, target) = self.prepare(input, target)?;
        if op.rows() == 0 {
            return self.reduce_empty(&op, &input, &target);
        }
        let stats = input.apply_op2(&target, op.clone())?;
        self.reduce(&op, &stats, &input, &target)
    }

    /// Computes the loss and its gradient with respect to `input` in one call, without autograd.
    ///
    /// This is the memory-lean path for hand-written training loops and for fused layers built
    /// on top of this crate: peak memory is the logits plus their gradient (autograd adds a third
    /// logits-sized buffer when it accumulates the gradient). The gradient has the input's shape
    /// and dtype and is that of the reduced loss.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_xent::CrossEntropyLoss;
    /// # fn main() -> candle_core::Result<()> {
    /// let logits = Tensor::new(&[[0f32, 0.2, 0.7, 0.1, 0.]], &Device::Cpu)?;
    /// let target = Tensor::new(&[2u32], &Device::Cpu)?;
    /// let (loss, grad) = CrossEntropyLoss::new().forward_with_grad(&logits, &target)?;
    /// // Softmax minus one-hot: the gradient of each row sums to zero.
    /// assert!(grad.sum_all()?.to_scalar::<f32>()?.abs() < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn forward_with_grad(&self, input: &Tensor, target: &Tensor) -> Result<(Tensor, Tensor)> {
        let (op, input, target) = self.prepare(input, target)?;
        if op.rows() == 0 {
            let loss = self.reduce_empty(&op, &input.detach(), &target)?;
            return Ok((loss, input.zeros_like()?));
        }
        let stats = input.apply_op2_no_bwd(&target, &op)?;
        let loss = self.reduce(&op, &stats, &input, &target)?;
        let rows = op.rows();
        let acc = stats.dtype();
        let g = match self.reduction {
            Reduction::None | Reduction::Sum => Tensor::ones((rows, 1), acc, input.device())?,
            Reduction::Mean => {
                let denom = self.mean_denominator(&op, &stats)?;
                Tensor::ones((rows, 1), acc, input.device())?.broadcast_div(&denom)?
            }
        };
        let stats = crate::op::backward_stats(&stats, &g)?;
        let grad = op.backward_with_stats(&input, &target, &stats)?;
        Ok((loss, grad))
    }

    /// `sum_i w_{y_i}` over the non-ignored class targets (their count when unweighted): the
    /// denominator of the mean. Out-of-range targets count 0 (the loss itself reports them).
    pub(crate) fn target_weight_sum(&self, classes: usize, target: &Tensor) -> Result<f64> {
        let t = target
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let w = match &self.weight {
            Some(w) => w.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            None => vec![1.0; classes],
        };
        Ok(crate::math::neumaier(
            t.iter()
                .filter(|&&y| y != self.ignore_index && y >= 0 && (y as usize) < w.len())
                .map(|&y| w[y as usize]),
        ))
    }

    fn mean_denominator(&self, op: &CrossEntropyOp, stats: &Tensor) -> Result<Tensor> {
        if op.soft {
            Tensor::new(op.rows() as f64, stats.device())?.to_dtype(stats.dtype())
        } else {
            crate::sum::sum_all(
                &stats
                    .narrow(1, crate::launch::COL_TARGET_WEIGHT, 1)?
                    .detach(),
            )
        }
    }

    fn reduce(
        &self,
        op: &CrossEntropyOp,
        stats: &Tensor,
        input: &Tensor,
        target: &Tensor,
    ) -> Result<Tensor> {
        let per_row = stats.narrow(1, crate::launch::COL_LOSS, 1)?.squeeze(1)?;
        let out = match self.reduction {
            Reduction::None => per_row.reshape(target_shape(self, op, input, target))?,
            Reduction::Sum => crate::sum::sum_all(&per_row)?,
            Reduction::Mean => {
                crate::sum::sum_all(&per_row)?.div(&self.mean_denominator(op, stats)?)?
            }
        };
        out.to_dtype(input.dtype())
    }

    /// The loss of zero rows: an empty tensor (`None`), 0 (`Sum`) or NaN (`Mean`, 0 / 0 as in
    /// PyTorch), computed from the input (`sum::empty_sum`) so that a backward pass gives the
    /// input its (empty) gradient.
    fn reduce_empty(&self, op: &CrossEntropyOp, input: &Tensor, target: &Tensor) -> Result<Tensor> {
        let zero = crate::sum::empty_sum(input)?;
        match self.reduction {
            Reduction::None => zero
                .broadcast_as(target_shape(self, op, input, target))?
                .contiguous(),
            Reduction::Sum => Ok(zero),
            Reduction::Mean => zero.affine(1.0, f64::NAN),
        }
    }

    fn class_dim_for(&self, rank: usize) -> usize {
        match self.class_dim {
            Some(d) => d,
            None if rank == 1 => 0,
            None => 1,
        }
    }

    /// Checks the scalar options (smoothing, z-loss, soft-cap) for `classes` classes and
    /// returns the smoothing as PyTorch's uniform `eps`.
    pub(crate) fn checked_smoothing(&self, classes: usize) -> Result<f64> {
        let eps = self.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            let why = if eps < 0.0 {
                " (PyTorch silently ignores negative values; candle-xent rejects them)"
            } else {
                ""
            };
            bail!("cross_entropy: label_smoothing must be in [0, 1], got {eps}{why}");
        }
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            bail!(
                "cross_entropy: z_loss must be finite and >= 0, got {}",
                self.z_loss
            );
        }
        if let Some(cap) = self.softcap {
            if !(cap.is_finite() && cap > 0.0) {
                bail!("cross_entropy: softcap must be finite and > 0, got {cap}");
            }
        }
        self.smoothing.to_uniform(eps, classes)
    }

    /// Validates everything device-independent and builds the op.
    pub(crate) fn prepare(
        &self,
        input: &Tensor,
        target: &Tensor,
    ) -> Result<(CrossEntropyOp, Tensor, Tensor)> {
        let dtype = input.dtype();
        if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64) {
            bail!("cross_entropy: input must be f16, bf16, f32 or f64, got {dtype:?}");
        }
        let dims = input.dims();
        if dims.is_empty() {
            bail!(
                "cross_entropy: input must have at least one dimension (the classes), got a scalar"
            );
        }
        let cd = self.class_dim_for(dims.len());
        if cd >= dims.len() {
            bail!(
                "cross_entropy: class_dim {cd} is out of range for an input of shape {:?}",
                dims
            );
        }
        let classes = dims[cd];
        if classes == 0 {
            bail!(
                "cross_entropy: the class dimension {cd} of input {:?} is empty",
                dims
            );
        }
        let eps = self.checked_smoothing(classes)?;
        let outer: usize = dims[..cd].iter().product();
        let inner: usize = dims[cd + 1..].iter().product();
        if !input.device().same_device(target.device()) {
            bail!(
                "cross_entropy: input is on {:?} but target is on {:?}",
                input.device().location(),
                target.device().location()
            );
        }
        let soft = target.dtype().is_float();
        let mut index_shape = dims.to_vec();
        index_shape.remove(cd);
        if soft {
            if target.dims() == index_shape.as_slice() && target.dims() != dims {
                bail!(
                    "cross_entropy: class indices must be integers: the {:?} target has the \
                     class-index shape {:?} of input {:?}; cast it (e.g. to_dtype(DType::U32)), \
                     or give probabilities of the input's shape",
                    target.dtype(),
                    target.dims(),
                    dims
                );
            }
            if target.dims() != dims {
                bail!(
                    "cross_entropy: probability target must have the input's shape {:?}, got {:?}",
                    dims,
                    target.dims()
                );
            }
            if target.dtype() != dtype {
                bail!(
                    "cross_entropy: probability target must have the input's dtype {dtype:?}, got {:?}",
                    target.dtype()
                );
            }
            if self.ignore_index != -100 {
                bail!(
                    "cross_entropy: ignore_index ({}) is only supported with class-index targets, \
                     not probability targets",
                    self.ignore_index
                );
            }
        } else {
            if !matches!(
                target.dtype(),
                DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64
            ) {
                bail!(
                    "cross_entropy: target must hold class indices (u8, u32, i16, i32, i64) or \
                     probabilities (float), got {:?}",
                    target.dtype()
                );
            }
            if target.dims() != index_shape.as_slice() {
                // (B, T, V) logits with (B, T) targets: the classes are last, PyTorch's rule
                // reads them on dim 1.
                let last = dims.len() - 1;
                let hint = if self.class_dim.is_none()
                    && dims.len() >= 3
                    && target.dims() == &dims[..last]
                {
                    format!(
                        "; the classes are read on dim 1 (PyTorch's rule): for classes on the \
                         last dim (e.g. (B, T, V) logits, (B, T) targets) use class_dim({last})"
                    )
                } else {
                    String::new()
                };
                bail!(
                    "cross_entropy: class-index target for input {:?} (class dim {cd}) must have \
                     shape {:?}, got {:?}{hint}",
                    dims,
                    index_shape,
                    target.dims()
                );
            }
        }
        let acc = CrossEntropyOp::acc_dtype(dtype);
        let weight = match &self.weight {
            None => None,
            Some(w) => {
                if !w.dtype().is_float() {
                    bail!(
                        "cross_entropy: weight must be a float tensor, got {:?}",
                        w.dtype()
                    );
                }
                if w.dims() != [classes] {
                    bail!(
                        "cross_entropy: weight must have shape ({classes},) for {classes} classes, got {:?}",
                        w.dims()
                    );
                }
                if !w.device().same_device(input.device()) {
                    bail!("cross_entropy: weight and input are on different devices");
                }
                Some(w.detach().to_dtype(acc)?.contiguous()?)
            }
        };
        let op = CrossEntropyOp {
            outer,
            classes,
            inner,
            smoothing: eps,
            ignore_index: self.ignore_index,
            z_loss: self.z_loss,
            softcap: self.softcap,
            inplace_grad: self.inplace_grad,
            weight,
            soft,
            target_dims: if soft {
                Vec::new()
            } else {
                target.dims().to_vec()
            },
        };
        // The GPU kernels read class indices as u32 or i64: widen the other integer types.
        let target = if !soft
            && !input.device().is_cpu()
            && !matches!(target.dtype(), DType::U32 | DType::I64)
        {
            target.to_dtype(DType::I64)?
        } else {
            target.contiguous()?
        };
        Ok((op, input.contiguous()?, target))
    }
}

/// Shape of the unreduced loss: the input's shape without the class dimension.
fn target_shape(
    loss: &CrossEntropyLoss,
    op: &CrossEntropyOp,
    input: &Tensor,
    target: &Tensor,
) -> Vec<usize> {
    if op.soft {
        let mut d = input.dims().to_vec();
        d.remove(loss.class_dim_for(input.rank()));
        d
    } else {
        target.dims().to_vec()
    }
}

/// Mean cross-entropy with label smoothing: a drop-in for `candle_nn::loss::cross_entropy`.
///
/// Same as `CrossEntropyLoss::new().label_smoothing(label_smoothing).forward(input, target)`;
/// accepts every input layout and target type [`CrossEntropyLoss`] does.
///
/// `input` is `(N, C)` or `(N, C, d1, ...)` with the classes on dim 1, as PyTorch; for
/// `(B, T, V)` language-model logits use [`CrossEntropyLoss::class_dim`]`(2)`.
///
/// # Errors
///
/// As [`CrossEntropyLoss::forward`]: bad shapes, dtypes, devices, out-of-range class indices or
/// a smoothing outside `[0, 1]` are an `Err` naming the problem. The precision bound is the
/// same too.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let logits = Tensor::new(&[[2f32, 0.5, -1.0], [0.1, 0.2, 3.0]], &Device::Cpu)?;
/// let target = Tensor::new(&[0u32, 2], &Device::Cpu)?;
/// // Before: candle_nn::loss::cross_entropy(&logits, &target)?
/// let loss = candle_xent::cross_entropy(&logits, &target, 0.1)?;
/// let plain = candle_nn::loss::cross_entropy(&logits, &target)?;
/// assert!(loss.to_scalar::<f32>()? > plain.to_scalar::<f32>()?);
/// # Ok(()) }
/// ```
pub fn cross_entropy(input: &Tensor, target: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    CrossEntropyLoss::new()
        .label_smoothing(label_smoothing)
        .forward(input, target)
}
