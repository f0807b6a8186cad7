//! Publishing a model folder to the Hugging Face Hub in one commit.
//!
//! [`publish_folder`] checks the folder locally first (the files [`crate::card::write_model_folder`]
//! writes, a parseable `config.json`, a token), then creates the repository if it is missing,
//! creates the branch if one is asked for and missing, and uploads the folder's files (all but
//! what [`PublishOptions::exclude`] keeps local: the training checkpoints by default) in a
//! single commit, so a failure leaves the repository as it was (at most created and empty).
//! Large files go the way the Hub asks ([`transfer`]): the basic LFS transfer here, Xet through
//! hf-hub. Every request has connect and read time limits ([`HubOptions::timeout`]). The token
//! is handed to the HTTP client and never printed, logged or written.

mod select;
mod transfer;

pub use select::{select_files, Selection, DEFAULT_EXCLUDE};

use crate::config::ModelConfig;
use crate::hub::{hub_err, HubOptions};
use candle_core::{bail, Result};
use hf_hub::{HFError, RepoTypeModel};
use std::path::{Path, PathBuf};
use transfer::{LocalFile, Mode};

/// Files a model folder must hold before it is published.
pub const REQUIRED_FILES: [&str; 3] = ["model.safetensors", "config.json", "README.md"];

/// What to publish and where.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// `OWNER/NAME` of the model repository.
    pub repo: String,
    /// Create the repository private (only when it does not exist yet).
    pub private: bool,
    /// Branch to commit to; `None`: `main`. Created from `main` when missing.
    pub revision: Option<String>,
    /// Commit message; `None`: "Upload <architecture> fine-tuned on <n> classes".
    pub message: Option<String>,
    /// Patterns of files kept local (see [`select_files`]); [`PublishOptions::new`] starts from
    /// [`DEFAULT_EXCLUDE`] (checkpoints, temporary and hidden files).
    pub exclude: Vec<String>,
}

impl PublishOptions {
    /// Options for `repo` with the defaults: public, `main`, the default message, the default
    /// exclude patterns.
    ///
    /// ```
    /// let o = candle_finetune::publish::PublishOptions::new("me/resnet18-cars");
    /// assert_eq!(o.exclude, ["checkpoint-*", "*.tmp", ".*"]);
    /// ```
    pub fn new(repo: impl Into<String>) -> Self {
        Self {
            repo: repo.into(),
            private: false,
            revision: None,
            message: None,
            exclude: DEFAULT_EXCLUDE.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The result of a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// URL of the repository.
    pub repo_url: String,
    /// URL of the commit, when the Hub returns one.
    pub commit_url: Option<String>,
    /// Commit id, when the Hub returns one.
    pub commit_oid: Option<String>,
    /// Paths uploaded, relative to the folder.
    pub files: Vec<String>,
    /// Paths an exclude pattern kept local.
    pub kept_local: Vec<String>,
    /// Paths the Hub took as LFS objects, and the transfer it chose for them (`basic`,
    /// `multipart` or `xet`; `None` when every file went inline).
    pub lfs_files: Vec<String>,
    /// See [`Published::lfs_files`].
    pub transfer: Option<String>,
}

/// Checks `dir` as a model folder: the required files exist and `config.json` parses.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let err = candle_finetune::publish::check_folder(dir.path()).unwrap_err();
/// assert!(err.to_string().contains("model.safetensors"));
/// ```
pub fn check_folder(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        bail!("publish: {} is not a folder", dir.display());
    }
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "publish: {} is not a model folder: missing {} (run `cargo xtask train-cars` first)",
            dir.display(),
            missing.join(", ")
        );
    }
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)?;
    serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("publish: {}: {e}", cfg_path.display())))
}

/// Publishes the model folder `dir` to `opts.repo` in one commit.
///
/// ```no_run
/// use candle_finetune::{hub::HubOptions, publish::{publish_folder, PublishOptions}};
/// let p = publish_folder(
///     &HubOptions::from_env(),
///     "out/resnet18-stanford-cars".as_ref(),
///     &PublishOptions::new("me/resnet18-stanford-cars"),
/// ).unwrap();
/// println!("{}", p.commit_url.unwrap_or(p.repo_url));
/// ```
pub fn publish_folder(hub: &HubOptions, dir: &Path, opts: &PublishOptions) -> Result<Published> {
    publish_folder_with(hub, dir, opts, &mut |_| {})
}

