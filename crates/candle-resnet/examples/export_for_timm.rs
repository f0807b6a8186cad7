//! Writes a randomly initialised, one-step-trained ResNet-18 (196 classes) as
//! `DIR/model.safetensors`, plus `DIR/input.safetensors` and `DIR/logits.safetensors` (eval-mode
//! logits of that input), for `scripts/check_timm_load.py` to load into timm and compare.
//!
//! ```text
//! cargo run --release -p candle-finetune --example export_for_timm -- /tmp/export
//! python3 scripts/check_timm_load.py /tmp/export
//! ```

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "export".into()));
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let model =
        candle_resnet::resnet::resnet18(196, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1., (2, 3, 64, 64), &dev)?;
    model.forward_t(&x, true)?; // move the batch-norm statistics off their defaults
    let logits = model.forward_t(&x, false)?;
    candle_resnet::export::export_safetensors(&vm, 1, &dir.join("model.safetensors"))?;
    candle_core::safetensors::save(
        &HashMap::from([("input".to_string(), x)]),
        dir.join("input.safetensors"),
    )?;
    candle_core::safetensors::save(
        &HashMap::from([("logits".to_string(), logits)]),
        dir.join("logits.safetensors"),
    )?;
    println!("wrote {}", dir.display());
    Ok(())
}
