//! BinaryCrossEntropyWithLogits against PyTorch (tests/fixtures/gen_bce_fixtures.py).

mod common;

use candle_core::{Device, Tensor, Var};
use candle_xent::{BinaryCrossEntropyWithLogits, Reduction};
use common::{assert_close, flat_f64};

#[test]
fn matches_pytorch_loss_and_gradient() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bce.json"
    ))
    .unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let v = |x: &serde_json::Value| {
        x.as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for c in cases {
        let shape: Vec<usize> = c["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_u64().unwrap() as usize)
            .collect();
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(v(&c["x"]), shape.as_slice(), &dev).unwrap())
            .unwrap();
        let y = Tensor::from_vec(v(&c["y"]), shape.as_slice(), &dev).unwrap();
        let red = match c["reduction"].as_str().unwrap() {
            "none" => Reduction::None,
            "sum" => Reduction::Sum,
            _ => Reduction::Mean,
        };
        let mut bce = BinaryCrossEntropyWithLogits::new()
            .label_smoothing(c["eps"].as_f64().unwrap())
            .reduction(red);
        if !c["weight"].is_null() {
            bce = bce.weight(Tensor::new(v(&c["weight"]).as_slice(), &dev).unwrap());
        }
        if !c["pos_weight"].is_null() {
            bce = bce.pos_weight(Tensor::new(v(&c["pos_weight"]).as_slice(), &dev).unwrap());
        }
        let loss = bce.forward(x.as_tensor(), &y).unwrap();
        let up = Tensor::from_vec(v(&c["upstream"]), loss.shape(), &dev).unwrap();
        let g = (&loss * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let name = c["name"].as_str().unwrap();
        assert_close(
            &flat_f64(&loss),
            &v(&c["loss"]),
            1e-12,
            1e-12,
            &format!("{name} loss"),
        );
        assert_close(
            &flat_f64(g.get(x.as_tensor()).unwrap()),
            &v(&c["grad"]),
            1e-12,
            1e-12,
            &format!("{name} grad"),
        );
    }
}

#[test]
fn stays_finite_where_candle_nn_overflows() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[200f32, -200.], [-200., 200.]], &dev).unwrap();
    let y = Tensor::new(&[[1f32, 0.], [1., 0.]], &dev).unwrap();
    let ours = BinaryCrossEntropyWithLogits::new()
        .forward(&x, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((ours - 100.0).abs() < 1e-3, "{ours}"); // two perfect, two off by 200: mean 100
    let nn = candle_nn::loss::binary_cross_entropy_with_logit(&x, &y)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        !nn.is_finite() || (nn - 100.0).abs() > 1.0,
        "candle-nn: {nn}"
    );
    let bad = BinaryCrossEntropyWithLogits::new()
        .label_smoothing(2.0)
        .forward(&x, &y);
    assert!(bad.unwrap_err().to_string().contains("label_smoothing"));
    let bad = BinaryCrossEntropyWithLogits::new().forward(&x, &y.narrow(0, 0, 1).unwrap());
    assert!(bad.unwrap_err().to_string().contains("shape"));
}
