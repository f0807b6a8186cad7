//! Trainable ResNet-18/34/50 with torchvision's architecture and variable names.
//!
//! Unlike `candle_transformers::models::resnet` (inference only), batch norms train
//! ([`crate::batchnorm::BatchNorm2d`]) and every layer has a backward pass, the 3x3/stride-2 stem
//! max-pool included ([`crate::ops::maxpool::MaxPool2d`]). Variable names are torchvision's
//! (`conv1`, `bn1.*`, `layer{1-4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
//! `layer{2-4}.0.downsample.{0,1}`, `fc`), so a torchvision or timm state dict fills every
//! variable.

use crate::batchnorm::BatchNorm2d;
use crate::ops::conv::Backend;
use crate::ops::maxpool::MaxPool2d;
use candle_core::{bail, Module, ModuleT, Result, Tensor};
use candle_ddp::Collective;
use candle_nn::{Init, Linear, VarBuilder};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The supported architectures.
///
/// ```
/// use candle_resnet::resnet::Arch;
/// assert_eq!("resnet18".parse::<Arch>().unwrap(), Arch::ResNet18);
/// assert_eq!(Arch::ResNet50.feature_dim(), 2048);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// BasicBlock x [2, 2, 2, 2], 512 features.
    ResNet18,
    /// BasicBlock x [3, 4, 6, 3], 512 features.
    ResNet34,
    /// Bottleneck x [3, 4, 6, 3], 2048 features.
    ResNet50,
}

impl Arch {
    fn blocks(self) -> [usize; 4] {
        match self {
            Arch::ResNet18 => [2, 2, 2, 2],
            Arch::ResNet34 | Arch::ResNet50 => [3, 4, 6, 3],
        }
    }

    fn bottleneck(self) -> bool {
        self == Arch::ResNet50
    }

    /// Width of the pooled features that feed `fc`.
    ///
    /// ```
    /// assert_eq!(candle_resnet::resnet::Arch::ResNet18.feature_dim(), 512);
    /// ```
    pub fn feature_dim(self) -> usize {
        if self.bottleneck() {
            2048
        } else {
            512
        }
    }

    /// The name torchvision and timm use (`resnet18`, ...).
    ///
    /// ```
    /// assert_eq!(candle_resnet::resnet::Arch::ResNet34.name(), "resnet34");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
        }
    }

    /// Builds the model, creating or fetching its variables through `vb`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let model = candle_resnet::resnet::Arch::ResNet18.build(10, vb).unwrap();
    /// assert_eq!(model.num_classes(), 10);
    /// ```
    pub fn build(self, num_classes: usize, vb: VarBuilder) -> Result<ResNet> {
        ResNet::new(self, num_classes, vb)
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "resnet18" => Ok(Arch::ResNet18),
            "resnet34" => Ok(Arch::ResNet34),
            "resnet50" => Ok(Arch::ResNet50),
            other => Err(format!(
                "unknown architecture {other:?} (resnet18, resnet34, resnet50)"
            )),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A bias-free convolution (variable `weight`), initialised like torchvision
/// (`kaiming_normal_`, fan-out, ReLU gain), computed by [`crate::ops::conv::conv2d_with`] on
/// `backend` ([`ResNet::with_conv_backend`]).
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
    backend: Backend,
}

impl Conv2d {
    /// The convolution in the input's dtype: an `f32` weight meets a `bf16` input as its
    /// `bf16` copy (a differentiable cast, so the gradient reaches the `f32` weight in `f32`),
    /// which is how mixed precision keeps master weights. `nhwc`: `x` and the result are
    /// channels-last ([`crate::ops::conv::conv2d_nhwc`]).
    fn forward_as(&self, x: &Tensor, nhwc: bool) -> Result<Tensor> {
        let (s, p, b) = (self.stride, self.padding, self.backend);
        let cast;
        let w = if x.dtype() == self.weight.dtype() {
            &self.weight
        } else {
            cast = self.weight.to_dtype(x.dtype())?;
            &cast
        };
        if nhwc {
            crate::ops::conv::conv2d_nhwc_with(x, w, s, p, b)
        } else {
            crate::ops::conv::conv2d_with(x, w, s, p, b)
        }
    }
}

