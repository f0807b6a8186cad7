//! The fused ReLU ops against candle's composed ops, with PyTorch's gradient convention
//! (zero where the output is zero) and NaN propagation.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_resnet::ops::relu::{add_relu, relu};

/// Random values in [-2, 2) with exact zeros (and a NaN planted if `nan`), shape (3, 4, 5, 6).
fn input(dtype: DType, seed: u64, nan: bool) -> Result<Tensor> {
    let n = 3 * 4 * 5 * 6;
    let v: Vec<f64> = (0..n as u64)
        .map(|i| {
            let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
            if i % 7 == 0 {
                0.0
            } else if nan && i == 11 {
                f64::NAN
            } else {
                ((h >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            }
        })
        .collect();
    Tensor::from_vec(v, (3, 4, 5, 6), &Device::Cpu)?.to_dtype(dtype)
}

/// Equal values (NaN where the other is NaN; -0 equals 0, PyTorch's threshold_backward writes +0).
fn same(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x == y || (x.is_nan() && y.is_nan()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
    Ok(())
}

#[test]
fn relu_and_its_gradient_follow_pytorch() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let x = Var::from_tensor(&input(dtype, 1, true)?)?;
        let dy = input(dtype, 2, false)?;
        let y = relu(&x)?;
        // Forward: max(x, 0) with NaN kept.
        let nan = x.as_tensor().ne(x.as_tensor())?;
        let want = nan.where_cond(x.as_tensor(), &x.as_tensor().maximum(0.0)?)?;
        same(&y, &want, "relu")?;
        // Backward: dy where y > 0 or y is NaN (PyTorch's threshold_backward), else 0.
        let g = (&y * &dy)?.sum_all()?.backward()?;
        let pass = (y.gt(0.0)?.to_dtype(dtype)? + nan.to_dtype(dtype)?)?;
        let want = (dy.clone() * pass)?;
        let dx = g.get(&x).expect("dx");
        same(dx, &want, "relu grad")?;
        let at_zero = x.as_tensor().eq(0.0)?.to_dtype(dtype)?;
        assert!(
            (dx * at_zero)?
                .abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                == 0.0,
            "gradient at 0 must be 0"
        );
    }
    Ok(())
}

#[test]
fn add_relu_equals_the_composed_residual_and_splits_the_gradient() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let a = Var::from_tensor(&input(dtype, 3, false)?)?;
        let b = Var::from_tensor(&input(dtype, 4, false)?)?;
        let dy = input(dtype, 5, false)?;
        let y = add_relu(&a, &b)?;
        let s = (a.as_tensor() + b.as_tensor())?;
        same(&y, &s.maximum(0.0)?, "add_relu")?;
        let g = (&y * &dy)?.sum_all()?.backward()?;
        let want = (&dy * s.gt(0.0)?.to_dtype(dtype)?)?;
        same(g.get(&a).expect("da"), &want, "da")?;
        same(g.get(&b).expect("db"), &want, "db")?;
    }
    Ok(())
}

#[test]
fn fused_batch_norm_relu_equals_batch_norm_then_relu_bit_for_bit() -> Result<()> {
    use candle_core::ModuleT;
    use candle_nn::{VarBuilder, VarMap};
    for dtype in [DType::F32, DType::F64] {
        let vm = VarMap::new();
        let bn =
            candle_resnet::BatchNorm2d::new(4, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu))?;
        // Non-trivial affine parameters.
        for (name, v) in vm.data().lock().unwrap().iter() {
            if name == "weight" || name == "bias" {
                v.set(
                    &input(dtype, 7 + name.len() as u64, false)?
                        .flatten_all()?
                        .narrow(0, 0, 4)?,
                )?;
            }
        }
        let x = Var::from_tensor(&input(dtype, 6, false)?)?;
        let dy = input(dtype, 8, false)?;
        let vars = vm.all_vars();
        let mut results = Vec::new();
        for fused in [true, false] {
            let y = if fused {
                bn.forward_t_relu(&x, true)?
            } else {
                relu(&bn.forward_t(&x, true)?)?
            };
            let g = (&y * &dy)?.sum_all()?.backward()?;
            let mut out = vec![y.clone(), g.get(&x).expect("dx").clone()];
            for v in &vars {
                if let Some(gv) = g.get(v) {
                    out.push(gv.clone());
                }
            }
            results.push(out);
        }
        assert_eq!(results[0].len(), 4, "y, dx, dgamma, dbeta");
        assert_eq!(results[0].len(), results[1].len());
        for (a, b) in results[0].iter().zip(&results[1]) {
            let (a, b) = (
                a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
                b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{dtype:?}: fused differs"
            );
        }
        // The mask really applies: some outputs are zero, their gradient is zero.
        assert!(
            results[0][0]
                .eq(0.0)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?
                > 10.0
        );
    }
    Ok(())
}

#[test]
fn fused_batch_norm_relu_gives_no_gradient_at_exactly_zero() -> Result<()> {
    // Channels of -1, 0, 1 (mean exactly 0) and beta = 0: the normalised 0s are exactly 0, where
    // PyTorch's ReLU gradient is 0. The fused backward recomputes its mask from x and must agree
    // with the separate ReLU bit for bit.
    use candle_core::ModuleT;
    use candle_nn::{VarBuilder, VarMap};
    for dtype in [DType::F32, DType::F64] {
        let vm = VarMap::new();
        let bn =
            candle_resnet::BatchNorm2d::new(3, VarBuilder::from_varmap(&vm, dtype, &Device::Cpu))?;
        vm.data().lock().unwrap()["weight"]
            .set(&Tensor::new(&[0.7f64, 1.3, 2.0], &Device::Cpu)?.to_dtype(dtype)?)?;
        let vals: Vec<f64> = (0..2 * 3 * 3 * 3)
            .map(|i| ((i * 7) % 3) as f64 - 1.0)
            .collect();
        let x = Var::from_tensor(
            &Tensor::from_vec(vals, (2, 3, 3, 3), &Device::Cpu)?.to_dtype(dtype)?,
        )?;
        let dy = input(dtype, 9, false)?
            .flatten_all()?
            .narrow(0, 0, 54)?
            .reshape((2, 3, 3, 3))?;
        let mut grads = Vec::new();
        for fused in [true, false] {
            let y = if fused {
                bn.forward_t_relu(&x, true)?
            } else {
                relu(&bn.forward_t(&x, true)?)?
            };
            let g = (&y * &dy)?.sum_all()?.backward()?;
            let dx = g.get(&x).expect("dx").to_dtype(DType::F64)?.flatten_all()?;
            grads.push(dx.to_vec1::<f64>()?);
        }
        let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&grads[0]),
            bits(&grads[1]),
            "{dtype:?}: fused dx differs"
        );
    }
    Ok(())
}
