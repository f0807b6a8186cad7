// The kernels of candle-xent, compiled for the host (see cuda_shim.h), behind one C entry point.
#include "cuda_shim.h"

#include "xent.cu"

namespace {
template <typename T, typename Y>
int run_typed(int bwd, int strided, unsigned grid, unsigned block, const void *x, const void *y,
              const void *soft, const void *w, const double *wsum, void *stats, void *out,
              const XentParams *p, unsigned long long *bad) {
    typedef typename AccOf<T>::type A;
    const T *xt = static_cast<const T *>(x);
    const Y *yt = static_cast<const Y *>(y);
    const T *st = static_cast<const T *>(soft);
    const A *wt = static_cast<const A *>(w);
    XentParams prm = *p;
    if (!bwd && !strided)
        emu::launch(grid, block, [&] { fwd_rows<T, Y>(xt, yt, st, wt, wsum, static_cast<A *>(stats), prm, bad); });
    else if (!bwd)
        emu::launch(grid, block, [&] { fwd_strided<T, Y>(xt, yt, st, wt, wsum, static_cast<A *>(stats), prm, bad); });
    else if (!strided)
        emu::launch(grid, block, [&] {
            bwd_rows<T, Y>(xt, yt, st, wt, wsum, static_cast<const A *>(stats), static_cast<T *>(out), prm, bad);
        });
    else
        emu::launch(grid, block, [&] {
            bwd_strided<T, Y>(xt, yt, st, wt, wsum, static_cast<const A *>(stats), static_cast<T *>(out), prm, bad);
        });
    return 0;
}

template <typename T>
int run_y(int ytype, int bwd, int strided, unsigned grid, unsigned block, const void *x, const void *y,
          const void *soft, const void *w, const double *wsum, void *stats, void *out, const XentParams *p,
          unsigned long long *bad) {
    switch (ytype) {
    case 0: return run_typed<T, uint32_t>(bwd, strided, grid, block, x, y, soft, w, wsum, stats, out, p, bad);
    case 1: return run_typed<T, int64_t>(bwd, strided, grid, block, x, y, soft, w, wsum, stats, out, p, bad);
    default: return -1;
    }
}
}  // namespace

// dtype: 0 f32, 1 f16, 2 bf16, 3 f64; ytype: 0 u32, 1 i64. Returns 0, or -1 for an unknown type.
extern "C" int xent_emu_run(int bwd, int strided, int dtype, int ytype, unsigned grid, unsigned block,
                            const void *x, const void *y, const void *soft, const void *w, const double *wsum,
                            void *stats, void *out, const XentParams *p, unsigned long long *bad) {
    switch (dtype) {
    case 0: return run_y<float>(ytype, bwd, strided, grid, block, x, y, soft, w, wsum, stats, out, p, bad);
    case 1: return run_y<__half>(ytype, bwd, strided, grid, block, x, y, soft, w, wsum, stats, out, p, bad);
    case 2: return run_y<__nv_bfloat16>(ytype, bwd, strided, grid, block, x, y, soft, w, wsum, stats, out, p, bad);
    case 3: return run_y<double>(ytype, bwd, strided, grid, block, x, y, soft, w, wsum, stats, out, p, bad);
    default: return -1;
    }
}
