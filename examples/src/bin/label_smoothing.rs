//! Train a small Candle classifier with label smoothing: the one-line switch from candle-nn.
//!
//! ```text
//! cargo run --release -p candle-examples-xent --bin label_smoothing
//! ```
//!
//! The data are generated: 4 Gaussian blobs in 16 dimensions, one per class. The model is a
//! two-layer MLP trained with AdamW. The only change from a plain candle-nn training loop is the
//! loss line marked below.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, AdamW, Module, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_xent::CrossEntropyLoss;

const CLASSES: usize = 4;
const DIM: usize = 16;

/// `n` points per class around well-separated random centres.
fn blobs(n: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let centres = (Tensor::randn(0f32, 1., (CLASSES, DIM), dev)? * 3.0)?;
    let labels: Vec<u32> = (0..CLASSES as u32)
        .flat_map(|c| std::iter::repeat_n(c, n))
        .collect();
    let labels = Tensor::new(labels.as_slice(), dev)?;
    let noise = Tensor::randn(0f32, 1., (CLASSES * n, DIM), dev)?;
    let x = (centres.index_select(&labels, 0)? + noise)?;
    Ok((x, labels))
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (x, y) = blobs(256, &dev)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let l1 = linear(DIM, 64, vb.pp("l1"))?;
    let l2 = linear(64, CLASSES, vb.pp("l2"))?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )?;

    // Before: let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
    let loss_fn = CrossEntropyLoss::new().label_smoothing(0.1);

    for step in 0..=100 {
        let logits = l2.forward(&l1.forward(&x)?.relu()?)?;
        let loss = loss_fn.forward(&logits, &y)?; // <- the one changed line
        opt.backward_step(&loss)?;
        if step % 20 == 0 {
            let acc = logits
                .argmax(D::Minus1)?
                .eq(&y)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?;
            println!(
                "step {step:3}  loss {:.4}  train accuracy {:.1}%",
                loss.to_scalar::<f32>()?,
                acc * 100.0
            );
        }
    }
    // With smoothing 0.1 the loss cannot reach 0: its floor is the entropy of the smoothed target.
    let eps = 0.1f64;
    let q_true = 1.0 - eps + eps / CLASSES as f64;
    let q_other = eps / CLASSES as f64;
    let floor = -(q_true * q_true.ln() + (CLASSES - 1) as f64 * q_other * q_other.ln());
    println!("loss floor with smoothing {eps}: {floor:.4}");
    Ok(())
}