/// A convolution and its batch norm as a stage of [`crate::ops::block`]'s fused train-mode
/// segments, where they can be one: CPU f32/f64 input (checked by the caller), the weight in
/// `x`'s dtype, the batch norm not synchronised.
fn fused_stage<'a>(
    c: &'a Conv2d,
    bn: &'a BatchNorm2d,
    x: &Tensor,
) -> Option<crate::ops::block::Stage<'a>> {
    let (gamma, beta, eps) = bn.train_parts()?;
    (c.weight.dtype() == x.dtype()).then_some(crate::ops::block::Stage {
        weight: &c.weight,
        stride: c.stride,
        padding: c.padding,
        backend: c.backend,
        gamma,
        beta,
        eps,
    })
}

/// A batch norm in either layout, with or without the ReLU after it.
fn bn_as(bn: &BatchNorm2d, x: &Tensor, train: bool, relu: bool, nhwc: bool) -> Result<Tensor> {
    match (nhwc, relu) {
        (true, true) => bn.forward_t_relu_nhwc(x, train),
        (true, false) => bn.forward_t_nhwc(x, train),
        (false, true) => bn.forward_t_relu(x, train),
        (false, false) => bn.forward_t(x, train),
    }
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let std = (2.0 / (cout * k * k) as f64).sqrt();
    let init = Init::Randn {
        mean: 0.,
        stdev: std,
    };
    let weight = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
    Ok(Conv2d {
        weight,
        stride,
        padding,
        backend: Backend::Auto,
    })
}

/// `nn.Linear` with PyTorch's default initialisation: `U(-1/sqrt(in), 1/sqrt(in))` for both the
/// weight and the bias.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let fc = candle_resnet::resnet::torch_linear(512, 196, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// let w = vm.data().lock().unwrap()["weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
/// assert!(w.iter().all(|v| v.abs() <= 1.0 / 512f32.sqrt()));
/// ```
pub fn torch_linear(input: usize, output: usize, vb: VarBuilder) -> Result<Linear> {
    let b = 1.0 / (input as f64).sqrt();
    let init = Init::Uniform { lo: -b, up: b };
    let w = vb.get_with_hints((output, input), "weight", init)?;
    let bias = vb.get_with_hints(output, "bias", init)?;
    Ok(Linear::new(w, Some(bias)))
}

