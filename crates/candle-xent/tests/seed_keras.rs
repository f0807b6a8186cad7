//! Coming from the question's thread or from Keras: each of their label-smoothing losses as one
//! candle-xent call, against the values PyTorch (the thread's four losses) and the keras package
//! (Keras 3) compute (tests/fixtures/gen_seed_keras.py, committed in seed_keras.json).

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_xent::{
    cross_entropy, BinaryCrossEntropyWithLogits, CrossEntropyLoss, Reduction, Smoothing,
};
use common::assert_close;
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed_keras.json"
    ))
    .expect("seed_keras.json");
    serde_json::from_str(&text).expect("json")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("dim") as usize)
        .collect()
}

fn targets(v: &Value) -> Result<Tensor> {
    let y: Vec<u32> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("class") as u32)
        .collect();
    Tensor::new(y.as_slice(), &Device::Cpu)
}

/// The thread's and PyTorch's losses, the candle-xent way.
fn ours(case: &Value, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let eps = case["eps"].as_f64().expect("eps");
    let weight = match &case["weight"] {
        Value::Null => None,
        w => Some(Tensor::new(floats(w).as_slice(), &Device::Cpu)?),
    };
    match (case["loss"].as_str().expect("loss"), weight) {
        // PyTorch, NVIDIA, Wangleiofficial without weights: the default convention.
        ("uniform", None) => cross_entropy(x, y, eps),
        ("uniform", Some(w)) => CrossEntropyLoss::new()
            .label_smoothing(eps)
            .weight(w)
            .forward(x, y),
        // Devin Yang / Shital Shah: eps / (C - 1) off the target; their weights scale each
        // class's term and their mean is over rows (PyTorch's divides by the targets' weights).
        ("other", w) => {
            let mut loss = CrossEntropyLoss::new()
                .label_smoothing(eps)
                .smoothing(Smoothing::OtherClasses);
            if let Some(w) = w {
                loss = loss.weight(w);
            }
            loss.reduction(Reduction::None).forward(x, y)?.mean_all()
        }
        // Wangleiofficial / Datasaurus with weights: an unweighted uniform term (smoothing 1 is
        // the uniform target alone) and a weighted NLL (weighted mean).
        ("wanglei", Some(w)) => {
            let uniform = cross_entropy(x, y, 1.0)?;
            let nll = CrossEntropyLoss::new().weight(w).forward(x, y)?;
            (uniform * eps)? + (nll * (1.0 - eps))?
        }
        (other, _) => panic!("unknown loss {other}"),
    }
}

#[test]
fn the_threads_four_losses_and_pytorchs_in_f64() -> Result<()> {
    let fx = fixture();
    let cases = fx["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 18);
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let x = Var::from_tensor(&Tensor::from_vec(
            floats(&c["x"]),
            dims(&c["shape"]).as_slice(),
            &Device::Cpu,
        )?)?;
        let y = targets(&c["y"])?;
        let loss = ours(c, &x, &y)?;
        let g = loss.backward()?;
        let got = loss.to_scalar::<f64>()?;
        assert_close(
            &[got],
            &[c["want"].as_f64().expect("want")],
            1e-13,
            1e-15,
            name,
        );
        let grad: Vec<f64> = g.get(&x).expect("grad").flatten_all()?.to_vec1()?;
        assert_close(
            &grad,
            &floats(&c["grad"]),
            1e-12,
            1e-15,
            &format!("{name} gradient"),
        );
    }
    Ok(())
}

#[test]
fn the_threads_printed_values_in_f32() -> Result<()> {
    // The thread prints 1.4178 (other classes, smoothing 0.3), 1.3883 (uniform, 0.3); its code
    // shows 0.5 for the first, which gives 1.5161.
    let fx = fixture();
    let printed = &fx["printed_f32"];
    let x = Tensor::new(
        &[
            [0f32, 0.2, 0.7, 0.1, 0.],
            [0., 0.9, 0.2, 0.2, 1.],
            [1., 0.2, 0.7, 0.9, 1.],
        ],
        &Device::Cpu,
    )?;
    let y = Tensor::new(&[2u32, 1, 0], &Device::Cpu)?;
    for (key, smoothing, eps) in [
        ("other_eps0.3", Smoothing::OtherClasses, 0.3),
        ("other_eps0.5", Smoothing::OtherClasses, 0.5),
        ("uniform_eps0.3", Smoothing::Uniform, 0.3),
    ] {
        let want = printed[key].as_f64().expect("printed");
        let got = CrossEntropyLoss::new()
            .label_smoothing(eps)
            .smoothing(smoothing)
            .forward(&x, &y)?
            .to_scalar::<f32>()?;
        assert_eq!(
            (f64::from(got) * 1e4).round() / 1e4,
            want,
            "{key}: {got} does not print as {want}"
        );
    }
    assert_eq!(printed["other_eps0.3"].as_f64(), Some(1.4178));
    assert_eq!(printed["other_eps0.5"].as_f64(), Some(1.5161));
    assert_eq!(printed["uniform_eps0.3"].as_f64(), Some(1.3883));
    Ok(())
}

