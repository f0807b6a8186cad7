// Host stand-ins for the CUDA built-ins used by candle-xent's kernels (src/xent.cu), so that the
// kernel source compiles as ordinary C++ and runs on the CPU (emu_threads.h):
//   * every thread of a block is a fiber; blocks run one after the other;
//   * `__syncthreads()` is a barrier over the block's threads, left in ascending thread order in
//     one round and descending in the next, so a missing barrier shows as a wrong result;
//   * `__shfl_xor_sync` exchanges values through a per-warp buffer between two warp barriers,
//     so a lane that skipped a shuffle its warp-mates made ends the test with a deadlock
//     message, not a pass;
//   * `__shared__` variables are function statics: one block runs at a time, so a static is
//     exactly that block's shared memory;
//   * `atomicMin` is a compare-and-swap loop on std::atomic_ref;
//   * `__half` is GCC's _Float16 (round to nearest even, like __float2half_rn) and
//     `__nv_bfloat16` rounds to nearest even by hand.
// What this cannot show: warp-synchronous behaviour the CUDA memory model does not promise,
// device math's last-ulp differences (expf, logf, tanhf are the host libm's here), performance,
// and PTX/driver issues. Those need a GPU (`cargo xtask gpu-check`).
#pragma once
#define XENT_HOST_EMULATION 1

#include <cmath>
#include <math.h>

#include "emu_threads.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;

struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier(); }

template <class V> V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    return emu::shuffle_xor(v, lane_mask);
}

inline unsigned long long atomicMin(unsigned long long *addr, unsigned long long v) {
    return emu::atomic_min(addr, v);
}

struct __half {
    _Float16 v;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_to_float(b.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{emu::float_to_bf16(f)}; }
