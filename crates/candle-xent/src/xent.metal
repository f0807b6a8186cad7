// Metal kernels of candle-xent's fused cross-entropy op (`src/op.rs`): the algorithm of
// `src/xent.cu`, in the Metal Shading Language.
//
// Compiled two ways from this one file:
//   * by Metal at run time (`new_library_with_source`; precise:: math) when the `metal` feature
//     is on, once per device, pipelines cached;
//   * as host C++ with a shim for the Metal built-ins (`crates/xent-kernel-emu/emu/metal_shim.h`)
//     by the `xent-kernel-emu` test crate, which runs every thread of every threadgroup and
//     compares the results with the CPU op and the PyTorch fixtures.
//
// Same layout, launch geometry (`candle_xent::launch`) and formulas as the CUDA kernels:
//   * rows kernels (inner == 1): `group` threads per row, one SIMD-group (32 lanes, several rows
//     per threadgroup, simd_shuffle_xor reductions) or the whole threadgroup (shuffles, then
//     threadgroup memory);
//   * strided kernels (inner > 1): one thread per row.
// Differences from CUDA: no f64 on Metal GPUs (f32, f16 and, with Metal 3.1, bf16 logits, all
// with f32 accumulation); parameters are f32/i64 (`XentParamsMetal`); the out-of-range flag is a
// 32-bit atomic (rows < 2^32); loads are scalar (consecutive lanes read consecutive elements).

#ifndef XENT_HOST_EMULATION
#include <metal_stdlib>
using namespace metal;
#define XENT_HOST_NAME(n) [[host_name(n)]]
#define XENT_THREADGROUP_ARRAY(T, name, n) threadgroup T name[n]
// Precise math whatever the library's fast-math setting (the CPU op's accuracy).
#define XENT_EXP precise::exp
#define XENT_LOG precise::log
#define XENT_TANH precise::tanh
#define XENT_FMA fma
#define XENT_DIV precise::divide
#else
#define XENT_EXP exp
#define XENT_LOG log
#define XENT_TANH tanh
#define XENT_FMA fmaf
#define XENT_DIV(a, b) ((a) / (b))
#endif

#define XENT_SIMD 32
#define XENT_MAX_SIMDGROUPS 32
// Values per row of the stats (`candle_xent::launch::STATS`).
#define XENT_STATS 4

// Mirrors `candle_xent::launch::XentParamsMetal`: seven 8-byte integers, then five floats (the
// derived ones computed on the host in f64 and rounded once, as the CPU op does).
struct XentParamsMetal {
    long outer;
    long classes;
    long inner;
    long ignore_index;
    long group;  // threads per row in the rows kernels: 32 or the threadgroup size
    long weighted;
    long soft;
    float smoothing;
    float eps_over_c;  // smoothing / classes
    float z_loss;
    float softcap;     // 0: off
    float weight_sum;  // sum of the class weights (classes when unweighted)
    float one_minus_eps;  // 1 - smoothing, formed in f64 on the host
};

// Every sum is relative to the shift: the running max, or 0 while every logit is -inf (the
// CUDA kernels' scheme: terms of one sign, nothing cancels at any logit scale).
struct Sums {
    float max, sum_exp;  // running max and sum exp(x - shift)
    float wx;            // sum_c w_c (x_c - shift) (<= 0)
    float wtx, wt;       // soft targets: sum_c w_c t_c (x_c - shift) (<= 0), sum_c w_c t_c
    float wn;            // sum_c w_c over the elements seen (their count when unweighted)
    // Kahan compensations of a thread's own sums (rounded - exact), folded into the sums by
    // fold_comp before the threads' sums are merged.
    float c_se, c_wx, c_wtx, c_wt;
};

inline Sums sums_zero() {
    Sums s;
    s.max = -INFINITY;
    s.sum_exp = 0.0f;
    s.wx = 0.0f;
    s.wtx = 0.0f;
    s.wt = 0.0f;
    s.wn = 0.0f;
    s.c_se = s.c_wx = s.c_wtx = s.c_wt = 0.0f;
    return s;
}

