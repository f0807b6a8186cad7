//! # hub-fake
//!
//! A loopback HTTP server that answers the read side of the Hugging Face Hub API the way the
//! Hub does, for repositories held in memory: enough for the official clients (hf-hub,
//! `huggingface_hub`) to list and download from it. Tests and offline demonstrations point
//! `HF_ENDPOINT` (or an endpoint option) at [`FakeHub::url`].
//!
//! Served:
//! - `GET /api/{models,datasets}/OWNER/NAME[/revision/REV]`: repo info with `sha` and
//!   `siblings` (no `cardData`: clients that need the card read `README.md`);
//! - `GET /api/{models,datasets}/OWNER/NAME/tree/REV[/PATH][?recursive=true]`: the tree
//!   listing (files with `oid`, `size`, `lfs.oid`; folders);
//! - `HEAD`/`GET /[datasets/]OWNER/NAME/resolve/REV/PATH`: the file, with `ETag` (the SHA-256
//!   of the content, as for LFS files), `X-Repo-Commit`, `Content-Length`, and `Range`
//!   requests answered `206` with `Content-Range`;
//! - `404` answers with `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`)
//!   and a JSON `error`, as the Hub sends them.
//!
//! Revisions are branch names (`main`, `refs/convert/parquet`, URL-encoded or not) or the
//! 40-hex commit of a branch. Every request is recorded ([`FakeHub::requests`]).
//!
//! ```
//! use hub_fake::{FakeHub, Kind};
//! let hub = FakeHub::start();
//! let commit = hub.put(Kind::Dataset, "me/tiny", "main", vec![("data/train-0.parquet".into(), b"PAR1".to_vec())]);
//! assert_eq!(commit.len(), 40);
//! assert!(hub.url().starts_with("http://127.0.0.1:"));
//! ```

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Kind of repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A model repo (`/OWNER/NAME/resolve/...`).
    Model,
    /// A dataset repo (`/datasets/OWNER/NAME/resolve/...`).
    Dataset,
}

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Path and query, as sent.
    pub url: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

#[derive(Default)]
struct Repo {
    /// branch -> commit
    branches: BTreeMap<String, String>,
    /// commit -> files
    commits: BTreeMap<String, BTreeMap<String, Arc<Vec<u8>>>>,
}

#[derive(Default)]
struct State {
    repos: BTreeMap<(Kind, String), Repo>,
    log: Vec<Request>,
}

/// The running server; it stops when dropped.
pub struct FakeHub {
    server: Arc<tiny_http::Server>,
    state: Arc<Mutex<State>>,
    url: String,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `%2F` and the like decoded (the Hub's clients encode `/` in revisions).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeHub {
    /// Starts a server on a free loopback port, with no repositories.
    pub fn start() -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind loopback"));
        let url = format!("http://{}", server.server_addr());
        let state = Arc::new(Mutex::new(State::default()));
        let (s, st) = (server.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                handle(&st, req);
            }
        });
        Self {
            server,
            state,
            url,
            thread: Some(thread),
        }
    }

    /// The endpoint (`http://127.0.0.1:PORT`, no trailing `/`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Commits `files` (path, content) to `branch` of repo `id` (created if new), replacing the
    /// branch's tree; returns the new commit (40 hex, derived from the content).
    pub fn put(&self, kind: Kind, id: &str, branch: &str, files: Vec<(String, Vec<u8>)>) -> String {
        let mut h = Sha256::new();
        h.update(id.as_bytes());
        h.update(branch.as_bytes());
        let mut tree = BTreeMap::new();
        for (p, b) in files {
            h.update(p.as_bytes());
            h.update(sha256_hex(&b).as_bytes());
            tree.insert(p, Arc::new(b));
        }
        let mut st = self.state.lock().expect("fake hub state");
        let repo = st.repos.entry((kind, id.to_string())).or_default();
        h.update(repo.commits.len().to_le_bytes());
        let commit = hex::encode(&h.finalize()[..20]);
        repo.commits.insert(commit.clone(), tree);
        repo.branches.insert(branch.to_string(), commit.clone());
        commit
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("fake hub state").log.clone()
    }
}

fn respond(req: tiny_http::Request, status: u16, headers: Vec<(String, String)>, body: Vec<u8>) {
    let mut r = tiny_http::Response::from_data(body).with_status_code(status);
    for (k, v) in headers {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            r.add_header(h);
        }
    }
    let _ = req.respond(r);
}

