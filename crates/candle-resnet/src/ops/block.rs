//! A ResNet's train-mode segments as single nodes of candle's graph (CPU, f32/f64,
//! channels-last): the stem, `max_pool(relu(bn(conv(x))))`, and each residual block,
//! `relu(bn_k(conv_k(... relu(bn_1(conv_1(x))))) + shortcut(x))`, the shortcut being `x` or
//! `bn(conv(x))`.
//!
//! Built from this crate's ops, a ResNet-18 block is five graph nodes that each hand candle's
//! backward a full-size gradient, and candle adds every one of them into a zero-filled tensor of
//! its own (`zeros_like` + `add`, single-threaded): four passes over memory per gradient that do
//! no arithmetic of the model, measured at ~9.5 % of a 224 px step; the stem's two are the
//! largest tensors of the network. Here the forward runs the same kernels on detached tensors
//! and keeps what their backward needs; one op ([`BlockEnd`]: the last batch norm, the residual
//! and the ReLU; [`StemEnd`]: the pool) is the segment's only full-size node, and its backward
//! runs the whole segment's backward, handing candle one gradient: the input's (none for the
//! stem's images).
//!
//! The parameters reach candle's graph through one small [`Params`] op per convolution: a
//! one-element function of the weight and of its batch norm's `[gamma; beta]`, an input of the
//! segment's node. Candle visits it after the segment (it is the segment's input), and its
//! backward returns the weight's and the affine's gradients that the segment's backward left
//! it (the weight's goes straight to the gradient store inside [`crate::backward()`]).
//!
//! The kernels and the order of every sum are those of the composed ops, so the output, the
//! running statistics and every gradient are the same bits (tested against the composed ops).

use super::batchnorm::Detached;
use super::conv::{nhwc_op, Backend, Conv2dOp};
use super::maxpool::{MaxPool2d, Nhwc};
use crate::backward::hand_over;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex, PoisonError};

/// One convolution and the batch norm after it, as the model holds them.
pub(crate) struct Stage<'a> {
    /// `(Co, Ci, kh, kw)`, in the input's dtype.
    pub(crate) weight: &'a Tensor,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    /// Where the convolution's f32 passes run.
    pub(crate) backend: Backend,
    pub(crate) gamma: &'a Tensor,
    pub(crate) beta: &'a Tensor,
    pub(crate) eps: f64,
}

/// A stage's parameter gradients, from the block's backward to its [`Params`] op:
/// `(dweight, [dgamma; dbeta])`.
type Slot = Arc<Mutex<Option<(Option<Tensor>, Tensor)>>>;

/// One stage as the forward left it for the backward (all detached).
struct Saved {
    input: Tensor,
    weight: Tensor,
    conv: Conv2dOp,
    /// The convolution's output, the batch norm's input.
    out: Tensor,
    bn: Detached,
    /// Values per channel of the batch statistics.
    count: usize,
    /// Where the backward leaves the parameter gradients; `None`: no parameter is in a graph.
    slot: Option<Slot>,
    /// The weight is in a graph (its gradient is wanted).
    weight_grad: bool,
}

impl Saved {
    /// The stage on `input` (detached, contiguous, channels-last); `relu`: its batch norm is
    /// followed by a ReLU. Also returns its [`Params`] token.
    fn run(input: &Tensor, s: &Stage, relu: bool) -> Result<(Self, Tensor)> {
        let weight = s.weight.detach().contiguous()?;
        let conv = nhwc_op(
            input.dims(),
            weight.dims(),
            (s.stride, s.padding),
            s.backend,
            input.dtype(),
        )?;
        let out = input.apply_op2_no_bwd(&weight, &conv)?;
        let (n, h, w, _) = out.dims4()?;
        let count = n * h * w;
        if count < 2 {
            bail!(
                "batch_norm: training needs more than one value per channel, got input {:?}",
                out.dims()
            );
        }
        let affine = Tensor::stack(&[s.gamma, s.beta], 0)?.to_dtype(out.dtype())?;
        let bn = Detached::new(&out, &affine.detach(), s.eps, relu, true)?;
        let slot = Slot::default();
        let token = s.weight.apply_op2(&affine, Params(slot.clone()))?;
        let saved = Self {
            input: input.clone(),
            weight,
            conv,
            out,
            bn,
            count,
            slot: token.track_op().then_some(slot),
            weight_grad: s.weight.track_op(),
        };
        Ok((saved, token))
    }

