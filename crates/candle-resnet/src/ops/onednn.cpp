// The three convolution passes of a training step through oneDNN (the library PyTorch calls
// for convolutions on CPU), behind candle-resnet's `onednn` feature, in three element types:
//   F32       f32 buffers, f32 arithmetic;
//   BF16      bf16 buffers: the operands and the forward / input-gradient results are bf16 and
//             oneDNN accumulates in f32 (on CPUs with AMX or AVX512-BF16 that is where the speed
//             is); the weight gradient comes back in f32, so the caller sums its per-thread
//             parts before the one rounding to bf16;
//   F32_BF16  f32 buffers, bf16 arithmetic: the operands are rounded to bf16 on their way into
//             the primitive's layout (the reorder that happens anyway), the products accumulate
//             in f32 and the results come back in f32 (some of oneDNN's AMX kernels pass partial
//             sums or results through bf16 on the way); mixed precision without bf16 tensors
//             outside the convolution.
//
// The interface is one C function, `cr_dnnl_conv`, over plain NCHW or NHWC (OIHW weights)
// buffers owned by the caller: oneDNN picks its own (blocked) layouts for the primitive, the
// buffers are reordered to and from them, and every scratch buffer belongs to the call.
// Primitives are built once per geometry, layout and pass and kept in a process-wide cache;
// their scratchpad is user-managed, so concurrent calls from several threads are safe. C++
// exceptions never cross into Rust: every failure is returned as a non-zero status with its
// message.

