//! A trainable `BatchNorm2d` with PyTorch's train/eval semantics, computed on the NCHW layout
//! directly (no transposes).

use crate::ops::batchnorm::Tail;
use candle_core::{bail, DType, ModuleT, Result, Tensor, Var};
use candle_ddp::Collective;
use candle_nn::{Init, VarBuilder};
use std::sync::Arc;

/// `nn.BatchNorm2d(C)` (affine, track_running_stats, eps 1e-5, momentum 0.1).
///
/// Train mode normalises with the batch mean and biased variance over `(N, H, W)` and updates
/// `running_mean` and `running_var` (with the unbiased variance) in place; eval mode uses the
/// running statistics. Variables: `weight`, `bias`, `running_mean`, `running_var`, the names of
/// PyTorch's state dict. Half-precision inputs are normalised in f32.
///
/// In data-parallel training each process normalises with its own batch's statistics (PyTorch
/// DDP's default); [`BatchNorm2d::set_sync`] makes it `nn.SyncBatchNorm` instead.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let bn = candle_resnet::batchnorm::BatchNorm2d::new(3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let x = Tensor::randn(2f32, 3., (4, 3, 5, 5), &Device::Cpu)?;
/// let y = bn.forward_t(&x, true)?;
/// let mean = y.mean_keepdim((0, 2, 3))?.flatten_all()?.to_vec1::<f32>()?;
/// assert!(mean.iter().all(|m| m.abs() < 1e-5));
/// // The running mean moved 10% of the way to the batch mean (about 2).
/// let rm = bn.running_mean().flatten_all()?.to_vec1::<f32>()?;
/// assert!(rm.iter().all(|m| (*m - 0.2).abs() < 0.1));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    /// The world whose batches are normalised together ([`BatchNorm2d::set_sync`]).
    sync: Option<Arc<dyn Collective>>,
}

