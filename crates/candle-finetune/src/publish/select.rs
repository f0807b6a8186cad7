//! Which files of a model folder go to the Hub: everything but what an exclude pattern names.
//!
//! A pattern without `/` is matched against every component of a path (as in `.gitignore`:
//! `checkpoint-*` keeps `checkpoint-best.safetensors` and anything under a `checkpoint-*/`
//! folder local); a pattern with `/` is matched against the whole `/`-separated relative path.
//! `*` never crosses a `/`; `**` does.

use candle_core::Result;
use globset::{GlobBuilder, GlobMatcher};
use std::path::Path;

/// What [`crate::publish::PublishOptions::exclude`] holds unless told otherwise: the training
/// checkpoints (`checkpoint-best.safetensors`, `checkpoint-last.safetensors`: the weights plus
/// optimizer state, about 90 MB each for a ResNet-18, which belong to the training run, not to
/// the published model), half-written temporary files and hidden files.
pub const DEFAULT_EXCLUDE: [&str; 3] = ["checkpoint-*", "*.tmp", ".*"];

/// The files of a folder split by the exclude patterns, as sorted `/`-separated relative paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Files to upload.
    pub upload: Vec<String>,
    /// Files an exclude pattern keeps local.
    pub kept_local: Vec<String>,
}

enum Pattern {
    /// No `/`: any component.
    Component(GlobMatcher),
    /// With `/`: the whole path.
    Path(GlobMatcher),
}

impl Pattern {
    fn new(p: &str) -> Result<Self> {
        let m = GlobBuilder::new(p.trim_start_matches('/'))
            .literal_separator(true)
            .build()
            .map_err(|e| {
                candle_core::Error::Msg(format!("publish: bad exclude pattern {p:?}: {e}"))
            })?
            .compile_matcher();
        Ok(if p.contains('/') {
            Self::Path(m)
        } else {
            Self::Component(m)
        })
    }

    fn matches(&self, rel: &str) -> bool {
        match self {
            Self::Component(m) => rel.split('/').any(|c| m.is_match(c)),
            Self::Path(m) => m.is_match(rel),
        }
    }
}

/// Every file under `dir` (recursively), split by `exclude`.
///
/// ```
/// use candle_finetune::publish::{select_files, DEFAULT_EXCLUDE};
/// let dir = tempfile::tempdir().unwrap();
/// for f in ["model.safetensors", "checkpoint-last.safetensors", "plots/curves.png"] {
///     let p = dir.path().join(f);
///     std::fs::create_dir_all(p.parent().unwrap()).unwrap();
///     std::fs::write(p, b"x").unwrap();
/// }
/// let ex: Vec<String> = DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect();
/// let s = select_files(dir.path(), &ex).unwrap();
/// assert_eq!(s.upload, ["model.safetensors", "plots/curves.png"]);
/// assert_eq!(s.kept_local, ["checkpoint-last.safetensors"]);
/// ```
pub fn select_files(dir: &Path, exclude: &[String]) -> Result<Selection> {
    let patterns = exclude
        .iter()
        .map(|p| Pattern::new(p))
        .collect::<Result<Vec<_>>>()?;
    let (mut upload, mut kept_local) = (Vec::new(), Vec::new());
    for rel in list_files(dir)? {
        if patterns.iter().any(|p| p.matches(&rel)) {
            kept_local.push(rel);
        } else {
            upload.push(rel);
        }
    }
    Ok(Selection { upload, kept_local })
}

/// Every file under `dir`, as sorted `/`-separated relative paths.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else {
                let rel = p.strip_prefix(root).map_err(candle_core::Error::wrap)?;
                let parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn component_and_path_patterns() {
        let c = Pattern::new("checkpoint-*").unwrap();
        assert!(c.matches("checkpoint-best.safetensors"));
        assert!(c.matches("runs/checkpoint-3/model.safetensors"));
        assert!(!c.matches("model.safetensors"));
        let p = Pattern::new("plots/*.png").unwrap();
        assert!(p.matches("plots/curves.png"));
        assert!(!p.matches("plots/sub/curves.png"), "* does not cross /");
        assert!(Pattern::new("**/*.png")
            .unwrap()
            .matches("plots/sub/curves.png"));
        assert!(Pattern::new("a[").is_err());
    }
}