// sum += v with Kahan's compensation c; an infinite or NaN sum drops it (inf - inf is NaN).
inline void kahan_add(thread float &sum, thread float &c, float v) {
    float y = v - c;
    float t = sum + y;
    float nc = (t - sum) - y;
    c = (t - t == 0.0f) ? nc : 0.0f;
    sum = t;
}

inline void fold_comp(thread Sums &s) {
    if (s.sum_exp - s.sum_exp == 0.0f) s.sum_exp -= s.c_se;
    if (s.wx - s.wx == 0.0f) s.wx -= s.c_wx;
    if (s.wtx - s.wtx == 0.0f) s.wtx -= s.c_wtx;
    if (s.wt - s.wt == 0.0f) s.wt -= s.c_wt;
    s.c_se = s.c_wx = s.c_wtx = s.c_wt = 0.0f;
}

inline float shift_of(float max) { return max == -INFINITY ? 0.0f : max; }

// Moves `s` to a larger max `hi`: sum_exp scales by exp(max - hi), the linear sums gain
// (shift_old - shift_new) * (their weight sums).
inline void reshift(thread Sums &s, float hi) {
    if (!(hi > s.max)) return;
    float e = (s.max == -INFINITY) ? 0.0f : XENT_EXP(s.max - hi);
    float delta = shift_of(s.max) - shift_of(hi);
    s.sum_exp *= e;
    s.c_se *= e;
    if (s.wn != 0.0f) s.wx += s.wn * delta;
    if (s.wt != 0.0f) s.wtx += s.wt * delta;
    s.max = hi;
}

// The kernels set each thread's max first, so the shift does not move while a thread adds its
// elements and their sums are compensated (the CUDA kernels' scheme). `zero_t_is_zero`
// (smoothing on): a zero soft target adds 0 even on a -inf logit (PyTorch: inf).
inline void add_elem(thread Sums &s, float v, float wc, float tc, bool soft, bool zero_t_is_zero) {
    reshift(s, v);
    float d = v - shift_of(s.max);
    kahan_add(s.sum_exp, s.c_se, XENT_EXP(d));
    float wd = wc * d;
    kahan_add(s.wx, s.c_wx, wd);
    s.wn += wc;
    if (soft) {
        float wtd = (zero_t_is_zero && tc == 0.0f) ? 0.0f : wd * tc;
        kahan_add(s.wtx, s.c_wtx, wtd);
        kahan_add(s.wt, s.c_wt, wc * tc);
    }
}

inline void merge_sums(thread Sums &a, Sums b) {
    float hi = b.max > a.max ? b.max : a.max;
    reshift(a, hi);
    reshift(b, hi);
    a.sum_exp += b.sum_exp;
    a.wx += b.wx;
    a.wtx += b.wtx;
    a.wt += b.wt;
    a.wn += b.wn;
}

// Butterfly over the SIMD-group: every lane ends with the total.
inline void simd_reduce(thread Sums &s) {
    fold_comp(s);
    for (ushort off = XENT_SIMD / 2; off > 0; off /= 2) {
        Sums o;
        o.max = simd_shuffle_xor(s.max, off);
        o.sum_exp = simd_shuffle_xor(s.sum_exp, off);
        o.wx = simd_shuffle_xor(s.wx, off);
        o.wtx = simd_shuffle_xor(s.wtx, off);
        o.wt = simd_shuffle_xor(s.wt, off);
        o.wn = simd_shuffle_xor(s.wn, off);
        o.c_se = o.c_wx = o.c_wtx = o.c_wt = 0.0f;  // folded before any exchange
        merge_sums(s, o);
    }
}