impl BatchNorm2d {
    /// Creates (or fetches from `vb`) the four tensors of a `C`-channel batch norm.
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let bn = candle_resnet::batchnorm::BatchNorm2d::new(64, vb.pp("bn1")).unwrap();
    /// assert!(vm.data().lock().unwrap().contains_key("bn1.running_var"));
    /// ```
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps: 1e-5,
            momentum: 0.1,
            sync: None,
        })
    }

    /// Synchronised batch norm (`nn.SyncBatchNorm`): in train mode the statistics are those of
    /// the batches of every rank of `world` together (two small all-reduces of per-channel
    /// sums per forward: the mean, then the squared deviations from it), and the backward
    /// sums the input gradient's two per-channel reductions over the ranks, so the gradients
    /// are those of one process normalising the whole global batch. Every rank must run the
    /// same forwards and backwards (a collective waits for all).
    /// `None` returns to per-process statistics. Runs on the CPU (f32, f64; half precision in
    /// f32); on other devices a train-mode forward is an error.
    ///
    /// ```
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let mut bn = candle_resnet::BatchNorm2d::new(2, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// // A world of one: the same as no synchronisation.
    /// bn.set_sync(Some(std::sync::Arc::new(candle_ddp::Single)));
    /// let y = bn.forward_t(&Tensor::new(&[[[[1f32]], [[2.]]], [[[3.]], [[6.]]]], &Device::Cpu)?, true)?;
    /// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.round()).collect::<Vec<_>>(), [-1., -1., 1., 1.]);
    /// # Ok(()) }
    /// ```
    pub fn set_sync(&mut self, world: Option<Arc<dyn Collective>>) {
        self.sync = world;
    }

    /// The running mean (updated by every train-mode forward).
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// # let bn = candle_resnet::batchnorm::BatchNorm2d::new(2, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// assert_eq!(bn.running_mean().dims(), &[2]);
    /// ```
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running variance (unbiased batch variances, averaged with momentum 0.1).
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// # let bn = candle_resnet::batchnorm::BatchNorm2d::new(2, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// assert_eq!(bn.running_var().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1., 1.]);
    /// ```
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    fn channel_shape(&self) -> Result<(usize, usize, usize, usize)> {
        Ok((1, self.weight.dim(0)?, 1, 1))
    }

    /// `(gamma, beta, eps)` for a caller that runs the train-mode kernels itself
    /// ([`crate::ops::block`]); `None` when synchronised (its statistics need the other ranks).
    pub(crate) fn train_parts(&self) -> Option<(&Tensor, &Tensor, f64)> {
        match self.sync {
            Some(_) => None,
            None => Some((&self.weight, &self.bias, self.eps)),
        }
    }

    /// Folds a batch's `(2, C) = [mean; biased variance]` over `count` values per channel into
    /// the running statistics.
    pub(crate) fn record_batch(&self, stats: &Tensor, count: usize) -> Result<()> {
        self.update_running(&stats.get(0)?, &stats.get(1)?, count)
    }

    /// `running = (1 - momentum) * running + momentum * batch`, with the unbiased variance.
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let m = self.momentum;
        let unbias = count as f64 / (count - 1) as f64;
        // Detached: the running statistics are state, not part of the step's graph.
        let rm = self.running_mean.as_tensor().detach();
        let rv = self.running_var.as_tensor().detach();
        let (rm, rv) = (&rm, &rv);
        let mean = mean.detach().flatten_all()?.to_dtype(rm.dtype())?;
        let var = var.detach().flatten_all()?.to_dtype(rv.dtype())?;
        let new_rm = ((rm * (1.0 - m))? + (mean * m)?)?;
        let new_rv = ((rv * (1.0 - m))? + (var * (m * unbias))?)?;
        self.running_mean.set(&new_rm)?;
        self.running_var.set(&new_rv)
    }

    /// Train mode on `x (N, C, H, W)`, or `(N, H, W, C)` when `channels_last` (the fused CPU
    /// kernels and the synchronised path only: the composed one is channels-first), followed
    /// by `tail`.
    fn forward_train(&self, x: &Tensor, tail: Tail, channels_last: bool) -> Result<Tensor> {
        // A residual the fused op cannot take (another dtype, shape or device) joins afterwards.
        if let Tail::AddRelu(r) = tail {
            let fits = r.dtype() == x.dtype() && r.shape() == x.shape();
            if !fits || !r.device().same_device(x.device()) {
                let y = self.forward_train(x, Tail::None, channels_last)?;
                return crate::ops::relu::add_relu(&y, r);
            }
        }
        if let Some(world) = &self.sync {
            return self.forward_train_synced(x, tail, world, channels_last);
        }
        let (n, h, w) = match x.dims4()? {
            (n, h, w, _) if channels_last => (n, h, w),
            (n, _, h, w) => (n, h, w),
        };
        let count = n * h * w;
        if count < 2 {
            bail!(
                "batch_norm: training needs more than one value per channel, got input {:?}",
                x.dims()
            );
        }
        if crate::ops::fused_applies(x) {
            let (y, st) = crate::ops::batchnorm::batch_norm_train(
                x,
                &self.weight,
                &self.bias,
                self.eps,
                tail,
                channels_last,
            )?;
            self.record_batch(&st, count)?;
            return Ok(y);
        }
        if channels_last {
            bail!("batch_norm: channels-last input takes the fused CPU kernels (f32, f64)");
        }
        let y = self.forward_train_composed(x, count)?;
        apply_tail(y, tail)
    }

    /// Train mode with the statistics of every rank's batch (fused CPU kernels).
    fn forward_train_synced(
        &self,
        x: &Tensor,
        tail: Tail,
        world: &Arc<dyn Collective>,
        channels_last: bool,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let f32s = |t: &Tensor| match dtype {
            DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
            _ => Ok(t.clone()),
        };
        let xf = f32s(x)?;
        if !crate::ops::fused_applies(&xf) {
            bail!(
                "batch_norm: synchronised statistics are computed on the CPU (f32, f64, half \
                 precision in f32), got {dtype:?} on {:?}",
                x.device()
            );
        }
        let rf;
        let tail = match tail {
            Tail::AddRelu(r) => {
                rf = f32s(r)?;
                Tail::AddRelu(&rf)
            }
            t => t,
        };
        let (y, st, count) = crate::ops::batchnorm::batch_norm_train_synced(
            &xf,
            &self.weight,
            &self.bias,
            self.eps,
            tail,
            world.clone(),
            channels_last,
        )?;
        self.record_batch(&st, count)?;
        y.to_dtype(dtype)
    }

    /// Train mode from candle tensor ops (autograd through them): CUDA, Metal, half precision.
    fn forward_train_composed(&self, x: &Tensor, count: usize) -> Result<Tensor> {
        let c = x.dim(1)?;
        let dtype = x.dtype();
        let xf = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean = xf.mean_keepdim((0, 2, 3))?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
        self.update_running(&mean, &var, count)?;
        let shape = self.channel_shape()?;
        let gamma = self.weight.to_dtype(xf.dtype())?.reshape(shape)?;
        let beta = self.bias.to_dtype(xf.dtype())?.reshape(shape)?;
        let scale = (var + self.eps)?.sqrt()?.recip()?.broadcast_mul(&gamma)?;
        debug_assert_eq!(scale.dim(1)?, c);
        xc.broadcast_mul(&scale)?
            .broadcast_add(&beta)?
            .to_dtype(dtype)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let shape = self.channel_shape()?;
        let dt = x.dtype();
        let inv = (self.running_var.as_tensor() + self.eps)?.sqrt()?.recip()?;
        let scale = (inv * &self.weight)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
        x.broadcast_mul(&scale.to_dtype(dt)?.reshape(shape)?)?
            .broadcast_add(&shift.to_dtype(dt)?.reshape(shape)?)
    }
}

