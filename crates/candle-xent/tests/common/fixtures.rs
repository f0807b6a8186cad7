//! The PyTorch fixtures (fixtures/gen_fixtures.py): cases, tensors, and a run through autograd.

use super::{eps_for, flat_f64, rtol_for};
use candle_core::{DType, Device, Tensor, Var};
use candle_xent::{CrossEntropyLoss, Reduction};
use serde::Deserialize;
use std::collections::HashMap;

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    pub dtype: String,
    pub eps: f64,
    pub ignore_index: i64,
    pub reduction: String,
    pub soft: bool,
    pub weighted: bool,
    pub target_dtype: Option<String>,
    pub torch_native: bool,
    #[serde(default)]
    pub z_loss: f64,
    #[serde(default)]
    pub softcap: Option<f64>,
    /// A case of the precision set (issue 17): checked to a few ulps by tests/precision.rs.
    #[serde(default)]
    pub precision: bool,
}

/// A fused linear cross-entropy case: exact logits of magnitude ~2^pow2.
#[derive(Deserialize)]
pub struct LinearCase {
    pub name: String,
    pub dtype: String,
    pub eps: f64,
    pub pow2: i32,
}

#[derive(Deserialize)]
pub struct Meta {
    pub cases: Vec<Case>,
    #[serde(default)]
    pub linear_cases: Vec<LinearCase>,
}

pub fn fixtures() -> (Meta, HashMap<String, Tensor>) {
    // XENT_FIXTURES_DIR: where a test binary runs away from this checkout (the GPU bundle).
    let dir = std::env::var("XENT_FIXTURES_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures").to_string());
    let meta: Meta =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/xent.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(format!("{dir}/xent.safetensors"), &Device::Cpu).unwrap();
    (meta, tensors)
}

pub fn dtype_of(s: &str) -> DType {
    match s {
        "f32" => DType::F32,
        "f64" => DType::F64,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => panic!("unknown dtype {other}"),
    }
}

pub fn reduction_of(s: &str) -> Reduction {
    match s {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        other => panic!("unknown reduction {other}"),
    }
}

pub struct Inputs {
    pub loss_fn: CrossEntropyLoss,
    pub input: Tensor,
    pub target: Tensor,
    pub upstream: Tensor,
    pub want_loss: Vec<f64>,
    pub want_grad: Vec<f64>,
}

pub fn inputs(case: &Case, t: &HashMap<String, Tensor>) -> Inputs {
    let get = |k: &str| t[&format!("{}.{k}", case.name)].clone();
    let dtype = dtype_of(&case.dtype);
    let input = get("input");
    assert_eq!(input.dtype(), dtype, "{}", case.name);
    let target = if case.soft {
        get("target")
    } else {
        let tdt = match case.target_dtype.as_deref() {
            Some("u8") => DType::U8,
            Some("u32") => DType::U32,
            _ => DType::I64,
        };
        get("target").to_dtype(tdt).unwrap()
    };
    let mut loss_fn = CrossEntropyLoss::new()
        .label_smoothing(case.eps)
        .ignore_index(case.ignore_index)
        .reduction(reduction_of(&case.reduction));
    if case.weighted {
        loss_fn = loss_fn.weight(get("weight"));
    }
    if case.z_loss != 0.0 {
        loss_fn = loss_fn.z_loss(case.z_loss);
    }
    if let Some(cap) = case.softcap {
        loss_fn = loss_fn.softcap(cap);
    }
    Inputs {
        loss_fn,
        input,
        target,
        upstream: get("upstream"),
        want_loss: flat_f64(&get("loss")),
        want_grad: flat_f64(&get("grad")),
    }
}

/// Loss and gradient of `sum(loss * upstream)` through `Tensor::backward` into a `Var`.
pub fn run(
    loss_fn: &CrossEntropyLoss,
    input: &Tensor,
    target: &Tensor,
    up: &Tensor,
) -> (Tensor, Tensor) {
    let var = Var::from_tensor(input).unwrap();
    let loss = loss_fn.forward(var.as_tensor(), target).unwrap();
    assert_eq!(
        loss.dtype(),
        input.dtype(),
        "the loss keeps the input dtype"
    );
    let up = up.to_dtype(loss.dtype()).unwrap();
    let total = (&loss * &up).unwrap().sum_all().unwrap();
    let grads = total.backward().unwrap();
    let grad = grads
        .get(var.as_tensor())
        .expect("a gradient for the input")
        .clone();
    assert_eq!(grad.dtype(), input.dtype());
    assert_eq!(grad.dims(), input.dims());
    (loss, grad)
}

pub fn acc_eps(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    }
}

pub fn tolerances(case: &Case, input: &Tensor) -> (f64, f64) {
    let dtype = dtype_of(&case.dtype);
    let xmax = flat_f64(input).iter().fold(0f64, |m, v| m.max(v.abs()));
    // Rounding the log-sum-exp of logits of magnitude |x| costs |x| * eps absolute error in
    // every log-probability, in PyTorch as here.
    let atol = 1e-7_f64.min(eps_for(dtype)) + 4.0 * xmax * acc_eps(dtype);
    (rtol_for(dtype), atol)
}
