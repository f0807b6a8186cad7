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
        let acc = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = logits.to_dtype(acc)?;
        let mut y = targets.to_dtype(acc)?;
        if eps != 0.0 {
            y = y.affine(1.0 - eps, 0.5 * eps)?;
        }
        // softplus(-x) = max(-x, 0) + log(1 + exp(-|x|))
        let sp = (x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let coef = match &self.pos_weight {
            None => None,
            Some(pw) => {
                let pw = pw.to_dtype(acc)?;
                Some(((pw - 1.0)?.broadcast_mul(&y)? + 1.0)?)
            }
        };
        let pos = match coef {
            Some(c) => c.broadcast_mul(&sp)?,
            None => sp,
        };
        let mut loss = ((y.affine(-1.0, 1.0)? * &x)? + pos)?;
        if let Some(w) = &self.weight {
            loss = loss.broadcast_mul(&w.to_dtype(acc)?)?;
        }
        let out = match self.reduction {
            Reduction::None => loss,
            Reduction::Sum => loss.sum_all()?,
            Reduction::Mean => loss.mean_all()?,
        };
        out.to_dtype(dtype)
    }
}
