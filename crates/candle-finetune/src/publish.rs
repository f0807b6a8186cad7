//! Publishing a model folder to the Hugging Face Hub in one commit (hf-hub 1.0's upload API).
//!
//! [`publish_folder`] checks the folder locally first (the files [`crate::card::write_model_folder`]
//! writes, a parseable `config.json`, a token), then creates the repository if it is missing,
//! creates the branch if one is asked for and missing, and uploads every file of the folder in a
//! single commit, so a failure leaves the repository as it was (at most created and empty).
//! The token is handed to hf-hub and never printed, logged or written.

use crate::config::ModelConfig;
use crate::hub::{hub_err, HubOptions};
use candle_core::{bail, Result};
use hf_hub::{HFError, RepoTypeModel};
use std::path::{Path, PathBuf};

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

fn split(repo: &str) -> Result<(&str, &str)> {
    match repo.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
        _ => bail!("publish: repository must be OWNER/NAME, got {repo:?}"),
    }
}

/// Publishes the model folder `dir` to `opts.repo` in one commit.
///
/// ```no_run
/// use candle_finetune::{hub::HubOptions, publish::{publish_folder, PublishOptions}};
/// let p = publish_folder(
///     &HubOptions::from_env(),
///     "out/resnet18-stanford-cars".as_ref(),
///     &PublishOptions { repo: "me/resnet18-stanford-cars".into(), private: false,
///                       revision: None, message: None },
/// ).unwrap();
/// println!("{}", p.commit_url.unwrap_or(p.repo_url));
/// ```
pub fn publish_folder(hub: &HubOptions, dir: &Path, opts: &PublishOptions) -> Result<Published> {
    let cfg = check_folder(dir)?;
    let (owner, name) = split(&opts.repo)?;
    if hub.offline {
        bail!("publish: HF_HUB_OFFLINE is set; publishing needs the network");
    }
    let token = hub.resolved_token().ok_or_else(|| {
        candle_core::Error::Msg(
            "publish: no Hugging Face token: set HF_TOKEN, or HF_TOKEN_PATH, or log in with \
             `huggingface-cli login` (writes HF_HOME/token)"
                .into(),
        )
    })?;
    let files = list_files(dir)?;
    let client = HubOptions {
        token: Some(token),
        ..hub.clone()
    }
    .client()?;
    let repo_url = client
        .create_repository()
        .repo_id(&opts.repo)
        .repo_type(RepoTypeModel)
        .private(opts.private)
        .exist_ok(true)
        .send()
        .map_err(hub_err(&format!("publish: cannot create {}", opts.repo)))?
        .url;
    let repo = client.model(owner, name);
    if let Some(branch) = opts.revision.as_deref().filter(|b| *b != "main") {
        match repo.create_branch().branch(branch).send() {
            Ok(()) | Err(HFError::Conflict { .. }) => {}
            Err(e) => bail!(
                "publish: cannot create branch {branch} in {}: {e}",
                opts.repo
            ),
        }
    }
    let message = opts.message.clone().unwrap_or_else(|| {
        format!(
            "Upload {} fine-tuned on {} classes (candle-finetune)",
            cfg.architecture, cfg.num_classes
        )
    });
    let info = repo
        .upload_folder()
        .folder_path(PathBuf::from(dir))
        .maybe_revision(opts.revision.clone())
        .commit_message(message)
        .send()
        .map_err(hub_err(&format!("publish: commit to {} failed", opts.repo)))?;
    Ok(Published {
        repo_url,
        commit_url: info.commit_url,
        commit_oid: info.commit_oid,
        files,
    })
}