#include <oneapi/dnnl/dnnl.hpp>
#ifdef CR_DNNL_OMP
#include <omp.h>
#endif

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace {

using dnnl::memory;
using tag = memory::format_tag;

// Must match `Geometry` in onednn.rs. `nhwc` (0 or 1): the caller's activations (x, y and
// their gradients) are channels-last, `(N, H, W, C)`, instead of NCHW; weights are OIHW always.
struct Geometry {
    int64_t n, ci, h, w, co, kh, kw, stride, padding, oh, ow, nhwc;
};

enum Pass : int32_t { FORWARD = 0, GRAD_INPUT = 1, GRAD_WEIGHT = 2 };
// Element type of the operands: must match `DT_F32` / `DT_BF16` in onednn.rs.
enum Dt : int32_t { F32 = 0, BF16 = 1, F32_BF16 = 2 };

using Key = std::tuple<int32_t, int32_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t>;

// One built pass: the primitive, the layouts it wants for its two inputs and its output, and
// the reorders from and to the caller's plain layouts where those differ (built once too:
// creating a reorder costs more than running a small one).
struct Built {
    dnnl::primitive prim;
    memory::desc a, b, out, scratch;
    int a_arg, b_arg, out_arg;
    memory::desc a_plain, b_plain, out_plain;
    dnnl::reorder a_in, b_in, out_back;  // empty when the layouts agree
    std::string impl;                     // oneDNN's name of the implementation it chose
};

// Per-thread buffers for the reordered operands, the blocked output and the scratchpad, kept
// from call to call: allocated per call, these large blocks came back from the allocator as
// fresh pages every step (16 % of a 224 px step in page faults).
struct Buffers {
    void* p[4] = {nullptr, nullptr, nullptr, nullptr};
    size_t cap[4] = {0, 0, 0, 0};
    Buffers() = default;
    Buffers(const Buffers&) = delete;
    Buffers& operator=(const Buffers&) = delete;
    ~Buffers() {
        for (void* q : p) std::free(q);
    }
    // Slot `i` with at least `bytes`, 64-byte aligned.
    void* get(int i, size_t bytes) {
        if (bytes == 0) bytes = 64;
        if (cap[i] < bytes) {
            std::free(p[i]);
            p[i] = nullptr;
            cap[i] = 0;
            size_t rounded = (bytes + 4095) / 4096 * 4096;
            p[i] = std::aligned_alloc(64, rounded);
            if (!p[i]) throw std::bad_alloc();
            cap[i] = rounded;
        }
        return p[i];
    }
};

thread_local Buffers buffers;

dnnl::engine& engine() {
    static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    return eng;
}

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Built>> cache;

std::shared_ptr<Built> build(int32_t pass, int32_t dt, const Geometry& g) {
    auto& eng = engine();
    const auto f32 = memory::data_type::f32;
    const auto bf16 = memory::data_type::bf16;
    // `io`: the caller's buffers; `ct`: the arithmetic's operands.
    const auto io = dt == BF16 ? bf16 : f32;
    const auto ct = dt == F32 ? f32 : bf16;
    memory::desc x({g.n, g.ci, g.h, g.w}, ct, tag::any);
    memory::desc wt({g.co, g.ci, g.kh, g.kw}, ct, tag::any);
    memory::desc y({g.n, g.co, g.oh, g.ow}, ct, tag::any);
    // Results in the caller's type: the forward's output, the input gradient.
    memory::desc y_out({g.n, g.co, g.oh, g.ow}, io, tag::any);
    memory::desc dx_out({g.n, g.ci, g.h, g.w}, io, tag::any);
    // The weight gradient is always f32 (see the top of the file).
    memory::desc dwt({g.co, g.ci, g.kh, g.kw}, f32, tag::any);
    memory::dims strides{g.stride, g.stride}, pad{g.padding, g.padding};
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const auto alg = dnnl::algorithm::convolution_direct;
    const auto prop = dnnl::prop_kind::forward_training;
#if DNNL_VERSION_MAJOR >= 3
    // The forward writes the caller's type; as the backward passes' hint it has the type of
    // the gradient they receive.
    const auto& fwd_dst = pass == FORWARD ? y_out : y;
    dnnl::convolution_forward::primitive_desc fwd(eng, prop, alg, x, wt, fwd_dst, strides, pad,
                                                  pad, attr);
#else
    const auto& fwd_dst = pass == FORWARD ? y_out : y;
    dnnl::convolution_forward::primitive_desc fwd(
        dnnl::convolution_forward::desc(prop, alg, x, wt, fwd_dst, strides, pad, pad), attr,
        eng);
#endif
    auto b = std::make_shared<Built>();
    if (pass == FORWARD) {
        b->prim = dnnl::convolution_forward(fwd);
        b->impl = fwd.impl_info_str();
        b->a = fwd.src_desc();
        b->b = fwd.weights_desc();
        b->out = fwd.dst_desc();
        b->scratch = fwd.scratchpad_desc();
        b->a_arg = DNNL_ARG_SRC;
        b->b_arg = DNNL_ARG_WEIGHTS;
        b->out_arg = DNNL_ARG_DST;
    } else if (pass == GRAD_INPUT) {
#if DNNL_VERSION_MAJOR >= 3
        dnnl::convolution_backward_data::primitive_desc pd(eng, alg, dx_out, wt, y, strides, pad,
                                                           pad, fwd, attr);
#else
        dnnl::convolution_backward_data::primitive_desc pd(
            dnnl::convolution_backward_data::desc(alg, dx_out, wt, y, strides, pad, pad), attr,
            eng, fwd);
#endif
        b->prim = dnnl::convolution_backward_data(pd);
        b->impl = pd.impl_info_str();
        b->a = pd.weights_desc();
        b->b = pd.diff_dst_desc();
        b->out = pd.diff_src_desc();
        b->scratch = pd.scratchpad_desc();
        b->a_arg = DNNL_ARG_WEIGHTS;
        b->b_arg = DNNL_ARG_DIFF_DST;
        b->out_arg = DNNL_ARG_DIFF_SRC;
    } else {
#if DNNL_VERSION_MAJOR >= 3
        dnnl::convolution_backward_weights::primitive_desc pd(eng, alg, x, dwt, y, strides, pad,
                                                              pad, fwd, attr);
#else
        dnnl::convolution_backward_weights::primitive_desc pd(
            dnnl::convolution_backward_weights::desc(alg, x, dwt, y, strides, pad, pad), attr, eng,
            fwd);
#endif
        b->prim = dnnl::convolution_backward_weights(pd);
        b->impl = pd.impl_info_str();
        b->a = pd.src_desc();
        b->b = pd.diff_dst_desc();
        b->out = pd.diff_weights_desc();
        b->scratch = pd.scratchpad_desc();
        b->a_arg = DNNL_ARG_SRC;
        b->b_arg = DNNL_ARG_DIFF_DST;
        b->out_arg = DNNL_ARG_DIFF_WEIGHTS;
    }
    // Channels-last activations are what oneDNN's AMX and AVX-512 kernels mostly want
    // (`acdb`): their reorder is then a conversion of the element type, or nothing.
    const auto act = g.nhwc ? tag::nhwc : tag::nchw;
    memory::desc x_plain({g.n, g.ci, g.h, g.w}, io, act);
    memory::desc w_plain({g.co, g.ci, g.kh, g.kw}, io, tag::oihw);
    memory::desc y_plain({g.n, g.co, g.oh, g.ow}, io, act);
    memory::desc dw_plain({g.co, g.ci, g.kh, g.kw}, f32, tag::oihw);
    b->a_plain = pass == GRAD_INPUT ? w_plain : x_plain;
    b->b_plain = pass == FORWARD ? w_plain : y_plain;
    b->out_plain = pass == FORWARD ? y_plain : pass == GRAD_INPUT ? x_plain : dw_plain;

    auto reorder = [&](const memory::desc& from, const memory::desc& to) {
        if (from == to) return dnnl::reorder();
        return dnnl::reorder(dnnl::reorder::primitive_desc(eng, from, eng, to));
    };
    b->a_in = reorder(b->a_plain, b->a);
    b->b_in = reorder(b->b_plain, b->b);
    b->out_back = reorder(b->out, b->out_plain);
    return b;
}

std::shared_ptr<Built> lookup(int32_t pass, int32_t dt, const Geometry& g) {
    Key k{pass, dt, g.n, g.ci, g.h, g.w, g.co, g.kh, g.kw, g.stride, g.padding, g.nhwc};
    {
        std::lock_guard<std::mutex> lock(cache_mutex);
        auto it = cache.find(k);
        if (it != cache.end()) return it->second;
    }
    auto b = build(pass, dt, g);  // outside the lock: building can take milliseconds
    std::lock_guard<std::mutex> lock(cache_mutex);
    return cache.emplace(k, b).first->second;
}

void set_error(char* err, size_t len, const char* what) {
    if (err && len) std::snprintf(err, len, "%s", what);
}

// Runs `body` for a known `pass` and `dt`, turning every failure into a status: 0 done, 1 an
// unknown pass or element type, 2 a oneDNN error, 3 another C++ exception, 4 anything else; the
// message goes to `err`. No exception crosses into Rust.
template <class F>
int32_t guarded(int32_t pass, int32_t dt, char* err, size_t err_len, F body) {
    try {
        if (pass < FORWARD || pass > GRAD_WEIGHT || dt < F32 || dt > F32_BF16) {
            set_error(err, err_len, "unknown convolution pass or element type");
            return 1;
        }
        body();
        return 0;
    } catch (const dnnl::error& e) {
        char msg[512];
        std::snprintf(msg, sizeof msg, "oneDNN: %s (status %d)", e.what(), (int)e.status);
        set_error(err, err_len, msg);
        return 2;
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return 3;
    } catch (...) {
        set_error(err, err_len, "unknown C++ exception");
        return 4;
    }
}

}  // namespace

