//! Launch geometry and parameter block of the GPU kernels (`src/xent.cu`).
//!
//! Plain Rust, compiled on every platform: the CUDA path launches with these values, and the
//! host emulation of the kernels (the `xent-kernel-emu` test crate) uses the very same ones, so
//! the choice of threads per row is tested without a GPU. 131,072 f32 classes get one
//! 1024-thread block per row; 10 classes one warp per row, 8 rows per 256-thread block (the
//! unit tests below check both).

/// Values per row of the forward's output, in the accumulator type, every backend alike:
/// `[loss, shift, log_sum, target_weight]`. The log-sum-exp is kept as the pair
/// `shift + log_sum`, `shift` the row's largest logit (0 when every logit is -inf) and `log_sum`
/// `ln sum exp(x - shift)` (in `[0, ln C]`), never as one rounded sum: at |x| ~ 1e4 an f32 sum
/// would carry ~1e-3 of rounding into every probability `exp(x - lse)`. The backward reads
/// `[shift, log_sum, target_weight, upstream]` (the last three columns plus the upstream
/// gradient of the row's loss) and forms `p = exp((x - shift) - log_sum)`, where `x - shift` is
/// exact for every probability that matters.
pub const STATS: usize = 4;
/// Column of the row's loss.
pub const COL_LOSS: usize = 0;
/// Column of the target weight: `w_y` (0 for an ignored row), or `sum_c w_c q_c` for soft
/// targets (the mean's denominator term and the backward's probability coefficient).
pub const COL_TARGET_WEIGHT: usize = 3;

/// Threads of a warp.
pub const WARP: u32 = 32;
/// Threads of a block in warp-per-row mode and of the strided kernels.
pub const BLOCK: u32 = 256;
/// Largest block (CUDA's limit, and the shared-memory size of the block reduction).
pub const MAX_BLOCK: u32 = 1024;
/// 16-byte vectors each thread should at least load from its row before more threads are added.
const VECS_PER_THREAD: usize = 8;

/// Kernel parameters, laid out exactly like `struct XentParams` in `xent.cu` (every field 8
/// bytes, so there is no padding for the two compilers to disagree on).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XentParams {
    /// Product of the dims before the class dim.
    pub outer: i64,
    /// Number of classes `C`.
    pub classes: i64,
    /// Product of the dims after the class dim (1: rows are contiguous).
    pub inner: i64,
    /// Label smoothing `eps`.
    pub smoothing: f64,
    /// Target value that is ignored.
    pub ignore_index: i64,
    /// z-loss coefficient (0: off).
    pub z_loss: f64,
    /// Soft-cap (0: off).
    pub softcap: f64,
    /// Threads per row in the row kernels (32, or the block size).
    pub group: i64,
    /// 1 when class weights are given.
    pub weighted: i64,
    /// 1 for probability targets.
    pub soft: i64,
}

/// Kernel parameters of the Metal kernels, laid out like `struct XentParamsMetal` in
/// `xent.metal`: seven 8-byte integers, then six `f32` (Metal GPUs have no f64). The derived
/// values are computed here in f64 and rounded once, exactly as the CPU op rounds them.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XentParamsMetal {
    /// Product of the dims before the class dim.
    pub outer: i64,
    /// Number of classes `C`.
    pub classes: i64,
    /// Product of the dims after the class dim.
    pub inner: i64,
    /// Target value that is ignored.
    pub ignore_index: i64,
    /// Threads per row in the row kernels.
    pub group: i64,
    /// 1 when class weights are given.
    pub weighted: i64,
    /// 1 for probability targets.
    pub soft: i64,
    /// Label smoothing `eps`.
    pub smoothing: f32,
    /// `eps / C`.
    pub eps_over_c: f32,
    /// z-loss coefficient.
    pub z_loss: f32,
    /// Soft-cap (0: off).
    pub softcap: f32,
    /// Sum of the class weights (`C` when unweighted).
    pub weight_sum: f32,
    /// `1 - eps`, formed in f64 (exact near eps = 1, where `1 - (f32)eps` is not).
    pub one_minus_eps: f32,
}

impl XentParamsMetal {
    /// The Metal parameters of the CUDA-side description `p` (whose `group` is taken as is)
    /// with the class weights' sum (`None`: unweighted).
    pub fn from_params(p: &XentParams, weight_sum: Option<f64>) -> Self {
        Self {
            outer: p.outer,
            classes: p.classes,
            inner: p.inner,
            ignore_index: p.ignore_index,
            group: p.group,
            weighted: p.weighted,
            soft: p.soft,
            smoothing: p.smoothing as f32,
            eps_over_c: (p.smoothing / p.classes as f64) as f32,
            z_loss: p.z_loss as f32,
            softcap: p.softcap as f32,
            weight_sum: weight_sum.unwrap_or(p.classes as f64) as f32,
            one_minus_eps: (1.0 - p.smoothing) as f32,
        }
    }
}

