// CUDA kernels of candle-xent's fused cross-entropy op (`src/op.rs`).
//
// Compiled three ways from this one file:
//   * to PTX by nvcc in build.rs when the `cuda` feature is on (loaded with
//     `CudaDevice::get_or_load_custom_func`),
//   * to PTX for sm_80 and sm_90 with warnings as errors in CI (`.ci/run`),
//   * as host C++ with a small shim for the CUDA built-ins by the `xent-kernel-emu` test crate,
//     which runs every thread of every block and compares the results with the CPU op.
//
// Layout: logits viewed as (outer, C, inner), rows r = n * inner + d (the order of the targets).
//   * `xent_fwd_*` / `xent_bwd_*` (inner == 1): `group` threads per row, either one warp (several
//     rows per block, shuffle reductions only) or the whole block (shuffles + shared memory).
//     Each thread streams its share of the row with 16-byte loads (after a scalar head that
//     reaches 16-byte alignment), so every logit is read once in the forward and once in the
//     backward, and the gradient written once.
//   * `xent_fwd_strided_*` / `xent_bwd_strided_*` (inner > 1, PyTorch's K-dim inputs): one thread
//     per row; consecutive threads take consecutive d, so the loads of a warp are coalesced.
//
// Forward writes per row [loss, shift, log_sum, target_weight] in the accumulator type A (f32,
// f64 for f64 logits; `candle_xent::launch::STATS`), exactly the CPU op's formulas: an online
// max / sum-of-exp, the weighted logit sums taken relative to the running max (shifted by
// (m_old - m_new) * sum w when it moves, so every term has one sign and nothing cancels at any
// scale), and the label-smoothing, class-weight, soft-target, z-loss and soft-cap terms. The
// log-sum-exp is the pair shift + log_sum, never one rounded sum. Out-of-range class targets are
// never read: the row's index goes into `bad` with atomicMin and its loss is NaN; the host reads
// `bad` back and returns an error.
//
// Backward reads per row [shift, log_sum, target_weight, g] and writes
//   g * (alpha p_c - beta w_c - gamma w_c t_c) - [c == y] fix,  p_c = exp((x_c - shift) - log_sum)
// with the true-class term subtracted in A before rounding to the logits' type; soft-capped
// logits get the tanh chain rule, sech^2 computed from exp (not 1 - tanh^2). It may run in place
// (out == x): each element is read and then written by the same thread, and nothing else reads
// it.

#ifndef XENT_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#define XENT_WARP 32
#define XENT_MAX_WARPS 32
// Values per row of the stats (`candle_xent::launch::STATS`).
#define XENT_STATS 4

// Mirrors `candle_xent::launch::XentParams` (all fields 8 bytes: no padding to disagree on).
struct XentParams {
    long long outer;
    long long classes;
    long long inner;
    double smoothing;
    long long ignore_index;
    double z_loss;
    double softcap;    // 0: off
    long long group;   // threads per row in the row kernels: 32 or blockDim.x
    long long weighted;
    long long soft;
};

// ---------------------------------------------------------------------------------------------
// Types and math in the accumulator type.

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }
__device__ __forceinline__ float acc_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double acc_tanh(double v) { return tanh(v); }
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) { return fma(a, b, c); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -INFINITY; }

// Soft-cap: cap * tanh(x / cap), computed as the CPU op does.
template <typename A> struct Cap {
    A cap;
    bool on;
    __device__ __forceinline__ A operator()(A v) const { return on ? cap * acc_tanh(v / cap) : v; }
    // d/dx of the cap, sech^2(x / cap) = 4e / (1 + e)^2 with e = exp(-2 |x / cap|) (1 - tanh^2
    // would lose every digit where tanh saturates); x / cap carried as the quotient plus its
    // exact remainder, which enters e to first order (the CPU op's formula).
    __device__ __forceinline__ A deriv(A v) const {
        A q = v / cap;
        A lo = acc_fma(-q, cap, v) / cap;
        // No remainder where it is not finite: |x| = inf, or |x / cap| past the type's range (the
        // capped logit is flat there, its derivative 0); a NaN x stays NaN through q.
        if (!(lo - lo == (A)0)) lo = (A)0;
        A aq = q < (A)0 ? -q : q;
        A slo = q < (A)0 ? -lo : lo;
        A e = acc_exp(-(A)2 * aq) * ((A)1 - (A)2 * slo);
        A s = (A)1 + e;
        return (A)4 * e / (s * s);
    }
};

