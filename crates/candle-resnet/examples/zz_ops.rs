use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::time::Instant;
fn t<F: FnMut() -> anyhow::Result<()>>(name: &str, mut f: F) -> anyhow::Result<()> {
    let mut b = f64::MAX;
    for _ in 0..7 {
        let t0 = Instant::now();
        f()?;
        b = b.min(t0.elapsed().as_secs_f64());
    }
    println!("{name}: {:.2} ms", b * 1e3);
    Ok(())
}
fn main() -> anyhow::Result<()> {
    candle_resnet::alloc::reuse_freed_memory();
    candle_resnet::threads::quiet_candle_pool();
    let dev = Device::Cpu;
    for (c, h) in [(64usize, 16usize), (64, 8), (512, 1)] {
        let vm = VarMap::new();
        let bn =
            candle_resnet::BatchNorm2d::new(c, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (128, c, h, h), &dev)?)?;
        let r = Tensor::randn(0f32, 1., (128, c, h, h), &dev)?;
        t(&format!("bn-relu fwd {c}x{h}"), || {
            bn.forward_t_relu(&x, true)?;
            Ok(())
        })?;
        t(&format!("bn-relu fwd+bwd {c}x{h}"), || {
            let y = bn.forward_t_relu(&x, true)?;
            (y * &r)?.sum_all()?.backward()?;
            Ok(())
        })?;
        t(&format!("bn fwd+bwd {c}x{h}"), || {
            let y = bn.forward_t(&x, true)?;
            (y * &r)?.sum_all()?.backward()?;
            Ok(())
        })?;
        t(&format!("harness {c}x{h}"), || {
            let y = x.as_tensor().clone();
            (y * &r)?.sum_all()?.backward()?;
            Ok(())
        })?;
    }
    Ok(())
}
