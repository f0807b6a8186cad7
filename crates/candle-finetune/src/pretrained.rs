//! Pretrained weights into a trainable model: ImageNet weights from the Hub or a file
//! ([`pretrained`], [`load_weights`]), and fine-tuned classifiers loaded back from a model folder
//! or a Hub repo ([`load_model_folder`], [`from_pretrained`]).

use crate::config::ModelConfig;
use crate::hub::HubOptions;
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::{Arch, ResNet};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Default weights: torchvision's ResNet-18 V1 ImageNet weights as published by timm.
pub const DEFAULT_REPO: &str = "timm/resnet18.tv_in1k";
/// The pinned commit of [`DEFAULT_REPO`].
pub const DEFAULT_REVISION: &str = "bbd144b3e5565108aad885f145491d11bc6ce807";
/// The weights file in [`DEFAULT_REPO`].
pub const DEFAULT_FILE: &str = "model.safetensors";

/// Where the weights come from.
///
/// ```
/// use candle_finetune::pretrained::WeightsSource;
/// let src = WeightsSource::default();
/// assert!(matches!(src, WeightsSource::Hub { .. }));
/// let local = WeightsSource::File("model.safetensors".into());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    /// A file in a Hub model repository at a revision (branch, tag or commit).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or 40-hex commit.
        revision: String,
        /// File inside the repository.
        file: String,
    },
    /// A local safetensors file.
    File(PathBuf),
}

impl Default for WeightsSource {
    fn default() -> Self {
        WeightsSource::Hub {
            repo: DEFAULT_REPO.into(),
            revision: DEFAULT_REVISION.into(),
            file: DEFAULT_FILE.into(),
        }
    }
}

impl HubOptions {
    /// Resolves a [`WeightsSource`] to a local file.
    ///
    /// ```
    /// use candle_finetune::{hub::HubOptions, pretrained::WeightsSource};
    /// let p = HubOptions::default().resolve(&WeightsSource::File("w.safetensors".into()));
    /// assert!(p.is_err()); // no such file
    /// ```
    pub fn resolve(&self, source: &WeightsSource) -> Result<PathBuf> {
        match source {
            WeightsSource::File(p) => {
                if !p.is_file() {
                    bail!("weights file {} does not exist", p.display());
                }
                Ok(p.clone())
            }
            WeightsSource::Hub {
                repo,
                revision,
                file,
            } => self.model_file(repo, revision, file),
        }
    }
}

/// How to treat the file's `fc` when loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Keep the freshly initialised head of the model (fine-tuning from ImageNet weights).
    Fresh,
    /// Load `fc` from the file too (reloading a fine-tuned model); its shape must match.
    FromFile,
}

/// Loads a torchvision/timm state dict from `path` into `varmap`, whose variables must already
/// exist (build the model on `VarBuilder::from_varmap(varmap, ..)` first). Every model variable
/// must be in the file with the same shape, except `fc.*` under [`Head::Fresh`]; file entries the
/// model does not have are an error, except `num_batches_tracked` (ignored) and `fc.*` under
/// [`Head::Fresh`]. Returns the number of tensors loaded.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_finetune::pretrained;
/// use candle_resnet::export;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("m.safetensors");
/// let a = VarMap::new();
/// candle_resnet::resnet::resnet18(7, VarBuilder::from_varmap(&a, DType::F32, &Device::Cpu)).unwrap();
/// export::export_safetensors(&a, 0, &path).unwrap();
/// let b = VarMap::new();
/// candle_resnet::resnet::resnet18(7, VarBuilder::from_varmap(&b, DType::F32, &Device::Cpu)).unwrap();
/// assert_eq!(pretrained::load_weights(&b, &path, pretrained::Head::FromFile).unwrap(), 102);
/// ```
pub fn load_weights(varmap: &VarMap, path: &Path, head: Head) -> Result<usize> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        candle_core::Error::Msg(format!("cannot read weights {}: {e}", path.display()))
    })?;
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let skip_head = |name: &str| head == Head::Fresh && candle_resnet::params::is_head(name);
    for name in tensors.keys() {
        if name.ends_with(".num_batches_tracked") || skip_head(name) {
            continue;
        }
        if !data.contains_key(name) {
            bail!(
                "weights {}: tensor {name:?} has no counterpart in the model (wrong architecture?)",
                path.display()
            );
        }
    }
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut loaded = 0;
    for name in names {
        if skip_head(name) {
            continue;
        }
        let var = &data[name];
        let Some(t) = tensors.get(name) else {
            bail!(
                "weights {}: the model's tensor {name:?} is missing from the file",
                path.display()
            );
        };
        if t.dims() != var.dims() {
            bail!(
                "weights {}: tensor {name:?} has shape {:?}, the model expects {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        if !t.dtype().is_float() {
            bail!(
                "weights {}: tensor {name:?} has dtype {:?}, expected a float",
                path.display(),
                t.dtype()
            );
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        loaded += 1;
    }
    Ok(loaded)
}

/// A trainable model initialised from pretrained weights, with a fresh `num_classes` head
/// initialised like PyTorch's `nn.Linear`.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_finetune::pretrained;
/// use candle_resnet::{export, resnet::Arch};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("imagenet.safetensors");
/// let vm = VarMap::new();
/// candle_resnet::resnet::resnet18(1000, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// export::export_safetensors(&vm, 0, &path).unwrap();
/// let (varmap, model) = pretrained::pretrained(Arch::ResNet18, 196, &path, &Device::Cpu).unwrap();
/// assert_eq!(model.num_classes(), 196);
/// ```
pub fn pretrained(
    arch: Arch,
    num_classes: usize,
    weights: &Path,
    device: &Device,
) -> Result<(VarMap, ResNet)> {
    let varmap = VarMap::new();
    let model = arch.build(
        num_classes,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    load_weights(&varmap, weights, Head::Fresh)?;
    Ok((varmap, model))
}

/// Reads the tensors of a safetensors file (a convenience for tools and tests).
///
/// ```
/// let r = candle_finetune::pretrained::read_safetensors(std::path::Path::new("/nonexistent"));
/// assert!(r.is_err());
/// ```
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
}

/// Loads an exported model folder (`config.json` + `model.safetensors`, as written by
/// `cargo xtask train-cars`): the model in eval-ready state, its config and its variables.
pub fn load_model_folder(dir: &Path, device: &Device) -> Result<(ResNet, ModelConfig, VarMap)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        candle_core::Error::Msg(format!("model folder {}: {e}", cfg_path.display()))
    })?;
    let cfg: ModelConfig = serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let varmap = VarMap::new();
    let model = cfg.architecture.build(
        cfg.num_classes,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    load_weights(&varmap, &dir.join("model.safetensors"), Head::FromFile)?;
    Ok((model, cfg, varmap))
}