template <typename A> __device__ __forceinline__ Cap<A> make_cap(const XentParams &p) {
    Cap<A> c;
    c.on = p.softcap > 0.0;
    c.cap = c.on ? (A)p.softcap : (A)1;
    return c;
}

// ---------------------------------------------------------------------------------------------
// Row sums: online max / sum-exp plus the weighted sums of the smoothing and soft-target terms.

// Every sum is relative to the shift: the running max, or 0 while every logit is -inf.
template <typename A> struct Sums {
    A max, sum_exp;  // running max and sum exp(x - shift)
    A wx;            // sum_c w_c (x_c - shift) (<= 0)
    A wtx, wt;       // soft targets: sum_c w_c t_c (x_c - shift) (<= 0), sum_c w_c t_c
    A wn;            // sum_c w_c over the elements seen (their count when unweighted)
    // Kahan compensations of a thread's own sums (rounded - exact), folded into the sums by
    // fold_comp before the threads' sums are merged.
    A c_se, c_wx, c_wtx, c_wt;
};

template <typename A> __device__ __forceinline__ Sums<A> sums_zero() {
    Sums<A> s;
    s.max = neg_inf<A>();
    s.sum_exp = (A)0;
    s.wx = (A)0;
    s.wtx = (A)0;
    s.wt = (A)0;
    s.wn = (A)0;
    s.c_se = s.c_wx = s.c_wtx = s.c_wt = (A)0;
    return s;
}

// sum += v with Kahan's compensation c; an infinite or NaN sum drops it (inf - inf is NaN).
template <typename A> __device__ __forceinline__ void kahan_add(A &sum, A &c, A v) {
    A y = v - c;
    A t = sum + y;
    A nc = (t - sum) - y;
    c = (t - t == (A)0) ? nc : (A)0;
    sum = t;
}

template <typename A> __device__ __forceinline__ void fold_comp(Sums<A> &s) {
    if (s.sum_exp - s.sum_exp == (A)0) s.sum_exp -= s.c_se;
    if (s.wx - s.wx == (A)0) s.wx -= s.c_wx;
    if (s.wtx - s.wtx == (A)0) s.wtx -= s.c_wtx;
    if (s.wt - s.wt == (A)0) s.wt -= s.c_wt;
    s.c_se = s.c_wx = s.c_wtx = s.c_wt = (A)0;
}

template <typename A> __device__ __forceinline__ A shift_of(A max) {
    return max == neg_inf<A>() ? (A)0 : max;
}

// Moves `s` to a larger max `hi`: sum_exp scales by exp(max - hi), the linear sums gain
// (shift_old - shift_new) * (their weight sums), terms of the same sign as the sums.
template <typename A> __device__ __forceinline__ void reshift(Sums<A> &s, A hi) {
    if (!(hi > s.max)) return;
    A e = (s.max == neg_inf<A>()) ? (A)0 : acc_exp(s.max - hi);
    A delta = shift_of(s.max) - shift_of(hi);
    s.sum_exp *= e;
    s.c_se *= e;
    if (s.wn != (A)0) s.wx += s.wn * delta;
    if (s.wt != (A)0) s.wtx += s.wt * delta;
    s.max = hi;
}

// Adds one (already soft-capped) logit. A NaN logit never becomes the max and turns sum_exp NaN.
// The kernels set each thread's max first (thread_max), so the shift does not move while a
// thread adds its elements and their sums are compensated (Kahan): a row's error then stays a
// few ulps for any C. `zero_t_is_zero` (smoothing on): a zero soft target adds 0 even on a -inf
// logit, its mass eps / C being counted by wx (PyTorch: inf); without smoothing 0 * -inf stays
// NaN, as in PyTorch.
template <typename A>
__device__ __forceinline__ void add_elem(Sums<A> &s, A v, A wc, A tc, bool soft,
                                         bool zero_t_is_zero) {
    reshift(s, v);
    A d = v - shift_of(s.max);
    kahan_add(s.sum_exp, s.c_se, acc_exp(d));
    A wd = wc * d;
    kahan_add(s.wx, s.c_wx, wd);
    s.wn += wc;
    if (soft) {
        A wtd = (zero_t_is_zero && tc == (A)0) ? (A)0 : wd * tc;
        kahan_add(s.wtx, s.c_wtx, wtd);
        kahan_add(s.wt, s.c_wt, wc * tc);
    }
}