#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        cin: usize,
        width: usize,
        stride: usize,
        bottleneck: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (convs, cout) = if bottleneck {
            let out = width * 4;
            (
                vec![
                    (
                        conv(cin, width, 1, 1, 0, vb.pp("conv1"))?,
                        BatchNorm2d::new(width, vb.pp("bn1"))?,
                    ),
                    // torchvision (V1.5) strides the 3x3 convolution.
                    (
                        conv(width, width, 3, stride, 1, vb.pp("conv2"))?,
                        BatchNorm2d::new(width, vb.pp("bn2"))?,
                    ),
                    (
                        conv(width, out, 1, 1, 0, vb.pp("conv3"))?,
                        BatchNorm2d::new(out, vb.pp("bn3"))?,
                    ),
                ],
                out,
            )
        } else {
            (
                vec![
                    (
                        conv(cin, width, 3, stride, 1, vb.pp("conv1"))?,
                        BatchNorm2d::new(width, vb.pp("bn1"))?,
                    ),
                    (
                        conv(width, width, 3, 1, 1, vb.pp("conv2"))?,
                        BatchNorm2d::new(width, vb.pp("bn2"))?,
                    ),
                ],
                width,
            )
        };
        let downsample = if stride != 1 || cin != cout {
            Some(Downsample {
                conv: conv(cin, cout, 1, stride, 0, vb.pp("downsample.0"))?,
                bn: BatchNorm2d::new(cout, vb.pp("downsample.1"))?,
            })
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    /// `drop`: the drop-path rate of this block and the key of this forward's draws; `nhwc`:
    /// `x` and the result are channels-last.
    fn forward_t(
        &self,
        x: &Tensor,
        train: bool,
        drop: Option<(f64, u64)>,
        nhwc: bool,
    ) -> Result<Tensor> {
        let drop = match (train, drop) {
            (true, Some((rate, key))) if rate > 0.0 => Some((rate, key)),
            _ => None,
        };
        if train && drop.is_none() && nhwc {
            if let Some(y) = self.forward_train_fused(x)? {
                return Ok(y);
            }
        }
        let mut y = x.clone();
        let Some((last, head)) = self.convs.split_last() else {
            bail!("resnet: a block without convolutions");
        };
        for (c, bn) in head {
            y = bn_as(bn, &c.forward_as(&y, nhwc)?, train, true, nhwc)?;
        }
        let y = last.0.forward_as(&y, nhwc)?;
        let shortcut = match &self.downsample {
            Some(d) => bn_as(&d.bn, &d.conv.forward_as(x, nhwc)?, train, false, nhwc)?,
            None => x.clone(),
        };
        let Some((rate, key)) = drop else {
            // The last batch norm, the residual and the ReLU in one op.
            return match nhwc {
                true => last.1.forward_t_add_relu_nhwc(&y, &shortcut, train),
                false => last.1.forward_t_add_relu(&y, &shortcut, train),
            };
        };
        // Drop path scales the branch between its batch norm and the residual.
        let y = bn_as(&last.1, &y, train, false, nhwc)?;
        let mask = drop_path_mask(y.dim(0)?, rate, key);
        let mask = Tensor::from_vec(mask, (y.dim(0)?, 1, 1, 1), y.device())?.to_dtype(y.dtype())?;
        crate::ops::relu::add_relu(&y.broadcast_mul(&mask)?, &shortcut)
    }

    /// The train-mode block as one graph node ([`crate::ops::block`]: the same values and
    /// gradients, a faster backward) where its kernels apply: channels-last `x` on the CPU in
    /// f32 or f64, the weights in `x`'s dtype, no synchronised batch norm. `None` elsewhere.
    fn forward_train_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        use crate::ops::block::residual_block_train;
        if !crate::ops::fused_applies(x) {
            return Ok(None);
        }
        let main: Option<Vec<_>> = self
            .convs
            .iter()
            .map(|(c, bn)| fused_stage(c, bn, x))
            .collect();
        let shortcut = match &self.downsample {
            Some(d) => match fused_stage(&d.conv, &d.bn, x) {
                Some(s) => Some(s),
                None => return Ok(None),
            },
            None => None,
        };
        let Some(main) = main else {
            return Ok(None);
        };
        let (y, stats) = residual_block_train(x, &main, shortcut.as_ref())?;
        let bns = self.convs.iter().map(|(_, bn)| bn);
        for ((st, count), bn) in stats
            .iter()
            .zip(bns.chain(self.downsample.iter().map(|d| &d.bn)))
        {
            bn.record_batch(st, *count)?;
        }
        Ok(Some(y))
    }
}

