//! Large output buffers on huge pages.
//!
//! A gradient of the logits is as large as the logits (500 MiB at 4096 x 32000 f32). Allocated
//! fresh, its pages arrive one 4 KiB page fault at a time as the kernel writes them: 128,000
//! faults, each a trip through the kernel that zeroes a page, which cost about as much as
//! computing the gradient (`perf record -e cpu-clock`: the page-fault path was the largest
//! single entry of a fused forward + backward). Asking for transparent huge pages on the
//! untouched buffer turns them into 250 faults of 2 MiB. The advice only concerns memory this
//! crate allocates and hands to candle; the process's allocator is not reconfigured.

use candle_core::{DType, Device, Result, Tensor};
use std::cell::RefCell;

/// Buffers below this size keep the allocator's pages: the advice would cost more than it saves.
/// It is also the size from which a thread keeps its gradient buffer between backward passes.
const ADVISE_FROM_BYTES: usize = 8 << 20;

thread_local! {
    /// The large logits gradient this thread last handed to candle's autograd, kept for the
    /// next backward pass (see [`reused_for_autograd`]).
    static GRAD_SLOT: RefCell<Option<Tensor>> = const { RefCell::new(None) };
}

/// A gradient for autograd, shaped and typed like `like` (CPU), written by `fill` (which must
/// write every element: the buffer may hold the previous step's gradient).
///
/// Why: candle's backward adds the gradient an op returns into a fresh zeroed tensor and then
/// drops it, so a new logits-sized buffer per step costs its page faults twice over (ours, then
/// the sum's). From [`ADVISE_FROM_BYTES`] on, the thread keeps the buffer and writes the next
/// step's gradient over it: the pages stay mapped. Safe because candle 0.11 reads the returned
/// gradient only inside that sum, synchronously on this thread, before the backward pass moves
/// to the next node (`Op::CustomOp2` in candle-core's `backprop.rs`); the crate's test
/// `autograd_gradients_stay_intact_across_steps` fails if a candle release starts handing it
/// out. [`crate::free_grad_buffer`] releases it.
pub(crate) fn reused_for_autograd(
    like: &Tensor,
    fill: impl FnOnce(&Tensor) -> Result<()>,
) -> Result<Tensor> {
    let (n, dtype) = (like.elem_count(), like.dtype());
    if n * dtype.size_in_bytes() < ADVISE_FROM_BYTES {
        let buf = fresh(n, dtype)?.reshape(like.shape())?;
        fill(&buf)?;
        return Ok(buf);
    }
    let held = GRAD_SLOT.with(|s| s.borrow_mut().take());
    let buf = match held {
        Some(t) if t.dtype() == dtype && t.elem_count() >= n && t.elem_count() / 2 <= n => t,
        _ => fresh(n, dtype)?,
    };
    let view = buf.narrow(0, 0, n)?.reshape(like.shape())?;
    let filled = fill(&view);
    GRAD_SLOT.with(|s| *s.borrow_mut() = Some(buf));
    filled.map(|()| view)
}

/// Frees the logits-gradient buffer the calling thread keeps between backward passes.
///
/// On the CPU, a backward pass through [`crate::CrossEntropyLoss`] whose logits take 8 MiB or
/// more writes their gradient into a buffer the thread keeps for the next step (same or up to
/// twice the size, same dtype), instead of a fresh allocation whose page faults cost as much as
/// the kernel itself. The buffer stays allocated after training; call this to return it.
///
/// ```
/// candle_xent::free_grad_buffer(); // harmless when there is none
/// ```
pub fn free_grad_buffer() {
    GRAD_SLOT.with(|s| s.borrow_mut().take());
}

/// A zeroed, flat CPU tensor of `n` elements (huge pages requested when large).
fn fresh(n: usize, dtype: DType) -> Result<Tensor> {
    let cpu = &Device::Cpu;
    match dtype {
        DType::F32 => Tensor::from_vec(zeroed::<f32>(n), n, cpu),
        DType::F64 => Tensor::from_vec(zeroed::<f64>(n), n, cpu),
        DType::F16 => Tensor::from_vec(zeroed::<half::f16>(n), n, cpu),
        DType::BF16 => Tensor::from_vec(zeroed::<half::bf16>(n), n, cpu),
        other => candle_core::bail!("cross_entropy: no gradient buffer for dtype {other:?}"),
    }
}

/// `n` elements whose all-zero bit pattern is the value zero (the float types), zeroed, with
/// transparent huge pages requested for large buffers (Linux; a no-op elsewhere and where the
/// system disables them).
pub(crate) fn zeroed<T: crate::math::Elem>(n: usize) -> Vec<T> {
    let layout = match std::alloc::Layout::array::<T>(n) {
        Ok(l) if l.size() > 0 => l,
        _ => return Vec::new(),
    };
    // SAFETY: `layout` has a non-zero size; `alloc_zeroed` returns memory of that layout (or
    // null, handled); every `Elem` (f16, bf16, f32, f64) is valid as all-zero bits, so
    // the `n` elements are initialised; the Vec takes the allocation with the very layout
    // (capacity n, align of T) the global allocator gave, so it frees it correctly.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout);
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        advise_huge_pages(ptr, layout.size());
        Vec::from_raw_parts(ptr.cast::<T>(), n, n)
    }
}

/// Requests transparent huge pages for the 2 MiB-aligned part of `[ptr, ptr + len)`. Advice
/// only: failure (an old kernel, THP disabled) changes nothing but speed.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        if len < ADVISE_FROM_BYTES {
            return;
        }
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: i32 = 14;
        extern "C" {
            fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
        }
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside the allocation just made; MADV_HUGEPAGE changes
            // no contents, only how future faults in the range are served.
            unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len, ADVISE_FROM_BYTES);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_are_zero_at_every_size() {
        for n in [0usize, 1, 7, 1 << 10, (ADVISE_FROM_BYTES / 4) + 3] {
            let v = zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "n = {n}");
            let h = zeroed::<half::bf16>(n);
            assert!(h.iter().all(|&x| x.to_bits() == 0), "bf16 n = {n}");
        }
    }
}
