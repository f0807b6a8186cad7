//! Reproducible weights without a file: every tensor filled from a hash of its name, so that a
//! ten-line Python function (`tests/fixtures/gen_resnet_fixture.py`) produces bit-identical
//! values in PyTorch. The torchvision parity fixtures are built this way, and tests that need a
//! fixed starting point use it.
//!
//! ```
//! use candle_core::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! let vm = VarMap::new();
//! candle_resnet::resnet18(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
//! candle_resnet::init::fill_deterministic(&vm).unwrap();
//! let w = vm.data().lock().unwrap()["fc.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
//! let v = candle_resnet::init::uniform("fc.weight", 3);
//! assert_eq!(w[0], (v[0] / 512f64.sqrt()) as f32);
//! ```

use candle_core::{Device, Result, Tensor};
use candle_nn::VarMap;

/// FNV-1a, 64 bits, of the name's bytes: the seed of its values.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xCBF29CE484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001B3);
    }
    h
}

/// `u_i` in [-1, 1) as f64, bit-identical to the Python generator.
pub fn uniform(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| {
            let mut z = seed.wrapping_add(i).wrapping_add(0x9E3779B97F4A7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0
        })
        .collect()
}

/// `(offset, scale)` of a tensor, as in the Python generator.
pub fn recipe(name: &str, shape: &[usize]) -> (f64, f64) {
    if name.ends_with("running_var") {
        (0.75, 0.25)
    } else if name.ends_with("running_mean") || name.ends_with("bias") {
        (0.0, 0.1)
    } else if shape.len() == 1 {
        (1.0, 0.2)
    } else {
        let fan_in: usize = shape[1..].iter().product();
        if shape.len() == 4 {
            (0.0, (6.0 / fan_in as f64).sqrt())
        } else {
            (0.0, 1.0 / (fan_in as f64).sqrt())
        }
    }
}

/// A tensor of `shape` with values `offset + scale * u_i` (f32) for the name's `u_i`.
pub fn det_tensor(name: &str, shape: &[usize], offset: f64, scale: f64) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = uniform(name, n)
        .into_iter()
        .map(|u| (offset + scale * u) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Sets every variable of `varmap` to its deterministic value.
pub fn fill_deterministic(varmap: &VarMap) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        let (o, s) = recipe(name, var.dims());
        var.set(&det_tensor(name, var.dims(), o, s)?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
