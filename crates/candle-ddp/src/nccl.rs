//! Collectives over NCCL, one rank per CUDA device (feature `nccl`).
//!
//! NCCL needs every rank to hold the same 128-byte unique id before the communicator exists;
//! [`Nccl::over`] takes it from rank 0 through another [`Collective`] (MPI, as nccl-tests
//! bootstraps), so `mpirun -np N` (or `srun`) starts N processes, each with its GPU, and MPI
//! carries nothing afterwards. The communicator runs on the candle device's own stream, so its
//! collectives are ordered with the kernels before and after them without extra
//! synchronisation.
//!
//! Tensor collectives ([`Collective::all_reduce_sum_tensor`],
//! [`Collective::broadcast_tensor`]) stay on the device; the slice ones copy through host
//! memory (they carry a few metric counts per step).

use crate::Collective;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// A rank of an NCCL world: its communicator and its CUDA device.
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// # #[cfg(feature = "mpi")] {
/// use candle_ddp::Collective;
/// let mpi = std::sync::Arc::new(candle_ddp::mpi::Mpi::init()?);
/// let device = candle_core::Device::new_cuda(mpi.local_rank())?;
/// let nccl = candle_ddp::nccl::Nccl::over(mpi, &device)?;
/// let g = candle_core::Tensor::ones(4, candle_core::DType::F32, &device)?;
/// let sum = nccl.all_reduce_sum_tensor(&g)?; // every element = world size
/// # }
/// # Ok(()) }
/// ```
pub struct Nccl {
    comm: Mutex<Comm>,
    device: CudaDevice,
    rank: usize,
    world: usize,
    /// The world that carried the id (kept: dropping an MPI world finalises MPI). Last, so
    /// that the communicator goes first.
    bootstrap: Arc<dyn Collective>,
}

// SAFETY: `Comm` holds NCCL's communicator handle (a raw pointer), which is why it is neither
// `Send` nor `Sync`. NCCL allows a communicator to be used from any host thread as long as no
// two calls on it run at the same time; every use here goes through the mutex, so moving the
// value to another thread or sharing it between threads cannot make two calls overlap.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::msg(format!("nccl: {what} failed: {e:?}"))
}

impl Nccl {
    /// Creates this rank's communicator on `device` (a CUDA device; one per rank), the ranks
    /// and world size being `bootstrap`'s: rank 0 draws NCCL's unique id and `bootstrap`
    /// broadcasts it. Every rank of `bootstrap` must call it. The bootstrap world is kept (and
    /// answers [`Collective::local_rank`]) as long as this one lives.
    ///
    /// # Errors
    /// `device` is not a CUDA device, or NCCL fails to create the communicator (a missing
    /// `libnccl`, ranks on the same GPU, an unreachable peer).
    pub fn over(bootstrap: Arc<dyn Collective>, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("nccl: each rank needs a CUDA device, got {device:?}")
        };
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        // The id's bytes travel as f64 values (exact for bytes) over the bootstrap's broadcast.
        let mut bytes = [0f64; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            for (b, &c) in bytes.iter_mut().zip(id.internal().iter()) {
                *b = c as i64 as f64;
            }
        }
        bootstrap.broadcast_f64(&mut bytes, 0)?;
        let id = Id::uninit(std::array::from_fn(|i| bytes[i] as i64 as _));
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id)
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        Ok(Self {
            comm: Mutex::new(comm),
            device: dev.clone(),
            rank,
            world,
            bootstrap,
        })
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on a device copy of `buf` and copies the result back.
    fn through_device<T>(
        &self,
        buf: &mut [T],
        op: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<()>
    where
        T: candle_core::WithDType,
    {
        if buf.is_empty() {
            return Ok(());
        }
        let t = Tensor::from_slice(buf, buf.len(), &Device::Cuda(self.device.clone()))?;
        let out = op(&t)?.to_vec1::<T>()?;
        buf.copy_from_slice(&out);
        Ok(())
    }
}

/// The NCCL collective a [`Device`] op runs: sum over the ranks, or rank `root`'s values.
enum Kind {
    Sum,
    Broadcast(usize),
}

/// A collective as a custom op on a CUDA tensor: the result is a new device buffer.
struct DeviceCollective<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl DeviceCollective<'_> {
    fn run<T>(&self, s: &CudaStorage, l: &Layout) -> Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        let Some((a, b)) = l.contiguous_offsets() else {
            bail!("nccl: collectives take contiguous tensors")
        };
        let src = s.as_cuda_slice::<T>()?.slice(a..b);
        let dev = s.device.clone();
        let mut dst = dev.alloc_zeros::<T>(b - a)?;
        match self.kind {
            Kind::Sum => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Kind::Broadcast(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32),
        }
        .map_err(|e| nccl_err("collective", e))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for DeviceCollective<'_> {
    fn name(&self) -> &'static str {
        "candle-ddp-nccl"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("nccl: the tensor is on the CPU; NCCL collectives take CUDA tensors")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = match s.dtype() {
            DType::F32 => self.run::<f32>(s, l)?,
            DType::F64 => self.run::<f64>(s, l)?,
            dt => bail!("nccl: collectives take f32 or f64 tensors, got {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Nccl {
    fn device_op(&self, t: &Tensor, kind: Kind) -> Result<Tensor> {
        use candle_core::backend::BackendDevice;
        if !matches!(t.device(), Device::Cuda(d) if d.same_device(&self.device)) {
            bail!(
                "nccl: rank {} communicates on its own CUDA device, the tensor is on {:?}",
                self.rank,
                t.device()
            );
        }
        let comm = self.comm();
        t.contiguous()?
            .apply_op1_no_bwd(&DeviceCollective { comm: &comm, kind })
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.through_device(buf, |t| self.device_op(t, Kind::Sum))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.through_device(buf, |t| self.device_op(t, Kind::Sum))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        crate::check_root(root, self.world)?;
        self.through_device(buf, |t| self.device_op(t, Kind::Broadcast(root)))
    }
    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        crate::check_root(root, self.world)?;
        self.through_device(buf, |t| self.device_op(t, Kind::Broadcast(root)))
    }
    fn local_rank(&self) -> usize {
        self.bootstrap.local_rank()
    }
    fn device(&self) -> Option<Device> {
        Some(Device::Cuda(self.device.clone()))
    }
    fn barrier(&self) -> Result<()> {
        // A one-element sum returns on each rank only once every rank has entered it.
        self.all_reduce_sum(&mut [0f32]).map(|_| ())
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if t.elem_count() == 0 {
            return Ok(t.clone());
        }
        self.device_op(t, Kind::Sum)
    }
    fn broadcast_tensor(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        crate::check_root(root, self.world)?;
        if t.elem_count() == 0 {
            return Ok(t.clone());
        }
        self.device_op(t, Kind::Broadcast(root))
    }
}