template <typename A> __device__ __forceinline__ void merge_sums(Sums<A> &a, Sums<A> b) {
    A hi = b.max > a.max ? b.max : a.max;
    reshift(a, hi);
    reshift(b, hi);
    a.sum_exp += b.sum_exp;
    a.wx += b.wx;
    a.wtx += b.wtx;
    a.wt += b.wt;
    a.wn += b.wn;
}

template <typename A> __device__ __forceinline__ Sums<A> shfl_sums(const Sums<A> &s, int off) {
    Sums<A> o;
    o.max = __shfl_xor_sync(0xffffffffu, s.max, off);
    o.sum_exp = __shfl_xor_sync(0xffffffffu, s.sum_exp, off);
    o.wx = __shfl_xor_sync(0xffffffffu, s.wx, off);
    o.wtx = __shfl_xor_sync(0xffffffffu, s.wtx, off);
    o.wt = __shfl_xor_sync(0xffffffffu, s.wt, off);
    o.wn = __shfl_xor_sync(0xffffffffu, s.wn, off);
    o.c_se = o.c_wx = o.c_wtx = o.c_wt = (A)0;  // folded before any exchange
    return o;
}

// Butterfly reduction: every lane of the warp ends with the warp's total.
template <typename A> __device__ __forceinline__ void warp_reduce(Sums<A> &s) {
    fold_comp(s);
    for (int off = XENT_WARP / 2; off > 0; off /= 2) {
        Sums<A> o = shfl_sums(s, off);
        merge_sums(s, o);
    }
}

// Whole-block reduction; the total is valid in thread 0. Every thread of the block must call it.
template <typename A> __device__ __forceinline__ void block_reduce(Sums<A> &s) {
    __shared__ Sums<A> part[XENT_MAX_WARPS];
    warp_reduce(s);
    int warp = threadIdx.x / XENT_WARP, lane = threadIdx.x % XENT_WARP;
    int warps = blockDim.x / XENT_WARP;
    if (lane == 0) part[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < warps ? part[lane] : sums_zero<A>();
        warp_reduce(s);
    }
    __syncthreads();  // `part` may be reused by a later call
}

// Visits the elements of one contiguous row owned by thread `lane` of `group`: a scalar head up
// to 16-byte alignment, 16-byte vectors, a scalar tail. `f(c, value)` gets each element once.
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T *row, long long C, int lane, int group, F f) {
    const int VEC = 16 / (int)sizeof(T);
    long long mis = (long long)(((uintptr_t)row) & 15) / (long long)sizeof(T);
    long long head = mis == 0 ? 0 : VEC - mis;
    if (head > C) head = C;
    for (long long c = lane; c < head; c += group) f(c, row[c]);
    long long nvec = (C - head) / VEC;
    const uint4 *vp = reinterpret_cast<const uint4 *>(row + head);
    for (long long i = lane; i < nvec; i += group) {
        uint4 raw = vp[i];
        const T *e = reinterpret_cast<const T *>(&raw);
        long long c0 = head + i * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) f(c0 + k, e[k]);
    }
    for (long long c = head + nvec * VEC + lane; c < C; c += group) f(c, row[c]);
}

// ---------------------------------------------------------------------------------------------
// Per-row finish (forward) and gradient coefficients (backward), shared by both layouts.

