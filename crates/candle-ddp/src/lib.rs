//! Collectives for data-parallel training with Candle.
//!
//! [`Collective`] is what a data-parallel trainer needs of its processes: who am I (`rank`), how
//! many are we (`world_size`), sum a buffer over all of us, copy one rank's buffer to all, wait
//! for all. [`Single`] is the one-process world (no dependency, no communication);
//! [`local::LocalWorld`] makes ranks of threads in one process (for tests and simulations); with
//! the `mpi` feature `mpi::Mpi` runs them over the system's MPI library, the engine `mpirun`
//! and `srun` launch.
//!
//! On top of the trait, [`all_reduce_mean`] averages gradient tensors in buckets of about
//! [`DEFAULT_BUCKET_BYTES`] (one collective per bucket rather than per tensor, as PyTorch DDP),
//! [`broadcast_tensors`] gives every rank one rank's values (the parameters at the start of a
//! run) and [`consistent`] checks that every rank holds the same checksum.

use candle_core::{bail, DType, Result, Tensor};

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// Bytes of `f32` gradient packed into one all-reduce: PyTorch DDP's default bucket (25 MiB).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// The collectives of a group of processes, each process one rank.
///
/// Every rank must call the same collectives in the same order with buffers of the same length;
/// a collective returns when every rank has made it.
pub trait Collective: Send + Sync {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over the ranks, in place: every rank ends with the same sums.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::all_reduce_sum`] in `f64` (metric counts and sums, exactly).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Copies rank `root`'s buffer into every rank's.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// [`Collective::broadcast`] of `f64` values.
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// This rank's index among the ranks on its machine: which GPU it drives. The default,
    /// [`Collective::rank`], holds for worlds on one machine.
    fn local_rank(&self) -> usize {
        self.rank()
    }

    /// The device this world's collectives run on, where it is bound to one (an NCCL rank's
    /// GPU): a trainer must then put its tensors there. `None`: any device (host memory).
    fn device(&self) -> Option<candle_core::Device> {
        None
    }

    /// [`Collective::all_reduce_sum`] of an `f32` tensor, returned as a new tensor of the same
    /// shape on the same device. The default copies through host memory; a device engine
    /// (NCCL) reduces on the device.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut buf = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut buf)?;
        Tensor::from_vec(buf, t.shape(), t.device())
    }

    /// [`Collective::broadcast`] of an `f32` tensor: rank `root`'s values, as a new tensor of
    /// the same shape on the same device.
    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut buf = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.broadcast(&mut buf, root)?;
        Tensor::from_vec(buf, t.shape(), t.device())
    }
}

impl std::fmt::Debug for dyn Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank(), self.world_size())
    }
}

/// The world of one process: rank 0 of 1; sums and broadcasts leave buffers as they are.
///
/// ```
/// use candle_ddp::{Collective, Single};
/// let mut v = [1f32, 2.0];
/// Single.all_reduce_sum(&mut v).unwrap();
/// assert_eq!((Single.rank(), Single.world_size(), v), (0, 1, [1.0, 2.0]));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn broadcast_f64(&self, _buf: &mut [f64], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// An error unless `root` is a rank of a world of `world` ranks.
pub fn check_root(root: usize, world: usize) -> Result<()> {
    if root >= world {
        bail!("collective: root rank {root} does not exist in a world of {world} ranks");
    }
    Ok(())
}

/// Consecutive runs of `tensors` (by index) whose `f32` sizes fit `bucket_bytes` together; a
/// tensor larger than a bucket is a bucket of its own.
fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let cap = (bucket_bytes / 4).max(1);
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0usize);
    for (i, t) in tensors.iter().enumerate() {
        let n = t.elem_count();
        if size > 0 && size + n > cap {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

fn check_f32(tensors: &[Tensor], what: &str) -> Result<()> {
    for (i, t) in tensors.iter().enumerate() {
        if t.dtype() != DType::F32 {
            bail!(
                "{what}: tensor {i} is {:?}; gradients and parameters travel as f32",
                t.dtype()
            );
        }
    }
    Ok(())
}

/// `tensors` flattened into one `f32` tensor (on the first one's device).
fn pack(tensors: &[Tensor]) -> Result<Tensor> {
    let flat = tensors
        .iter()
        .map(|t| t.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// Splits the flat `buf` back into tensors of the shapes of `like`.
fn unpack(buf: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let v = buf.narrow(0, at, n)?.reshape(t.shape());
            at += n;
            v
        })
        .collect()
}

/// The mean over the ranks of each tensor (each rank passes its own values of the same
/// shapes, in the same order): packed into buckets of about `bucket_bytes`, one
/// [`Collective::all_reduce_sum`] per bucket, divided by the world size. `f32` tensors only;
/// results keep each tensor's shape and device. In a world of one the tensors come back as they
/// are.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let g = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
/// let m = candle_ddp::all_reduce_mean(&candle_ddp::Single, &[g], 1 << 20).unwrap();
/// assert_eq!(m[0].to_vec2::<f32>().unwrap(), [[1., 2.], [3., 4.]]);
/// ```
pub fn all_reduce_mean(
    c: &dyn Collective,
    tensors: &[Tensor],
    bucket_bytes: usize,
) -> Result<Vec<Tensor>> {
    check_f32(tensors, "all_reduce_mean")?;
    let world = c.world_size();
    if world == 1 {
        return Ok(tensors.to_vec());
    }
    let inv = 1.0 / world as f64;
    let mut out = Vec::with_capacity(tensors.len());
    for r in buckets(tensors, bucket_bytes) {
        let part = &tensors[r];
        let sum = c.all_reduce_sum_tensor(&pack(part)?)?;
        out.extend(unpack(&(sum * inv)?, part)?);
    }
    Ok(out)
}

/// Rank `root`'s values of `tensors` on every rank (same shapes and order on every rank), in
/// buckets of about `bucket_bytes`: how a data-parallel run starts every rank from the same
/// parameters and buffers.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let p = Tensor::new(&[5f32], &Device::Cpu).unwrap();
/// let b = candle_ddp::broadcast_tensors(&candle_ddp::Single, &[p], 0, 1 << 20).unwrap();
/// assert_eq!(b[0].to_vec1::<f32>().unwrap(), [5.0]);
/// assert!(candle_ddp::broadcast_tensors(&candle_ddp::Single, &[], 1, 1 << 20).is_err());
/// ```
pub fn broadcast_tensors(
    c: &dyn Collective,
    tensors: &[Tensor],
    root: usize,
    bucket_bytes: usize,
) -> Result<Vec<Tensor>> {
    check_root(root, c.world_size())?;
    check_f32(tensors, "broadcast_tensors")?;
    if c.world_size() == 1 {
        return Ok(tensors.to_vec());
    }
    let mut out = Vec::with_capacity(tensors.len());
    for r in buckets(tensors, bucket_bytes) {
        let part = &tensors[r];
        let buf = c.broadcast_tensor(&pack(part)?, root)?;
        out.extend(unpack(&buf, part)?);
    }
    Ok(out)
}

/// Whether every rank passed the same `checksum` (compared with rank 0's, bit for bit); every
/// rank gets the same answer.
///
/// ```
/// assert!(candle_ddp::consistent(&candle_ddp::Single, 1.25).unwrap());
/// ```
pub fn consistent(c: &dyn Collective, checksum: f64) -> Result<bool> {
    let mut root = [checksum];
    c.broadcast_f64(&mut root, 0)?;
    let mut differs = [(root[0].to_bits() != checksum.to_bits()) as u8 as f64];
    c.all_reduce_sum_f64(&mut differs)?;
    Ok(differs[0] == 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn buckets_pack_consecutive_tensors_up_to_the_size() {
        let t = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let ts = [t(3), t(3), t(10), t(0), t(1), t(2)];
        // 16 bytes = 4 floats per bucket.
        assert_eq!(buckets(&ts, 16), vec![0..1, 1..2, 2..3, 3..6]);
        assert_eq!(buckets(&ts, 1 << 20), vec![0..6]);
        assert!(buckets(&[], 16).is_empty());
    }
}
