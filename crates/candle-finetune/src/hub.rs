//! ImageNet weights from the Hugging Face Hub (hf-hub 1.0) or a local file, into a trainable
//! [`VarMap`].
//!
//! Environment, as the Python `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`
//! and `HF_HUB_CACHE` (read by hf-hub itself) and `HF_HUB_OFFLINE` (mapped here to hf-hub's
//! `local_files_only`). Files land in the standard cache layout
//! (`<cache>/models--OWNER--NAME/snapshots/<commit>/<file>`), so a second run, or a run with a
//! pinned 40-hex revision already cached, makes no network request.

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
/// use candle_finetune::hub::WeightsSource;
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

/// How to reach the Hub. [`HubOptions::from_env`] is what the command-line tools use; tests set
/// the fields explicitly instead of touching process-wide environment variables.
///
/// ```
/// let opts = candle_finetune::hub::HubOptions { offline: true, ..Default::default() };
/// assert!(opts.cache_dir.is_none());
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// Cache root; `None`: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network (resolve from the cache only).
    pub offline: bool,
    /// Endpoint; `None`: `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Access token; `None`: `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else
    /// `HF_HOME/token` (what `huggingface-cli login` writes). Never printed: `Debug` redacts it.
    pub token: Option<String>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Whether an environment value means "on" (`1`, `true`, `yes`, `on`, any case).
fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubOptions {
    /// Options from the environment: `HF_HUB_OFFLINE` sets [`HubOptions::offline`]; the cache
    /// and endpoint variables are read by hf-hub.
    ///
    /// ```
    /// let opts = candle_finetune::hub::HubOptions::from_env();
    /// ```
    pub fn from_env() -> Self {
        Self {
            cache_dir: None,
            offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| truthy(&v)),
            endpoint: None,
            token: None,
        }
    }

    /// A blocking hf-hub client honouring these options.
    ///
    /// ```
    /// let client = candle_finetune::hub::HubOptions::default().client().unwrap();
    /// ```
    pub fn client(&self) -> Result<hf_hub::HFClientSync> {
        let mut b = hf_hub::HFClient::builder();
        if let Some(dir) = &self.cache_dir {
            b = b.cache_dir(dir);
        }
        if let Some(e) = &self.endpoint {
            b = b.endpoint(e);
        }
        if let Some(t) = &self.token {
            b = b.token(t);
        }
        b.build_sync()
            .map_err(hub_err("cannot create the Hub client"))
    }

    /// The local path of `file` in model repo `repo` at `revision`, downloading it into the cache
    /// unless it is there (or [`HubOptions::offline`] is set).
    ///
    /// ```no_run
    /// let opts = candle_finetune::hub::HubOptions::from_env();
    /// let p = opts.model_file("timm/resnet18.tv_in1k", candle_finetune::hub::DEFAULT_REVISION, "model.safetensors").unwrap();
    /// ```
    pub fn model_file(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        let (owner, name) = split_repo(repo)?;
        self.fetch(
            self.client()?.model(owner, name),
            "model",
            repo,
            revision,
            file,
        )
    }

    /// Downloads (or finds in the cache) one file of a repository.
    fn fetch<T: hf_hub::RepoType>(
        &self,
        handle: hf_hub::HFRepositorySync<T>,
        kind: &str,
        repo: &str,
        revision: &str,
        file: &str,
    ) -> Result<PathBuf> {
        let offline = self.offline;
        handle
            .download_file()
            .filename(file)
            .revision(revision)
            .local_files_only(offline)
            .send()
            .map_err(|e| {
                let hint = match (&e, offline) {
                    (hf_hub::HFError::Request { .. }, _) => OFFLINE_HINT,
                    (_, true) => FILL_CACHE_HINT,
                    _ => "",
                };
                let mode = if offline {
                    " (offline: HF_HUB_OFFLINE is set, so only the cache was searched)"
                } else {
                    ""
                };
                candle_core::Error::Msg(format!(
                    "cannot get {file} from {kind} repo {repo} at {revision}{mode}{hint}\n  cause: {e}"
                ))
            })
    }

    /// The local path of `file` in dataset repo `repo` at `revision` (see [`HubOptions::model_file`]).
    ///
    /// ```no_run
    /// let opts = candle_finetune::hub::HubOptions::from_env();
    /// let p = opts.dataset_file("tanganke/stanford_cars", candle_finetune::data::DEFAULT_DATASET_REVISION,
    ///     "data/test-00000-of-00002.parquet").unwrap();
    /// ```
    pub fn dataset_file(&self, repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
        let (owner, name) = split_repo(repo)?;
        self.fetch(
            self.client()?.dataset(owner, name),
            "dataset",
            repo,
            revision,
            file,
        )
    }

    /// Resolves a [`WeightsSource`] to a local file.
    ///
    /// ```
    /// use candle_finetune::hub::{HubOptions, WeightsSource};
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

