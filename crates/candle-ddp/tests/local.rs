//! The in-process world: sums in rank order (the same on every rank), broadcasts from every
//! root, bucketed means and checksum agreement across 3 thread-ranks, the same checks the MPI
//! self-test makes across processes.

use candle_core::{DType, Device, Tensor};
use candle_ddp::{all_reduce_mean, broadcast_tensors, consistent, local::LocalWorld, Collective};

#[test]
fn three_thread_ranks_agree() {
    let ranks = LocalWorld::new(3);
    std::thread::scope(|s| {
        for r in &ranks {
            s.spawn(move || {
                let (k, w) = (r.rank(), r.world_size());
                assert_eq!(w, 3);
                let mut v: Vec<f32> = (0..1000).map(|i| ((k + 1) * i) as f32).collect();
                r.all_reduce_sum(&mut v).unwrap();
                assert!(v.iter().enumerate().all(|(i, x)| *x == (6 * i) as f32));
                let mut d = [k as f64 * 0.25];
                r.all_reduce_sum_f64(&mut d).unwrap();
                assert_eq!(d[0], 0.75);
                for root in 0..w {
                    let mut b = [k as f32, 7.0];
                    r.broadcast(&mut b, root).unwrap();
                    assert_eq!(b, [root as f32, 7.0]);
                }
                let mine = vec![
                    Tensor::full(k as f32, (2, 3), &Device::Cpu).unwrap(),
                    Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap(),
                    Tensor::full(10.0 + k as f32, 4, &Device::Cpu).unwrap(),
                ];
                for bucket in [4usize, 1 << 20] {
                    let m = all_reduce_mean(r, &mine, bucket).unwrap();
                    assert_eq!(m[0].to_vec2::<f32>().unwrap(), vec![vec![1.0; 3]; 2]);
                    assert_eq!(m[1].dims(), &[0]);
                    assert_eq!(m[2].to_vec1::<f32>().unwrap(), vec![11.0; 4]);
                }
                let b = broadcast_tensors(r, &mine[..1], 2, 1 << 20).unwrap();
                assert_eq!(b[0].to_vec2::<f32>().unwrap(), vec![vec![2.0; 3]; 2]);
                assert!(consistent(r, 3.5).unwrap());
                assert!(!consistent(r, k as f64).unwrap());
                r.barrier().unwrap();
            });
        }
    });
}
