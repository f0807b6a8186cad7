//! Small helpers shared by the CPU kernels of the custom ops.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

/// The elements of a contiguous CPU tensor as a typed slice; `what` names it in the error
/// (e.g. `"conv2d: input"`).
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}
