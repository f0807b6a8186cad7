// The thread machinery shared by the CUDA and Metal shims: every thread of a block
// (threadgroup) is an OS thread, blocks run one after the other on them, barriers are
// std::barrier, and a warp (SIMD-group) of 32 lanes exchanges values through a per-warp slot
// array between two warp barriers.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
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

namespace emu {
// Lane `lane ^ lane_mask`'s value of `v`, across the calling thread's warp.
template <class V> V shuffle_xor(V v, int lane_mask) {
    static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
    Warp &w = *block->warps[thread_idx.x / 32];
    int lane = (int)(thread_idx.x % 32);
    std::memcpy(w.slot[lane], &v, sizeof(V));
    w.bar.arrive_and_wait();
    V r;
    std::memcpy(&r, w.slot[lane ^ lane_mask], sizeof(V));
    w.bar.arrive_and_wait();
    return r;
}

inline void block_barrier() { block->bar.arrive_and_wait(); }

// bfloat16 <-> float, rounding to nearest even (NaN stays NaN).
inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (f != f) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

template <class U> U atomic_min(U *addr, U v) {
    std::atomic_ref<U> a(*addr);
    U old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}
}  // namespace emu