/// A fine-tuned classifier loaded back from the Hub (or a local folder) by [`from_pretrained`].
pub struct Pretrained {
    /// The network, weights loaded.
    pub model: ResNet,
    /// Its `config.json`.
    pub config: ModelConfig,
    /// Class names, index order.
    pub labels: Vec<String>,
    /// The model's variables (to fine-tune further or export).
    pub varmap: VarMap,
}

impl Pretrained {
    /// The eval transform of this model's config (resize, center crop, normalise), the one
    /// evaluation and [`Pretrained::predict`] apply.
    pub fn transform(&self) -> crate::data::Transform {
        crate::data::Transform::for_eval(self.config.preprocess())
    }

    /// The `k` most probable classes of each encoded image (JPEG or PNG bytes), as
    /// `(class name, probability)` pairs, most probable first: the config's preprocessing, one
    /// forward pass in eval mode, softmax. An undecodable image is an `Err` naming its index.
    ///
    /// ```no_run
    /// use candle_finetune::{hub::HubOptions, pretrained::from_pretrained};
    /// let p = from_pretrained(&HubOptions::from_env(), "someone/resnet18-stanford-cars", None,
    ///                         &candle_core::Device::Cpu).unwrap();
    /// let top = p.predict(&[std::fs::read("car.jpg").unwrap()], 5).unwrap();
    /// println!("{} ({:.1} %)", top[0][0].0, 100.0 * top[0][0].1);
    /// ```
    pub fn predict<B: AsRef<[u8]>>(
        &self,
        images: &[B],
        k: usize,
    ) -> Result<Vec<Vec<(String, f32)>>> {
        let t = self.transform();
        let s = t.pre.size as usize;
        let device = self
            .varmap
            .all_vars()
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        let mut buf = vec![0f32; images.len() * 3 * s * s];
        for (i, (bytes, out)) in images.iter().zip(buf.chunks_mut(3 * s * s)).enumerate() {
            let img = crate::data::decode_rgb(bytes.as_ref())
                .map_err(|e| candle_core::Error::Msg(format!("image {i}: {e}")))?;
            t.apply(&img, 0, 0, 0, out)
                .map_err(|e| candle_core::Error::Msg(format!("image {i}: {e}")))?;
        }
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let x = Tensor::from_vec(buf, (images.len(), 3, s, s), &device)?;
        let logits = self.model.infer(&x)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        Ok(probs
            .into_iter()
            .map(|p| {
                let mut idx: Vec<usize> = (0..p.len()).collect();
                // Highest first; ties keep the lower class index first.
                idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                idx.into_iter()
                    .take(k)
                    .map(|i| (self.labels[i].clone(), p[i]))
                    .collect()
            })
            .collect())
    }
}

/// Loads a model published by `cargo xtask publish-cars` (any repo holding the `config.json` and
/// `model.safetensors` of [`crate::card::write_model_folder`]): `repo` is `OWNER/NAME` on the
/// Hub (downloaded into the Hub cache, or read from it when [`HubOptions::offline`]) or a local
/// folder; `revision` defaults to `main`.
///
/// ```no_run
/// use candle_finetune::{hub::HubOptions, pretrained::from_pretrained};
/// let p = from_pretrained(&HubOptions::from_env(), "someone/resnet18-stanford-cars", None,
///                         &candle_core::Device::Cpu).unwrap();
/// println!("{} classes, first {}", p.labels.len(), p.labels[0]);
/// ```
pub fn from_pretrained(
    opts: &HubOptions,
    repo: &str,
    revision: Option<&str>,
    device: &Device,
) -> Result<Pretrained> {
    let local = Path::new(repo);
    let dir = if local.is_dir() {
        local.to_path_buf()
    } else {
        let rev = revision.unwrap_or("main");
        opts.model_file(repo, rev, "config.json")?;
        let w = opts.model_file(repo, rev, "model.safetensors")?;
        w.parent()
            .ok_or_else(|| candle_core::Error::Msg(format!("{repo}: no snapshot folder")))?
            .to_path_buf()
    };
    let (model, config, varmap) = load_model_folder(&dir, device)?;
    if config.id2label.len() != config.num_classes {
        bail!(
            "{repo}: config.json names {} classes but has num_classes {}",
            config.id2label.len(),
            config.num_classes
        );
    }
    let labels = config.class_names();
    Ok(Pretrained {
        model,
        config,
        labels,
        varmap,
    })
}