fn json(req: tiny_http::Request, status: u16, v: serde_json::Value) {
    respond(
        req,
        status,
        vec![("Content-Type".into(), "application/json".into())],
        v.to_string().into_bytes(),
    );
}

fn not_found(req: tiny_http::Request, code: &str, message: String) {
    let head = req.method() == &tiny_http::Method::Head;
    let body = if head {
        Vec::new()
    } else {
        serde_json::json!({ "error": message })
            .to_string()
            .into_bytes()
    };
    respond(
        req,
        404,
        vec![
            ("X-Error-Code".into(), code.into()),
            ("X-Error-Message".into(), message),
            ("Content-Type".into(), "application/json".into()),
        ],
        body,
    );
}

/// The commit a revision names in `repo`: a branch, or a commit of the repo.
fn resolve_rev(repo: &Repo, rev: &str) -> Option<String> {
    repo.branches
        .get(rev)
        .cloned()
        .or_else(|| repo.commits.contains_key(rev).then(|| rev.to_string()))
}

/// Splits `OWNER/NAME/<verb>/REV/PATH...` where REV may hold `/` (`refs/convert/parquet`): the
/// longest branch name of `repo` that prefixes the rest wins.
fn split_rev_path(repo: &Repo, rest: &str) -> (String, String) {
    let decoded = percent_decode(rest);
    let mut best: Option<&String> = None;
    for b in repo.branches.keys() {
        let fits = decoded == *b || decoded.starts_with(&format!("{b}/"));
        if fits && best.is_none_or(|x| b.len() > x.len()) {
            best = Some(b);
        }
    }
    match best {
        Some(b) => (
            b.clone(),
            decoded[b.len()..].trim_start_matches('/').to_string(),
        ),
        None => match decoded.split_once('/') {
            Some((r, p)) => (r.to_string(), p.to_string()),
            None => (decoded, String::new()),
        },
    }
}

