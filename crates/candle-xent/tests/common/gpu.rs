//! The GPU tests shared by `tests/cuda.rs` and `tests/metal.rs`: every PyTorch fixture case
//! against the fixture values and the CPU op, wide rows, K-dim, in-place gradients, errors,
//! fused linear cross-entropy and binary cross-entropy.

use crate::common::fixtures::{dtype_of, fixtures, inputs, run, tolerances};
use crate::common::precision::{assert_all_within, check_grad, check_loss, rows_of, worse};
use crate::common::{assert_close, assert_close_scaled, flat_f64};
use candle_core::{DType, Device, Tensor, Var};
use candle_xent::{CrossEntropyLoss, Reduction};
use std::collections::HashMap;

/// Every fixture case on `dev` (skipping f64 where `f64_ok` is false) against the fixture values
/// and the CPU op, in place too; optionally dumped to `XENT_CUDA_DUMP`.
pub fn fixtures_match_pytorch_and_the_cpu_op(dev: &Device, f64_ok: bool) {
    let dev = dev.clone();
    let (meta, t) = fixtures();
    let mut dump = HashMap::new();
    let mut precision = Vec::new();
    for case in &meta.cases {
        if !f64_ok && case.dtype == "f64" {
            continue;
        }
        let inp = inputs(case, &t);
        let (cpu_loss, cpu_grad) = run(&inp.loss_fn, &inp.input, &inp.target, &inp.upstream);
        let mut loss_fn = inp.loss_fn.clone();
        if case.weighted {
            let w = t[&format!("{}.weight", case.name)].to_device(&dev).unwrap();
            loss_fn = loss_fn.weight(w);
        }
        let on = |x: &Tensor| x.to_device(&dev).unwrap();
        let (loss, grad) = run(
            &loss_fn,
            &on(&inp.input),
            &on(&inp.target),
            &on(&inp.upstream),
        );
        assert!(loss.device().same_device(&dev) && grad.device().same_device(&dev));
        let (rtol, atol) = tolerances(case, &inp.input);
        let name = &case.name;
        let (l, g) = (flat_f64(&loss), flat_f64(&grad));
        if case.precision {
            // The precision set: the bound of tests/precision.rs, on the device.
            let dt = dtype_of(&case.dtype);
            let rows = rows_of(&case.reduction, &inp.input);
            let wl = check_loss(name, dt, &l, &inp.want_loss, rows, "device");
            let wg = check_grad(name, dt, &g, &inp.want_grad, "device");
            precision.push((worse(wl, wg), name.clone()));
        } else {
            assert_close(
                &l,
                &inp.want_loss,
                rtol,
                atol,
                &format!("{name} loss vs PyTorch"),
            );
            assert_close(
                &g,
                &inp.want_grad,
                rtol,
                atol,
                &format!("{name} grad vs PyTorch"),
            );
            assert_close(
                &l,
                &flat_f64(&cpu_loss),
                rtol,
                atol,
                &format!("{name} loss vs CPU"),
            );
            assert_close(
                &g,
                &flat_f64(&cpu_grad),
                rtol,
                atol,
                &format!("{name} grad vs CPU"),
            );
        }
        // In place: the same numbers, written over the logits.
        let (il, ig) = run(
            &loss_fn.clone().inplace_grad(true),
            &on(&inp.input),
            &on(&inp.target),
            &on(&inp.upstream),
        );
        // Bit for bit (NaN losses of the precision set included).
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&flat_f64(&il)), bits(&l), "{name} in-place loss");
        assert_eq!(bits(&flat_f64(&ig)), bits(&g), "{name} in-place grad");
        dump.insert(format!("{name}.loss"), loss.to_dtype(DType::F64).unwrap());
        dump.insert(format!("{name}.grad"), grad.to_dtype(DType::F64).unwrap());
    }
    assert_all_within(&mut precision, "precision set on the device");
    if let Some(path) = std::env::var_os("XENT_CUDA_DUMP") {
        let cpu: HashMap<_, _> = dump
            .into_iter()
            .map(|(k, v)| (k, v.to_device(&Device::Cpu).unwrap()))
            .collect();
        candle_core::safetensors::save(&cpu, path).unwrap();
    }
}