impl BatchNorm2d {
    /// `relu(bn(x))`, the pair that follows most convolutions of a ResNet: in train mode on CPU
    /// f32/f64 one fused pass (the same values and gradients as [`ModuleT::forward_t`] followed
    /// by [`crate::ops::relu::relu`], with one full-size pass and buffer less each way).
    ///
    /// ```
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let bn = candle_resnet::BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let x = Tensor::randn(0f32, 1., (2, 4, 3, 3), &Device::Cpu)?;
    /// let fused = bn.forward_t_relu(&x, true)?;
    /// let two = candle_resnet::ops::relu::relu(&bn.forward_t(&x, true)?)?;
    /// assert_eq!(fused.flatten_all()?.to_vec1::<f32>()?, two.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_t_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check(x)?;
        if train {
            self.forward_train(x, Tail::Relu, false)
        } else {
            crate::ops::relu::relu(&self.forward_eval(x)?)
        }
    }

    /// [`ModuleT::forward_t`] on a channels-last `(N, H, W, C)` tensor: the same statistics,
    /// running averages and gradients (to rounding), computed on `x` seen as the `(N*H*W, C,
    /// 1, 1)` matrix it is in memory, whose kernels walk rows of `C` channels.
    ///
    /// ```
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let bn = candle_resnet::BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu))?;
    /// let x = Tensor::randn(0f64, 1., (2, 4, 3, 3), &Device::Cpu)?;
    /// let nchw = bn.forward_t(&x, true)?;
    /// let nhwc = bn.forward_t_nhwc(&x.permute((0, 2, 3, 1))?, true)?.permute((0, 3, 1, 2))?;
    /// let diff = (nchw - nhwc)?.abs()?.max_all()?.to_scalar::<f64>()?;
    /// assert!(diff < 1e-12);
    /// # Ok(()) }
    /// ```
    pub fn forward_t_nhwc(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_nhwc(x, train, Tail::None)
    }

    /// [`BatchNorm2d::forward_t_relu`] on a channels-last `(N, H, W, C)` tensor (see
    /// [`BatchNorm2d::forward_t_nhwc`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let bn = candle_resnet::BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let y = bn.forward_t_relu_nhwc(&Tensor::randn(0f32, 1., (2, 3, 3, 4), &Device::Cpu)?, true)?;
    /// assert_eq!(y.dims(), &[2, 3, 3, 4]);
    /// assert!(y.min_all()?.to_scalar::<f32>()? >= 0.0);
    /// # Ok(()) }
    /// ```
    pub fn forward_t_relu_nhwc(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_nhwc(x, train, Tail::Relu)
    }

    /// `relu(bn(x) + residual)`, the end of a ResNet block: in train mode on CPU f32/f64 one
    /// fused op (the same values and gradients, bit for bit, as [`ModuleT::forward_t`] followed
    /// by [`crate::ops::relu::add_relu`], with one full-size pass and one node of the graph
    /// less); `residual` has `x`'s shape (another dtype falls back to the two ops).
    ///
    /// ```
    /// use candle_core::{DType, Device, ModuleT, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let bn = candle_resnet::BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let x = Tensor::randn(0f32, 1., (2, 4, 3, 3), &Device::Cpu)?;
    /// let r = Tensor::randn(0f32, 1., (2, 4, 3, 3), &Device::Cpu)?;
    /// let fused = bn.forward_t_add_relu(&x, &r, true)?;
    /// let two = candle_resnet::ops::relu::add_relu(&bn.forward_t(&x, true)?, &r)?;
    /// assert_eq!(fused.flatten_all()?.to_vec1::<f32>()?, two.flatten_all()?.to_vec1::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_t_add_relu(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        self.check(x)?;
        if train {
            self.forward_train(x, Tail::AddRelu(residual), false)
        } else {
            crate::ops::relu::add_relu(&self.forward_eval(x)?, residual)
        }
    }

    /// [`BatchNorm2d::forward_t_add_relu`] on channels-last `(N, H, W, C)` tensors (see
    /// [`BatchNorm2d::forward_t_nhwc`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let bn = candle_resnet::BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let x = Tensor::randn(0f32, 1., (2, 3, 3, 4), &Device::Cpu)?;
    /// let y = bn.forward_t_add_relu_nhwc(&x, &x.ones_like()?, true)?;
    /// assert_eq!(y.dims(), &[2, 3, 3, 4]);
    /// assert!(y.min_all()?.to_scalar::<f32>()? >= 0.0);
    /// # Ok(()) }
    /// ```
    pub fn forward_t_add_relu_nhwc(
        &self,
        x: &Tensor,
        residual: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_nhwc(x, train, Tail::AddRelu(residual))
    }

    /// Either channels-last forward. Train mode on the fused kernels takes the 4-D tensor as
    /// it is (a reshape would be one more node whose full-size gradient candle's backward adds
    /// into a zeroed buffer: two per batch norm, about a tenth of a 224 px ResNet-18 step);
    /// otherwise `x` is seen as the `(N*H*W, C, 1, 1)` tensor it is in memory.
    fn forward_nhwc(&self, x: &Tensor, train: bool, tail: Tail) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let &[n, h, w, xc] = x.dims() else {
            bail!(
                "batch_norm: expected (N, H, W, {c}) input, got {:?}",
                x.dims()
            );
        };
        if xc != c {
            bail!(
                "batch_norm: expected (N, H, W, {c}) input, got {:?}",
                x.dims()
            );
        }
        if train && (self.sync.is_some() || crate::ops::fused_applies(x)) {
            return self.forward_train(x, tail, true);
        }
        let rows = x.contiguous()?.reshape((n * h * w, c, 1, 1))?;
        apply_tail(self.forward_t(&rows, train)?.reshape(x.dims())?, tail)
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        if x.rank() != 4 || x.dim(1)? != self.weight.dim(0)? {
            bail!(
                "batch_norm: expected (N, {}, H, W) input, got {:?}",
                self.weight.dim(0)?,
                x.dims()
            );
        }
        Ok(())
    }
}

