// Host stand-ins for the Metal Shading Language built-ins used by candle-xent's Metal kernels
// (src/xent.metal), so that the kernel source compiles as C++20 and runs on the CPU, on the same
// thread machinery as the CUDA shim (emu_threads.h):
//   * every thread of a threadgroup is a fiber; threadgroups run one after the other;
//   * `threadgroup_barrier` is a barrier over the threadgroup; `simd_shuffle_xor` exchanges
//     values through a per-SIMD-group (32 lanes) buffer between two barriers;
//   * threadgroup arrays (XENT_THREADGROUP_ARRAY) are function statics of the one running
//     threadgroup; address-space qualifiers (device, constant, thread, threadgroup) vanish;
//   * `atomic_uint` is std::atomic<uint32_t>, `atomic_fetch_min_explicit` a CAS loop;
//   * `half` is GCC's _Float16, `bfloat` rounds to nearest even; Metal attributes
//     ([[buffer(n)]], ...) are ignored by the host compiler.
// What this cannot show: the Metal compiler accepting the source (no Metal toolchain on Linux),
// Apple GPU math's last ulp, SIMD-group behaviour the Metal spec leaves open, speed.
#pragma once
#define XENT_HOST_EMULATION 1

#include <cmath>
#include <math.h>

#include "emu_threads.h"

using std::exp;
using std::isfinite;
using std::log;
using std::tanh;

typedef unsigned int uint;
typedef unsigned short ushort;

struct half {
    _Float16 v;
    half() = default;
    half(float f) : v((_Float16)f) {}
    operator float() const { return (float)v; }
};

struct bfloat {
    uint16_t bits;
    bfloat() = default;
    bfloat(float f) : bits(emu::float_to_bf16(f)) {}
    operator float() const { return emu::bf16_to_float(bits); }
};

typedef std::atomic<uint32_t> atomic_uint;
constexpr auto memory_order_relaxed = std::memory_order_relaxed;

inline uint atomic_fetch_min_explicit(atomic_uint *a, uint v, std::memory_order) {
    uint old = a->load();
    while (v < old && !a->compare_exchange_weak(old, v)) {
    }
    return old;
}

enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) { emu::block_barrier(); }

template <class V> V simd_shuffle_xor(V v, ushort lane_mask) { return emu::shuffle_xor(v, (int)lane_mask); }

#define XENT_THREADGROUP_ARRAY(T, name, n) static T name[n]
#define kernel
#define device
#define constant
#define thread
#define threadgroup
