//! [`Collective`] over MPI (the `mpi` crate, rsmpi): the processes `mpirun -np N` or `srun`
//! started, on one machine or many.

use crate::{check_root, Collective};
use candle_core::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use std::sync::Mutex;

/// Elements per MPI call: MPI counts are `int`, so longer buffers go in chunks.
const CHUNK: usize = 1 << 30;

/// The MPI world of this process (`MPI_COMM_WORLD`). Create it once, at the start of `main`;
/// dropping it finalises MPI.
pub struct Mpi {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    local_rank: usize,
    // Last: finalises MPI after the communicator is gone.
    _universe: Universe,
}

// SAFETY: MPI is initialised with `MPI_THREAD_SERIALIZED` (checked in `init`): any thread may
// call MPI as long as no two do at once. Every call goes through the `world` mutex, so calls are
// serialised; the communicator handle itself is a plain value MPI owns.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI for this process (once per process). Run under `mpirun`/`srun`; a
    /// program started directly is a world of one. An error when MPI is already initialised or
    /// cannot serialise calls from several threads.
    pub fn init() -> Result<Self> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            bail!("mpi: MPI is already initialised in this process (create one Mpi, at the start)");
        };
        if threading < Threading::Serialized {
            bail!(
                "mpi: the MPI library provides thread level {threading:?}; data-parallel training \
                 needs at least Serialized (MPI_THREAD_SERIALIZED)"
            );
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // The ranks that share this machine's memory, ordered by world rank.
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        Ok(Self {
            world: Mutex::new(world),
            rank,
            size,
            local_rank,
            _universe: universe,
        })
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A panic while holding the lock leaves the communicator as valid as before.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Element-wise sum over the ranks of `buf`, in `int`-sized chunks.
    fn sum_in_place<T: Equivalence + Copy>(&self, buf: &mut [T]) -> Result<()> {
        let w = self.world();
        for chunk in buf.chunks_mut(CHUNK) {
            let send = chunk.to_vec();
            w.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }

    /// Rank `root`'s `buf` into every rank's, in `int`-sized chunks.
    fn broadcast_in_place<T: Equivalence>(&self, buf: &mut [T], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let w = self.world();
        let p = w.process_at_rank(root as i32);
        for chunk in buf.chunks_mut(CHUNK) {
            p.broadcast_into(chunk);
        }
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_in_place(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_in_place(buf)
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast_in_place(buf, root)
    }

    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        self.broadcast_in_place(buf, root)
    }

    fn barrier(&self) -> Result<()> {
        self.world().barrier();
        Ok(())
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }
}