/// `y` followed by `tail`, from candle-resnet's separate ops.
fn apply_tail(y: Tensor, tail: Tail) -> Result<Tensor> {
    match tail {
        Tail::None => Ok(y),
        Tail::Relu => crate::ops::relu::relu(&y),
        Tail::AddRelu(r) => crate::ops::relu::add_relu(&y, r),
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check(x)?;
        if train {
            self.forward_train(x, Tail::None, false)
        } else {
            self.forward_eval(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    fn close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-11 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn composed_train_path_equals_the_fused_kernels() {
        // What CUDA and Metal run (composed ops, candle autograd) against the CPU kernels, in f64:
        // output, running statistics, and the gradients of x, gamma and beta.
        let dev = Device::Cpu;
        let x = Tensor::randn(1f64, 2., (3, 4, 5, 6), &dev).unwrap();
        let up = Tensor::randn(0f64, 1., (3, 4, 5, 6), &dev).unwrap();
        let gamma = Tensor::randn(1f64, 0.3, 4, &dev).unwrap();
        let beta = Tensor::randn(0f64, 0.3, 4, &dev).unwrap();
        let run = |composed: bool| {
            let vm = VarMap::new();
            let bn = BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, DType::F64, &dev)).unwrap();
            vm.data().lock().unwrap()["weight"].set(&gamma).unwrap();
            vm.data().lock().unwrap()["bias"].set(&beta).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let y = if composed {
                bn.forward_train_composed(xv.as_tensor(), 3 * 5 * 6)
                    .unwrap()
            } else {
                bn.forward_t(xv.as_tensor(), true).unwrap()
            };
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let data = vm.data().lock().unwrap();
            vec![
                flat(&y),
                flat(g.get(xv.as_tensor()).unwrap()),
                flat(g.get(data["weight"].as_tensor()).unwrap()),
                flat(g.get(data["bias"].as_tensor()).unwrap()),
                flat(bn.running_mean()),
                flat(bn.running_var()),
            ]
        };
        let (fused, composed) = (run(false), run(true));
        for (i, what) in ["y", "dx", "dgamma", "dbeta", "running_mean", "running_var"]
            .iter()
            .enumerate()
        {
            close(&composed[i], &fused[i], what);
        }
    }
}
