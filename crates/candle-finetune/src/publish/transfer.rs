//! The Hub's upload protocol, spoken here where hf-hub 1.0 falls short.
//!
//! hf-hub 1.0 moves large files only through Xet: when the Hub answers the LFS batch with the
//! `basic` transfer (as it can for repositories not on Xet storage), hf-hub ignores the upload
//! URL and puts every large file inline in the commit, which the Hub rejects above 10 MiB after
//! the whole body was sent; and it re-sends a failed commit up to five times, body and all. Its
//! upload internals are private, so this module does what the official Python client does, with
//! hf-hub's own HTTP stack (reqwest on tokio) and the same timeouts as every other Hub request
//! ([`HubOptions::http_client`]):
//!
//! 1. preupload: the Hub says which files are LFS;
//! 2. the LFS batch (`basic`, `multipart` and `xet` offered): the Hub picks the transfer and
//!    says which objects it lacks;
//! 3. the basic transfer: one PUT of the file to the returned URL, or, when the action carries a
//!    `chunk_size`, one PUT per part and the completion call; then the verify call;
//! 4. one NDJSON commit: `lfsFile` entries (path, sha256 oid, size) for the large files, base64
//!    for the small ones, with the branch head as `parentCommit`. It is re-sent only when it
//!    provably did not reach the server, or after the branch head was read again and had not
//!    moved.
//!
//! When the Hub picks Xet, [`super::publish_folder`] hands the upload to hf-hub, which speaks it.

use crate::hub::HubOptions;
use base64::Engine;
use candle_core::{bail, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

/// Bytes at the start of a file the preupload call sends (the Hub sniffs them).
const SAMPLE: usize = 512;
/// Files per preupload call (the official client's batch size).
const PREUPLOAD_BATCH: usize = 256;
/// Commit attempts at most, after transient answers (408, 429, 5xx) or a dropped connection;
/// each retry only after the branch head was read and had not moved. A commit that gets no
/// answer within the time limit is not sent again: one read of the head says whether it was
/// applied, and the publish ends (within twice the time limit of the commit's start).
pub(crate) const COMMIT_ATTEMPTS: usize = 3;
/// Attempts of one PUT to a signed URL (idempotent), after 5xx answers or dropped connections;
/// a PUT that gets no answer within the time limit is not retried.
const PUT_ATTEMPTS: usize = 3;
/// The slowest upload rate a request's total time limit allows for its body.
const MIN_BYTES_PER_S: f64 = 256.0 * 1024.0;

/// A file to upload: its path in the repository, on disk, and its size.
#[derive(Debug, Clone)]
pub(crate) struct LocalFile {
    pub path: String,
    pub abs: PathBuf,
    pub size: u64,
}

/// How the Hub wants a file: inline in the commit, or as an LFS object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Regular,
    Lfs,
}

/// An answer: status, headers, body.
struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The Hub's `error` message, or the start of the body.
    fn message(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["error"].is_string() => v["error"].as_str().unwrap_or_default().to_string(),
            _ => text.chars().take(200).collect(),
        }
    }

    fn json(&self, what: &str) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            candle_core::Error::Msg(format!("{what}: the Hub's answer is not JSON: {e}"))
        })
    }
}

/// Blocking HTTP to the Hub: a reqwest client on a runtime of its own.
pub(crate) struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    endpoint: String,
    auth: String,
    wait: Duration,
}