/// Appended to a download error when the Hub could not be reached: how to run offline.
pub const OFFLINE_HINT: &str = "\n  the Hub cannot be reached; to run offline: HF_HUB_OFFLINE=1 with a filled Hub cache (HF_HUB_CACHE / HF_HOME), or local files (train-cars --data-dir DIR --weights-file FILE)";

/// Appended to an offline cache miss: how to fill the cache or avoid it.
pub const FILL_CACHE_HINT: &str = "\n  the file is not in the Hub cache: run once online (e.g. cargo xtask download-cars) to fill it, or use local files (train-cars --data-dir DIR --weights-file FILE)";

/// `owner/name` split in two, or an error naming the bad id.
pub(crate) fn split_repo(repo: &str) -> Result<(&str, &str)> {
    match repo.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
        _ => bail!("repository id {repo:?} is not of the form OWNER/NAME"),
    }
}

pub(crate) fn hub_err(context: &str) -> impl FnOnce(hf_hub::HFError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("{context}: {e}"))
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
/// use candle_finetune::{export, hub};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("m.safetensors");
/// let a = VarMap::new();
/// candle_resnet::resnet::resnet18(7, VarBuilder::from_varmap(&a, DType::F32, &Device::Cpu)).unwrap();
/// export::export_safetensors(&a, 0, &path).unwrap();
/// let b = VarMap::new();
/// candle_resnet::resnet::resnet18(7, VarBuilder::from_varmap(&b, DType::F32, &Device::Cpu)).unwrap();
/// assert_eq!(hub::load_weights(&b, &path, hub::Head::FromFile).unwrap(), 102);
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
/// use candle_finetune::{export, hub, resnet::Arch};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("imagenet.safetensors");
/// let vm = VarMap::new();
/// candle_resnet::resnet::resnet18(1000, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// export::export_safetensors(&vm, 0, &path).unwrap();
/// let (varmap, model) = hub::pretrained(Arch::ResNet18, 196, &path, &Device::Cpu).unwrap();
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
/// let r = candle_finetune::hub::read_safetensors(std::path::Path::new("/nonexistent"));
/// assert!(r.is_err());
/// ```
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
}

/// Kind of Hub repository, as named in the cache (`models--...`, `datasets--...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// A model repository.
    Model,
    /// A dataset repository.
    Dataset,
}