extern "C" {

// Runs one pass. FORWARD: a = x, b = w, out = y. GRAD_INPUT: a = w, b = dy, out = dx.
// GRAD_WEIGHT: a = x, b = dy, out = dw. Buffers are plain NCHW, or NHWC where `g->nhwc` (OIHW
// for weights), of element type `dt` (f32 for F32 and F32_BF16, bf16 for BF16), except that dw
// is always f32, and `out` is fully overwritten.
// `threads` > 0 sets the OpenMP team for this call. Returns 0, or non-zero with a message in
// `err`.
int32_t cr_dnnl_conv(int32_t pass, int32_t dt, const Geometry* g, const void* a, const void* b,
                     void* out, int32_t threads, char* err, size_t err_len) {
    return guarded(pass, dt, err, err_len, [&] {
        auto built = lookup(pass, dt, *g);
        auto& eng = engine();
        dnnl::stream st(eng);
#ifdef CR_DNNL_OMP
        if (threads > 0) omp_set_num_threads(threads);
#else
        (void)threads;
#endif
        // A caller's buffer, reordered into slot `i` in the primitive's layout where that differs.
        auto input = [&](int i, const memory::desc& plain, const memory::desc& want,
                         const dnnl::reorder& r, const void* p) {
            memory user(plain, eng, const_cast<void*>(p));
            if (!r) return user;
            memory m(want, eng, buffers.get(i, want.get_size()));
            r.execute(st, user, m);
            return m;
        };
        memory ma = input(0, built->a_plain, built->a, built->a_in, a);
        memory mb = input(1, built->b_plain, built->b, built->b_in, b);
        memory user_out(built->out_plain, eng, out);
        memory mo = !built->out_back
                        ? user_out
                        : memory(built->out, eng, buffers.get(2, built->out.get_size()));
        // Zeroed each call: oneDNN 2.6's AMX bf16 weight-gradient kernels read scratchpad they
        // have not written (a reused, dirty one put products of the padding into the taps that
        // only ever meet padding: tests/onednn.rs's property test, an 8 x 1 input, 2x2 kernel,
        // stride 2, padding 1).
        void* scratch_p = buffers.get(3, built->scratch.get_size());
        std::memset(scratch_p, 0, built->scratch.get_size());
        memory scratch(built->scratch, eng, scratch_p);
        built->prim.execute(st, {{built->a_arg, ma},
                                 {built->b_arg, mb},
                                 {built->out_arg, mo},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
        if (built->out_back) built->out_back.execute(st, mo, user_out);
        st.wait();
    });
}

// The name oneDNN gives the implementation it picked for `pass` in `dt` on geometry `g`
// (e.g. "brgconv:avx512_core_amx", "ref:any"), NUL-terminated in `buf`. Returns 0, or non-zero
// when no primitive can be built (the message is then in `buf`).
int32_t cr_dnnl_impl(int32_t pass, int32_t dt, const Geometry* g, char* buf, size_t len) {
    return guarded(pass, dt, buf, len,
                   [&] { set_error(buf, len, lookup(pass, dt, *g)->impl.c_str()); });
}

// The oneDNN version linked, as "MAJOR.MINOR.PATCH".
void cr_dnnl_version(char* buf, size_t len) {
    const dnnl_version_t* v = dnnl_version();
    std::snprintf(buf, len, "%d.%d.%d", v->major, v->minor, v->patch);
}

}  // extern "C"
