// The thread machinery shared by the CUDA and Metal shims. Every thread of a block
// (threadgroup) is a fiber on the calling OS thread; blocks run one after the other.
// A thread runs until it reaches a barrier, then the scheduler resumes the next thread; a
// barrier opens when all of its participants have arrived. A warp (SIMD-group) of 32 lanes
// exchanges values through a per-warp slot array between two warp barriers.
//
// Why fibers and not OS threads: a kernel's threads meet at a barrier every few dozen
// instructions, and with 256 OS threads per block on a few cores every meeting was a round of
// futex wake-ups and context switches through the kernel; fibers switch in user space.
//
// Interleaving: the threads of a block run in turns, in ascending thread order in one round and
// descending in the next. A kernel that reads shared memory another thread writes in the same
// barrier interval (a missing __syncthreads) sees the value neither written (one direction) nor
// already written (the other) in some round, so the tests see the race. What fibers cannot show
// is a race *within* an interval on real parallel hardware that both orders happen to hide;
// that is the GPU check's job.
//
// A deadlock (a thread that returned while its block waits in __syncthreads, a lane that
// skipped a shuffle its warp-mates made) ends the process with a message naming the block,
// instead of hanging: the scheduler sees a whole round in which nobody arrived anywhere.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Scheduler;
inline thread_local Scheduler *sched = nullptr;

// A barrier of `n` participants. `gen` counts the times it opened.
struct Barrier {
    int n, arrived = 0;
    uint64_t gen = 0;
    explicit Barrier(int participants) : n(participants) {}
    void arrive_and_wait();
};
struct Warp {
    Barrier bar;
    alignas(8) unsigned char slot[32][8];
    explicit Warp(int lanes) : bar(lanes) {}
};
struct Block {
    Barrier bar;
    std::vector<std::unique_ptr<Warp>> warps;
    explicit Block(int threads) : bar(threads) {
        for (int w = 0; w * 32 < threads; ++w) {
            int lanes = threads - w * 32 < 32 ? threads - w * 32 : 32;
            warps.emplace_back(new Warp(lanes));
        }
    }
};
inline dim3 thread_idx, block_idx, block_dim, grid_dim;
inline Block *block = nullptr;
inline std::mutex one_launch;

// Stack of each fiber: the kernels keep a few small arrays of accumulators; 256 KiB is ample
// and only the touched pages are ever backed by memory.
constexpr size_t STACK = 256 * 1024;

// Switching between fibers. On x86-64 a dozen instructions that save the callee-saved
// registers on the old stack and restore them from the new one (glibc's swapcontext also saves
// the signal mask with a system call, which made it 80 % of the emulation's time). Elsewhere
// ucontext. Neither saves MXCSR or the x87 control word: the kernels never change them.
#if defined(__x86_64__) && defined(__linux__)
#define EMU_ASM_SWITCH 1
extern "C" void emu_fiber_switch(void **save_sp, void *to_sp);
// Defined in fiber_switch.cpp.

struct Context {
    void *sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Scheduler {
    Context main_ctx;
    std::vector<Context> ctx;
    std::vector<char> done;
    std::vector<void *> stacks;
    unsigned current = 0;
    uint64_t arrivals = 0;  // every arrival at any barrier, and every thread's return
    const std::function<void()> *kernel = nullptr;

    explicit Scheduler(unsigned threads) : ctx(threads), done(threads, 0), stacks(threads) {
        for (auto &s : stacks) {
            s = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (s == MAP_FAILED) {
                std::fprintf(stderr, "xent-kernel-emu: cannot map a fiber stack\n");
                std::abort();
            }
        }
    }
    ~Scheduler() {
        for (void *s : stacks) munmap(s, STACK);
    }

    static void switch_to(Context &save, Context &to) {
#ifdef EMU_ASM_SWITCH
        emu_fiber_switch(&save.sp, to.sp);
#else
        swapcontext(&save.uc, &to.uc);
#endif
    }

    // The calling fiber gives the turn back to the scheduler.
    void yield() { switch_to(ctx[current], main_ctx); }

    // A fiber's whole life: the kernel, then back to the scheduler for good.
    static void entry() {
        Scheduler &s = *sched;
        (*s.kernel)();
        s.done[s.current] = 1;
        s.arrivals++;
        switch_to(s.ctx[s.current], s.main_ctx);
        std::abort();  // a finished fiber is never resumed
    }

    // Makes thread `t`'s fiber start `entry` on its own stack at the next switch to it.
    void start(unsigned t) {
#ifdef EMU_ASM_SWITCH
        // The stack as emu_fiber_switch leaves it: six saved registers, then the address `ret`
        // jumps to (entry), then entry's never-used return address; 16-byte aligned at the call
        // boundary as the ABI wants.
        auto top = reinterpret_cast<uintptr_t>(stacks[t]) + STACK;
        auto *sp = reinterpret_cast<void **>(top & ~uintptr_t(15));
        *--sp = nullptr;
        *--sp = reinterpret_cast<void *>(&entry);
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        ctx[t].sp = sp;
#else
        getcontext(&ctx[t].uc);
        ctx[t].uc.uc_stack.ss_sp = stacks[t];
        ctx[t].uc.uc_stack.ss_size = STACK;
        ctx[t].uc.uc_link = nullptr;
        makecontext(&ctx[t].uc, entry, 0);
#endif
        done[t] = 0;
    }

    // Runs one block to completion.
    void run_block(unsigned b, unsigned grid) {
        unsigned n = (unsigned)ctx.size();
        for (unsigned t = 0; t < n; ++t) start(t);
        unsigned live = n;
        for (uint64_t round = 0; live > 0; ++round) {
            uint64_t before = arrivals;
            for (unsigned k = 0; k < n; ++k) {
                unsigned t = round % 2 == 0 ? k : n - 1 - k;
                if (done[t]) continue;
                current = t;
                thread_idx.x = t;
                block_idx.x = b;
                block_dim.x = n;
                grid_dim.x = grid;
                switch_to(main_ctx, ctx[t]);
                if (done[t]) live--;
            }
            if (live > 0 && arrivals == before) {
                std::fprintf(stderr,
                             "xent-kernel-emu: deadlock in block %u of %u: %u of %u threads wait at "
                             "a barrier that the others never reach (a thread returned early or "
                             "skipped a __syncthreads / shuffle)\n",
                             b, grid, live, n);
                std::abort();
            }
        }
    }
};

inline void Barrier::arrive_and_wait() {
    uint64_t g = gen;
    sched->arrivals++;
    if (++arrived == n) {
        arrived = 0;
        gen++;
    }
    // Even the thread that opens the barrier waits for its next turn: every thread then leaves
    // the barrier in the round's order, so each of the two orders is really tried.
    do {
        sched->yield();
    } while (gen == g);
}

// Runs `kernel()` for every thread of every block of a 1-D launch, block after block, each
// thread on its own fiber.
template <class F> void launch(unsigned grid, unsigned threads, F kernel) {
    // `__shared__` statics and the globals above are process-wide: one launch at a time,
    // whatever the callers' threads (one mutex for every kernel, not a static of this template).
    std::lock_guard<std::mutex> hold(one_launch);
    std::function<void()> k = kernel;
    Scheduler s(threads);
    s.kernel = &k;
    sched = &s;
    for (unsigned b = 0; b < grid; ++b) {
        Block blk((int)threads);
        block = &blk;
        s.run_block(b, grid);
    }
    block = nullptr;
    sched = nullptr;
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