    /// The backward of the stage for the gradient `dy` of its output: leaves the parameter
    /// gradients in the slot and returns the input's where `input_grad`.
    fn backward(&self, dy: &Tensor, input_grad: bool) -> Result<Option<Tensor>> {
        let (dc, affine_grad) = self.bn.backward(&self.out, dy)?;
        let want = (input_grad, self.weight_grad);
        let (dx, dw) = self.conv.grads(&self.input, &self.weight, &dc, want)?;
        if let Some(slot) = &self.slot {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some((dw, affine_grad));
        }
        Ok(dx)
    }
}

/// `weight, [gamma; beta] -> [0]`: the way a stage's parameters enter candle's graph; its
/// backward returns the gradients the block's backward computed.
struct Params(Slot);

impl CustomOp2 for Params {
    fn name(&self) -> &'static str {
        "candle-resnet-block-params"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let zero = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(vec![0.0]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![0.0]),
            _ => bail!("residual block: fused kernels take f32 or f64"),
        };
        Ok((zero, Shape::from(1)))
    }
    fn bwd(
        &self,
        weight: &Tensor,
        _affine: &Tensor,
        _token: &Tensor,
        _grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let taken = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some((dw, daffine)) = taken else {
            bail!("residual block: parameter gradients asked for before the block's backward ran")
        };
        Ok((dw.and_then(|g| hand_over(weight, g)), Some(daffine)))
    }
}

/// `(x, tokens) -> relu(bn(conv_k output) + shortcut)`, with the block's whole backward.
struct BlockEnd {
    main: Vec<Saved>,
    /// The projection shortcut and its output; `None`: the shortcut is `x`.
    shortcut: Option<(Saved, Tensor)>,
}

/// `f` on the CPU storage of `t` (read-locked while it runs) and its layout.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(c, l),
        _ => bail!("residual block: fused kernels run on the CPU"),
    }
}