/// `revision` as one URL path segment.
fn segment(revision: &str) -> String {
    let mut out = String::new();
    for b in revision.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Http {
    pub fn new(opts: &HubOptions, token: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(candle_core::Error::wrap)?;
        Ok(Self {
            rt,
            client: opts.http_client()?,
            endpoint: opts.endpoint(),
            auth: format!("Bearer {token}"),
            wait: opts.wait_limit(),
        })
    }

    /// Sends a request whose body has `body_len` bytes and reads the whole answer, within the
    /// connect / read limit and a total limit that grows with the body.
    fn send(
        &self,
        rb: reqwest::RequestBuilder,
        body_len: usize,
    ) -> std::result::Result<Reply, reqwest::Error> {
        let total = self.wait + Duration::from_secs_f64(body_len as f64 / MIN_BYTES_PER_S);
        self.rt.block_on(async {
            let resp = rb.timeout(total).send().await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?.to_vec();
            Ok(Reply {
                status,
                headers,
                body,
            })
        })
    }

    /// A transport failure in words: a timeout names the limit, a refused connection the host.
    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            format!(
                "no answer within the time limit ({} s to connect or between reads; \
                 HubOptions::timeout or HF_HUB_DOWNLOAD_TIMEOUT): {e}",
                self.wait.as_secs_f64()
            )
        } else if e.is_connect() {
            format!("cannot connect to {}: {e}", self.endpoint)
        } else {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        }
    }

    /// One request that must succeed (2xx), with `what` in every error.
    fn call(&self, what: &str, rb: reqwest::RequestBuilder, body_len: usize) -> Result<Reply> {
        let r = self
            .send(rb, body_len)
            .map_err(|e| candle_core::Error::Msg(format!("{what}: {}", self.describe(&e))))?;
        if !r.ok() {
            bail!("{what}: HTTP {}: {}", r.status, r.message());
        }
        Ok(r)
    }

    fn api(&self, repo: &str, tail: &str) -> String {
        format!("{}/api/models/{repo}/{tail}", self.endpoint)
    }

    /// The Hub's upload mode of every file (preupload); files it says to ignore are left out.
    pub fn upload_modes(
        &self,
        repo: &str,
        revision: &str,
        files: &[LocalFile],
    ) -> Result<HashMap<String, Mode>> {
        let mut modes = HashMap::new();
        let what = format!("publish: preupload to {repo}");
        for batch in files.chunks(PREUPLOAD_BATCH) {
            let mut entries = Vec::new();
            for f in batch {
                let mut sample = vec![0u8; SAMPLE.min(f.size as usize)];
                std::fs::File::open(&f.abs)?.read_exact(&mut sample)?;
                entries.push(json!({
                    "path": f.path,
                    "size": f.size,
                    "sample": base64::engine::general_purpose::STANDARD.encode(&sample),
                }));
            }
            let body = json!({ "files": entries }).to_string().into_bytes();
            let len = body.len();
            let rb = self
                .client
                .post(self.api(repo, &format!("preupload/{}", segment(revision))))
                .header("Authorization", &self.auth)
                .header("Content-Type", "application/json")
                .body(body);
            let v = self.call(&what, rb, len)?.json(&what)?;
            for f in v["files"].as_array().into_iter().flatten() {
                let (Some(path), Some(mode)) = (f["path"].as_str(), f["uploadMode"].as_str())
                else {
                    bail!("{what}: malformed answer entry {f}");
                };
                if f["shouldIgnore"].as_bool() == Some(true) {
                    continue;
                }
                let m = if mode == "lfs" {
                    Mode::Lfs
                } else {
                    Mode::Regular
                };
                modes.insert(path.to_string(), m);
            }
        }
        Ok(modes)
    }

    /// The LFS batch for `objects` (`(sha256 hex, size)`): the transfer the Hub picked and its
    /// per-object answers.
    pub fn lfs_batch(
        &self,
        repo: &str,
        revision: &str,
        objects: &[(String, u64)],
    ) -> Result<(String, Vec<Value>)> {
        let what = format!("publish: LFS batch for {repo}");
        let objs: Vec<Value> = objects
            .iter()
            .map(|(oid, size)| json!({"oid": oid, "size": size}))
            .collect();
        let body = json!({
            "operation": "upload",
            "transfers": ["basic", "multipart", "xet"],
            "objects": objs,
            "hash_algo": "sha256",
            "ref": {"name": revision},
        })
        .to_string()
        .into_bytes();
        let len = body.len();
        let rb = self
            .client
            .post(format!(
                "{}/{repo}.git/info/lfs/objects/batch",
                self.endpoint
            ))
            .header("Authorization", &self.auth)
            .header("Accept", "application/vnd.git-lfs+json")
            .header("Content-Type", "application/vnd.git-lfs+json")
            .body(body);
        let v = self.call(&what, rb, len)?.json(&what)?;
        // The git-lfs protocol: no `transfer` in the answer means basic.
        let transfer = v["transfer"].as_str().unwrap_or("basic").to_string();
        let answers = v["objects"].as_array().cloned().unwrap_or_default();
        Ok((transfer, answers))
    }

    /// A PUT of `body` to a signed URL, retried on transport failures and 5xx (it is
    /// idempotent); returns the answer's headers.
    fn put(
        &self,
        what: &str,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<reqwest::header::HeaderMap> {
        let mut last = String::new();
        for attempt in 0..PUT_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 << attempt));
            }
            let mut rb = self.client.put(url).body(body.clone());
            for (k, v) in headers {
                rb = rb.header(k, v);
            }
            match self.send(rb, body.len()) {
                Ok(r) if r.ok() => return Ok(r.headers),
                Ok(r) if r.status >= 500 => last = format!("HTTP {}: {}", r.status, r.message()),
                Ok(r) => bail!("{what}: HTTP {}: {}", r.status, r.message()),
                // A server that stays silent for the whole limit is not asked again.
                Err(e) if e.is_timeout() => bail!("{what}: {}", self.describe(&e)),
                Err(e) => last = self.describe(&e),
            }
        }
        bail!("{what}: {last} (after {PUT_ATTEMPTS} attempts)")
    }

    /// The basic (or multipart) transfer of one object, then its verification. An answer
    /// without `actions` means the Hub already has the object.
    pub fn transfer(&self, answer: &Value, file: &LocalFile, oid: &str) -> Result<()> {
        let what = format!("publish: upload of {}", file.path);
        if let Some(err) = answer.get("error") {
            bail!(
                "{what}: the Hub refused the object: {} {}",
                err["code"],
                err["message"].as_str().unwrap_or_default()
            );
        }
        let Some(actions) = answer.get("actions") else {
            return Ok(());
        };
        if let Some(up) = actions.get("upload") {
            let href = up["href"].as_str().ok_or_else(|| {
                candle_core::Error::Msg(format!("{what}: upload action without href"))
            })?;
            let header = string_map(&up["header"]);
            match header.iter().find(|(k, _)| k == "chunk_size") {
                Some((_, cs)) => self.multipart(&what, href, &header, cs, file, oid)?,
                None => {
                    let body = std::fs::read(&file.abs)?;
                    if body.len() as u64 != file.size {
                        bail!("{what}: the file changed size while publishing");
                    }
                    self.put(&what, href, &header, body)?;
                }
            }
        }
        if let Some(verify) = actions.get("verify") {
            let href = verify["href"].as_str().ok_or_else(|| {
                candle_core::Error::Msg(format!("{what}: verify action without href"))
            })?;
            let body = json!({"oid": oid, "size": file.size})
                .to_string()
                .into_bytes();
            let len = body.len();
            let mut rb = self
                .client
                .post(href)
                .header("Authorization", &self.auth)
                .header("Accept", "application/vnd.git-lfs+json")
                .header("Content-Type", "application/vnd.git-lfs+json")
                .body(body);
            for (k, v) in string_map(&verify["header"]) {
                rb = rb.header(k, v);
            }
            self.call(&format!("{what} (verify)"), rb, len)?;
        }
        Ok(())
    }

    /// A multipart upload: part `i` (1-based, the numeric keys of the action's header) is bytes
    /// `[(i-1) * chunk_size, i * chunk_size)`; each PUT's ETag goes to the completion call.
    fn multipart(
        &self,
        what: &str,
        href: &str,
        header: &[(String, String)],
        chunk_size: &str,
        file: &LocalFile,
        oid: &str,
    ) -> Result<()> {
        let cs: u64 = chunk_size.trim().parse().map_err(|_| {
            candle_core::Error::Msg(format!("{what}: bad chunk_size {chunk_size:?}"))
        })?;
        let mut parts: Vec<(u64, &str)> = header
            .iter()
            .filter_map(|(k, v)| k.parse::<u64>().ok().map(|n| (n, v.as_str())))
            .collect();
        parts.sort();
        if cs == 0 || parts.is_empty() || parts.len() as u64 != file.size.div_ceil(cs) {
            bail!(
                "{what}: {} part URLs for {} bytes in chunks of {cs}",
                parts.len(),
                file.size
            );
        }
        let mut f = std::fs::File::open(&file.abs)?;
        let mut done = Vec::new();
        for (i, (n, url)) in parts.iter().enumerate() {
            let start = i as u64 * cs;
            let len = cs.min(file.size - start) as usize;
            let mut buf = vec![0u8; len];
            f.seek(SeekFrom::Start(start))?;
            f.read_exact(&mut buf)?;
            let h = self.put(&format!("{what} (part {n})"), url, &[], buf)?;
            let etag = h.get("etag").and_then(|v| v.to_str().ok()).ok_or_else(|| {
                candle_core::Error::Msg(format!("{what}: part {n} answered without an ETag"))
            })?;
            done.push(json!({"partNumber": n, "etag": etag}));
        }
        let body = json!({"oid": oid, "parts": done}).to_string().into_bytes();
        let len = body.len();
        let rb = self
            .client
            .post(href)
            .header("Accept", "application/vnd.git-lfs+json")
            .header("Content-Type", "application/vnd.git-lfs+json")
            .body(body);
        self.call(
            &format!("{what} (completing the multipart upload)"),
            rb,
            len,
        )?;
        Ok(())
    }

    /// The commit id at the head of `revision`, `None` when the branch has none yet.
    pub fn head(&self, repo: &str, revision: &str) -> Result<Option<String>> {
        let what = format!("publish: reading the head of {repo}@{revision}");
        let rb = self
            .client
            .get(self.api(repo, &format!("revision/{}", segment(revision))))
            .header("Authorization", &self.auth);
        let r = self
            .send(rb, 0)
            .map_err(|e| candle_core::Error::Msg(format!("{what}: {}", self.describe(&e))))?;
        if r.status == 404 {
            return Ok(None);
        }
        if !r.ok() {
            bail!("{what}: HTTP {}: {}", r.status, r.message());
        }
        Ok(r.json(&what)?["sha"].as_str().map(String::from))
    }

    /// The commit of `entries` (NDJSON lines after the header) on `revision`, whose head was
    /// `parent` before it. Sent again only when the failed attempt provably did not reach the
    /// server (no connection) or the branch head, read again, had not moved; with `parent` as
    /// `parentCommit` the Hub itself refuses a second application.
    pub fn commit(
        &self,
        repo: &str,
        revision: &str,
        message: &str,
        parent: Option<&str>,
        entries: &[Value],
    ) -> Result<Value> {
        let what = format!("publish: commit to {repo} failed");
        let mut header = json!({"summary": message, "description": ""});
        if let Some(p) = parent {
            header["parentCommit"] = json!(p);
        }
        let mut body = json!({"key": "header", "value": header})
            .to_string()
            .into_bytes();
        body.push(b'\n');
        for e in entries {
            body.extend(e.to_string().into_bytes());
            body.push(b'\n');
        }
        let url = self.api(repo, &format!("commit/{}", segment(revision)));
        let mut last = String::new();
        for attempt in 0..COMMIT_ATTEMPTS {
            let rb = self
                .client
                .post(&url)
                .header("Authorization", &self.auth)
                .header("Content-Type", "application/x-ndjson")
                .body(body.clone());
            let reached = match self.send(rb, body.len()) {
                Ok(r) if r.ok() => return r.json(&what),
                // 408 / 429 / 5xx may be transient; anything else is the Hub's final word.
                Ok(r) if r.status == 408 || r.status == 429 || r.status >= 500 => {
                    last = format!("HTTP {}: {}", r.status, r.message());
                    true
                }
                Ok(r) => bail!("{what}: HTTP {}: {}", r.status, r.message()),
                Err(e) => {
                    last = self.describe(&e);
                    if e.is_timeout() {
                        // Not sent again (the wait is bounded): say whether it was applied.
                        match self.head(repo, revision) {
                            Ok(now) if now.as_deref() != parent => bail!(
                                "{what}: {last}; the head of {revision} moved from {} to {} \
                                 meanwhile, so the commit was probably applied (check the \
                                 repository)",
                                parent.unwrap_or("none"),
                                now.as_deref().unwrap_or("none")
                            ),
                            Ok(_) => bail!(
                                "{what}: {last}; the head of {revision} did not move, so it was \
                                 not applied: publish again"
                            ),
                            Err(h) => {
                                bail!("{what}: {last}; whether it was applied is unknown ({h})")
                            }
                        }
                    }
                    !e.is_connect()
                }
            };
            if attempt + 1 == COMMIT_ATTEMPTS {
                break;
            }
            if reached {
                let now = self.head(repo, revision).map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "{what}: {last}; not sent again, since whether it was applied is unknown ({e})"
                    ))
                })?;
                if now.as_deref() != parent {
                    bail!(
                        "{what}: {last}; but the head of {revision} moved from {} to {} \
                         meanwhile, so the commit was probably applied: not sending it again \
                         (check the repository)",
                        parent.unwrap_or("none"),
                        now.as_deref().unwrap_or("none")
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(500 << attempt));
        }
        bail!("{what}: {last} (after {COMMIT_ATTEMPTS} attempts; the branch head did not move, so none was applied)")
    }
}

/// A JSON object of strings (an LFS action's `header`) as pairs; numbers are written out.
fn string_map(v: &Value) -> Vec<(String, String)> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), s)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The commit entry of a file sent inline.
pub(crate) fn inline_entry(file: &LocalFile) -> Result<Value> {
    let bytes = std::fs::read(&file.abs)?;
    Ok(json!({
        "key": "file",
        "value": {
            "content": base64::engine::general_purpose::STANDARD.encode(bytes),
            "path": file.path,
            "encoding": "base64",
        }
    }))
}

/// The commit entry of an LFS object.
pub(crate) fn lfs_entry(file: &LocalFile, oid: &str) -> Value {
    json!({
        "key": "lfsFile",
        "value": {"path": file.path, "algo": "sha256", "oid": oid, "size": file.size}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn revisions_are_one_path_segment() {
        assert_eq!(super::segment("main"), "main");
        assert_eq!(super::segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(super::segment("v1.0 rc"), "v1.0%20rc");
    }
}