/// Bytes of the large files sent so far and in all ([`publish_folder_with`]); reported after
/// each file the client sends itself (Xet uploads go through hf-hub and report nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadProgress {
    pub sent: u64,
    pub total: u64,
}

/// [`publish_folder`] reporting the large-file upload's progress to `progress` (the command
/// line draws a bar from it). The steps: check the folder and the credentials, create the
/// repository (and branch), list the files and ask the Hub how each travels, send the large
/// ones, then commit every file at once.
pub fn publish_folder_with(
    hub: &HubOptions,
    dir: &Path,
    opts: &PublishOptions,
    progress: &mut dyn FnMut(UploadProgress),
) -> Result<Published> {
    let cfg = check_folder(dir)?;
    let (owner, name) = crate::hub::split_repo(&opts.repo)
        .map_err(|e| candle_core::Error::Msg(format!("publish: {e}")))?;
    let (hub, token) = with_token(hub)?;
    let sel = select_files(dir, &opts.exclude)?;
    if let Some(r) = REQUIRED_FILES
        .iter()
        .find(|r| !sel.upload.iter().any(|u| u == *r))
    {
        bail!("publish: an exclude pattern keeps {r} local, but a model folder needs it");
    }
    let repo_url = create_repo(&hub, (owner, name), opts)?;
    let revision = opts.revision.as_deref().unwrap_or("main");
    let message = opts.message.clone().unwrap_or_else(|| {
        format!(
            "Upload {} fine-tuned on {} classes (candle-finetune)",
            cfg.architecture, cfg.num_classes
        )
    });
    let http = transfer::Http::new(&hub, &token)?;
    let files = local_files(dir, &sel.upload)?;
    let modes = http.upload_modes(&opts.repo, revision, &files)?;
    // The Hub's own ignore rules drop a file from the upload.
    let files: Vec<LocalFile> = files
        .into_iter()
        .filter(|f| modes.contains_key(&f.path))
        .collect();
    let lfs: Vec<&LocalFile> = files
        .iter()
        .filter(|f| f.size > 0 && modes[&f.path] == Mode::Lfs)
        .collect();
    let published = |commit_url, commit_oid, transfer| Published {
        repo_url: repo_url.clone(),
        commit_url,
        commit_oid,
        files: files.iter().map(|f| f.path.clone()).collect(),
        kept_local: sel.kept_local.clone(),
        lfs_files: lfs.iter().map(|f| f.path.clone()).collect(),
        transfer,
    };
    let mut oids = std::collections::HashMap::new();
    let mut chosen = None;
    if !lfs.is_empty() {
        for f in &lfs {
            oids.insert(f.path.clone(), crate::hub::sha256_file(&f.abs)?);
        }
        let how = send_large(&http, (&opts.repo, revision), &lfs, &oids, progress)?;
        if how == "xet" {
            let (url, oid) = publish_via_xet(&hub, (owner, name), dir, opts, &files, &message)?;
            return Ok(published(url, oid, Some(how)));
        }
        chosen = Some(how);
    }
    let mut entries = Vec::with_capacity(files.len());
    for f in &files {
        entries.push(match oids.get(&f.path) {
            Some(oid) => transfer::lfs_entry(f, oid),
            None => transfer::inline_entry(f)?,
        });
    }
    let parent = http.head(&opts.repo, revision)?;
    let info = http.commit(&opts.repo, revision, &message, parent.as_deref(), &entries)?;
    Ok(published(
        info["commitUrl"].as_str().map(String::from),
        info["commitOid"].as_str().map(String::from),
        chosen,
    ))
}

/// `hub` with its token resolved (publishing needs one, and the network).
fn with_token(hub: &HubOptions) -> Result<(HubOptions, String)> {
    if hub.offline {
        bail!("publish: HF_HUB_OFFLINE is set; publishing needs the network");
    }
    let token = hub.resolved_token().ok_or_else(|| {
        candle_core::Error::Msg(
            "publish: no Hugging Face token: set HF_TOKEN, or HF_TOKEN_PATH, or log in with \
             `hf auth login` (writes HF_HOME/token)"
                .into(),
        )
    })?;
    let hub = HubOptions {
        token: Some(token.clone()),
        ..hub.clone()
    };
    Ok((hub, token))
}

