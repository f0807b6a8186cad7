//! Hugging Face Hub transport (hf-hub 1.0): [`HubOptions`] (endpoint, cache, offline mode, token),
//! single-file downloads into the standard cache, and the cache layout itself
//! ([`repo_cache_dir`], [`seed_cache`]) for tests and offline runs.
//!
//! Environment, as the Python `huggingface_hub` reads it: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`
//! and `HF_HUB_CACHE` (read by hf-hub itself) and `HF_HUB_OFFLINE` (mapped here to hf-hub's
//! `local_files_only`). Files land in the standard cache layout
//! (`<cache>/models--OWNER--NAME/snapshots/<commit>/<file>`), so a second run, or a run with a
//! pinned 40-hex revision already cached, makes no network request. Model weights on top of this:
//! [`crate::pretrained`].

use candle_core::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a request may wait for the Hub, to connect or for any read, unless
/// [`HubOptions::timeout`] (or `HF_HUB_DOWNLOAD_TIMEOUT`, in seconds) says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Retries of a Hub request after a transient failure (a 5xx or 429 answer, a refused or reset
/// connection, a timeout): one. With the timeout applying to every wait, a Hub operation whose
/// server stops answering ends with an error within twice [`HubOptions::wait_limit`] of the
/// request that got no answer (plus hf-hub's sub-second backoff), not five or six times it.
pub const HUB_RETRIES: usize = 1;

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
    /// `HF_HOME/token` (what `hf auth login` writes). Never printed: `Debug` redacts it.
    pub token: Option<String>,
    /// The longest wait for the server, to connect or between two reads of an answer; `None`:
    /// [`DEFAULT_TIMEOUT`]. A server that accepts the connection and never answers ends the call
    /// with an error after this long instead of hanging it.
    pub timeout: Option<Duration>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
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
    /// Options from the environment: `HF_HUB_OFFLINE` sets [`HubOptions::offline`],
    /// `HF_HUB_DOWNLOAD_TIMEOUT` (seconds) [`HubOptions::timeout`]; the cache and endpoint
    /// variables are read by hf-hub.
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
            timeout: std::env::var("HF_HUB_DOWNLOAD_TIMEOUT")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
        }
    }

    /// The endpoint in effect, as hf-hub resolves it: [`HubOptions::endpoint`], else
    /// `HF_ENDPOINT`, else `https://huggingface.co`; no trailing `/`.
    ///
    /// ```
    /// let o = candle_finetune::hub::HubOptions { endpoint: Some("http://127.0.0.1:9/".into()), ..Default::default() };
    /// assert_eq!(o.endpoint(), "http://127.0.0.1:9");
    /// ```
    pub fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .unwrap_or_else(|| "https://huggingface.co".to_string())
            .trim_end_matches('/')
            .to_string()
    }

    /// The wait limit in effect: [`HubOptions::timeout`] or [`DEFAULT_TIMEOUT`].
    ///
    /// ```
    /// use std::time::Duration;
    /// let o = candle_finetune::hub::HubOptions { timeout: Some(Duration::from_secs(5)), ..Default::default() };
    /// assert_eq!(o.wait_limit(), Duration::from_secs(5));
    /// ```
    pub fn wait_limit(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The HTTP client every Hub request goes through: connect and read timeouts of
    /// [`HubOptions::wait_limit`] (no total limit, so a large download is not cut off while it
    /// progresses), and candle-finetune's user agent. Each call builds a new client: one client
    /// per async runtime.
    ///
    /// ```
    /// let http = candle_finetune::hub::HubOptions::default().http_client().unwrap();
    /// ```
    pub fn http_client(&self) -> Result<reqwest::Client> {
        let wait = self.wait_limit();
        reqwest::Client::builder()
            .connect_timeout(wait)
            .read_timeout(wait)
            .user_agent(concat!(
                "candle-finetune/",
                env!("CARGO_PKG_VERSION"),
                "; hf-hub/1.0"
            ))
            .build()
            .map_err(|e| candle_core::Error::Msg(format!("cannot create the HTTP client: {e}")))
    }

    /// A blocking hf-hub client honouring these options (its requests time out as
    /// [`HubOptions::http_client`]'s do, and are retried [`HUB_RETRIES`] time).
    ///
    /// ```
    /// let client = candle_finetune::hub::HubOptions::default().client().unwrap();
    /// ```
    pub fn client(&self) -> Result<hf_hub::HFClientSync> {
        self.client_with_retries(Some(HUB_RETRIES))
    }

    /// [`HubOptions::client`] with hf-hub's retries of transient failures set to `retries`
    /// (`None`: hf-hub's default, five; [`HubOptions::client`] uses [`HUB_RETRIES`]).
    pub(crate) fn client_with_retries(
        &self,
        retries: Option<usize>,
    ) -> Result<hf_hub::HFClientSync> {
        let mut b = hf_hub::HFClient::builder().client(self.http_client()?);
        if let Some(n) = retries {
            b = b.retry_max_attempts(n);
        }
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
    /// let p = opts.model_file("timm/resnet18.tv_in1k", candle_finetune::pretrained::DEFAULT_REVISION, "model.safetensors").unwrap();
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
    ///
    /// hf-hub sends its metadata request through a client of its own, without our time limits,
    /// so a server that accepts the connection and never answers would hold it for ever. The
    /// download therefore runs on a thread of its own, watched: whenever twice
    /// [`HubOptions::wait_limit`] passes without the call ending and without a file of the cache
    /// being written (a download in progress writes its `.incomplete` blob there), the wait ends
    /// with an error.
    /// The abandoned thread stays blocked until the process exits.
    fn fetch<T: hf_hub::RepoType + Send + 'static>(
        &self,
        handle: hf_hub::HFRepositorySync<T>,
        kind: &str,
        repo: &str,
        revision: &str,
        file: &str,
    ) -> Result<PathBuf>
    where
        hf_hub::HFRepositorySync<T>: Send,
    {
        let offline = self.offline;
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, rev) = (file.to_string(), revision.to_string());
        std::thread::Builder::new()
            .name("hub-download".into())
            .spawn(move || {
                let r = handle
                    .download_file()
                    .filename(&f)
                    .revision(&rev)
                    .local_files_only(offline)
                    .send();
                let _ = tx.send(r);
            })
            .map_err(candle_core::Error::wrap)?;
        let period = self.wait_limit() * 2;
        let mut since = std::time::SystemTime::now();
        let result = loop {
            match rx.recv_timeout(period) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    // Only a slow call pays for this walk of the cache.
                    let written = self.cache_root().is_ok_and(|c| written_since(&c, since));
                    since = std::time::SystemTime::now();
                    if !written {
                        bail!(
                            "cannot get {file} from {kind} repo {repo} at {revision}: no answer \
                             within the time limit ({:.0} s without progress: twice \
                             HubOptions::timeout or HF_HUB_DOWNLOAD_TIMEOUT)",
                            period.as_secs_f64()
                        );
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("cannot get {file} from {kind} repo {repo}: the download thread died")
                }
            }
        };
        result.map_err(|e| {
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
}

/// Appended to a download error when the Hub could not be reached: how to run offline.
pub const OFFLINE_HINT: &str = "\n  the Hub cannot be reached; to run offline: HF_HUB_OFFLINE=1 with a filled Hub cache (HF_HUB_CACHE / HF_HOME), or local files (DataSource::Dir and a local weights file)";

/// Appended to an offline cache miss: how to fill the cache or avoid it.
pub const FILL_CACHE_HINT: &str = "\n  the file is not in the Hub cache: run once online to fill it, or use local files (DataSource::Dir and a local weights file)";

/// `owner/name` split in two, or an error naming the bad id.
pub(crate) fn split_repo(repo: &str) -> Result<(&str, &str)> {
    match repo.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
        _ => bail!("repository id {repo:?} is not of the form OWNER/NAME"),
    }
}