// Writes [loss, shift, log_sum, target_weight] for one row. `xy` is the (capped) target logit,
// read only for valid class targets. Every term is a sum of non-negative parts: lse - x_y =
// (shift - x_y) + log_sum, and the smoothing term W log_sum - sum_c w_c (x_c - shift).
template <typename A>
__device__ __forceinline__ void finish_row(const XentParams &p, const Sums<A> &s, bool has_y, A wy, A xy,
                                           A weight_sum, A *out) {
    A m = shift_of(s.max);
    A ls = acc_log(s.sum_exp);
    // 1 - eps formed in double before the one rounding (exact near eps = 1). Terms whose factor
    // is exactly 0 (eps = 0, or 1 - eps = 0) are left out, not multiplied by 0: PyTorch's
    // formula does not have them, and 0 * inf would be NaN.
    A one_m = (A)(1.0 - p.smoothing);
    A eoc = (A)(p.smoothing / (double)p.classes);
    const bool smooth = p.smoothing != 0.0;
    A lse = m + ls;
    A z = (A)p.z_loss * lse * lse;
    out[1] = m;
    out[2] = ls;
    if (!p.soft) {
        if (!has_y) {
            out[0] = (A)0;
            out[3] = (A)0;
            return;
        }
        A nll = wy * ((m - xy) + ls);
        A loss = one_m * nll;
        if (smooth) loss += eoc * (ls * weight_sum - s.wx);
        if (p.z_loss != 0.0) loss += z;
        out[0] = loss;
        out[3] = wy;
    } else {
        A wq = one_m * s.wt;
        A wqx = one_m != (A)0 ? one_m * s.wtx : (A)0;
        if (smooth) {
            wq += eoc * weight_sum;
            wqx += eoc * s.wx;
        }
        A loss = ls * wq - wqx;
        if (p.z_loss != 0.0) loss += z;
        out[0] = loss;
        out[3] = wq;
    }
}

template <typename A> struct GradCoef {
    A shift, log_sum, alpha, beta, gamma, fix;
    long long y;  // -1: no one-hot term
    bool zero;    // ignored row
};