// Whole-threadgroup reduction through `part` (threadgroup memory of XENT_MAX_SIMDGROUPS
// entries); the total is valid in thread 0. Every thread of the threadgroup must call it.
inline void group_reduce(thread Sums &s, threadgroup Sums *part, uint tid, uint tg_size) {
    simd_reduce(s);
    uint sg = tid / XENT_SIMD, lane = tid % XENT_SIMD;
    uint groups = tg_size / XENT_SIMD;
    if (lane == 0) part[sg] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        s = lane < groups ? part[lane] : sums_zero();
        simd_reduce(s);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

struct Cap {
    float cap;
    bool on;
};

inline Cap make_cap(constant XentParamsMetal &p) {
    Cap c;
    c.on = p.softcap > 0.0f;
    c.cap = c.on ? p.softcap : 1.0f;
    return c;
}

inline float capped(Cap c, float v) { return c.on ? c.cap * XENT_TANH(XENT_DIV(v, c.cap)) : v; }

// d/dx of the cap, sech^2(x / cap) = 4e / (1 + e)^2 with e = exp(-2 |x / cap|), x / cap carried
// as the quotient plus its exact remainder (the CPU and CUDA formula).
inline float cap_deriv(Cap c, float v) {
    float q = XENT_DIV(v, c.cap);
    float lo = XENT_DIV(XENT_FMA(-q, c.cap, v), c.cap);
    // No remainder where it is not finite: |x| = inf, or |x / cap| past the float range (the
    // capped logit is flat there, its derivative 0); a NaN x stays NaN through q.
    if (!(lo - lo == 0.0f)) lo = 0.0f;
    float aq = q < 0.0f ? -q : q;
    float slo = q < 0.0f ? -lo : lo;
    float e = XENT_EXP(-2.0f * aq) * (1.0f - 2.0f * slo);
    float s = 1.0f + e;
    return 4.0f * e / (s * s);
}

// Writes [loss, shift, log_sum, target_weight]; every term a sum of non-negative parts.
inline void finish_row(constant XentParamsMetal &p, Sums s, bool has_y, float wy, float xy,
                       device float *out) {
    float m = shift_of(s.max);
    float ls = XENT_LOG(s.sum_exp);
    // Terms whose factor is exactly 0 (eps = 0, or 1 - eps = 0) are left out (PyTorch's formula
    // does not have them; 0 * inf would be NaN).
    float one_m = p.one_minus_eps;
    float eoc = p.eps_over_c;
    bool smooth = p.smoothing != 0.0f;
    float lse = m + ls;
    float z = p.z_loss * lse * lse;
    out[1] = m;
    out[2] = ls;
    if (p.soft == 0) {
        if (!has_y) {
            out[0] = 0.0f;
            out[3] = 0.0f;
            return;
        }
        float loss = one_m * (wy * ((m - xy) + ls));
        if (smooth) loss += eoc * (ls * p.weight_sum - s.wx);
        if (p.z_loss != 0.0f) loss += z;
        out[0] = loss;
        out[3] = wy;
    } else {
        float wq = one_m * s.wt;
        float wqx = one_m != 0.0f ? one_m * s.wtx : 0.0f;
        if (smooth) {
            wq += eoc * p.weight_sum;
            wqx += eoc * s.wx;
        }
        float loss = ls * wq - wqx;
        if (p.z_loss != 0.0f) loss += z;
        out[0] = loss;
        out[3] = wq;
    }
}

struct GradCoef {
    float shift, log_sum, alpha, beta, gamma, fix;
    long y;
    bool zero;
};

inline GradCoef grad_coef(constant XentParamsMetal &p, device const float *st, long y, bool has_y) {
    GradCoef k;
    float tw = st[2], g = st[3];
    float lse = st[0] + st[1];
    float one_m = p.one_minus_eps;
    float eoc = p.eps_over_c;
    float z_term = p.z_loss != 0.0f ? 2.0f * p.z_loss * lse : 0.0f;
    float smooth_w = p.smoothing != 0.0f ? eoc * p.weight_sum : 0.0f;
    k.shift = st[0];
    k.log_sum = st[1];
    k.zero = false;
    k.y = -1;
    k.fix = 0.0f;
    if (p.soft == 0) {
        if (!has_y) {
            k.zero = true;
            k.alpha = k.beta = k.gamma = 0.0f;
            return k;
        }
        k.alpha = g * (one_m * tw + smooth_w + z_term);
        k.beta = g * eoc;
        k.gamma = 0.0f;
        k.y = y;
        k.fix = g * one_m * tw;
    } else {
        k.alpha = g * (tw + z_term);
        k.beta = g * eoc;
        k.gamma = g * one_m;
    }
    return k;
}

// The gradient of element c from its raw logit `xv` (capped here when the cap is on).
inline float grad_elem(GradCoef k, Cap cap, long c, float xv, float wc, float tc) {
    float xc = capped(cap, xv);
    float g = k.alpha * XENT_EXP((xc - k.shift) - k.log_sum) - k.beta * wc;
    g = g - k.gamma * wc * tc;
    if (c == k.y) g = g - k.fix;
    if (cap.on) g *= cap_deriv(cap, xv);
    return g;
}

// Reads the class of row r. Returns true for a class to score; `valid` is false (and the row
// recorded in `bad`) for an out-of-range class.
template <typename Y>
inline bool read_target(device const Y *y, long r, constant XentParamsMetal &p,
                        device atomic_uint *bad, thread long &cls, thread bool &valid) {
    cls = long(y[r]);
    if (cls == p.ignore_index) {
        valid = true;
        return false;
    }
    valid = cls >= 0 && cls < p.classes;
    if (!valid) atomic_fetch_min_explicit(bad, uint(r), memory_order_relaxed);
    return valid;
}

// Writes row r's [loss, shift, log_sum, target_weight] from its sums: soft targets, an ignored
// class, an out-of-range class (recorded in `bad`, NaN stats) or a class whose logit is
// xr[cls * stride].
template <typename T, typename Y>
inline void write_stats(constant XentParamsMetal &p, Sums s, long r, device const Y *y,
                        device const float *w, device const T *xr, long stride, Cap cap,
                        device float *stats, device atomic_uint *bad) {
    device float *out = stats + r * XENT_STATS;
    if (p.soft != 0) {
        finish_row(p, s, true, 1.0f, 0.0f, out);
        return;
    }
    long cls;
    bool valid;
    if (!read_target(y, r, p, bad, cls, valid)) {
        if (valid) {
            finish_row(p, s, false, 0.0f, 0.0f, out);
        } else {
            out[0] = out[1] = out[2] = NAN;
            out[3] = 0.0f;
        }
        return;
    }
    float wy = p.weighted != 0 ? w[cls] : 1.0f;
    finish_row(p, s, true, wy, capped(cap, float(xr[cls * stride])), out);
}

// ---------------------------------------------------------------------------------------------
// Rows kernels (inner == 1).

template <typename T, typename Y>
kernel void xent_fwd(device const T *x [[buffer(0)]], device const Y *y [[buffer(1)]],
                     device const T *soft [[buffer(2)]], device const float *w [[buffer(3)]],
                     constant XentParamsMetal &p [[buffer(4)]], device float *stats [[buffer(5)]],
                     device atomic_uint *bad [[buffer(6)]],
                     uint tid [[thread_position_in_threadgroup]],
                     uint tg [[threadgroup_position_in_grid]],
                     uint tg_size [[threads_per_threadgroup]]) {
    XENT_THREADGROUP_ARRAY(Sums, part, XENT_MAX_SIMDGROUPS);
    const uint group = uint(p.group);
    const long rows = p.outer * p.inner;
    const long r = long(tg) * long(tg_size / group) + long(tid / group);
    const uint lane = tid % group;
    // Rows past the end only exist with a SIMD-group per row, which then leaves as a whole.
    if (r >= rows) return;
    const long C = p.classes;
    device const T *xr = x + r * C;
    const Cap cap = make_cap(p);
    const bool weighted = p.weighted != 0, is_soft = p.soft != 0;
    Sums s = sums_zero();
    // First this thread's max over its elements, then its sums relative to it (no rescaling).
    for (long c = lane; c < C; c += group) {
        float xv = capped(cap, float(xr[c]));
        if (xv > s.max) s.max = xv;
    }
    const bool zt = p.smoothing != 0.0f;
    for (long c = lane; c < C; c += group) {
        float wc = weighted ? w[c] : 1.0f;
        float tc = is_soft ? float(soft[r * C + c]) : 0.0f;
        add_elem(s, capped(cap, float(xr[c])), wc, tc, is_soft, zt);
    }
    if (group == XENT_SIMD) {
        simd_reduce(s);
    } else {
        group_reduce(s, part, tid, tg_size);
    }
    if (lane != 0) return;
    write_stats(p, s, r, y, w, xr, 1, cap, stats, bad);
}

// `x` and `out` may be the same buffer (in-place gradient): each element is read and then
// written by the same thread.
template <typename T, typename Y>
kernel void xent_bwd(device const T *x [[buffer(0)]], device const Y *y [[buffer(1)]],
                     device const T *soft [[buffer(2)]], device const float *w [[buffer(3)]],
                     constant XentParamsMetal &p [[buffer(4)]],
                     device const float *stats [[buffer(5)]], device atomic_uint *bad [[buffer(6)]],
                     device T *out [[buffer(7)]], uint tid [[thread_position_in_threadgroup]],
                     uint tg [[threadgroup_position_in_grid]],
                     uint tg_size [[threads_per_threadgroup]]) {
    const uint group = uint(p.group);
    const long rows = p.outer * p.inner;
    const long r = long(tg) * long(tg_size / group) + long(tid / group);
    const uint lane = tid % group;
    if (r >= rows) return;
    const long C = p.classes;
    const bool is_soft = p.soft != 0;
    // Class-index targets without smoothing use only the target's weight (a coefficient): a NaN
    // weight of a class no row targets stays out of the gradient, as in PyTorch.
    const bool grad_w = p.weighted != 0 && (is_soft || p.smoothing != 0.0f);
    long cls = -1;
    bool has_y = true, valid = true;
    if (!is_soft) has_y = read_target(y, r, p, bad, cls, valid);
    const GradCoef k = grad_coef(p, stats + r * XENT_STATS, cls, has_y);
    const Cap cap = make_cap(p);
    for (long c = lane; c < C; c += group) {
        long i = r * C + c;
        float g;
        if (k.zero) {
            g = valid ? 0.0f : NAN;
        } else {
            float wc = grad_w ? w[c] : 1.0f;
            float tc = is_soft ? float(soft[i]) : 0.0f;
            g = grad_elem(k, cap, c, float(x[i]), wc, tc);
        }
        out[i] = T(g);
    }
}

// ---------------------------------------------------------------------------------------------
// Strided kernels (inner > 1): one thread per row (n, d), element c at n * C * inner + c * inner + d.

template <typename T, typename Y>
kernel void xent_fwd_strided(device const T *x [[buffer(0)]], device const Y *y [[buffer(1)]],
                             device const T *soft [[buffer(2)]], device const float *w [[buffer(3)]],
                             constant XentParamsMetal &p [[buffer(4)]],
                             device float *stats [[buffer(5)]], device atomic_uint *bad [[buffer(6)]],
                             uint tid [[thread_position_in_threadgroup]],
                             uint tg [[threadgroup_position_in_grid]],
                             uint tg_size [[threads_per_threadgroup]]) {
    const long rows = p.outer * p.inner;
    const long r = long(tg) * long(tg_size) + long(tid);
    if (r >= rows) return;
    const long C = p.classes, inner = p.inner;
    const long base = (r / inner) * C * inner + r % inner;
    const Cap cap = make_cap(p);
    const bool weighted = p.weighted != 0, is_soft = p.soft != 0;
    Sums s = sums_zero();
    for (long c = 0; c < C; ++c) {
        float xv = capped(cap, float(x[base + c * inner]));
        if (xv > s.max) s.max = xv;
    }
    const bool zt = p.smoothing != 0.0f;
    for (long c = 0; c < C; ++c) {
        float wc = weighted ? w[c] : 1.0f;
        float tc = is_soft ? float(soft[base + c * inner]) : 0.0f;
        add_elem(s, capped(cap, float(x[base + c * inner])), wc, tc, is_soft, zt);
    }
    fold_comp(s);
    write_stats(p, s, r, y, w, x + base, inner, cap, stats, bad);
}

template <typename T, typename Y>
kernel void xent_bwd_strided(device const T *x [[buffer(0)]], device const Y *y [[buffer(1)]],
                             device const T *soft [[buffer(2)]], device const float *w [[buffer(3)]],
                             constant XentParamsMetal &p [[buffer(4)]],
                             device const float *stats [[buffer(5)]],
                             device atomic_uint *bad [[buffer(6)]], device T *out [[buffer(7)]],
                             uint tid [[thread_position_in_threadgroup]],
                             uint tg [[threadgroup_position_in_grid]],
                             uint tg_size [[threads_per_threadgroup]]) {
    const long rows = p.outer * p.inner;
    const long r = long(tg) * long(tg_size) + long(tid);
    if (r >= rows) return;
    const long C = p.classes, inner = p.inner;
    const long base = (r / inner) * C * inner + r % inner;
    const bool is_soft = p.soft != 0;
    // Class-index targets without smoothing use only the target's weight (a coefficient): a NaN
    // weight of a class no row targets stays out of the gradient, as in PyTorch.
    const bool grad_w = p.weighted != 0 && (is_soft || p.smoothing != 0.0f);
    long cls = -1;
    bool has_y = true, valid = true;
    if (!is_soft) has_y = read_target(y, r, p, bad, cls, valid);
    const GradCoef k = grad_coef(p, stats + r * XENT_STATS, cls, has_y);
    const Cap cap = make_cap(p);
    for (long c = 0; c < C; ++c) {
        long i = base + c * inner;
        float g;
        if (k.zero) {
            g = valid ? 0.0f : NAN;
        } else {
            float wc = grad_w ? w[c] : 1.0f;
            float tc = is_soft ? float(soft[i]) : 0.0f;
            g = grad_elem(k, cap, c, float(x[i]), wc, tc);
        }
        out[i] = T(g);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: xent_{fwd,bwd}[_strided]_{f32,f16,bf16}_{u32,i64}. Soft targets use any
// instantiation; unused buffers (y, soft, w) may be bound to any buffer.

#ifndef XENT_HOST_EMULATION
#define XENT_FWD_SIG(T, Y)                                                                        \
    device const T *x [[buffer(0)]], device const Y *y [[buffer(1)]],                             \
        device const T *soft [[buffer(2)]], device const float *w [[buffer(3)]],                  \
        constant XentParamsMetal &p [[buffer(4)]], device float *stats [[buffer(5)]],             \
        device atomic_uint *bad [[buffer(6)]], uint tid [[thread_position_in_threadgroup]],       \
        uint tg [[threadgroup_position_in_grid]], uint tg_size [[threads_per_threadgroup]]
#define XENT_BWD_SIG(T, Y)                                                                        \
    device const T *x [[buffer(0)]], device const Y *y [[buffer(1)]],                             \
        device const T *soft [[buffer(2)]], device const float *w [[buffer(3)]],                  \
        constant XentParamsMetal &p [[buffer(4)]], device const float *stats [[buffer(5)]],       \
        device atomic_uint *bad [[buffer(6)]], device T *out [[buffer(7)]],                       \
        uint tid [[thread_position_in_threadgroup]], uint tg [[threadgroup_position_in_grid]],    \
        uint tg_size [[threads_per_threadgroup]]
#define XENT_INSTANTIATE(T, TN, Y, YN)                                                            \
    template XENT_HOST_NAME("xent_fwd_" #TN "_" #YN) kernel void xent_fwd<T, Y>(XENT_FWD_SIG(T, Y)); \
    template XENT_HOST_NAME("xent_bwd_" #TN "_" #YN) kernel void xent_bwd<T, Y>(XENT_BWD_SIG(T, Y)); \
    template XENT_HOST_NAME("xent_fwd_strided_" #TN "_" #YN) kernel void xent_fwd_strided<T, Y>(     \
        XENT_FWD_SIG(T, Y));                                                                      \
    template XENT_HOST_NAME("xent_bwd_strided_" #TN "_" #YN) kernel void xent_bwd_strided<T, Y>(     \
        XENT_BWD_SIG(T, Y));

XENT_INSTANTIATE(float, f32, uint, u32)
XENT_INSTANTIATE(float, f32, long, i64)
XENT_INSTANTIATE(half, f16, uint, u32)
XENT_INSTANTIATE(half, f16, long, i64)
#if __METAL_VERSION__ >= 310
XENT_INSTANTIATE(bfloat, bf16, uint, u32)
XENT_INSTANTIATE(bfloat, bf16, long, i64)
#endif
#endif