/// A 1-D launch: `grid` blocks of `block` threads, `group` threads per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Number of blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Threads cooperating on one row (row kernels); 1 for the strided kernels.
    pub group: u32,
}

/// Geometry of the row kernels (`inner == 1`) for `rows` rows of `classes` elements of
/// `elem_bytes` bytes: a warp per row while a row is at most `32 * 8` vectors of 16 bytes, else
/// one block per row with enough threads that each loads about 8 vectors (up to 1024 threads).
pub fn rows_launch(rows: usize, classes: usize, elem_bytes: usize) -> Launch {
    let vec = (16 / elem_bytes.max(1)).max(1);
    let vectors = classes.div_ceil(vec);
    let want = vectors.div_ceil(VECS_PER_THREAD);
    let group = if want <= WARP as usize {
        WARP
    } else {
        (want.next_power_of_two() as u32).min(MAX_BLOCK)
    };
    rows_launch_with_group(rows, group)
}

/// [`rows_launch`] with a given number of threads per row (32, or a multiple of 32 up to 1024
/// that is then the block size). Used by tests to drive both reduction paths on small rows.
pub fn rows_launch_with_group(rows: usize, group: u32) -> Launch {
    assert!(
        (WARP..=MAX_BLOCK).contains(&group) && group.is_multiple_of(WARP),
        "group {group} must be a multiple of 32 in 32..=1024"
    );
    let per_block = if group == WARP {
        (BLOCK / WARP) as usize
    } else {
        1
    };
    let block = if group == WARP { BLOCK } else { group };
    Launch {
        grid: rows.div_ceil(per_block) as u32,
        block,
        group,
    }
}

/// Geometry of the strided kernels (`inner > 1`): one thread per row.
pub fn strided_launch(rows: usize) -> Launch {
    Launch {
        grid: rows.div_ceil(BLOCK as usize) as u32,
        block: BLOCK,
        group: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_grows_with_the_row() {
        // f32: 4 per vector, 8 vectors per thread -> 32 elements per thread.
        assert_eq!(rows_launch(1, 1024, 4).group, 32);
        assert_eq!(rows_launch(1, 1025, 4).group, 64);
        assert_eq!(rows_launch(1, 32_768, 4).group, 1024);
        // bf16: 8 per vector -> 64 elements per thread.
        assert_eq!(rows_launch(1, 2048, 2).group, 32);
        assert_eq!(rows_launch(1, 4096, 2).group, 64);
        // f64: 2 per vector.
        assert_eq!(rows_launch(1, 1000, 8).group, 64);
    }

    #[test]
    fn grids_cover_every_row() {
        for rows in [1usize, 7, 8, 9, 1000] {
            let l = rows_launch(rows, 10, 4);
            assert!(l.grid as usize * (l.block / l.group) as usize >= rows);
            assert!((l.grid as usize - 1) * ((l.block / l.group) as usize) < rows);
            let l = rows_launch(rows, 100_000, 4);
            assert_eq!(l.grid as usize, rows);
            let s = strided_launch(rows);
            assert!(s.grid as usize * 256 >= rows);
        }
    }

    // Formerly doctests: the module is private unless the `kernel-abi` feature is on, so they
    // failed under `cargo test -p candle-xent`.
    #[test]
    fn big_rows_get_a_block_small_rows_a_warp() {
        let l = rows_launch(16_384, 131_072, 4);
        assert_eq!((l.grid, l.block, l.group), (16_384, 1024, 1024));
        let l = rows_launch(100, 10, 4);
        assert_eq!((l.grid, l.block, l.group), (13, 256, 32));
    }

    #[test]
    fn metal_params_from_cuda_params() {
        let p = XentParams {
            outer: 2,
            classes: 10,
            inner: 1,
            smoothing: 0.1,
            ignore_index: -100,
            z_loss: 0.0,
            softcap: 0.0,
            group: 32,
            weighted: 0,
            soft: 0,
        };
        let m = XentParamsMetal::from_params(&p, None);
        assert_eq!((m.eps_over_c, m.weight_sum), ((0.1f64 / 10.0) as f32, 10.0));
        assert_eq!(m.one_minus_eps, 0.9f32);
        let m = XentParamsMetal::from_params(&p, Some(2.5));
        assert_eq!(m.weight_sum, 2.5);
    }

    #[test]
    fn params_have_no_padding() {
        assert_eq!(std::mem::size_of::<XentParams>(), 10 * 8);
        assert_eq!(std::mem::size_of::<XentParamsMetal>(), 7 * 8 + 6 * 4);
    }
}