/// Creates the model repository (an existing one is kept) and, for a revision other than
/// `main`, its branch; returns the repository's URL.
fn create_repo(
    hub: &HubOptions,
    (owner, name): (&str, &str),
    opts: &PublishOptions,
) -> Result<String> {
    let client = hub.client()?;
    let repo_url = client
        .create_repository()
        .repo_id(&opts.repo)
        .repo_type(RepoTypeModel)
        .private(opts.private)
        .exist_ok(true)
        .send()
        .map_err(hub_err(&format!("publish: cannot create {}", opts.repo)))?
        .url;
    if let Some(branch) = opts.revision.as_deref().filter(|b| *b != "main") {
        match client
            .model(owner, name)
            .create_branch()
            .branch(branch)
            .send()
        {
            Ok(()) | Err(HFError::Conflict { .. }) => {}
            Err(e) => bail!(
                "publish: cannot create branch {branch} in {}: {e}",
                opts.repo
            ),
        }
    }
    Ok(repo_url)
}

/// The files to upload (paths relative to `dir`) with their sizes.
fn local_files(dir: &Path, upload: &[String]) -> Result<Vec<LocalFile>> {
    upload
        .iter()
        .map(|rel| {
            let abs = dir.join(rel);
            let size = std::fs::metadata(&abs)?.len();
            Ok(LocalFile {
                path: rel.clone(),
                abs,
                size,
            })
        })
        .collect()
}

/// Asks the Hub how the large files travel and, for `basic` or `multipart`, sends them
/// (reporting to `progress`); returns the transfer's name (`xet` is left to the caller, which
/// hands it to hf-hub).
fn send_large(
    http: &transfer::Http,
    (repo, revision): (&str, &str),
    lfs: &[&LocalFile],
    oids: &std::collections::HashMap<String, String>,
    progress: &mut dyn FnMut(UploadProgress),
) -> Result<String> {
    let objects: Vec<(String, u64)> = lfs
        .iter()
        .map(|f| (oids[&f.path].clone(), f.size))
        .collect();
    let (how, answers) = http.lfs_batch(repo, revision, &objects)?;
    match how.as_str() {
        "xet" => {}
        "basic" | "multipart" => {
            let total = lfs.iter().map(|f| f.size).sum();
            let mut sent = 0;
            progress(UploadProgress { sent, total });
            for f in lfs {
                let oid = &oids[&f.path];
                let answer = answers
                    .iter()
                    .find(|a| a["oid"].as_str() == Some(oid))
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "publish: the LFS batch answer has no entry for {}",
                            f.path
                        ))
                    })?;
                http.transfer(answer, f, oid)?;
                sent += f.size;
                progress(UploadProgress { sent, total });
            }
        }
        other => bail!(
            "publish: the Hub asked for the LFS transfer {other:?}; this client speaks \
             basic, multipart and xet"
        ),
    }
    Ok(how)
}

/// The Hub picked Xet for the large files: hf-hub uploads them and commits the selected files
/// (exactly those: escaped literal patterns), with its retries off so the commit is sent once.
fn publish_via_xet(
    hub: &HubOptions,
    (owner, name): (&str, &str),
    dir: &Path,
    opts: &PublishOptions,
    files: &[LocalFile],
    message: &str,
) -> Result<(Option<String>, Option<String>)> {
    let client = hub.client_with_retries(Some(0))?;
    let allow: Vec<String> = files.iter().map(|f| globset::escape(&f.path)).collect();
    let info = client
        .model(owner, name)
        .upload_folder()
        .folder_path(PathBuf::from(dir))
        .allow_patterns(allow)
        .maybe_revision(opts.revision.clone())
        .commit_message(message.to_string())
        .send()
        .map_err(hub_err(&format!(
            "publish: commit to {} failed (Xet upload through hf-hub)",
            opts.repo
        )))?;
    Ok((info.commit_url, info.commit_oid))
}