/// Wide rows (block-per-row kernels), every dtype and option, against the CPU op.
pub fn wide_rows_match_the_cpu_op(dev: &Device, f64_ok: bool) {
    let dev = dev.clone();
    for (rows, c) in [(7usize, 32_000usize), (3, 131_072), (33, 1000), (5, 3001)] {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            if dtype == DType::F64 && !f64_ok {
                continue;
            }
            let x = Tensor::randn(0f32, 3.0, (rows, c), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let y: Vec<i64> = (0..rows)
                .map(|r| {
                    if r % 4 == 1 {
                        -100
                    } else {
                        ((r * 7919) % c) as i64
                    }
                })
                .collect();
            let y = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
            let w = Tensor::rand(0.5f32, 1.5, c, &Device::Cpu).unwrap();
            let f = CrossEntropyLoss::new()
                .label_smoothing(0.1)
                .z_loss(1e-4)
                .softcap(30.0)
                .reduction(Reduction::None);
            for weighted in [false, true] {
                let f = if weighted {
                    f.clone().weight(w.clone())
                } else {
                    f.clone()
                };
                let fg = if weighted {
                    f.clone().weight(w.to_device(&dev).unwrap())
                } else {
                    f.clone()
                };
                let (cl, cg) = f.forward_with_grad(&x, &y).unwrap();
                let (gl, gg) = fg
                    .forward_with_grad(&x.to_device(&dev).unwrap(), &y.to_device(&dev).unwrap())
                    .unwrap();
                let (rtol, atol) = match dtype {
                    DType::F64 => (1e-12, 1e-12),
                    DType::F32 => (2e-5, 1e-6),
                    DType::F16 => (2e-3, 1e-4),
                    _ => (1e-2, 1e-3),
                };
                let what = format!("{rows}x{c} {dtype:?} weighted {weighted}");
                assert_close(
                    &flat_f64(&gl),
                    &flat_f64(&cl),
                    rtol,
                    atol,
                    &format!("{what} loss"),
                );
                assert_close(
                    &flat_f64(&gg),
                    &flat_f64(&cg),
                    rtol,
                    atol,
                    &format!("{what} grad"),
                );
            }
        }
    }
}

/// K-dim inputs with soft targets, and u8 targets with ignore_index 255.
pub fn kdim_soft_targets_and_u8_targets(dev: &Device) {
    let dev = dev.clone();
    let x = Tensor::randn(0f32, 2.0, (2, 19, 4, 5), &Device::Cpu).unwrap();
    let soft = candle_nn::ops::softmax(
        &Tensor::randn(0f32, 1.0, (2, 19, 4, 5), &Device::Cpu).unwrap(),
        1,
    )
    .unwrap();
    let f = CrossEntropyLoss::new().label_smoothing(0.2);
    let (cl, cg) = f.forward_with_grad(&x, &soft).unwrap();
    let (gl, gg) = f
        .forward_with_grad(&x.to_device(&dev).unwrap(), &soft.to_device(&dev).unwrap())
        .unwrap();
    assert_close(&flat_f64(&gl), &flat_f64(&cl), 1e-5, 1e-6, "kdim soft loss");
    assert_close(&flat_f64(&gg), &flat_f64(&cg), 1e-5, 1e-6, "kdim soft grad");
    let y = Tensor::new(&[[3u8, 255, 18], [0, 7, 255]], &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 2.0, (2, 19, 3), &Device::Cpu).unwrap();
    let f = CrossEntropyLoss::new()
        .ignore_index(255)
        .label_smoothing(0.1);
    let (cl, cg) = f.forward_with_grad(&x, &y).unwrap();
    let (gl, gg) = f
        .forward_with_grad(&x.to_device(&dev).unwrap(), &y.to_device(&dev).unwrap())
        .unwrap();
    assert_close(&flat_f64(&gl), &flat_f64(&cl), 1e-5, 1e-6, "u8 loss");
    assert_close(&flat_f64(&gg), &flat_f64(&cg), 1e-5, 1e-6, "u8 grad");
}

/// Out-of-range classes are errors naming the position; autograd into a `Var` works.
pub fn out_of_range_targets_are_errors(dev: &Device) {
    let dev = dev.clone();
    let x = Tensor::zeros((4, 10), DType::F32, &dev).unwrap();
    for (y, bad) in [
        (
            Tensor::new(&[1u32, 2, 10, 3], &dev).unwrap(),
            "class 10 at position [2]",
        ),
        (
            Tensor::new(&[1i64, -5, 11, 3], &dev).unwrap(),
            "class -5 at position [1]",
        ),
    ] {
        let err = CrossEntropyLoss::new()
            .forward(&x, &y)
            .unwrap_err()
            .to_string();
        assert!(err.contains(bad), "{err}");
    }
    let x = Tensor::zeros((2, 10, 3), DType::BF16, &dev).unwrap();
    let y = Tensor::new(&[[0i64, 1, 2], [3, 40, 5]], &dev).unwrap();
    let err = CrossEntropyLoss::new()
        .forward(&x, &y)
        .unwrap_err()
        .to_string();
    assert!(err.contains("class 40 at position [1, 1]"), "{err}");
    // Autograd into a Var on the GPU.
    let v = Var::randn(0f32, 1.0, (3, 10), &dev).unwrap();
    let y = Tensor::new(&[0u32, 9, 4], &dev).unwrap();
    let g = candle_xent::cross_entropy(&v, &y, 0.1)
        .unwrap()
        .backward()
        .unwrap();
    let row_sums = flat_f64(&g.get(&v).unwrap().sum(1).unwrap());
    assert!(row_sums.iter().all(|s| s.abs() < 1e-6), "{row_sums:?}");
}