fn handle(state: &Arc<Mutex<State>>, req: tiny_http::Request) {
    let url = req.url().to_string();
    let method = req.method().to_string();
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let st_arc = state.clone();
    let mut st = st_arc.lock().expect("fake hub state");
    st.log.push(Request {
        method: method.clone(),
        url: url.clone(),
        range: range.clone(),
    });
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let recursive = query
        .split('&')
        .any(|q| q == "recursive=true" || q == "recursive=True");
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
    // API routes.
    if segs.first() == Some(&"api") && segs.len() >= 4 {
        let kind = match segs[1] {
            "models" => Kind::Model,
            "datasets" => Kind::Dataset,
            _ => return not_found(req, "RepoNotFound", format!("unknown route {path}")),
        };
        // segs[2] = owner, segs[3] = "name[/verb/rev/...]"
        let owner = segs[2];
        let (name, rest) = segs[3].split_once('/').unwrap_or((segs[3], ""));
        let id = format!("{owner}/{name}");
        let Some(repo) = st.repos.get(&(kind, id.clone())) else {
            return not_found(
                req,
                "RepoNotFound",
                format!("Repository Not Found for url: {url}"),
            );
        };
        let (verb, after) = rest.split_once('/').unwrap_or((rest, ""));
        match verb {
            "" | "revision" => {
                let rev = if verb.is_empty() {
                    "main".to_string()
                } else {
                    split_rev_path(repo, after).0
                };
                let Some(commit) = resolve_rev(repo, &rev) else {
                    return not_found(req, "RevisionNotFound", format!("Invalid rev id: {rev}"));
                };
                let files = &repo.commits[&commit];
                let siblings: Vec<serde_json::Value> = files
                    .keys()
                    .map(|f| serde_json::json!({ "rfilename": f }))
                    .collect();
                json(
                    req,
                    200,
                    serde_json::json!({
                        "_id": format!("fake-{commit}"), "id": id, "author": owner,
                        "sha": commit, "private": false, "gated": false, "disabled": false,
                        "tags": [], "siblings": siblings,
                    }),
                )
            }
            "tree" => {
                let (rev, sub) = split_rev_path(repo, after);
                let Some(commit) = resolve_rev(repo, &rev) else {
                    return not_found(req, "RevisionNotFound", format!("Invalid rev id: {rev}"));
                };
                let prefix = if sub.is_empty() {
                    String::new()
                } else {
                    format!("{}/", sub.trim_end_matches('/'))
                };
                let mut out = Vec::new();
                let mut dirs = std::collections::BTreeSet::new();
                for (f, b) in &repo.commits[&commit] {
                    let Some(rel) = f.strip_prefix(&prefix) else {
                        continue;
                    };
                    match rel.split_once('/') {
                        Some((d, _)) if !recursive => {
                            dirs.insert(format!("{prefix}{d}"));
                        }
                        _ => {
                            if recursive {
                                let mut acc = prefix.clone();
                                for part in rel
                                    .split('/')
                                    .collect::<Vec<_>>()
                                    .split_last()
                                    .map_or(&[][..], |x| x.1)
                                {
                                    acc.push_str(part);
                                    dirs.insert(acc.clone());
                                    acc.push('/');
                                }
                            }
                            let sha = sha256_hex(b);
                            out.push(serde_json::json!({
                                "type": "file", "oid": &sha[..40], "size": b.len(), "path": f,
                                "lfs": { "oid": sha, "size": b.len(), "pointerSize": 134 },
                            }));
                        }
                    }
                }
                let mut all: Vec<serde_json::Value> = dirs
                    .into_iter()
                    .map(|d| serde_json::json!({ "type": "directory", "oid": "0".repeat(40), "size": 0, "path": d }))
                    .collect();
                all.extend(out);
                json(req, 200, serde_json::Value::Array(all))
            }
            _ => not_found(req, "EntryNotFound", format!("unknown route {path}")),
        }
    } else {
        // /[datasets/]OWNER/NAME/resolve/REV/PATH
        let p = path.trim_start_matches('/');
        let (kind, p) = match p.strip_prefix("datasets/") {
            Some(r) => (Kind::Dataset, r),
            None => (Kind::Model, p),
        };
        let parts: Vec<&str> = p.splitn(4, '/').collect();
        if parts.len() < 4 || parts[2] != "resolve" {
            return not_found(req, "EntryNotFound", format!("unknown route {path}"));
        }
        let id = format!("{}/{}", parts[0], parts[1]);
        let Some(repo) = st.repos.get(&(kind, id.clone())) else {
            return not_found(
                req,
                "RepoNotFound",
                format!("Repository Not Found for url: {url}"),
            );
        };
        let (rev, file) = split_rev_path(repo, parts[3]);
        let Some(commit) = resolve_rev(repo, &rev) else {
            return not_found(req, "RevisionNotFound", format!("Invalid rev id: {rev}"));
        };
        let Some(bytes) = repo.commits[&commit].get(&file).cloned() else {
            return not_found(req, "EntryNotFound", format!("Entry not found: {file}"));
        };
        drop(st);
        let etag = format!("\"{}\"", sha256_hex(&bytes));
        let mut headers = vec![
            ("ETag".to_string(), etag.clone()),
            ("X-Repo-Commit".to_string(), commit),
            ("Accept-Ranges".to_string(), "bytes".to_string()),
            (
                "Content-Type".to_string(),
                "application/octet-stream".to_string(),
            ),
        ];
        let total = bytes.len();
        let (status, slice) = match range.as_deref().and_then(parse_range) {
            Some((a, b)) if a < total => {
                let b = b.unwrap_or(total - 1).min(total - 1);
                headers.push(("Content-Range".into(), format!("bytes {a}-{b}/{total}")));
                (206, bytes[a..=b].to_vec())
            }
            Some(_) => {
                headers.push(("Content-Range".into(), format!("bytes */{total}")));
                return respond(req, 416, headers, Vec::new());
            }
            None => (200, bytes.to_vec()),
        };
        if method == "HEAD" {
            // tiny_http computes Content-Length from the body; send the length the GET would.
            let mut r = tiny_http::Response::new(
                tiny_http::StatusCode(status),
                Vec::new(),
                std::io::empty(),
                Some(slice.len()),
                None,
            );
            for (k, v) in headers {
                if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
                    r.add_header(h);
                }
            }
            let _ = req.respond(r);
        } else {
            respond(req, status, headers, slice);
        }
    }
}

/// `bytes=A-B` or `bytes=A-` as `(A, Some(B) | None)`.
fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
    let r = v.trim().strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = if b.trim().is_empty() {
        None
    } else {
        Some(b.trim().parse().ok()?)
    };
    Some((a, b))
}
