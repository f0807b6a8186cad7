//! Binary cross-entropy on logits with Keras-style label smoothing, `pos_weight`, `weight` and
//! reductions, in the stable log-sum-exp form.

use crate::Reduction;
use candle_core::{bail, DType, Result, Tensor};

/// `torch.nn.BCEWithLogitsLoss` plus label smoothing (Keras convention: targets become
/// `y * (1 - eps) + 0.5 * eps`). Per element, with `z = softplus(-x) = -log(sigmoid(x))` computed
/// as `max(-x, 0) + log(1 + exp(-|x|))` so no intermediate overflows:
/// `loss = w * [(1 - y) * x + (1 + (pos_weight - 1) * y) * z]`.
///
/// Computed in f32 (f64 for f64 logits); the result has the logits' dtype. Gradients flow
/// through `Tensor::backward` into the logits. candle-nn's `binary_cross_entropy_with_logit`
/// goes through `sigmoid` then `log` and returns `inf`/NaN for logits beyond about ±90; this
/// stays finite.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_xent::{BinaryCrossEntropyWithLogits, Reduction};
/// # fn main() -> candle_core::Result<()> {
/// let x = Tensor::new(&[[1000f32, -1000.], [0., 2.]], &Device::Cpu)?;
/// let y = Tensor::new(&[[1f32, 0.], [1., 0.]], &Device::Cpu)?;
/// let l = BinaryCrossEntropyWithLogits::new().reduction(Reduction::None).forward(&x, &y)?;
/// let v = l.flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(&v[..2], &[0.0, 0.0]);
/// assert!((v[2] - 2f32.ln()).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BinaryCrossEntropyWithLogits {
    label_smoothing: f64,
    weight: Option<Tensor>,
    pos_weight: Option<Tensor>,
    reduction: Reduction,
}

impl Default for BinaryCrossEntropyWithLogits {
    fn default() -> Self {
        Self::new()
    }
}

impl BinaryCrossEntropyWithLogits {
    /// No smoothing, no weights, mean reduction.
    ///
    /// ```
    /// let bce = candle_xent::BinaryCrossEntropyWithLogits::new();
    /// ```
    pub fn new() -> Self {
        Self {
            label_smoothing: 0.0,
            weight: None,
            pos_weight: None,
            reduction: Reduction::Mean,
        }
    }

    /// Label smoothing `eps` in `[0, 1]` (Keras: `y * (1 - eps) + 0.5 * eps`).
    ///
    /// ```
    /// let bce = candle_xent::BinaryCrossEntropyWithLogits::new().label_smoothing(0.1);
    /// ```
    pub fn label_smoothing(mut self, eps: f64) -> Self {
        self.label_smoothing = eps;
        self
    }

    /// Per-element weight, broadcast to the logits' shape.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let bce = candle_xent::BinaryCrossEntropyWithLogits::new().weight(Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap());
    /// ```
    pub fn weight(mut self, weight: Tensor) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Weight of the positive term, broadcast along the logits' trailing dimension (one value
    /// per class in multi-label problems), as PyTorch's `pos_weight`.
    ///
    /// ```
    /// # use candle_core::{Device, Tensor};
    /// let bce = candle_xent::BinaryCrossEntropyWithLogits::new().pos_weight(Tensor::new(&[3f32], &Device::Cpu).unwrap());
    /// ```
    pub fn pos_weight(mut self, pos_weight: Tensor) -> Self {
        self.pos_weight = Some(pos_weight);
        self
    }

    /// The reduction (default mean over all elements).
    ///
    /// ```
    /// let bce = candle_xent::BinaryCrossEntropyWithLogits::new().reduction(candle_xent::Reduction::Sum);
    /// ```
    pub fn reduction(mut self, r: Reduction) -> Self {
        self.reduction = r;
        self
    }