/// Fused linear cross-entropy (through autograd and `forward_with_grad`, with a bias, several
/// chunks and every option) and binary cross-entropy on `dev`, against the same calls on the CPU.
pub fn fused_linear_and_binary_match_the_cpu(dev: &Device, f64_ok: bool) {
    use candle_xent::{BinaryCrossEntropyWithLogits, FusedLinearCrossEntropy};
    let dtypes: &[DType] = if f64_ok {
        &[DType::F32, DType::F64]
    } else {
        &[DType::F32]
    };
    let (n, h, v) = (37, 24, 301);
    let cpu = Device::Cpu;
    let on = |t: &Tensor| t.to_device(dev).unwrap();
    for &dtype in dtypes {
        let rtol = crate::common::rtol_for(dtype) * 10.0;
        let rand = |shape: &[usize], std: f64| {
            Tensor::randn(0f64, std, shape, &cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (hid, w, b) = (rand(&[n, h], 1.0), rand(&[v, h], 0.3), rand(&[v], 1.0));
        let mut ys: Vec<i64> = (0..n as i64).map(|i| (i * 53 + 7) % v as i64).collect();
        ys[5] = -100;
        ys[20] = -100;
        let y = Tensor::new(ys.as_slice(), &cpu).unwrap();
        let ce = CrossEntropyLoss::new()
            .label_smoothing(0.1)
            .z_loss(1e-3)
            .softcap(20.0);
        let fused = FusedLinearCrossEntropy::new(ce).chunk(16);

        // forward_with_grad on the device (tensor-op gradients) and on the CPU (GEMMs).
        let want = fused.forward_with_grad(&hid, &w, Some(&b), &y).unwrap();
        let got = fused
            .forward_with_grad(&on(&hid), &on(&w), Some(&on(&b)), &on(&y))
            .unwrap();
        assert!(got.grad_weight.device().same_device(dev));
        let want_gb = want.grad_bias.as_ref().unwrap();
        assert_close_scaled(&got.loss, &want.loss, rtol, "flce loss");
        assert_close_scaled(&got.grad_hidden, &want.grad_hidden, rtol, "flce d hidden");
        assert_close_scaled(&got.grad_weight, &want.grad_weight, rtol, "flce d weight");
        assert_close_scaled(
            got.grad_bias.as_ref().unwrap(),
            want_gb,
            rtol,
            "flce d bias",
        );

        // Through autograd: the loss and the gradients of all three parameters.
        let vars = [&hid, &w, &b].map(|t| Var::from_tensor(&on(t)).unwrap());
        let loss = fused
            .forward(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                Some(vars[2].as_tensor()),
                &on(&y),
            )
            .unwrap();
        assert!(loss.device().same_device(dev));
        assert_close_scaled(&loss, &want.loss, rtol, "flce autograd loss");
        let grads = loss.backward().unwrap();
        let wants = [&want.grad_hidden, &want.grad_weight, want_gb];
        for (var, w) in vars.iter().zip(wants) {
            let g = grads
                .get(var.as_tensor())
                .expect("a gradient per parameter");
            assert_close_scaled(g, w, rtol, "flce autograd gradient");
        }

        // Binary cross-entropy with smoothing and pos_weight (tensor ops on the device).
        let logits = rand(&[9, 5], 30.0);
        let targets = Tensor::rand(0f64, 1.0, (9, 5), &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let pw = Tensor::new(&[0.5f64, 1.0, 2.0, 3.0, 0.25], &cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let bce = |d: &Device| {
            let x = Var::from_tensor(&logits.to_device(d).unwrap()).unwrap();
            let l = BinaryCrossEntropyWithLogits::new()
                .label_smoothing(0.05)
                .pos_weight(pw.to_device(d).unwrap())
                .forward(x.as_tensor(), &targets.to_device(d).unwrap())
                .unwrap();
            let g = l.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            (l, g)
        };
        let ((gl, gg), (wl, wg)) = (bce(dev), bce(&cpu));
        assert!(gl.device().same_device(dev));
        assert_close_scaled(&gl, &wl, rtol, "bce loss");
        assert_close_scaled(&gg, &wg, rtol, "bce grad");
    }
}
