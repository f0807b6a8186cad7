//! ReLU and the residual `relu(a + b)` as fused CPU ops, with PyTorch's gradient.
//!
//! Candle's `relu` runs single-threaded and its backward is four full-size passes
//! (`zeros_like`, `ge`, `to_dtype`, `mul`); a ResNet-18 step applies it 17 times. Here the
//! forward is one parallel pass and the backward one more: `dx = dy` where the output is
//! positive, `0` elsewhere — PyTorch's `threshold_backward(dy, y, 0)`, so the gradient at
//! exactly 0 is 0 (candle's passes it) and NaN propagates forward and backward as in PyTorch.
//! Other dtypes and devices use candle's ops.

use super::storage::contiguous_slice;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise scheduling, small enough to split the
/// smallest ResNet activations across threads.
const CHUNK: usize = 1 << 14;

fn map2<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

/// Dispatches a two-input element-wise kernel on f32/f64 CPU storages of equal layout.
fn binary(
    what: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32k: impl Fn(&[f32], &[f32]) -> Vec<f32>,
    f64k: impl Fn(&[f64], &[f64]) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() {
        bail!("{what}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    let out = match (s1, s2) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(f32k(
            contiguous_slice(s1, l1, what)?,
            contiguous_slice(s2, l2, what)?,
        )),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(f64k(
            contiguous_slice(s1, l1, what)?,
            contiguous_slice(s2, l2, what)?,
        )),
        _ => bail!("{what}: both tensors must be f32 or both f64"),
    };
    Ok((out, l1.shape().clone()))
}

/// `max(x, 0)`.
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "candle-resnet-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn k<T: WithDType>(x: &[T]) -> Vec<T> {
            let mut out = vec![T::zero(); x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, x)| {
                    for (o, &v) in o.iter_mut().zip(x) {
                        *o = super::relu1(v);
                    }
                });
            out
        }
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(k(contiguous_slice(s, l, "relu: input")?)),
            CpuStorage::F64(_) => CpuStorage::F64(k(contiguous_slice(s, l, "relu: input")?)),
            _ => bail!("relu: the fused op takes f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &ReluGrad)?))
    }
}

/// `relu(a + b)`: the residual connection of a ResNet block.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "candle-resnet-add-relu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        binary(
            "add_relu",
            (s1, l1),
            (s2, l2),
            |a, b| map2(a, b, |a, b| super::relu1(a + b)),
            |a, b| map2(a, b, |a, b| super::relu1(a + b)),
        )
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_grad(y, dy)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// `(y, dy) -> dy where y > 0, else 0` (NaN outputs pass the gradient, as in PyTorch).
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "candle-resnet-relu-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn k<T: WithDType>(y: &[T], dy: &[T]) -> Vec<T> {
            // A select, not a branch (random signs): 0 where y <= 0, so NaN passes d.
            map2(y, dy, |y, d| {
                let zero = y <= T::zero();
                if zero {
                    T::zero()
                } else {
                    d
                }
            })
        }
        binary("relu backward", (s1, l1), (s2, l2), k::<f32>, k::<f64>)
    }
}

/// `dy` where the ReLU output `y` is positive (or NaN), `0` elsewhere: the gradient every fused
/// ReLU here passes back (contiguous CPU f32/f64 tensors of one shape).
pub(crate) fn relu_grad(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &ReluGrad)
}

/// `max(x, 0)` with PyTorch's gradient (0 where the output is 0); a fused op on CPU f32/f64,
/// candle's `relu` otherwise.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[-1f32, 0., 2.], &Device::Cpu)?;
/// let y = candle_resnet::ops::relu::relu(&x)?;
/// assert_eq!(y.to_vec1::<f32>()?, [0., 0., 2.]);
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, [0., 0., 1.]);
/// # Ok(()) }
/// ```
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if super::fused_applies(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// `relu(a + b)` in one pass, both inputs receiving the masked gradient; a fused op on CPU
/// f32/f64 (same shape), candle's ops otherwise.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let a = Tensor::new(&[-1f32, 0.5, 2.], &Device::Cpu)?;
/// let b = Tensor::new(&[0.5f32, -1., 1.], &Device::Cpu)?;
/// let y = candle_resnet::ops::relu::add_relu(&a, &b)?;
/// assert_eq!(y.to_vec1::<f32>()?, [0., 0., 3.]);
/// # Ok(()) }
/// ```
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::fused_applies(a)
        && a.dtype() == b.dtype()
        && a.device().same_device(b.device())
        && a.shape() == b.shape()
    {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}
