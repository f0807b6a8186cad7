//! Writing files so that a crash never leaves a half-written one: checkpoints, exports, the model
//! folder's JSON and card. The implementation lives with the model export in `candle-resnet`
//! (`candle_resnet::export`), which needs it too; this is the place to find it from here.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let p = dir.path().join("eval.json");
//! candle_finetune::files::atomic_write_bytes(&p, b"{}").unwrap();
//! assert_eq!(std::fs::read(&p).unwrap(), b"{}");
//! ```

pub use candle_resnet::export::{atomic_write, atomic_write_bytes};

/// The files below `dir` (symbolic links followed) that `keep` accepts, as sorted
/// `/`-separated paths relative to `dir`: a Hub snapshot's or a data folder's listing.
pub(crate) fn relative_files(
    dir: &std::path::Path,
    keep: impl Fn(&std::path::Path) -> bool,
) -> candle_core::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", d.display())))?;
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() && keep(&p) {
                let rel = p.strip_prefix(dir).expect("walked under the folder");
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                files.push(parts.join("/"));
            }
        }
    }
    files.sort();
    Ok(files)
}
