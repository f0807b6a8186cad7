// Host stand-ins for the CUDA built-ins used by candle-xent's kernels (src/xent.cu), so that the
// kernel source compiles as ordinary C++ and runs on the CPU with real concurrency:
//   * every thread of a block is an OS thread; blocks run one after the other on them;
//   * `__syncthreads()` is a barrier over the block's threads;
//   * `__shfl_xor_sync` exchanges values through a per-warp buffer between two warp barriers,
//     so a lane that skipped a shuffle its warp-mates made would deadlock the test, not pass it;
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

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    uint32_t x, y, z, w;
};

namespace emu {
struct Warp {
    std::barrier<> bar;
    alignas(8) unsigned char slot[32][8];
    explicit Warp(int lanes) : bar(lanes) {}
};
struct Block {
    std::barrier<> bar;
    std::vector<std::unique_ptr<Warp>> warps;
    explicit Block(int threads) : bar(threads) {
        for (int w = 0; w * 32 < threads; ++w) {
            int lanes = threads - w * 32 < 32 ? threads - w * 32 : 32;
            warps.emplace_back(new Warp(lanes));
        }
    }
};
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;
inline thread_local Block *block = nullptr;
inline std::mutex one_launch;

// Runs `kernel()` for every thread of every block of a 1-D launch. One OS thread per thread of
// the block, reused for each block in turn; a separate barrier ends each block, so a thread that
// left the kernel early while its block still waits in __syncthreads deadlocks here as it would
// misbehave on a GPU.
template <class F> void launch(unsigned grid, unsigned threads, F kernel) {
    // `__shared__` statics are process-wide: one launch at a time, whatever the callers' threads
    // (one mutex for every kernel, not a static of this template).
    std::lock_guard<std::mutex> hold(one_launch);
    Block blk((int)threads);
    std::barrier<> block_done((std::ptrdiff_t)threads);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        ts.emplace_back([&, t] {
            for (unsigned b = 0; b < grid; ++b) {
                thread_idx.x = t;
                block_idx.x = b;
                block_dim.x = threads;
                grid_dim.x = grid;
                block = &blk;
                kernel();
                block_done.arrive_and_wait();
            }
        });
    }
    for (auto &t : ts) t.join();
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

template <class V> V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
    emu::Warp &w = *emu::block->warps[threadIdx.x / 32];
    int lane = (int)(threadIdx.x % 32);
    std::memcpy(w.slot[lane], &v, sizeof(V));
    w.bar.arrive_and_wait();
    V r;
    std::memcpy(&r, w.slot[lane ^ lane_mask], sizeof(V));
    w.bar.arrive_and_wait();
    return r;
}

inline unsigned long long atomicMin(unsigned long long *addr, unsigned long long v) {
    std::atomic_ref<unsigned long long> a(*addr);
    unsigned long long old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

struct __half {
    _Float16 v;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