impl CustomOp2 for BlockEnd {
    fn name(&self) -> &'static str {
        "candle-resnet-block"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(last) = self.main.last() else {
            bail!("residual block: no convolution");
        };
        with_cpu(&last.out, |c, cl| match &self.shortcut {
            Some((_, r)) => with_cpu(r, |r, rl| last.bn.add_relu_cpu((c, cl), (r, rl))),
            None => last.bn.add_relu_cpu((c, cl), (s1, l1)),
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        tokens: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_x = x.track_op();
        // The ReLU's mask comes from the output (it saw the shortcut); the masked gradient is
        // the last batch norm's and the shortcut's.
        let dm = super::relu::relu_grad(y, dy)?;
        // Every stage but the first passes its input's gradient on (the first where `x` wants
        // one), so with `want_x` this ends as the gradient of `x` through the main path.
        let mut g = dm.clone();
        for (i, s) in self.main.iter().enumerate().rev() {
            if let Some(d) = s.backward(&g, i > 0 || want_x)? {
                g = d;
            }
        }
        let shortcut = match &self.shortcut {
            Some((s, _)) => s.backward(&dm, want_x)?,
            None => Some(dm),
        };
        let dx = match (want_x, shortcut) {
            (true, Some(r)) => Some((g + r)?),
            _ => None,
        };
        Ok((dx, Some(tokens.zeros_like()?)))
    }
}

/// The block in train mode on `x (N, H, W, C)` (CPU, f32 or f64, the weights in `x`'s dtype):
/// `main`'s stages with a ReLU after each batch norm but the last, whose output is added to the
/// shortcut (`x`, or the `shortcut` stage) before the final ReLU. Returns the output and each
/// batch norm's `(2, C) = [mean; biased variance]` with its values per channel (for the running
/// statistics), `main`'s in order, then the shortcut's. Differentiable in `x` and every
/// parameter.
pub(crate) fn residual_block_train(
    x: &Tensor,
    main: &[Stage],
    shortcut: Option<&Stage>,
) -> Result<(Tensor, Vec<(Tensor, usize)>)> {
    let x = x.contiguous()?;
    let xd = x.detach();
    let mut saved = Vec::with_capacity(main.len());
    let mut tokens = Vec::with_capacity(main.len() + 1);
    let mut h = xd.clone();
    for (i, s) in main.iter().enumerate() {
        let last = i + 1 == main.len();
        let (stage, token) = Saved::run(&h, s, !last)?;
        if !last {
            h = stage.bn.normalize(&stage.out)?;
        }
        saved.push(stage);
        tokens.push(token);
    }
    if saved.is_empty() {
        bail!("residual block: no convolution");
    }
    let shortcut = match shortcut {
        Some(s) => {
            let (stage, token) = Saved::run(&xd, s, false)?;
            let r = stage.bn.normalize(&stage.out)?;
            tokens.push(token);
            Some((stage, r))
        }
        None => None,
    };
    let stats = saved
        .iter()
        .chain(shortcut.iter().map(|(s, _)| s))
        .map(|s| (s.bn.stats().clone(), s.count))
        .collect();
    let tokens = Tensor::cat(&tokens, 0)?;
    let y = x.apply_op2(
        &tokens,
        BlockEnd {
            main: saved,
            shortcut,
        },
    )?;
    Ok((y, stats))
}

/// `(images, token) -> max_pool(relu(bn(conv(images))))`, with the stem's whole backward.
struct StemEnd {
    stage: Saved,
    /// The pool's input.
    h: Tensor,
    pool: Nhwc,
}

impl CustomOp2 for StemEnd {
    fn name(&self) -> &'static str {
        "candle-resnet-stem"
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        with_cpu(&self.h, |h, l| self.pool.cpu_fwd(h, l))
    }
    fn bwd(
        &self,
        x: &Tensor,
        token: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(dh) = self.pool.bwd(&self.h, y, dy)? else {
            bail!("stem: the pool passed no gradient");
        };
        let dx = self.stage.backward(&dh, x.track_op())?;
        Ok((dx, Some(token.zeros_like()?)))
    }
}