pub(crate) fn hub_err(context: &str) -> impl FnOnce(hf_hub::HFError) -> candle_core::Error + '_ {
    move |e| {
        // A transport failure: say which kind (reqwest's own text does not).
        let kind = match &e {
            hf_hub::HFError::Request { source, .. } if source.is_timeout() => {
                ": no answer within the time limit (HubOptions::timeout or \
                 HF_HUB_DOWNLOAD_TIMEOUT, default 60 s)"
            }
            hf_hub::HFError::Request { source, .. } if source.is_connect() => {
                ": cannot connect to the Hub"
            }
            _ => "",
        };
        candle_core::Error::Msg(format!("{context}{kind}: {e}"))
    }
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

/// Whether a file under `dir` (recursively) was written at or after `t`: the download
/// watchdog's sign of progress (a download in progress keeps writing its blob).
fn written_since(dir: &Path, t: std::time::SystemTime) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| match e.file_type() {
        Ok(k) if k.is_dir() => written_since(&e.path(), t),
        Ok(k) if k.is_file() => e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|m| m >= t),
        _ => false,
    })
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
/// use candle_finetune::hub::{seed_cache, HubOptions, RepoKind};
/// use candle_finetune::pretrained::WeightsSource;
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

/// The files of a dataset repository at one commit, as [`HubOptions::list_dataset`] found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoListing {
    /// `owner/name`.
    pub repo: String,
    /// The revision asked for (branch, tag, `refs/convert/parquet` or commit).
    pub revision: String,
    /// The commit it resolved to; every file is read at this commit.
    pub commit: String,
    /// Repository-relative paths (`/`-separated), sorted.
    pub files: Vec<String>,
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