impl RepoKind {
    fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// The Hub cache folder of a repository: `<cache>/<kind>s--OWNER--NAME`.
///
/// ```
/// use candle_finetune::hub::{repo_cache_dir, RepoKind};
/// let p = repo_cache_dir(std::path::Path::new("/c"), RepoKind::Model, "timm/resnet18.tv_in1k").unwrap();
/// assert_eq!(p, std::path::Path::new("/c/models--timm--resnet18.tv_in1k"));
/// ```
pub fn repo_cache_dir(cache: &Path, kind: RepoKind, repo: &str) -> Result<PathBuf> {
    let (owner, name) = split_repo(repo)?;
    Ok(cache.join(format!("{}--{owner}--{name}", kind.plural())))
}

/// The lower-case hex SHA-256 of a file.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("x");
/// std::fs::write(&p, b"abc").unwrap();
/// assert_eq!(candle_finetune::hub::sha256_file(&p).unwrap(),
///            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
/// ```
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Places a local file into a Hub cache exactly as hf-hub would after downloading it: the
/// content under `blobs/<sha256>`, a relative symlink `snapshots/<revision>/<file>` to it, and
/// `refs/main` pointing at `revision` (a 40-hex commit). Used by the offline `--smoke` runs and by
/// the tests, which then read the file back through the normal hf-hub path.
///
/// ```
/// use candle_finetune::hub::{seed_cache, HubOptions, RepoKind, WeightsSource};
/// let cache = tempfile::tempdir().unwrap();
/// let src = cache.path().join("w.bin");
/// std::fs::write(&src, b"weights").unwrap();
/// let rev = "0123456789abcdef0123456789abcdef01234567";
/// seed_cache(cache.path(), RepoKind::Model, "me/net", rev, "model.safetensors", &src).unwrap();
/// let opts = HubOptions { cache_dir: Some(cache.path().into()), offline: true, ..Default::default() };
/// let p = opts.model_file("me/net", "main", "model.safetensors").unwrap();
/// assert_eq!(std::fs::read(p).unwrap(), b"weights");
/// ```
pub fn seed_cache(
    cache: &Path,
    kind: RepoKind,
    repo: &str,
    revision: &str,
    file: &str,
    src: &Path,
) -> Result<PathBuf> {
    if revision.len() != 40 || !revision.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("seed_cache: revision {revision:?} must be a 40-hex commit");
    }
    let root = repo_cache_dir(cache, kind, repo)?;
    let sha = sha256_file(src)?;
    let blob = root.join("blobs").join(&sha);
    std::fs::create_dir_all(root.join("blobs"))?;
    if !blob.exists() {
        crate::files::atomic_write(&blob, |tmp| {
            std::fs::copy(src, tmp)?;
            Ok(())
        })?;
    }
    let snap = root.join("snapshots").join(revision).join(file);
    let parent = snap.parent().expect("snapshot path has a parent");
    std::fs::create_dir_all(parent)?;
    let depth = Path::new(file).components().count() + 1; // file's dirs + the revision folder
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(&sha);
    if snap.symlink_metadata().is_ok() {
        std::fs::remove_file(&snap)?;
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, &snap)?;
    #[cfg(not(unix))]
    std::fs::copy(&blob, &snap)?;
    std::fs::create_dir_all(root.join("refs"))?;
    crate::files::atomic_write_bytes(&root.join("refs").join("main"), revision.as_bytes())?;
    Ok(snap)
}

/// Loads an exported model folder (`config.json` + `model.safetensors`, as written by
/// `cargo xtask train-cars`): the model in eval-ready state, its config and its variables.
pub fn load_model_folder(
    dir: &Path,
    device: &Device,
) -> Result<(ResNet, crate::card::ModelConfig, VarMap)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        candle_core::Error::Msg(format!("model folder {}: {e}", cfg_path.display()))
    })?;
    let cfg: crate::card::ModelConfig = serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let varmap = VarMap::new();
    let model = cfg.architecture.build(
        cfg.num_classes,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    load_weights(&varmap, &dir.join("model.safetensors"), Head::FromFile)?;
    Ok((model, cfg, varmap))
}

impl HubOptions {
    /// The token uploads will use: [`HubOptions::token`], else `HF_TOKEN`, else the file named by
    /// `HF_TOKEN_PATH`, else `HF_HOME/token` (default `~/.cache/huggingface/token`), the order
    /// hf-hub itself follows. `None` when there is none (or `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set).
    pub fn resolved_token(&self) -> Option<String> {
        if let Some(t) = &self.token {
            return Some(t.clone()).filter(|t| !t.is_empty());
        }
        if std::env::var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_ok_and(|v| !v.is_empty()) {
            return None;
        }
        if let Ok(t) = std::env::var("HF_TOKEN") {
            if !t.is_empty() {
                return Some(t);
            }
        }
        let file = match std::env::var_os("HF_TOKEN_PATH") {
            Some(p) => PathBuf::from(p),
            None => {
                let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface"))
                });
                home?.join("token")
            }
        };
        let t = std::fs::read_to_string(file).ok()?.trim().to_string();
        Some(t).filter(|t| !t.is_empty())
    }
}

/// A fine-tuned classifier loaded back from the Hub (or a local folder) by [`from_pretrained`].
pub struct Pretrained {
    /// The network, weights loaded.
    pub model: ResNet,
    /// Its `config.json`.
    pub config: crate::card::ModelConfig,
    /// Class names, index order.
    pub labels: Vec<String>,
    /// The model's variables (to fine-tune further or export).
    pub varmap: VarMap,
}

/// Loads a model published by `cargo xtask publish-cars` (any repo holding the `config.json` and
/// `model.safetensors` of [`crate::card::write_model_folder`]): `repo` is `OWNER/NAME` on the
/// Hub (downloaded into the Hub cache, or read from it when [`HubOptions::offline`]) or a local
/// folder; `revision` defaults to `main`.
///
/// ```no_run
/// use candle_finetune::hub::{from_pretrained, HubOptions};
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