/// The stem in train mode on images `x (N, H, W, C)` (CPU, f32 or f64, the weight in `x`'s
/// dtype): `pool(relu(bn(conv(x))))`. Returns the output and the batch norm's
/// `(2, C) = [mean; biased variance]` with its values per channel. Differentiable in `x` and
/// every parameter.
pub(crate) fn stem_train(
    x: &Tensor,
    stage: &Stage,
    pool: &MaxPool2d,
) -> Result<(Tensor, (Tensor, usize))> {
    let x = x.contiguous()?;
    let (stage, token) = Saved::run(&x.detach(), stage, true)?;
    let h = stage.bn.normalize(&stage.out)?;
    let pool = pool.nhwc_op(&h)?;
    let stats = (stage.bn.stats().clone(), stage.count);
    let y = x.apply_op2(&token, StemEnd { stage, h, pool })?;
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use super::{residual_block_train, stem_train, Stage};
    use crate::ops::conv::conv2d_nhwc;
    use crate::ops::maxpool::MaxPool2d;
    use crate::BatchNorm2d;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    /// A convolution with its batch norm, parameters in a `VarMap` of their own.
    struct Layer {
        weight: Var,
        stride: usize,
        padding: usize,
        bn: BatchNorm2d,
        vm: VarMap,
    }

    /// Normal-ish values from `seed`, in `dtype`.
    fn values(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    }

    fn layer(co: usize, ci: usize, k: usize, stride: usize, seed: u64, dtype: DType) -> Layer {
        let vm = VarMap::new();
        let bn = BatchNorm2d::new(co, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu)).unwrap();
        {
            let data = vm.data().lock().unwrap();
            let ramp = |a: f64, b: f64| {
                values(&[co], seed ^ 0x55, DType::F64)
                    .affine(a, b)?
                    .to_dtype(dtype)
            };
            data["weight"].set(&ramp(0.3, 1.0).unwrap()).unwrap();
            data["bias"].set(&ramp(0.2, 0.1).unwrap()).unwrap();
            data["running_mean"].set(&ramp(0.1, 0.0).unwrap()).unwrap();
            data["running_var"].set(&ramp(0.2, 1.0).unwrap()).unwrap();
        }
        let std = (2.0 / (ci * k * k) as f64).sqrt();
        let w = (values(&[co, ci, k, k], seed, DType::F64) * std).unwrap();
        Layer {
            weight: Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap(),
            stride,
            padding: k / 2,
            bn,
            vm,
        }
    }

    /// A basic (two 3x3) or bottleneck (1x1, strided 3x3, 1x1 to 4x) block, with a projection
    /// shortcut where the shape changes.
    fn block(
        cin: usize,
        width: usize,
        stride: usize,
        bottleneck: bool,
        seed: u64,
        dtype: DType,
    ) -> (Vec<Layer>, Option<Layer>) {
        let (main, cout) = if bottleneck {
            let out = width * 4;
            (
                vec![
                    layer(width, cin, 1, 1, seed, dtype),
                    layer(width, width, 3, stride, seed + 1, dtype),
                    layer(out, width, 1, 1, seed + 2, dtype),
                ],
                out,
            )
        } else {
            (
                vec![
                    layer(width, cin, 3, stride, seed, dtype),
                    layer(width, width, 3, 1, seed + 1, dtype),
                ],
                width,
            )
        };
        let shortcut =
            (stride != 1 || cin != cout).then(|| layer(cout, cin, 1, stride, seed + 3, dtype));
        (main, shortcut)
    }

    /// The block from the crate's public ops, one graph node each.
    fn composed(x: &Tensor, main: &[Layer], shortcut: Option<&Layer>) -> Result<Tensor> {
        let mut h = x.clone();
        let (last, head) = main.split_last().expect("a stage");
        for l in head {
            h =
                l.bn.forward_t_relu_nhwc(&conv2d_nhwc(&h, &l.weight, l.stride, l.padding)?, true)?;
        }
        let c = conv2d_nhwc(&h, &last.weight, last.stride, last.padding)?;
        let r = match shortcut {
            Some(l) => {
                l.bn.forward_t_nhwc(&conv2d_nhwc(x, &l.weight, l.stride, 0)?, true)?
            }
            None => x.clone(),
        };
        last.bn.forward_t_add_relu_nhwc(&c, &r, true)
    }

    fn stage(l: &Layer) -> Stage<'_> {
        let data = l.vm.data().lock().unwrap();
        let (gamma, beta) = (
            data["weight"].as_tensor().clone(),
            data["bias"].as_tensor().clone(),
        );
        drop(data);
        let (g, b, eps) = l.bn.train_parts().unwrap();
        assert_eq!((g.id(), b.id()), (gamma.id(), beta.id()));
        Stage {
            weight: l.weight.as_tensor(),
            stride: l.stride,
            padding: l.padding,
            backend: crate::ops::conv::Backend::Gemm,
            gamma: g,
            beta: b,
            eps,
        }
    }

    fn fused(x: &Tensor, main: &[Layer], shortcut: Option<&Layer>) -> Result<Tensor> {
        let stages: Vec<Stage> = main.iter().map(stage).collect();
        let sc = shortcut.map(stage);
        let (y, stats) = residual_block_train(x, &stages, sc.as_ref())?;
        for ((st, count), l) in stats.iter().zip(main.iter().chain(shortcut)) {
            l.bn.record_batch(st, *count)?;
        }
        Ok(y)
    }

    /// Bits of everything a step sees: the output, each batch norm's running statistics, and
    /// the gradients of `sum(y * r)` for `x` (when a variable: candle's backward also files
    /// gradients under inputs outside the graph, which nothing reads) and every parameter.
    fn outcome(
        y: &Tensor,
        x: Option<&Tensor>,
        main: &[Layer],
        shortcut: Option<&Layer>,
    ) -> Vec<Vec<u64>> {
        let bits = |t: &Tensor| -> Vec<u64> {
            let v: Vec<f64> = t
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        let r = values(y.dims(), 99, y.dtype());
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |t: &Tensor| g.get(t).map(bits).unwrap_or_default();
        let mut out = vec![bits(y), x.map(grad).unwrap_or_default()];
        for l in main.iter().chain(shortcut) {
            let data = l.vm.data().lock().unwrap();
            out.push(bits(l.bn.running_mean()));
            out.push(bits(l.bn.running_var()));
            out.push(grad(l.weight.as_tensor()));
            out.push(grad(data["weight"].as_tensor()));
            out.push(grad(data["bias"].as_tensor()));
        }
        out
    }

    /// `loss(stages)`'s gradients for every weight variable, each paired with what
    /// `Tensor::backward` gives; `-0.0` read as `+0.0`.
    fn weight_grads(
        main: &[Layer],
        shortcut: Option<&Layer>,
        derived: bool,
        x: &Tensor,
    ) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        // A weight that is a function of the variable (here `2 w`) must reach the variable
        // through candle's graph, also inside `crate::backward()`.
        let weights: Vec<Tensor> = main
            .iter()
            .chain(shortcut)
            .map(|l| {
                if derived {
                    l.weight.as_tensor() * 2.0
                } else {
                    Ok(l.weight.as_tensor().clone())
                }
            })
            .collect::<Result<_>>()?;
        let stages: Vec<Stage> = main
            .iter()
            .chain(shortcut)
            .zip(&weights)
            .map(|(l, w)| Stage {
                weight: w,
                ..stage(l)
            })
            .collect();
        let (m, sc) = stages.split_at(main.len());
        let (y, _) = residual_block_train(x, m, sc.first())?;
        let loss = (&y * values(y.dims(), 7, y.dtype()))?.sum_all()?;
        let (direct, plain) = (crate::backward(&loss)?, loss.backward()?);
        let read = |g: Option<&Tensor>| -> Result<Vec<f64>> {
            let Some(g) = g else { return Ok(Vec::new()) };
            let v: Vec<f64> = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            Ok(v.into_iter().map(|x| x + 0.0).collect())
        };
        main.iter()
            .chain(shortcut)
            .map(|l| {
                Ok((
                    read(direct.get(l.weight.as_tensor()))?,
                    read(plain.get(l.weight.as_tensor()))?,
                ))
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The fused stem is the composed stem (convolution, batch norm + ReLU, max-pool), bit
        /// for bit.
        #[test]
        fn fused_stem_matches_the_composed_ops_bit_for_bit(
            n in 1usize..3, h in 1usize..12, w in 1usize..12, cin in 1usize..4, co in 1usize..5,
            k in prop::sample::select(vec![1usize, 3, 7]), stride in 1usize..3,
            pool in prop::sample::select(vec![(3usize, 2usize, 1usize), (2, 2, 0), (3, 1, 1)]),
            f64_: bool, x_var: bool, seed in 0u64..1000,
        ) {
            let dtype = if f64_ { DType::F64 } else { DType::F32 };
            let x = values(&[n, h, w, cin], seed, dtype);
            let x = if x_var { Var::from_tensor(&x).unwrap().as_tensor().clone() } else { x };
            let pool = MaxPool2d::new(pool.0, pool.1, pool.2);
            let (l1, l2) = (layer(co, cin, k, stride, seed, dtype), layer(co, cin, k, stride, seed, dtype));
            let want = conv2d_nhwc(&x, &l1.weight, stride, k / 2)
                .and_then(|c| l1.bn.forward_t_relu_nhwc(&c, true))
                .and_then(|h| pool.forward_nhwc(&h));
            let got = stem_train(&x, &stage(&l2), &pool).and_then(|(y, (st, count))| {
                l2.bn.record_batch(&st, count)?;
                Ok(y)
            });
            match (want, got) {
                (Ok(a), Ok(b)) => {
                    let xg = x_var.then_some(&x);
                    let (a, b) = (outcome(&a, xg, &[l1], None), outcome(&b, xg, &[l2], None));
                    prop_assert_eq!(a, b);
                }
                (Err(a), Err(b)) => {
                    let first = |e: candle_core::Error| e.to_string().lines().next().map(str::to_owned);
                    prop_assert_eq!(first(a), first(b));
                }
                (a, b) => prop_assert!(false, "composed {:?} vs fused {:?}", a.map(|_| ()), b.map(|_| ())),
            }
        }

        /// The fused block is the composed block, bit for bit: output, running statistics and
        /// every gradient, basic and bottleneck, with and without a projection shortcut.
        #[test]
        fn fused_block_matches_the_composed_ops_bit_for_bit(
            n in 1usize..3, h in 1usize..7, w in 1usize..7, cin in 1usize..6, width in 1usize..5,
            stride in 1usize..3, bottleneck: bool, f64_: bool, x_var: bool, seed in 0u64..1000,
        ) {
            let dtype = if f64_ { DType::F64 } else { DType::F32 };
            let x = values(&[n, h, w, cin], seed, dtype);
            let x = if x_var { Var::from_tensor(&x).unwrap().as_tensor().clone() } else { x };
            let (m1, s1) = block(cin, width, stride, bottleneck, seed, dtype);
            let (m2, s2) = block(cin, width, stride, bottleneck, seed, dtype);
            let want = composed(&x, &m1, s1.as_ref());
            let got = fused(&x, &m2, s2.as_ref());
            match (want, got) {
                (Ok(a), Ok(b)) => {
                    let (a, b) = (outcome(&a, x_var.then_some(&x), &m1, s1.as_ref()), outcome(&b, x_var.then_some(&x), &m2, s2.as_ref()));
                    prop_assert_eq!(a.len(), b.len());
                    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                        prop_assert_eq!(a, b, "item {} differs", i);
                    }
                    prop_assert!(!x_var || !a[1].is_empty(), "no gradient for x");
                }
                // One value per channel somewhere (a 1x1 map of one image): both refuse.
                (Err(a), Err(b)) => prop_assert!(
                    b.to_string().contains("more than one value per channel"),
                    "composed: {a}; fused: {b}"
                ),
                (a, b) => prop_assert!(false, "composed {:?} vs fused {:?}", a.map(|_| ()), b.map(|_| ())),
            }
        }

        /// Inside `crate::backward()` the weights' gradients skip candle's accumulation; a weight
        /// computed from a variable still reaches the variable through candle's graph.
        #[test]
        fn direct_weight_gradients_are_candles(
            n in 2usize..3, h in 1usize..6, cin in 1usize..5, width in 1usize..4,
            stride in 1usize..3, bottleneck: bool, derived: bool, f64_: bool, seed in 0u64..1000,
        ) {
            let dtype = if f64_ { DType::F64 } else { DType::F32 };
            let x = values(&[n, h, h, cin], seed, dtype);
            let (main, shortcut) = block(cin, width, stride, bottleneck, seed, dtype);
            let grads = weight_grads(&main, shortcut.as_ref(), derived, &x).unwrap();
            for (i, (direct, plain)) in grads.iter().enumerate() {
                prop_assert!(!plain.is_empty(), "weight {} has no gradient", i);
                prop_assert_eq!(direct, plain, "weight {}", i);
            }
        }
    }
}
