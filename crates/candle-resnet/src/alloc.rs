//! Keeping freed memory for reuse: the cheapest speed-up of a CPU training step.
//!
//! A training step allocates and frees the same large buffers every time (activations,
//! gradients, im2col matrices; tens to hundreds of MB each at 224 px). glibc's `malloc` serves
//! such blocks with `mmap` and returns them with `munmap` when freed, so every step pays for page
//! faults, for the kernel zeroing fresh pages and for TLB shootdowns across threads: measured
//! with `perf record -e cpu-clock` on a ResNet-18 step (batch 32, 224 px, 2 threads), 26 % of the
//! time was in the kernel. [`reuse_freed_memory`] tells glibc to serve every block from its heap
//! and not to give freed memory back to the system, so the second step on reuses the first
//! step's pages. It also keeps every thread on one arena: a step that runs on a rayon worker
//! ([`crate::threads::on_worker`]) would otherwise allocate in per-thread arenas, whose heaps
//! glibc creates and unmaps on its own (a 224 px step spent 16 % of its time page-faulting them
//! back: 19-22 -> 27-29 images/s with one arena, measured alternating).
//!
//! It changes the whole process's allocator, so a library does not call it for you: call it
//! once at the start of `main` (the project's `cargo xtask` commands do).

/// Makes glibc's `malloc` keep freed memory for reuse (no `mmap` for large blocks, no trimming
/// of the heap, one arena for all threads). Returns whether the setting took effect: `false` off glibc (musl, macOS,
/// Windows), where it does nothing.
///
/// Measured (`cargo xtask bench-resnet`, ResNet-18 training step, 2 threads): 224 px batch 32
/// from 9.3 to 13.3 images/s, 32 px batch 128 from 196 to 299 images/s; peak RSS 1857 -> 2065 MiB
/// and 285 -> 330 MiB.
///
/// ```
/// // At the start of main:
/// let kept = candle_resnet::alloc::reuse_freed_memory();
/// assert_eq!(kept, cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn reuse_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>: int mallopt(int param, int value).
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only sets allocator parameters; it is thread-safe in glibc and both
        // values are in their documented ranges. It returns 1 on success, 0 on error.
        unsafe {
            mallopt(M_MMAP_MAX, 0) == 1
                && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
                && mallopt(M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// This process's resident memory now and its highest so far (`VmRSS` and `VmHWM` of
/// `/proc/self/status`), in MiB; `None` where that file does not exist (not Linux). What a
/// memory figure of a training step or a soak run reads; `VmHWM` compares with PyTorch's
/// `ru_maxrss`.
///
/// ```
/// if let Some((now, peak)) = candle_resnet::alloc::resident_mib() {
///     assert!(now > 0.0 && peak >= now);
/// }
/// ```
pub fn resident_mib() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