/// The per-sample multipliers of drop path (stochastic depth) at `rate` for `batch` samples,
/// drawn from `key`: 0 with probability `rate`, else `1 / (1 - rate)` (timm's `drop_path`,
/// `scale_by_keep`); all 0 at rate 1.
///
/// ```
/// let m = candle_resnet::resnet::drop_path_mask(1000, 0.25, 7);
/// let dropped = m.iter().filter(|&&v| v == 0.0).count();
/// assert!((200..300).contains(&dropped));
/// assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
/// assert_eq!(m, candle_resnet::resnet::drop_path_mask(1000, 0.25, 7));
/// ```
pub fn drop_path_mask(batch: usize, rate: f64, key: u64) -> Vec<f32> {
    let keep = 1.0 - rate;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
    (0..batch)
        .map(|_| {
            if keep > 0.0 && rng.random_bool(keep.clamp(0.0, 1.0)) {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// timm's drop-path rate of each residual block for a network rate `rate`: linear in the block's
/// index, 0 for the first block and `rate` for the last (`rate * i / (blocks - 1)`).
///
/// ```
/// use candle_resnet::resnet::{drop_path_rates, Arch};
/// let r = drop_path_rates(Arch::ResNet18, 0.1);
/// assert_eq!((r.len(), r[0], r[7]), (8, 0.0, 0.1));
/// ```
pub fn drop_path_rates(arch: Arch, rate: f64) -> Vec<f64> {
    let n: usize = arch.blocks().iter().sum();
    (0..n)
        .map(|i| rate * i as f64 / (n.max(2) - 1) as f64)
        .collect()
}

/// A torchvision ResNet: `(N, 3, H, W)` images to `(N, num_classes)` logits.
///
/// ```
/// use candle_core::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let vm = VarMap::new();
/// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
/// let model = candle_resnet::resnet::resnet18(196, vb)?;
/// let images = Tensor::randn(0f32, 1., (2, 3, 64, 64), &Device::Cpu)?;
/// let logits = model.forward_t(&images, true)?;
/// assert_eq!(logits.dims(), &[2, 196]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ResNet {
    arch: Arch,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    pool: MaxPool2d,
    layers: Vec<Vec<Block>>,
    fc: Linear,
    num_classes: usize,
    /// Drop-path rate of each block, in order ([`drop_path_rates`]); empty: none.
    drop_path: Vec<f64>,
    /// Key of the next training forward's drop-path draws ([`ResNet::set_noise_key`]).
    noise_key: std::sync::Arc<AtomicU64>,
    /// Whether the batch norms are synchronised ([`ResNet::with_sync_batch_norm`]).
    sync_bn: bool,
    /// Whether activations may be kept channels-last ([`ResNet::with_channels_last`]).
    channels_last: bool,
}

impl ResNet {
    /// Builds `arch` with a `num_classes` head (variables under `vb`, torchvision names).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// candle_resnet::resnet::ResNet::new(candle_resnet::resnet::Arch::ResNet18, 3, vb).unwrap();
    /// assert_eq!(vm.all_vars().len(), 62 + 40); // 62 trainable tensors, 40 running stats
    /// ```
    pub fn new(arch: Arch, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        if num_classes == 0 {
            bail!("resnet: num_classes must be positive");
        }
        let conv1 = conv(3, 64, 7, 2, 3, vb.pp("conv1"))?;
        let bn1 = BatchNorm2d::new(64, vb.pp("bn1"))?;
        let mut cin = 64;
        let mut layers = Vec::new();
        for (li, &n) in arch.blocks().iter().enumerate() {
            let width = 64 << li;
            let stride = if li == 0 { 1 } else { 2 };
            let vbl = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::new();
            for bi in 0..n {
                let b = Block::new(
                    cin,
                    width,
                    if bi == 0 { stride } else { 1 },
                    arch.bottleneck(),
                    vbl.pp(bi.to_string()),
                )?;
                cin = if arch.bottleneck() { width * 4 } else { width };
                blocks.push(b);
            }
            layers.push(blocks);
        }
        let fc = torch_linear(arch.feature_dim(), num_classes, vb.pp("fc"))?;
        Ok(Self {
            arch,
            conv1,
            bn1,
            pool: MaxPool2d::new(3, 2, 1),
            layers,
            fc,
            num_classes,
            drop_path: Vec::new(),
            noise_key: Default::default(),
            sync_bn: false,
            channels_last: true,
        })
    }

    /// This model with drop path (stochastic depth, timm's `drop_path_rate`): in training, each
    /// residual block's branch is dropped per sample at the block's rate of
    /// [`drop_path_rates`] (the survivors scaled by `1 / keep`); evaluation is unchanged. The
    /// draws of a training forward come from the key set by [`ResNet::set_noise_key`].
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let m = candle_resnet::resnet::resnet18(3, vb).unwrap().with_drop_path(0.1).unwrap();
    /// assert_eq!(m.drop_path_rate(), 0.1);
    /// assert!(candle_resnet::resnet::resnet18(3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap().with_drop_path(1.5).is_err());
    /// ```
    pub fn with_drop_path(mut self, rate: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            bail!("resnet: the drop-path rate must lie in [0, 1), got {rate}");
        }
        self.drop_path = if rate > 0.0 {
            drop_path_rates(self.arch, rate)
        } else {
            Vec::new()
        };
        Ok(self)
    }

    /// This model with synchronised batch norm over `world` (`nn.SyncBatchNorm.
    /// convert_sync_batchnorm`): every batch norm computes its training statistics over the
    /// batches of all ranks together ([`BatchNorm2d::set_sync`]); `None`: each rank's own
    /// (DDP's default).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let world: std::sync::Arc<dyn candle_ddp::Collective> = std::sync::Arc::new(candle_ddp::Single);
    /// let m = candle_resnet::resnet::resnet18(3, vb).unwrap().with_sync_batch_norm(Some(world));
    /// assert!(m.has_sync_batch_norm());
    /// ```
    pub fn with_sync_batch_norm(mut self, world: Option<Arc<dyn Collective>>) -> Self {
        self.bn1.set_sync(world.clone());
        for block in self.layers.iter_mut().flatten() {
            for (_, bn) in block.convs.iter_mut() {
                bn.set_sync(world.clone());
            }
            if let Some(d) = &mut block.downsample {
                d.bn.set_sync(world.clone());
            }
        }
        self.sync_bn = world.is_some();
        self
    }

    /// Whether the network keeps its activations channels-last, `(N, H, W, C)`, between the
    /// stem and the pooling (default `true`): for f32 and f64 on the CPU, on every convolution
    /// backend (oneDNN's included), every op of the body runs on rows of channels
    /// ([`crate::ops::conv::conv2d_nhwc_with`], [`BatchNorm2d::forward_t_nhwc`],
    /// [`MaxPool2d::forward_nhwc`]), which trains faster than `(N, C, H, W)` on small maps.
    /// Inputs and outputs keep their layout either way; `false` gives the `(N, C, H, W)` body
    /// (for comparisons). Values agree with it to rounding (the sums run in another order).
    ///
    /// ```
    /// # use candle_core::{DType, Device, ModuleT, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # fn main() -> candle_core::Result<()> {
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    /// let m = candle_resnet::resnet::resnet18(3, vb)?;
    /// let x = Tensor::randn(0f64, 1., (2, 3, 32, 32), &Device::Cpu)?;
    /// let a = m.forward_t(&x, true)?;
    /// let b = m.clone().with_channels_last(false).forward_t(&x, true)?;
    /// assert!((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-9);
    /// # Ok(()) }
    /// ```
    pub fn with_channels_last(mut self, on: bool) -> Self {
        self.channels_last = on;
        self
    }

    /// Whether a forward of `x` keeps the body channels-last (see
    /// [`ResNet::with_channels_last`]).
    pub fn runs_channels_last(&self, x: &Tensor) -> bool {
        self.channels_last
            && x.device().is_cpu()
            && self.conv1.backend.runs_channels_last(x.dtype())
    }

    /// Runs every convolution on `backend` (default [`Backend::Auto`]): e.g.
    /// [`Backend::OneDnnBf16`] for bf16 arithmetic inside the convolutions of an f32 network
    /// on CPUs with AMX or AVX512-BF16 (the `onednn` feature).
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// use candle_resnet::ops::conv::Backend;
    /// let vm = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    /// let m = candle_resnet::resnet::resnet18(3, vb).unwrap().with_conv_backend(Backend::Gemm);
    /// assert_eq!(m.conv_backend(), Backend::Gemm);
    /// ```
    pub fn with_conv_backend(mut self, backend: Backend) -> Self {
        self.conv1.backend = backend;
        for block in self.layers.iter_mut().flatten() {
            for (conv, _) in block.convs.iter_mut() {
                conv.backend = backend;
            }
            if let Some(d) = &mut block.downsample {
                d.conv.backend = backend;
            }
        }
        self
    }

    /// The convolutions' backend ([`ResNet::with_conv_backend`]).
    pub fn conv_backend(&self) -> Backend {
        self.conv1.backend
    }

    /// Whether the batch norms are synchronised ([`ResNet::with_sync_batch_norm`]).
    pub fn has_sync_batch_norm(&self) -> bool {
        self.sync_bn
    }

    /// The network's drop-path rate (that of its last block; 0: off).
    pub fn drop_path_rate(&self) -> f64 {
        self.drop_path.last().copied().unwrap_or(0.0)
    }

    /// Sets the key the next training forwards draw their drop-path masks from: a trainer sets
    /// it before each step (from its seed, epoch and batch) so that runs and resumed runs draw
    /// the same masks. Without drop path it has no effect.
    pub fn set_noise_key(&self, key: u64) {
        self.noise_key.store(key, Ordering::Relaxed);
    }

    /// The architecture.
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// let m = candle_resnet::resnet::resnet18(5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// assert_eq!(m.arch(), candle_resnet::resnet::Arch::ResNet18);
    /// ```
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Width of the head.
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// let m = candle_resnet::resnet::resnet18(5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// assert_eq!(m.num_classes(), 5);
    /// ```
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Pooled backbone features `(N, feature_dim)`, before `fc`. Half-precision input
    /// (`bf16`, `f16`) runs the convolutions and batch norms in that precision against the
    /// model's `f32` weights (mixed precision: batch-norm statistics in `f32`); the pooling and
    /// the features are `f32`.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// let m = candle_resnet::resnet::resnet18(5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// let f = m.features_t(&Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap(), false).unwrap();
    /// assert_eq!(f.dims(), &[1, 512]);
    /// ```
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.features(x, train, true)
    }

    /// Eval-mode logits without an autograd graph: the same values as
    /// `forward_t(x, false)`, but each stage's output is detached, so the activations of a
    /// stage are freed as soon as the next stage has read them (with the graph, every
    /// intermediate tensor of the network lives until the logits are dropped, because the
    /// weights are `Var`s). Peak memory of evaluation and prediction is then one stage's, not
    /// the network's. No gradient flows through the result.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use candle_nn::{ModuleT, VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// let m = candle_resnet::resnet::resnet18(5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// let x = Tensor::ones((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    /// let a = m.infer(&x).unwrap();
    /// let b = m.forward_t(&x, false).unwrap();
    /// assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    /// ```
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.features(x, false, false)?;
        Ok(self.fc.forward(&f)?.detach())
    }

    /// [`Self::features_t`]; `graph: false` detaches the stem's and every block's output
    /// (see [`Self::infer`]).
    fn features(&self, x: &Tensor, train: bool, graph: bool) -> Result<Tensor> {
        let cut = |t: Tensor| if graph { t } else { t.detach() };
        if x.rank() != 4 || x.dim(1)? != 3 {
            bail!("resnet: expected (N, 3, H, W) images, got {:?}", x.dims());
        }
        let nhwc = self.runs_channels_last(x);
        let y = if nhwc {
            let x = x.permute((0, 2, 3, 1))?.contiguous()?;
            let fused = match train && crate::ops::fused_applies(&x) {
                true => fused_stage(&self.conv1, &self.bn1, &x),
                false => None,
            };
            if let Some(stage) = fused {
                // Convolution, batch norm, ReLU and pool as one graph node (same values).
                let (y, (stats, count)) = crate::ops::block::stem_train(&x, &stage, &self.pool)?;
                self.bn1.record_batch(&stats, count)?;
                y
            } else {
                let y = bn_as(
                    &self.bn1,
                    &self.conv1.forward_as(&x, true)?,
                    train,
                    true,
                    true,
                )?;
                self.pool.forward_nhwc(&y)?
            }
        } else {
            let y = self
                .bn1
                .forward_t_relu(&self.conv1.forward_as(x, false)?, train)?;
            self.pool.forward(&y)?
        };
        let mut y = cut(y);
        let key = self.noise_key.load(Ordering::Relaxed);
        for (i, b) in self.layers.iter().flatten().enumerate() {
            // One stream per block: splitmix-style mixing of the step's key and the block.
            let drop = self.drop_path.get(i).map(|&rate| {
                let k =
                    (key ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(i as u64);
                (rate, k)
            });
            y = cut(b.forward_t(&y, train, drop, nhwc)?);
        }
        if y.dtype() != self.fc.weight().dtype() {
            y = y.to_dtype(self.fc.weight().dtype())?;
        }
        if nhwc {
            y.mean((1, 2))
        } else {
            y.mean((2, 3))
        }
    }

    /// The classification head.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Module, Tensor};
    /// # use candle_nn::{VarBuilder, VarMap};
    /// # let vm = VarMap::new();
    /// let m = candle_resnet::resnet::resnet18(5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    /// let z = m.head().forward(&Tensor::zeros((1, 512), DType::F32, &Device::Cpu).unwrap()).unwrap();
    /// assert_eq!(z.dims(), &[1, 5]);
    /// ```
    pub fn head(&self) -> &Linear {
        &self.fc
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.fc.forward(&self.features_t(x, train)?)
    }
}

/// ResNet-18 with a `num_classes` head.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let model = candle_resnet::resnet::resnet18(196, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// ```
pub fn resnet18(num_classes: usize, vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(Arch::ResNet18, num_classes, vb)
}

/// ResNet-34 with a `num_classes` head.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let model = candle_resnet::resnet::resnet34(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// ```
pub fn resnet34(num_classes: usize, vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(Arch::ResNet34, num_classes, vb)
}

/// ResNet-50 with a `num_classes` head.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// let model = candle_resnet::resnet::resnet50(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// ```
pub fn resnet50(num_classes: usize, vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(Arch::ResNet50, num_classes, vb)
}
