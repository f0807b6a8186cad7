//! NCCL collectives on the GPUs of this machine (feature `nccl`; run on a CUDA machine, e.g. by
//! the GPU check bundle): one rank bootstrapped over `Single`, and, where there are two or more
//! GPUs, two ranks as threads of this process (`LocalWorld` carrying NCCL's id), each on its
//! own GPU. Sums and broadcasts are compared with values computed here on the host.

use candle_core::{DType, Device, Tensor};
use candle_ddp::{local::LocalWorld, nccl::Nccl, Collective, Single};
use std::sync::Arc;

fn gpus() -> usize {
    (0..8).take_while(|&i| Device::new_cuda(i).is_ok()).count()
}

#[test]
fn one_rank_sums_and_broadcasts_are_identities_on_the_device() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let nccl = Nccl::over(Arc::new(Single), &dev).unwrap();
    assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));
    let t = Tensor::arange(0f32, 1000., &dev)
        .unwrap()
        .reshape((10, 100))
        .unwrap();
    let s = nccl.all_reduce_sum_tensor(&t).unwrap();
    assert!(s.device().same_device(&dev));
    assert_eq!(s.dims(), t.dims());
    assert_eq!(s.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    let b = nccl.broadcast_tensor(&t, 0).unwrap();
    assert_eq!(b.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    let mut host = [1.5f64, -2.0];
    nccl.all_reduce_sum_f64(&mut host).unwrap();
    assert_eq!(host, [1.5, -2.0]);
    nccl.barrier().unwrap();
    // Strided views travel as their values.
    let tt = t.t().unwrap();
    let s = nccl.all_reduce_sum_tensor(&tt).unwrap();
    assert_eq!(s.to_vec2::<f32>().unwrap(), tt.to_vec2::<f32>().unwrap());
    // A CPU tensor or an integer one is an error, not undefined behaviour.
    let cpu = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(nccl.all_reduce_sum_tensor(&cpu).is_err());
    let ints = Tensor::zeros(4, DType::U32, &dev).unwrap();
    assert!(nccl.all_reduce_sum_tensor(&ints).is_err());
    assert!(nccl.broadcast_tensor(&t, 1).is_err());
    // Bucketed means over the world of one give the tensors back.
    let m =
        candle_ddp::all_reduce_mean(&nccl, &[t.clone(), t.sum_keepdim(1).unwrap()], 256).unwrap();
    assert_eq!(m[0].to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
}

#[test]
fn two_ranks_on_two_gpus_sum_exactly() {
    if gpus() < 2 {
        eprintln!("one GPU here: the two-rank case needs two (checked: 1-rank only)");
        return;
    }
    let ranks = LocalWorld::new(2);
    let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                s.spawn(move || {
                    let rank = r.rank();
                    let dev = Device::new_cuda(rank).unwrap();
                    let nccl = Nccl::over(Arc::new(r), &dev).unwrap();
                    let t =
                        (Tensor::arange(0f32, 64., &dev).unwrap() * (rank as f64 + 1.0)).unwrap();
                    let sum = nccl.all_reduce_sum_tensor(&t).unwrap();
                    let from1 = nccl.broadcast_tensor(&t, 1).unwrap();
                    (
                        sum.to_vec1::<f32>().unwrap(),
                        from1.to_vec1::<f32>().unwrap(),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let want_sum: Vec<f32> = (0..64).map(|i| 3.0 * i as f32).collect();
    let want_b: Vec<f32> = (0..64).map(|i| 2.0 * i as f32).collect();
    for (sum, b) in out {
        assert_eq!(sum, want_sum);
        assert_eq!(b, want_b);
    }
}
