// The Metal kernels of candle-xent, compiled for the host (see metal_shim.h), behind one C entry.
#include "metal_shim.h"

#include "xent.metal"

namespace {
template <typename T, typename Y>
int run_typed(int bwd, int strided, unsigned grid, unsigned block, const void *x, const void *y,
              const void *soft, const float *w, const XentParamsMetal *p, float *stats, void *out,
              uint32_t *bad) {
    const T *xt = static_cast<const T *>(x);
    const Y *yt = static_cast<const Y *>(y);
    const T *st = static_cast<const T *>(soft);
    T *ot = static_cast<T *>(out);
    XentParamsMetal &prm = *const_cast<XentParamsMetal *>(p);
    atomic_uint *flag = reinterpret_cast<atomic_uint *>(bad);
    emu::launch(grid, block, [&] {
        uint tid = emu::thread_idx.x, tg = emu::block_idx.x, n = emu::block_dim.x;
        if (!bwd && !strided) xent_fwd<T, Y>(xt, yt, st, w, prm, stats, flag, tid, tg, n);
        else if (!bwd) xent_fwd_strided<T, Y>(xt, yt, st, w, prm, stats, flag, tid, tg, n);
        else if (!strided) xent_bwd<T, Y>(xt, yt, st, w, prm, stats, flag, ot, tid, tg, n);
        else xent_bwd_strided<T, Y>(xt, yt, st, w, prm, stats, flag, ot, tid, tg, n);
    });
    return 0;
}

template <typename T>
int run_y(int ytype, int bwd, int strided, unsigned grid, unsigned block, const void *x, const void *y,
          const void *soft, const float *w, const XentParamsMetal *p, float *stats, void *out, uint32_t *bad) {
    switch (ytype) {
    case 0: return run_typed<T, uint>(bwd, strided, grid, block, x, y, soft, w, p, stats, out, bad);
    case 1: return run_typed<T, long>(bwd, strided, grid, block, x, y, soft, w, p, stats, out, bad);
    default: return -1;
    }
}
}  // namespace

static_assert(sizeof(XentParamsMetal) == 7 * 8 + 6 * 4, "XentParamsMetal layout");
static_assert(sizeof(atomic_uint) == 4, "atomic_uint is 32-bit");

// dtype: 0 f32, 1 f16, 2 bf16; ytype: 0 u32, 1 i64. Returns 0, or -1 for an unknown type.
extern "C" int xent_emu_metal_run(int bwd, int strided, int dtype, int ytype, unsigned grid, unsigned block,
                                  const void *x, const void *y, const void *soft, const float *w,
                                  const XentParamsMetal *p, float *stats, void *out, uint32_t *bad) {
    switch (dtype) {
    case 0: return run_y<float>(ytype, bwd, strided, grid, block, x, y, soft, w, p, stats, out, bad);
    case 1: return run_y<half>(ytype, bwd, strided, grid, block, x, y, soft, w, p, stats, out, bad);
    case 2: return run_y<bfloat>(ytype, bwd, strided, grid, block, x, y, soft, w, p, stats, out, bad);
    default: return -1;
    }
}