#[test]
fn keras_losses_with_label_smoothing() -> Result<()> {
    let fx = fixture();
    let b = &fx["batch"];
    let dev = Device::Cpu;
    let x = Tensor::from_vec(floats(&b["x"]), dims(&b["shape"]).as_slice(), &dev)?;
    let y = targets(&b["y"])?;
    let classes = x.dim(1)?;
    let onehot = Tensor::eye(classes, DType::F64, &dev)?.index_select(&y, 0)?;
    let kcases = fx["keras_cases"].as_array().expect("keras cases");
    assert_eq!(kcases.len(), 10);
    for c in kcases {
        let name = c["name"].as_str().expect("name");
        let eps = c["eps"].as_f64().expect("eps");
        let got = match (c["kind"].as_str().expect("kind"), &c["class_weight"]) {
            // CategoricalCrossentropy(from_logits=True, label_smoothing=eps) on one-hot targets:
            // the uniform convention, with probability targets or class indices alike.
            ("categorical", Value::Null) => {
                let soft = CrossEntropyLoss::new()
                    .label_smoothing(eps)
                    .forward(&x, &onehot)?;
                let hard = cross_entropy(&x, &y, eps)?;
                assert_close(
                    &[hard.to_scalar::<f64>()?],
                    &[soft.to_scalar::<f64>()?],
                    1e-14,
                    0.0,
                    name,
                );
                soft
            }
            // Keras's class_weight weighs each row's whole loss by w[y] and divides by the rows.
            ("categorical", w) => {
                let w = Tensor::new(floats(w).as_slice(), &dev)?.index_select(&y, 0)?;
                let rows = CrossEntropyLoss::new()
                    .label_smoothing(eps)
                    .reduction(Reduction::None)
                    .forward(&x, &y)?;
                (rows * w)?.mean_all()?
            }
            ("sparse", _) => cross_entropy(&x, &y, 0.0)?,
            ("binary", _) => {
                let shape = dims(&c["shape"]);
                let bx = Tensor::from_vec(floats(&c["x"]), shape.as_slice(), &dev)?;
                let by = Tensor::from_vec(floats(&c["y"]), shape.as_slice(), &dev)?;
                BinaryCrossEntropyWithLogits::new()
                    .label_smoothing(eps)
                    .forward(&bx, &by)?
            }
            (other, _) => panic!("unknown Keras case {other}"),
        };
        let got = got.to_scalar::<f64>()?;
        // keras.losses' float64 row losses with the objects' reduction.
        assert_close(
            &[got],
            &[c["want"].as_f64().expect("want")],
            1e-12,
            1e-15,
            name,
        );
        // The Loss object itself (float32 on the torch backend).
        let object = c["object"].as_f64().expect("object");
        assert_close(
            &[got],
            &[object],
            1e-6,
            1e-7,
            &format!("{name} (Keras object)"),
        );
    }
    Ok(())
}

#[test]
fn other_classes_rejects_what_it_cannot_spread() -> Result<()> {
    let dev = Device::Cpu;
    let one = Tensor::zeros((2, 1), DType::F32, &dev)?;
    let y = Tensor::new(&[0u32, 0], &dev)?;
    let e = CrossEntropyLoss::new()
        .label_smoothing(0.1)
        .smoothing(Smoothing::OtherClasses)
        .forward(&one, &y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 class"), "{e}");
    // 4 classes: at most 3/4, or the target gets less than each other class.
    let x = Tensor::zeros((2, 4), DType::F32, &dev)?;
    let e = CrossEntropyLoss::new()
        .label_smoothing(0.8)
        .smoothing(Smoothing::OtherClasses)
        .forward(&x, &y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("(C - 1) / C = 0.75"), "{e}");
    // At the limit every class gets 1/4: the loss of uniform logits is ln 4.
    let l = CrossEntropyLoss::new()
        .label_smoothing(0.75)
        .smoothing(Smoothing::OtherClasses)
        .forward(&x, &y)?
        .to_scalar::<f32>()?;
    assert!((f64::from(l) - 4f64.ln()).abs() < 1e-6, "{l}");
    // Zero smoothing needs no second class.
    let l = CrossEntropyLoss::new()
        .smoothing(Smoothing::OtherClasses)
        .forward(&one, &y)?
        .to_scalar::<f32>()?;
    assert_eq!(l, 0.0);
    Ok(())
}
