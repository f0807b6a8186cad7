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
