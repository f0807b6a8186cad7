//! [`Collective`] between threads of one process: `LocalWorld::new(n)` gives `n` ranks to move
//! into `n` threads. It runs data-parallel code (and its tests) without MPI: the sums are taken
//! in rank order, so every rank gets the same, deterministic result. A rank that never reaches
//! a collective leaves the others waiting: for tests and simulations, not for production.
//!
//! Ranks that share one rayon pool can deadlock when a collective runs inside parallel work
//! (a synchronised batch norm's, in a step run on a worker): the blocked worker may steal the
//! other rank's step and wait on itself. Run each rank's thread on a pool of its own
//! (`rayon::ThreadPoolBuilder::new().build()?.install(...)`), as separate processes would be.

use crate::{check_root, Collective};
use candle_core::{bail, Result};
use std::sync::{Arc, Barrier, Mutex};

enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// The element types the collectives carry, and their slot in a [`Payload`].
trait Value: Copy + Default + std::ops::AddAssign {
    fn wrap(v: Vec<Self>) -> Payload;
    fn unwrap(p: &Payload) -> Option<&[Self]>;
}

impl Value for f32 {
    fn wrap(v: Vec<Self>) -> Payload {
        Payload::F32(v)
    }
    fn unwrap(p: &Payload) -> Option<&[Self]> {
        match p {
            Payload::F32(v) => Some(v),
            Payload::F64(_) => None,
        }
    }
}

impl Value for f64 {
    fn wrap(v: Vec<Self>) -> Payload {
        Payload::F64(v)
    }
    fn unwrap(p: &Payload) -> Option<&[Self]> {
        match p {
            Payload::F64(v) => Some(v),
            Payload::F32(_) => None,
        }
    }
}

struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Option<Payload>>>,
}

/// One rank of a [`LocalWorld`].
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

/// Makes the ranks of an in-process world.
pub struct LocalWorld;

impl LocalWorld {
    /// `size` ranks (0..size), to be used from `size` threads at once.
    ///
    /// ```
    /// use candle_ddp::{local::LocalWorld, Collective};
    /// let ranks = LocalWorld::new(3);
    /// let sums: Vec<f32> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = ranks.iter().map(|r| s.spawn(move || {
    ///         let mut v = [r.rank() as f32 + 1.0];
    ///         r.all_reduce_sum(&mut v).unwrap();
    ///         v[0]
    ///     })).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(sums, [6.0, 6.0, 6.0]);
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            size: size.max(1),
            barrier: Barrier::new(size.max(1)),
            slots: Mutex::new((0..size.max(1)).map(|_| None).collect()),
        });
        (0..size.max(1))
            .map(|rank| LocalRank {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl LocalRank {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<Payload>>> {
        self.shared.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every rank deposits `mine`; after the barrier `read` sees all deposits; after a second
    /// barrier the slots are free for the next collective.
    fn exchange<T>(&self, mine: Payload, read: impl FnOnce(&[Option<Payload>]) -> T) -> T {
        self.slots()[self.rank] = Some(mine);
        self.shared.barrier.wait();
        let out = read(&self.slots());
        self.shared.barrier.wait();
        out
    }
}

impl LocalRank {
    /// Element-wise sum of every rank's `buf`, added in rank order.
    fn sum_in_place<T: Value>(&self, buf: &mut [T], what: &str) -> Result<()> {
        let n = buf.len();
        let sum = self.exchange(T::wrap(buf.to_vec()), |slots| {
            let mut acc = vec![T::default(); n];
            for s in slots {
                match s.as_ref().and_then(T::unwrap) {
                    Some(v) if v.len() == n => acc.iter_mut().zip(v).for_each(|(a, b)| *a += *b),
                    _ => return Err(len_error(what)),
                }
            }
            Ok(acc)
        })?;
        buf.copy_from_slice(&sum);
        Ok(())
    }

    /// Rank `root`'s `buf` into this rank's.
    fn broadcast_in_place<T: Value>(&self, buf: &mut [T], root: usize, what: &str) -> Result<()> {
        check_root(root, self.shared.size)?;
        let v = self.exchange(T::wrap(buf.to_vec()), |slots| {
            match slots[root].as_ref().and_then(T::unwrap) {
                Some(v) => Ok(v.to_vec()),
                None => Err(len_error(what)),
            }
        })?;
        if v.len() != buf.len() {
            bail!(
                "{what}: rank {root} sent {} values, this rank expects {}",
                v.len(),
                buf.len()
            );
        }
        buf.copy_from_slice(&v);
        Ok(())
    }
}

fn len_error(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{what}: the ranks passed buffers of different lengths or types"
    ))
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_in_place(buf, "all_reduce_sum")
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_in_place(buf, "all_reduce_sum_f64")
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast_in_place(buf, root, "broadcast")
    }

    fn broadcast_f64(&self, buf: &mut [f64], root: usize) -> Result<()> {
        self.broadcast_in_place(buf, root, "broadcast_f64")
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}
