//! The one-process world and the tensor helpers: any shape (0 and 1 included), strided views,
//! values kept exactly; other dtypes and absent roots are errors, never panics.

use candle_core::{DType, Device, Tensor};
use candle_ddp::{all_reduce_mean, broadcast_tensors, consistent, Collective, Single};
use proptest::prelude::*;

proptest! {
    #[test]
    fn single_world_returns_the_values(dims in prop::collection::vec(0usize..5, 1..4),
                                       transpose in any::<bool>(), bucket in 1usize..256) {
        let n: usize = dims.iter().product();
        let t = Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap().reshape(dims.as_slice()).unwrap();
        let t = if transpose && dims.len() >= 2 { t.t().unwrap() } else { t };
        let m = all_reduce_mean(&Single, &[t.clone(), t.clone()], bucket).unwrap();
        let b = broadcast_tensors(&Single, std::slice::from_ref(&t), 0, bucket).unwrap();
        for r in m.iter().chain(&b) {
            prop_assert_eq!(r.dims(), t.dims());
            prop_assert_eq!(r.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                            t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
}

#[test]
fn other_dtypes_and_roots_are_errors() {
    let t = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
    let e = all_reduce_mean(&Single, std::slice::from_ref(&t), 1024)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F64") && e.contains("f32"), "{e}");
    assert!(broadcast_tensors(&Single, &[t], 0, 1024).is_err());
    let e = Single.broadcast(&mut [1.0], 1).unwrap_err().to_string();
    assert!(e.contains("root rank 1"), "{e}");
    assert!(consistent(&Single, f64::NAN).unwrap());
    assert!(all_reduce_mean(&Single, &[], 1024).unwrap().is_empty());
}