template <typename A>
__device__ __forceinline__ GradCoef<A> grad_coef(const XentParams &p, const A *st, long long y, bool has_y,
                                                 A weight_sum) {
    GradCoef<A> k;
    A tw = st[2], g = st[3];
    A lse = st[0] + st[1];
    A one_m = (A)(1.0 - p.smoothing);
    A eoc = (A)(p.smoothing / (double)p.classes);
    // As in the forward, terms with a zero factor are left out rather than multiplied.
    A z_term = p.z_loss != 0.0 ? (A)(2.0 * p.z_loss) * lse : (A)0;
    A smooth_w = p.smoothing != 0.0 ? eoc * weight_sum : (A)0;
    k.shift = st[0];
    k.log_sum = st[1];
    k.zero = false;
    k.y = -1;
    k.fix = (A)0;
    if (!p.soft) {
        if (!has_y) {
            k.zero = true;
            k.alpha = k.beta = k.gamma = (A)0;
            return k;
        }
        k.alpha = g * (one_m * tw + smooth_w + z_term);
        k.beta = g * eoc;
        k.gamma = (A)0;
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
template <typename A>
__device__ __forceinline__ A grad_elem(const GradCoef<A> &k, const Cap<A> &cap, long long c, A xv, A wc,
                                       A tc) {
    A xc = cap(xv);
    A pr = acc_exp((xc - k.shift) - k.log_sum);
    A g = k.alpha * pr - k.beta * wc;
    g = g - k.gamma * wc * tc;
    if (c == k.y) g = g - k.fix;
    if (cap.on) g *= cap.deriv(xv);
    return g;
}

// Class target of row r: validity, and the ignore_index test. Out-of-range rows are recorded.
template <typename Y>
__device__ __forceinline__ bool read_target(const Y *y, long long r, const XentParams &p,
                                            unsigned long long *bad, long long &cls, bool &valid) {
    cls = (long long)y[r];
    if (cls == p.ignore_index) {
        valid = true;
        return false;
    }
    valid = cls >= 0 && cls < p.classes;
    if (!valid) atomicMin(bad, (unsigned long long)r);
    return valid;
}

template <typename A>
__device__ __forceinline__ A weight_total(const XentParams &p, const double *wsum) {
    return p.weighted ? (A)(*wsum) : (A)(double)p.classes;
}

// Writes row r's [loss, shift, log_sum, target_weight] from its sums: soft targets, an ignored
// class, an out-of-range class (recorded in `bad`, NaN stats) or a class whose logit is
// xr[cls * stride].
template <typename T, typename Y, typename A>
__device__ __forceinline__ void write_stats(const XentParams &p, const Sums<A> &s, long long r, const Y *y,
                                            const A *w, const double *wsum, const T *xr,
                                            long long stride, const Cap<A> &cap, A *stats,
                                            unsigned long long *bad) {
    A wsm = weight_total<A>(p, wsum);
    A *out = stats + r * XENT_STATS;
    if (p.soft) {
        finish_row(p, s, true, (A)1, (A)0, wsm, out);
        return;
    }
    long long cls;
    bool valid;
    if (!read_target(y, r, p, bad, cls, valid)) {
        if (valid) {
            finish_row(p, s, false, (A)0, (A)0, wsm, out);
        } else {
            out[0] = out[1] = out[2] = (A)NAN;
            out[3] = (A)0;
        }
        return;
    }
    A wy = p.weighted ? w[cls] : (A)1;
    finish_row(p, s, true, wy, cap(to_acc(xr[cls * stride])), wsm, out);
}

// ---------------------------------------------------------------------------------------------
// Kernels, contiguous rows (inner == 1).

template <typename T, typename Y>
__device__ __forceinline__ void fwd_rows(const T *__restrict__ x, const Y *__restrict__ y,
                                         const T *__restrict__ soft,
                                         const typename AccOf<T>::type *__restrict__ w,
                                         const double *__restrict__ wsum,
                                         typename AccOf<T>::type *__restrict__ stats, XentParams p,
                                         unsigned long long *bad) {
    typedef typename AccOf<T>::type A;
    const int group = (int)p.group;
    const long long rows = p.outer * p.inner;
    const long long r = (long long)blockIdx.x * (blockDim.x / group) + threadIdx.x / group;
    const int lane = threadIdx.x % group;
    // Rows past the end only exist in warp-per-row mode, where the whole warp leaves together.
    if (r >= rows) return;
    const long long C = p.classes;
    const T *xr = x + r * C;
    const Cap<A> cap = make_cap<A>(p);
    Sums<A> s = sums_zero<A>();
    const bool weighted = p.weighted != 0, is_soft = p.soft != 0;
    const bool zt = p.smoothing != 0.0;
    // First this thread's max over its elements, then its sums relative to it (no rescaling).
    for_row(xr, C, lane, group, [&](long long, T v) {
        A xv = cap(to_acc(v));
        if (xv > s.max) s.max = xv;
    });
    if (!is_soft) {
        for_row(xr, C, lane, group, [&](long long c, T v) {
            A wc = weighted ? w[c] : (A)1;
            add_elem(s, cap(to_acc(v)), wc, (A)0, false, zt);
        });
    } else {
        const T *tr = soft + r * C;
        for_row(xr, C, lane, group, [&](long long c, T v) {
            A wc = weighted ? w[c] : (A)1;
            add_elem(s, cap(to_acc(v)), wc, to_acc(tr[c]), true, zt);
        });
    }
    if (group == XENT_WARP) {
        warp_reduce(s);
    } else {
        block_reduce(s);
    }
    if (lane != 0) return;
    write_stats(p, s, r, y, w, wsum, xr, 1, cap, stats, bad);
}

// `x` and `out` may be the same buffer (in-place gradient), so neither is __restrict__.
template <typename T, typename Y>
__device__ __forceinline__ void bwd_rows(const T *x, const Y *__restrict__ y, const T *__restrict__ soft,
                                         const typename AccOf<T>::type *__restrict__ w,
                                         const double *__restrict__ wsum,
                                         const typename AccOf<T>::type *__restrict__ stats, T *out,
                                         XentParams p, unsigned long long *bad) {
    typedef typename AccOf<T>::type A;
    const int group = (int)p.group;
    const long long rows = p.outer * p.inner;
    const long long r = (long long)blockIdx.x * (blockDim.x / group) + threadIdx.x / group;
    const int lane = threadIdx.x % group;
    if (r >= rows) return;
    const long long C = p.classes;
    const bool is_soft = p.soft != 0;
    // Class-index targets without smoothing use only the target's weight (a coefficient): a NaN
    // weight of a class no row targets stays out of the gradient, as in PyTorch.
    const bool grad_w = p.weighted != 0 && (is_soft || p.smoothing != 0.0);
    long long cls = -1;
    bool has_y = true, valid = true;
    if (!is_soft) has_y = read_target(y, r, p, bad, cls, valid);
    const GradCoef<A> k = grad_coef(p, stats + r * XENT_STATS, cls, has_y, weight_total<A>(p, wsum));
    const Cap<A> cap = make_cap<A>(p);
    const T *xr = x + r * C;
    T *orow = out + r * C;
    const T *tr = is_soft ? soft + r * C : nullptr;
    // Same traversal as the reads, so a vector is written by the thread that read it.
    const int VEC = 16 / (int)sizeof(T);
    long long mis = (long long)(((uintptr_t)xr) & 15) / (long long)sizeof(T);
    long long head = mis == 0 ? 0 : VEC - mis;
    if (head > C) head = C;
    auto one = [&](long long c, T v) -> T {
        if (k.zero) return from_acc<T>(valid ? (A)0 : (A)NAN);
        A wc = grad_w ? w[c] : (A)1;
        A tc = is_soft ? to_acc(tr[c]) : (A)0;
        return from_acc<T>(grad_elem(k, cap, c, to_acc(v), wc, tc));
    };
    for (long long c = lane; c < head; c += group) orow[c] = one(c, xr[c]);
    long long nvec = (C - head) / VEC;
    const uint4 *vp = reinterpret_cast<const uint4 *>(xr + head);
    // The gradient row may sit at another 16-byte phase than the logits row (a view with an
    // offset): then its elements are stored one by one.
    const bool out_aligned = ((((uintptr_t)orow) - ((uintptr_t)xr)) & 15) == 0;
    uint4 *op = reinterpret_cast<uint4 *>(orow + head);
    for (long long i = lane; i < nvec; i += group) {
        uint4 raw = vp[i];
        const T *e = reinterpret_cast<const T *>(&raw);
        uint4 res;
        T *o = reinterpret_cast<T *>(&res);
        long long c0 = head + i * VEC;
#pragma unroll
        for (int q = 0; q < VEC; ++q) o[q] = one(c0 + q, e[q]);
        if (out_aligned) {
            op[i] = res;
        } else {
#pragma unroll
            for (int q = 0; q < VEC; ++q) orow[c0 + q] = o[q];
        }
    }
    for (long long c = head + nvec * VEC + lane; c < C; c += group) orow[c] = one(c, xr[c]);
}

// ---------------------------------------------------------------------------------------------
// Kernels, strided rows (inner > 1): one thread per row, element c of row (n, d) at
// n * C * inner + c * inner + d.

template <typename T, typename Y>
__device__ __forceinline__ void fwd_strided(const T *__restrict__ x, const Y *__restrict__ y,
                                            const T *__restrict__ soft,
                                            const typename AccOf<T>::type *__restrict__ w,
                                            const double *__restrict__ wsum,
                                            typename AccOf<T>::type *__restrict__ stats, XentParams p,
                                            unsigned long long *bad) {
    typedef typename AccOf<T>::type A;
    const long long rows = p.outer * p.inner;
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const long long C = p.classes, inner = p.inner;
    const long long n = r / inner, d = r % inner;
    const T *xr = x + n * C * inner + d;
    const T *tr = p.soft ? soft + n * C * inner + d : nullptr;
    const Cap<A> cap = make_cap<A>(p);
    const bool weighted = p.weighted != 0, is_soft = p.soft != 0;
    Sums<A> s = sums_zero<A>();
    for (long long c = 0; c < C; ++c) {
        A xv = cap(to_acc(xr[c * inner]));
        if (xv > s.max) s.max = xv;
    }
    const bool zt = p.smoothing != 0.0;
    for (long long c = 0; c < C; ++c) {
        A wc = weighted ? w[c] : (A)1;
        A tc = is_soft ? to_acc(tr[c * inner]) : (A)0;
        add_elem(s, cap(to_acc(xr[c * inner])), wc, tc, is_soft, zt);
    }
    fold_comp(s);
    write_stats(p, s, r, y, w, wsum, xr, inner, cap, stats, bad);
}

template <typename T, typename Y>
__device__ __forceinline__ void bwd_strided(const T *x, const Y *__restrict__ y, const T *__restrict__ soft,
                                            const typename AccOf<T>::type *__restrict__ w,
                                            const double *__restrict__ wsum,
                                            const typename AccOf<T>::type *__restrict__ stats, T *out,
                                            XentParams p, unsigned long long *bad) {
    typedef typename AccOf<T>::type A;
    const long long rows = p.outer * p.inner;
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const long long C = p.classes, inner = p.inner;
    const long long n = r / inner, d = r % inner;
    const long long base = n * C * inner + d;
    const bool is_soft = p.soft != 0;
    // Class-index targets without smoothing use only the target's weight (a coefficient): a NaN
    // weight of a class no row targets stays out of the gradient, as in PyTorch.
    const bool grad_w = p.weighted != 0 && (is_soft || p.smoothing != 0.0);
    long long cls = -1;
    bool has_y = true, valid = true;
    if (!is_soft) has_y = read_target(y, r, p, bad, cls, valid);
    const GradCoef<A> k = grad_coef(p, stats + r * XENT_STATS, cls, has_y, weight_total<A>(p, wsum));
    const Cap<A> cap = make_cap<A>(p);
    for (long long c = 0; c < C; ++c) {
        long long i = base + c * inner;
        A g;
        if (k.zero) {
            g = valid ? (A)0 : (A)NAN;
        } else {
            A wc = grad_w ? w[c] : (A)1;
            A tc = is_soft ? to_acc(soft[i]) : (A)0;
            g = grad_elem(k, cap, c, to_acc(x[i]), wc, tc);
        }
        out[i] = from_acc<T>(g);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: xent_{fwd,bwd}[_strided]_{f32,f16,bf16,f64}_{u32,i64}. Soft targets use any
// instantiation with a null `y`. Unused pointers (y, soft, w, wsum) may be null.

#define XENT_FWD_ARGS(T, Y)                                                                       \
    const T *x, const Y *y, const T *soft, const AccOf<T>::type *w, const double *wsum,         \
        AccOf<T>::type *stats, XentParams p, unsigned long long *bad
#define XENT_BWD_ARGS(T, Y)                                                                       \
    const T *x, const Y *y, const T *soft, const AccOf<T>::type *w, const double *wsum,         \
        const AccOf<T>::type *stats, T *out, XentParams p, unsigned long long *bad

#define XENT_INSTANTIATE(T, TN, Y, YN)                                                            \
    extern "C" __global__ void xent_fwd_##TN##_##YN(XENT_FWD_ARGS(T, Y)) {                      \
        fwd_rows<T, Y>(x, y, soft, w, wsum, stats, p, bad);                                      \
    }                                                                                             \
    extern "C" __global__ void xent_bwd_##TN##_##YN(XENT_BWD_ARGS(T, Y)) {                      \
        bwd_rows<T, Y>(x, y, soft, w, wsum, stats, out, p, bad);                                 \
    }                                                                                             \
    extern "C" __global__ void xent_fwd_strided_##TN##_##YN(XENT_FWD_ARGS(T, Y)) {              \
        fwd_strided<T, Y>(x, y, soft, w, wsum, stats, p, bad);                                   \
    }                                                                                             \
    extern "C" __global__ void xent_bwd_strided_##TN##_##YN(XENT_BWD_ARGS(T, Y)) {              \
        bwd_strided<T, Y>(x, y, soft, w, wsum, stats, out, p, bad);                              \
    }

XENT_INSTANTIATE(float, f32, uint32_t, u32)
XENT_INSTANTIATE(float, f32, int64_t, i64)
XENT_INSTANTIATE(__half, f16, uint32_t, u32)
XENT_INSTANTIATE(__half, f16, int64_t, i64)
XENT_INSTANTIATE(__nv_bfloat16, bf16, uint32_t, u32)
XENT_INSTANTIATE(__nv_bfloat16, bf16, int64_t, i64)
XENT_INSTANTIATE(double, f64, uint32_t, u32)
XENT_INSTANTIATE(double, f64, int64_t, i64)
