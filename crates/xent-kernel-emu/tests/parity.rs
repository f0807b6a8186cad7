//! The CUDA kernel source, run on the host through the shim, against the PyTorch fixtures of
//! candle-xent and against candle-xent's CPU op.

#[path = "../../candle-xent/tests/common/mod.rs"]
mod common;

use candle_core::{DType, Device, Tensor, Var, WithDType};
use candle_xent::{CrossEntropyLoss, Reduction};
use common::precision::{assert_all_within, check_grad, check_loss, rows_of, worse, Worst};
use common::{assert_close, eps_for, flat_f64, rtol_for};
use half::{bf16, f16};
use serde::Deserialize;
use std::collections::HashMap;
use xent_kernel_emu::{Elem, Problem, Source, Targets, COL_LOSS, COL_TARGET_WEIGHT, STATS};

#[derive(Deserialize)]
struct Case {
    name: String,
    dtype: String,
    eps: f64,
    ignore_index: i64,
    reduction: String,
    soft: bool,
    weighted: bool,
    #[serde(default)]
    z_loss: f64,
    #[serde(default)]
    softcap: Option<f64>,
    /// A case of the precision set: checked to the bound of `common::precision`.
    #[serde(default)]
    precision: bool,
}

#[derive(Deserialize)]
struct Meta {
    cases: Vec<Case>,
}

fn fixtures() -> (Meta, HashMap<String, Tensor>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../candle-xent/tests/fixtures");
    let meta = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/xent.json")).unwrap())
        .unwrap();
    let t =
        candle_core::safetensors::load(format!("{dir}/xent.safetensors"), &Device::Cpu).unwrap();
    (meta, t)
}

/// What one emulated forward + backward gives, reduced like `CrossEntropyLoss`.
struct Emulated {
    loss: Vec<f64>,
    grad: Vec<f64>,
    grad_inplace: Vec<f64>,
}

fn acc_f64<T: Elem>(v: T::Acc) -> f64
where
    T::Acc: Into<f64>,
{
    v.into()
}

fn emulate<T: Elem + WithDType>(
    case: &Case,
    t: &HashMap<String, Tensor>,
    group: Option<u32>,
    source: Source,
) -> (Problem, Emulated)
where
    T::Acc: Into<f64>,
{
    let get = |k: &str| t[&format!("{}.{k}", case.name)].clone();
    let input = get("input");
    let dims = input.dims().to_vec();
    let cd = if dims.len() == 1 { 0 } else { 1 };
    let mut p = Problem::new(
        dims[..cd].iter().product(),
        dims[cd],
        dims[cd + 1..].iter().product(),
    );
    p.smoothing = case.eps;
    p.ignore_index = case.ignore_index;
    p.z_loss = case.z_loss;
    p.softcap = case.softcap;
    p.group = if p.inner == 1 { group } else { None };
    p.source = source;
    if case.weighted {
        p.weight = Some(flat_f64(&get("weight")));
    }
    let x: Vec<T> = input.flatten_all().unwrap().to_vec1().unwrap();
    let soft_t: Vec<T>;
    let hard_t: Vec<i64>;
    let targets = if case.soft {
        soft_t = get("target").flatten_all().unwrap().to_vec1().unwrap();
        Targets::Soft(&soft_t)
    } else {
        hard_t = get("target")
            .to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        Targets::I64(&hard_t)
    };
    let stats = p.forward(&x, targets).expect("valid targets");
    let rows = p.rows();
    let loss_rows: Vec<f64> = (0..rows)
        .map(|r| acc_f64::<T>(stats[r * STATS + COL_LOSS]))
        .collect();
    let denom = if case.soft {
        rows as f64
    } else {
        (0..rows)
            .map(|r| acc_f64::<T>(stats[r * STATS + COL_TARGET_WEIGHT]))
            .sum()
    };
    let up = flat_f64(&get("upstream"));
    let (loss, g): (Vec<f64>, Vec<f64>) = match case.reduction.as_str() {
        // The unreduced loss is returned in the input's dtype.
        "none" => (
            loss_rows
                .iter()
                .map(|&v| T::round_from(v).as_f64())
                .collect(),
            up.clone(),
        ),
        // Reduced losses too come back in the input's dtype.
        "sum" => (
            vec![T::round_from(loss_rows.iter().sum()).as_f64()],
            vec![up[0]; rows],
        ),
        "mean" => (
            vec![T::round_from(loss_rows.iter().sum::<f64>() / denom).as_f64()],
            vec![up[0] / denom; rows],
        ),
        other => panic!("reduction {other}"),
    };
    let bstats = p.backward_stats(&stats, |r| T::acc(g[r]));
    let grad = p.backward(&x, targets, &bstats).expect("valid targets");
    let mut xg = x.clone();
    p.backward_inplace(&mut xg, targets, &bstats).unwrap();
    let to64 = |v: &[T]| v.iter().map(|e| e.as_f64()).collect::<Vec<_>>();
    (
        p,
        Emulated {
            loss,
            grad: to64(&grad),
            grad_inplace: to64(&xg),
        },
    )
}

