//! Atomic writes and the PyTorch-loadable safetensors export.

use crate::params::is_buffer;
use candle_core::{bail, DType, Result, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `path` atomically: `write` fills a temporary file in the same directory, which is
/// flushed to disk and renamed over `path`. A crash leaves either the old file or the new one.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("a.txt");
/// candle_resnet::export::atomic_write(&p, |tmp| Ok(std::fs::write(tmp, b"hi")?)).unwrap();
/// assert_eq!(std::fs::read(&p).unwrap(), b"hi");
/// ```
pub fn atomic_write(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| candle_core::Error::Msg(format!("{} is not a file path", path.display())))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| {
        let f = std::fs::File::open(&tmp)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes bytes atomically (see [`atomic_write`]).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("config.json");
/// candle_resnet::export::atomic_write_bytes(&p, b"{}").unwrap();
/// assert_eq!(std::fs::read(&p).unwrap(), b"{}");
/// ```
pub fn atomic_write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// The model's state dict as torchvision names it: every variable of `varmap` (as f32), plus a
/// 0-d i64 `num_batches_tracked` for every batch norm, so that PyTorch's strict
/// `load_state_dict` accepts it.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// candle_resnet::resnet::resnet18(196, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// let sd = candle_resnet::export::state_dict(&vm, 0).unwrap();
/// assert_eq!(sd["fc.weight"].dims(), &[196, 512]);
/// assert_eq!(sd["bn1.num_batches_tracked"].dtype(), DType::I64);
/// assert_eq!(sd.len(), 102 + 20);
/// ```
pub fn state_dict(varmap: &VarMap, num_batches_tracked: i64) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut out = HashMap::new();
    for (name, var) in data.iter() {
        let t = var
            .as_tensor()
            .detach()
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?;
        out.insert(name.clone(), t.contiguous()?);
        if let Some(module) = name.strip_suffix(".running_mean") {
            let nbt = Tensor::new(num_batches_tracked, &candle_core::Device::Cpu)?;
            out.insert(format!("{module}.num_batches_tracked"), nbt);
        }
    }
    Ok(out)
}

/// Exports the model to `path` as safetensors with torchvision names (atomically), loadable by
/// `timm.create_model("resnet18", num_classes=N)` + `load_state_dict` and by
/// `candle_finetune::pretrained::load_weights`.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// let vm = VarMap::new();
/// candle_resnet::resnet::resnet18(3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// let dir = tempfile::tempdir().unwrap();
/// candle_resnet::export::export_safetensors(&vm, 0, &dir.path().join("model.safetensors")).unwrap();
/// ```
pub fn export_safetensors(varmap: &VarMap, num_batches_tracked: i64, path: &Path) -> Result<()> {
    let sd = state_dict(varmap, num_batches_tracked)?;
    if sd.keys().all(|k| is_buffer(k)) {
        bail!("export: the VarMap holds no trainable tensors");
    }
    atomic_write(path, |tmp| candle_core::safetensors::save(&sd, tmp))
}