impl HubOptions {
    /// The Hub cache root in effect, as hf-hub resolves it: [`HubOptions::cache_dir`], else
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    ///
    /// ```
    /// let o = candle_finetune::hub::HubOptions { cache_dir: Some("/c".into()), ..Default::default() };
    /// assert_eq!(o.cache_root().unwrap(), std::path::Path::new("/c"));
    /// ```
    pub fn cache_root(&self) -> Result<PathBuf> {
        let mut b = hf_hub::HFClient::builder();
        if let Some(dir) = &self.cache_dir {
            b = b.cache_dir(dir);
        }
        if let Some(e) = &self.endpoint {
            b = b.endpoint(e);
        }
        Ok(b.build()
            .map_err(hub_err("cannot create the Hub client"))?
            .cache_dir()
            .to_path_buf())
    }

    /// Lists dataset repo `repo` at `revision`: online through the Hub API (the repo info's
    /// `siblings` at that revision, else the recursive tree listing), recording the commit under
    /// `refs/<revision>` in the cache as the download client does; offline
    /// ([`HubOptions::offline`]) from the cache's snapshot of that commit, which holds the files
    /// an earlier run fetched.
    ///
    /// ```no_run
    /// let opts = candle_finetune::hub::HubOptions::from_env();
    /// let l = opts.list_dataset("uoft-cs/cifar100", "main").unwrap();
    /// assert!(l.files.iter().any(|f| f.ends_with(".parquet")));
    /// ```
    pub fn list_dataset(&self, repo: &str, revision: &str) -> Result<RepoListing> {
        let (owner, name) = split_repo(repo)?;
        let root = repo_cache_dir(&self.cache_root()?, RepoKind::Dataset, repo)?;
        if self.offline {
            return list_snapshot(&root, repo, revision);
        }
        let client = self.client()?;
        let handle = client.dataset(owner, name);
        let context = format!("cannot list dataset repo {repo} at {revision}");
        let info = handle
            .info()
            .revision(revision)
            .send()
            .map_err(|e| list_err(&context, e))?;
        let commit = info.sha.filter(|s| is_commit(s)).ok_or_else(|| {
            candle_core::Error::Msg(format!("{context}: the answer names no commit"))
        })?;
        let mut files: Vec<String> = match info.siblings {
            Some(s) => s.into_iter().map(|s| s.rfilename).collect(),
            None => handle
                .list_tree()
                .revision(commit.clone())
                .recursive(true)
                .send()
                .map_err(|e| list_err(&context, e))?
                .into_iter()
                .filter_map(|e| match e {
                    hf_hub::repository::RepoTreeEntry::File { path, .. } => Some(path),
                    _ => None,
                })
                .collect(),
        };
        files.sort();
        if revision != commit {
            // As hf-hub does after a download at a branch: later offline runs resolve it here.
            let r = root.join("refs").join(revision);
            std::fs::create_dir_all(r.parent().expect("a ref has a parent"))?;
            crate::files::atomic_write_bytes(&r, commit.as_bytes())?;
        }
        Ok(RepoListing {
            repo: repo.into(),
            revision: revision.into(),
            commit,
            files,
        })
    }
}

fn list_err(context: &str, e: hf_hub::HFError) -> candle_core::Error {
    let hint = match &e {
        hf_hub::HFError::Request { .. } => OFFLINE_HINT,
        _ => "",
    };
    let base = hub_err(context)(e);
    candle_core::Error::Msg(format!("{base}{hint}"))
}

/// The files of the cached snapshot of `revision` (a commit, or a ref recorded in `refs/`).
fn list_snapshot(root: &Path, repo: &str, revision: &str) -> Result<RepoListing> {
    let mode = " (offline: HF_HUB_OFFLINE is set, so only the cache was searched)";
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        let r = root.join("refs").join(revision);
        match std::fs::read_to_string(&r) {
            Ok(c) if is_commit(c.trim()) => c.trim().to_string(),
            _ => bail!(
                "cannot list dataset repo {repo} at {revision}{mode}: the cache has no ref \
                 {}{FILL_CACHE_HINT}",
                r.display()
            ),
        }
    };
    let snap = root.join("snapshots").join(&commit);
    if !snap.is_dir() {
        bail!(
            "cannot list dataset repo {repo} at {revision}{mode}: no snapshot {}{FILL_CACHE_HINT}",
            snap.display()
        );
    }
    let files = crate::files::relative_files(&snap, |_| true)?;
    Ok(RepoListing {
        repo: repo.into(),
        revision: revision.into(),
        commit,
        files,
    })
}