fn cpu_op(case: &Case, t: &HashMap<String, Tensor>) -> (Vec<f64>, Vec<f64>) {
    let get = |k: &str| t[&format!("{}.{k}", case.name)].clone();
    let mut f = CrossEntropyLoss::new()
        .label_smoothing(case.eps)
        .ignore_index(case.ignore_index)
        .z_loss(case.z_loss)
        .reduction(match case.reduction.as_str() {
            "none" => Reduction::None,
            "sum" => Reduction::Sum,
            _ => Reduction::Mean,
        });
    if case.weighted {
        f = f.weight(get("weight"));
    }
    if let Some(c) = case.softcap {
        f = f.softcap(c);
    }
    let input = get("input");
    let target = if case.soft {
        get("target")
    } else {
        get("target").to_dtype(DType::I64).unwrap()
    };
    let var = Var::from_tensor(&input).unwrap();
    let loss = f.forward(var.as_tensor(), &target).unwrap();
    let up = get("upstream").to_dtype(loss.dtype()).unwrap();
    let grads = (&loss * &up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (
        flat_f64(&loss),
        flat_f64(grads.get(var.as_tensor()).unwrap()),
    )
}

/// Every emulated run of `case`: the geometry the GPU path picks, then each reduction path
/// forced (warp, block), for the CUDA source and (no f64 on Metal) the Metal source; each run's
/// in-place gradient is checked bit for bit against its out-of-place one. Returns each run's
/// description and results.
fn kernel_runs<T: Elem + WithDType>(
    case: &Case,
    t: &HashMap<String, Tensor>,
    dtype: DType,
) -> Vec<(String, Emulated)>
where
    T::Acc: Into<f64>,
{
    let sources: &[Source] = if dtype == DType::F64 {
        &[Source::Cuda]
    } else {
        &[Source::Cuda, Source::Metal]
    };
    let mut runs = Vec::new();
    for &source in sources {
        for forced in [None, Some(32), Some(256)] {
            let (p, e) = emulate::<T>(case, t, forced, source);
            let what = format!(
                "{} ({source:?}, inner {}, group {:?})",
                case.name, p.inner, p.group
            );
            assert_eq!(
                e.grad.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                e.grad_inplace
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "{what}: in-place gradient differs from the out-of-place one"
            );
            runs.push((what, e));
        }
    }
    runs
}

fn check_case<T: Elem + WithDType>(case: &Case, t: &HashMap<String, Tensor>, dtype: DType)
where
    T::Acc: Into<f64>,
{
    let get = |k: &str| t[&format!("{}.{k}", case.name)].clone();
    let xmax = flat_f64(&get("input"))
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()));
    let acc_eps = if dtype == DType::F64 {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    };
    let rtol = rtol_for(dtype);
    let atol = 1e-7_f64.min(eps_for(dtype)) + 4.0 * xmax * acc_eps;
    let (want_loss, want_grad) = (flat_f64(&get("loss")), flat_f64(&get("grad")));
    let (cpu_loss, cpu_grad) = cpu_op(case, t);
    for (what, e) in kernel_runs::<T>(case, t, dtype) {
        assert_close(
            &e.loss,
            &want_loss,
            rtol,
            atol,
            &format!("{what} loss vs PyTorch"),
        );
        assert_close(
            &e.grad,
            &want_grad,
            rtol,
            atol,
            &format!("{what} grad vs PyTorch"),
        );
        assert_close(
            &e.loss,
            &cpu_loss,
            rtol,
            atol,
            &format!("{what} loss vs CPU op"),
        );
        assert_close(
            &e.grad,
            &cpu_grad,
            rtol,
            atol,
            &format!("{what} grad vs CPU op"),
        );
    }
}

/// A precision case (logits up to 1e30, ties, one huge logit, masked rows) through both kernel
/// sources and both reduction paths, to the bound the CPU op meets (tests/precision.rs).
fn check_precision_case<T: Elem + WithDType>(
    case: &Case,
    t: &HashMap<String, Tensor>,
    dtype: DType,
) -> Worst
where
    T::Acc: Into<f64>,
{
    let get = |k: &str| t[&format!("{}.{k}", case.name)].clone();
    let (want_loss, want_grad) = (flat_f64(&get("loss")), flat_f64(&get("grad")));
    let rows = rows_of(&case.reduction, &get("input"));
    let mut worst: Worst = (0.0, String::new());
    for (what, e) in kernel_runs::<T>(case, t, dtype) {
        let wl = check_loss(&what, dtype, &e.loss, &want_loss, rows, "emulated");
        let wg = check_grad(&what, dtype, &e.grad, &want_grad, "emulated");
        worst = worse(worse(worst, wl), wg);
    }
    worst
}

#[test]
fn kernels_exact_at_every_scale() {
    let (meta, t) = fixtures();
    let mut report = Vec::new();
    for case in meta.cases.iter().filter(|c| c.precision) {
        let w = match case.dtype.as_str() {
            "f32" => check_precision_case::<f32>(case, &t, DType::F32),
            "f64" => check_precision_case::<f64>(case, &t, DType::F64),
            "f16" => check_precision_case::<f16>(case, &t, DType::F16),
            "bf16" => check_precision_case::<bf16>(case, &t, DType::BF16),
            other => panic!("dtype {other}"),
        };
        report.push((w, case.name.clone()));
    }
    assert!(report.len() >= 100, "{} precision cases", report.len());
    assert_all_within(&mut report, "CUDA and Metal kernel sources");
}

#[test]
fn kernels_match_pytorch_fixtures_and_the_cpu_op() {
    let (meta, t) = fixtures();
    assert!(meta.cases.len() >= 80);
    // The precision set: kernels_exact_at_every_scale.
    for case in meta.cases.iter().filter(|c| !c.precision) {
        match case.dtype.as_str() {
            "f32" => check_case::<f32>(case, &t, DType::F32),
            "f64" => check_case::<f64>(case, &t, DType::F64),
            "f16" => check_case::<f16>(case, &t, DType::F16),
            "bf16" => check_case::<bf16>(case, &t, DType::BF16),
            other => panic!("dtype {other}"),
        }
    }
}
