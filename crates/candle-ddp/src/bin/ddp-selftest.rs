//! Checks the MPI collectives across the ranks `mpirun` started: exact sums (integer-valued
//! `f32`/`f64`, so the order of the additions cannot matter), broadcasts from every root,
//! bucketed means of tensors smaller and larger than a bucket (and empty), broadcast tensors
//! and the checksum agreement. Each rank prints `ddp-selftest: rank R of W: ok` or what failed
//! (exit 1).
//!
//! ```text
//! mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/ddp-selftest
//! mpirun ... -np 2 target/debug/ddp-selftest --die-rank 1   # rank 1 exits 3 before the first collective
//! ```

use candle_core::{Device, Tensor};
use candle_ddp::{all_reduce_mean, broadcast_tensors, consistent, mpi::Mpi, Collective};

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

fn run(c: &Mpi) -> Result<(), Box<dyn std::error::Error>> {
    let (r, w) = (c.rank(), c.world_size());
    let tri = (w * (w + 1) / 2) as f32;
    for n in [0usize, 1, 1000, 3_000_001] {
        let mut v: Vec<f32> = (0..n).map(|i| ((r + 1) * (i % 1024)) as f32).collect();
        c.all_reduce_sum(&mut v)?;
        check(
            v.iter()
                .enumerate()
                .all(|(i, x)| *x == tri * (i % 1024) as f32),
            &format!("all_reduce_sum of {n} values"),
        )?;
        let mut d: Vec<f64> = (0..n.min(5000))
            .map(|i| (r * 1_000_000 + i) as f64)
            .collect();
        c.all_reduce_sum_f64(&mut d)?;
        let base = (w * (w - 1) / 2 * 1_000_000) as f64;
        check(
            d.iter()
                .enumerate()
                .all(|(i, x)| *x == base + (w * i) as f64),
            "all_reduce_sum_f64",
        )?;
    }
    for root in 0..w {
        let mut v: Vec<f32> = (0..777).map(|i| (r * 1000 + i) as f32).collect();
        c.broadcast(&mut v, root)?;
        check(
            v.iter()
                .enumerate()
                .all(|(i, x)| *x == (root * 1000 + i) as f32),
            &format!("broadcast from {root}"),
        )?;
        let mut d = [r as f64 + 0.5];
        c.broadcast_f64(&mut d, root)?;
        check(d[0] == root as f64 + 0.5, "broadcast_f64")?;
    }
    check(
        c.broadcast(&mut [0f32], w).is_err(),
        "a root outside the world is an error",
    )?;
    // Bucketed means: each rank's tensors are base + rank, so the mean is base + (w - 1) / 2.
    let dev = Device::Cpu;
    let shapes: [&[usize]; 5] = [&[0], &[1], &[3, 4], &[2_600_000, 4], &[5]];
    let mine: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| {
            Tensor::ones(*s, candle_core::DType::F32, &dev)?.affine(1.0, (k * 10 + r) as f64)
        })
        .collect::<candle_core::Result<_>>()?;
    let half = (w - 1) as f32 / 2.0;
    for bucket in [64usize, candle_ddp::DEFAULT_BUCKET_BYTES] {
        let m = all_reduce_mean(c, &mine, bucket)?;
        for (k, t) in m.iter().enumerate() {
            check(t.dims() == shapes[k], "mean keeps shapes")?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            check(
                v.iter().all(|x| *x == (1 + k * 10) as f32 + half),
                &format!("mean of tensor {k} with buckets of {bucket} bytes"),
            )?;
        }
    }
    // A transposed (strided) view travels in its logical order.
    let strided = Tensor::arange(0f32, 12.0, &dev)?
        .reshape((3, 4))?
        .affine(1.0, r as f64)?
        .t()?;
    let b = broadcast_tensors(c, std::slice::from_ref(&strided), 0, 1 << 20)?;
    let want = Tensor::arange(0f32, 12.0, &dev)?.reshape((3, 4))?.t()?;
    check(
        b[0].to_vec2::<f32>()? == want.to_vec2::<f32>()?,
        "broadcast of a strided tensor",
    )?;
    check(consistent(c, 42.0)?, "equal checksums agree")?;
    check(
        w == 1 || !consistent(c, r as f64)?,
        "different checksums disagree",
    )?;
    c.barrier()?;
    Ok(())
}

fn main() {
    let die: Option<usize> = std::env::args()
        .skip_while(|a| a != "--die-rank")
        .nth(1)
        .and_then(|v| v.parse().ok());
    let c = match Mpi::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ddp-selftest: {e}");
            std::process::exit(2);
        }
    };
    if die == Some(c.rank()) {
        eprintln!("ddp-selftest: rank {} exits on request", c.rank());
        std::process::exit(3);
    }
    match run(&c) {
        Ok(()) => println!("ddp-selftest: rank {} of {}: ok", c.rank(), c.world_size()),
        Err(e) => {
            println!(
                "ddp-selftest: rank {} of {}: FAILED: {e}",
                c.rank(),
                c.world_size()
            );
            std::process::exit(1);
        }
    }
}