    /// The loss of `logits` against `targets` (same shape, float; values in `[0, 1]`).
    /// Gradients flow into `logits`; targets, `weight` and `pos_weight` are constants.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use candle_xent::{BinaryCrossEntropyWithLogits, Reduction};
    /// # fn main() -> candle_core::Result<()> {
    /// // A zero-initialised head: sigmoid(0) - y is the gradient.
    /// let x = Var::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
    /// let y = Tensor::new(&[0f32, 1.], &Device::Cpu)?;
    /// let l = BinaryCrossEntropyWithLogits::new().reduction(Reduction::Sum).forward(&x, &y)?;
    /// let g = l.backward()?.get(&x).unwrap().to_vec1::<f32>()?;
    /// assert_eq!(g, [0.5, -0.5]);
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let eps = self.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            bail!("binary_cross_entropy: label_smoothing must be in [0, 1], got {eps}");
        }
        let dtype = logits.dtype();
        if !dtype.is_float() || !targets.dtype().is_float() {
            bail!(
                "binary_cross_entropy: logits and targets must be float, got {dtype:?} and {:?}",
                targets.dtype()
            );
        }
        if logits.dims() != targets.dims() {
            bail!(
                "binary_cross_entropy: targets have shape {:?}, logits {:?}",
                targets.dims(),
                logits.dims()
            );
        }
        if !logits.device().same_device(targets.device()) {
            bail!("binary_cross_entropy: logits and targets are on different devices");
        }
        let acc = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let weight = self.broadcast_arg("weight", self.weight.as_ref(), logits, acc)?;
        let pos_weight = self.broadcast_arg("pos_weight", self.pos_weight.as_ref(), logits, acc)?;
        if logits.elem_count() == 0 {
            // Linked to the logits so that backward finds their empty gradient.
            let zero = crate::sum::empty_sum(logits)?.to_dtype(acc)?;
            let out = match self.reduction {
                Reduction::None => zero.broadcast_as(logits.shape())?.contiguous()?,
                Reduction::Sum => zero,
                Reduction::Mean => zero.affine(1.0, f64::NAN)?,
            };
            return out.to_dtype(dtype);
        }
        let x = logits.to_dtype(acc)?;
        let xd = x.detach();
        // The smoothed target y' = y (1 - eps) + eps / 2 and its complement
        // 1 - y' = (1 - y)(1 - eps) + eps / 2, each formed from non-negative terms (1 - y'
        // computed from a rounded y' would lose its digits as y' nears 1).
        let y_raw = targets.detach().to_dtype(acc)?;
        let (y, y_c) = if eps != 0.0 {
            (
                y_raw.affine(1.0 - eps, 0.5 * eps)?,
                y_raw.affine(-1.0, 1.0)?.affine(1.0 - eps, 0.5 * eps)?,
            )
        } else {
            (y_raw.clone(), y_raw.affine(-1.0, 1.0)?)
        };
        // With c = 1 + (pos_weight - 1) y and L = log(1 + exp(-|x|)), the loss
        // (1 - y) x + c softplus(-x) is (1 - y) relu(x) + pos_weight y relu(-x) + c L: a sum of
        // non-negative terms (no cancellation at large |x|). Its derivative is
        // (1 - y) sigmoid(x) - pos_weight y sigmoid(-x), two terms of opposite signs that are each
        // exact to a few ulps: sigmoid(+-x) = exp(-softplus(-+x)) = exp(-(relu(-+x) + L)).
        let l = ((xd.abs()?.neg()?.exp()? + 1.0)?).log()?;
        let relu_neg = xd.neg()?.relu()?;
        let pwy = match &pos_weight {
            Some(pw) => (pw * &y)?,
            None => y.clone(),
        };
        let coef = match &pos_weight {
            Some(pw) => (((pw - 1.0)? * &y)? + 1.0)?,
            None => Tensor::ones_like(&y)?,
        };
        let mut loss = ((&y_c * xd.relu()?)? + (&pwy * &relu_neg)?)?;
        loss = (loss + (&coef * &l)?)?;
        let sig_pos = (&relu_neg + &l)?.neg()?.exp()?;
        let sig_neg = (xd.relu()? + &l)?.neg()?.exp()?;
        let mut grad = ((&y_c * sig_pos)? - (&pwy * sig_neg)?)?;
        if let Some(w) = &weight {
            loss = (loss * w)?;
            grad = (grad * w)?;
        }
        // The value is `loss`; the gradient is `grad`: `x - x.detach()` is exactly 0 for finite
        // logits and carries d/dx = 1 (candle's autograd would take a one-sided derivative of
        // relu and abs at exactly 0, e.g. -1.5 instead of -0.5 for x = 0, y = 1).
        let loss = (loss + ((&x - &xd)? * grad)?)?;
        let out = match self.reduction {
            Reduction::None => loss,
            Reduction::Sum => crate::sum::sum_all(&loss)?,
            Reduction::Mean => (crate::sum::sum_all(&loss)? / loss.elem_count() as f64)?,
        };
        out.to_dtype(dtype)
    }

    /// `arg` (weight or pos_weight) checked and broadcast to the logits' shape, in `acc`.
    fn broadcast_arg(
        &self,
        name: &str,
        arg: Option<&Tensor>,
        logits: &Tensor,
        acc: DType,
    ) -> Result<Option<Tensor>> {
        let Some(a) = arg else { return Ok(None) };
        if !a.dtype().is_float() {
            bail!(
                "binary_cross_entropy: {name} must be a float tensor, got {:?}",
                a.dtype()
            );
        }
        if !a.device().same_device(logits.device()) {
            bail!("binary_cross_entropy: {name} and logits are on different devices");
        }
        match a.detach().broadcast_as(logits.shape()) {
            Ok(b) => Ok(Some(b.to_dtype(acc)?)),
            Err(_) => bail!(
                "binary_cross_entropy: {name} of shape {:?} does not broadcast to the logits' \
                 shape {:?}",
                a.dims(),
                logits.dims()
            ),
        }
    }
}
