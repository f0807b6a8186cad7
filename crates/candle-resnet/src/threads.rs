//! Keeping candle's element-wise thread pool from spinning against the other workers.
//!
//! candle 0.11 runs large element-wise ops (the additions of its gradient accumulation, the
//! optimizer's updates) on a pool of its own, pinned, whose workers spin 25,000 times after
//! every op before they sleep. On a machine with few cores that spinning takes the cores from
//! rayon's workers, which run this crate's kernels (batch norm, max-pool, the convolutions)
//! right after: `perf record -e cpu-clock` put 15-18 % of a 32 px ResNet-18 step (2 threads) in
//! that loop. candle reads the spin count from `CANDLE_BARRIER_POOL_SPIN_LIMIT` once, when its
//! pool starts (its first large element-wise op), so [`quiet_candle_pool`] sets it first.
//!
//! It changes a process-wide setting, so a library does not call it for you: call it once at
//! the start of `main`, before any candle op (the project's `cargo xtask` commands do).

/// The spin count [`quiet_candle_pool`] sets: about as long as the fastest element-wise op
/// takes, so a worker still catches back-to-back ops without waking up.
pub const CANDLE_SPIN_LIMIT: u32 = 200;

/// Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`CANDLE_SPIN_LIMIT`] unless the environment already
/// sets it; returns the value in effect. Call it at the start of `main`, before other threads
/// start and before any candle op.
///
/// Measured (`cargo xtask bench-resnet`, ResNet-18 step, 2 threads, alternating runs):
/// 32 px batch 128 from 589-619 to 611-652 images/s with the im2col path, and from 760-830 to
/// 770-865 with the `onednn` feature.
///
/// ```
/// let limit = candle_resnet::threads::quiet_candle_pool();
/// assert_eq!(std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").unwrap(), limit.to_string());
/// ```
///
/// Changing the environment races with any other thread reading it (undefined behaviour in the
/// C library; `std::env::set_var` is `unsafe` from Rust 2024 on). This function confines that:
/// where the process's threads can be counted (Linux, `/proc/self/task`) and another thread
/// already exists, it leaves the environment alone and returns candle's own default; elsewhere
/// the rule above (call it before any other thread starts) is the caller's to keep.
pub fn quiet_candle_pool() -> u32 {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if let Some(v) = std::env::var(VAR).ok().and_then(|v| v.trim().parse().ok()) {
        return v;
    }
    if other_threads_exist() {
        return CANDLE_DEFAULT_SPIN_LIMIT;
    }
    // The only thread of the process: nothing can read the environment meanwhile.
    std::env::set_var(VAR, CANDLE_SPIN_LIMIT.to_string());
    CANDLE_SPIN_LIMIT
}

/// candle's spin count when `CANDLE_BARRIER_POOL_SPIN_LIMIT` is not set (candle-core 0.11).
const CANDLE_DEFAULT_SPIN_LIMIT: u32 = 25_000;

/// Whether this process is known to run another thread besides the caller (Linux; `false`
/// where the threads cannot be counted).
fn other_threads_exist() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() > 1)
}

/// Runs `f` on one of rayon's worker threads (the current one if it is a worker) and returns
/// its result.
///
/// The kernels of this crate split their work with rayon. Called from a thread outside the pool
/// (`main`), every parallel loop hands its work to the pool and puts the caller to sleep until
/// it is done, two context switches per loop, hundreds per training step; on a worker the loop
/// runs in place and the caller takes its share of the work. Run a training step (or the
/// whole loop) through it.
///
/// ```
/// let on_a_worker = candle_resnet::threads::on_worker(|| rayon::current_thread_index().is_some());
/// assert!(on_a_worker);
/// ```
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope runs its closure before returning")
}

/// [`on_worker`] when `device` is the CPU; on a GPU, `f` runs on this thread, which holds the
/// device's context.
///
/// ```
/// let dev = candle_core::Device::Cpu;
/// assert!(candle_resnet::threads::on_cpu_worker(&dev, || rayon::current_thread_index().is_some()));
/// ```
pub fn on_cpu_worker<R: Send>(device: &candle_core::Device, f: impl FnOnce() -> R + Send) -> R {
    if device.is_cpu() {
        on_worker(f)
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn with_other_threads_the_environment_is_left_alone() {
        // The test harness runs this on a thread of its own beside main: not alone.
        assert!(other_threads_exist());
        let var = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
        match std::env::var(var) {
            // Set from outside: reported as it is.
            Ok(v) => assert_eq!(quiet_candle_pool().to_string(), v.trim()),
            Err(_) => {
                assert_eq!(quiet_candle_pool(), CANDLE_DEFAULT_SPIN_LIMIT);
                assert!(std::env::var(var).is_err(), "the environment was changed");
            }
        }
    }
}
