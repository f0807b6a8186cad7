//! Publishing against a loopback HTTP server that implements the endpoints a publication calls
//! (repo creation and branch through hf-hub; preupload, the LFS batch with the basic, multipart
//! or Xet transfer, the signed PUTs, verify, the branch head and the NDJSON commit), the
//! time limits, and the round trip back through `from_pretrained`.

use base64::Engine;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_finetune::config::ModelConfig;
use candle_finetune::hub::{seed_cache, HubOptions, RepoKind};
use candle_finetune::pretrained::from_pretrained;
use candle_finetune::publish::{
    publish_folder, publish_folder_with, PublishOptions, Published, UploadProgress,
};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::{resnet18, Arch};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "hf_loopback_secret_token";
const OID: &str = "0123456789abcdef0123456789abcdef01234567";
/// The branch head before any commit.
const HEAD0: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    auth: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// How the fake Hub answers.
#[derive(Default)]
struct Script {
    /// Status of `POST /api/repos/create` (200 if 0).
    create: u16,
    /// Statuses of successive commit attempts before a 200.
    commit_failures: Vec<u16>,
    /// Apply a commit even when answering it with a failure (the head moves).
    apply_failed_commits: bool,
    /// Files above this size are "lfs" in the preupload answer (`None`: every file regular).
    lfs_over: Option<u64>,
    /// The LFS batch's chosen transfer ("basic" when empty); "multipart" sends parts of
    /// `chunk` bytes.
    transfer: &'static str,
    chunk: u64,
    /// Requests whose path contains this are never answered (empty: none).
    hang: &'static str,
}

struct FakeHub {
    url: String,
    log: Arc<Mutex<Vec<Req>>>,
    /// Bodies of the PUTs to signed URLs, by URL path.
    puts: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn respond(req: tiny_http::Request, status: u16, body: Value) {
    let header =
        tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).unwrap();
    let resp = tiny_http::Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    req.respond(resp).unwrap();
}

fn fake_hub(script: Script) -> FakeHub {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let puts = Arc::new(Mutex::new(BTreeMap::new()));
    let (srv, lg, pt, base) = (server.clone(), log.clone(), puts.clone(), url.clone());
    let thread = std::thread::spawn(move || {
        let mut failures = script.commit_failures.into_iter();
        let mut head = HEAD0.to_string();
        let mut held = Vec::new();
        for mut req in srv.incoming_requests() {
            let mut body = Vec::new();
            req.as_reader().read_to_end(&mut body).unwrap();
            let header = |name: &'static str| {
                req.headers()
                    .iter()
                    .find(|h| h.field.equiv(name))
                    .map(|h| h.value.as_str().to_string())
            };
            let r = Req {
                method: req.method().to_string(),
                path: req.url().split('?').next().unwrap().to_string(),
                auth: header("Authorization"),
                content_type: header("Content-Type"),
                body,
            };
            lg.lock().unwrap().push(r.clone());
            if !script.hang.is_empty() && r.path.contains(script.hang) {
                held.push(req);
                continue;
            }
            let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
            match (r.method.as_str(), parts.as_slice()) {
                ("POST", ["api", "repos", "create"]) => match script.create {
                    0 | 200 => {
                        let b: Value = serde_json::from_slice(&r.body).unwrap();
                        let repo = format!(
                            "{}/{}",
                            b["organization"].as_str().unwrap(),
                            b["name"].as_str().unwrap()
                        );
                        respond(req, 200, json!({"url": format!("{base}/{repo}")}));
                    }
                    409 => respond(
                        req,
                        409,
                        json!({"error": "You already created this model repo"}),
                    ),
                    s => respond(req, s, json!({"error": "Invalid username or password."})),
                },
                ("POST", ["api", "models", _, _, "branch", _]) => respond(req, 200, json!({})),
                ("POST", ["api", "models", _, _, "preupload", _]) => {
                    let b: Value = serde_json::from_slice(&r.body).unwrap();
                    let files: Vec<Value> = b["files"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| {
                            let big = script
                                .lfs_over
                                .is_some_and(|n| f["size"].as_u64().unwrap() > n);
                            let mode = if big { "lfs" } else { "regular" };
                            json!({"path": f["path"], "uploadMode": mode, "shouldIgnore": false})
                        })
                        .collect();
                    respond(req, 200, json!({"files": files}));
                }
                ("POST", [_, repo_git, "info", "lfs", "objects", "batch"]) => {
                    assert!(repo_git.ends_with(".git"));
                    let b: Value = serde_json::from_slice(&r.body).unwrap();
                    let transfer = if script.transfer.is_empty() {
                        "basic"
                    } else {
                        script.transfer
                    };
                    let objects: Vec<Value> = b["objects"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|o| {
                            let oid = o["oid"].as_str().unwrap();
                            let size = o["size"].as_u64().unwrap();
                            let upload = if transfer == "multipart" {
                                let mut h = json!({"chunk_size": script.chunk.to_string()});
                                for i in 1..=size.div_ceil(script.chunk) {
                                    h[format!("{i:05}")] = json!(format!("{base}/s3/{oid}/{i}"));
                                }
                                json!({"href": format!("{base}/lfs/complete/{oid}"), "header": h})
                            } else {
                                json!({"href": format!("{base}/s3/{oid}")})
                            };
                            json!({"oid": oid, "size": size, "actions": {
                                "upload": upload,
                                "verify": {"href": format!("{base}/lfs/verify"), "header": {}},
                            }})
                        })
                        .collect();
                    respond(req, 200, json!({"transfer": transfer, "objects": objects}));
                }
                ("PUT", ["s3", ..]) => {
                    pt.lock().unwrap().insert(r.path.clone(), r.body.clone());
                    let etag = format!("\"etag-{}\"", parts.last().unwrap());
                    let h = tiny_http::Header::from_bytes(&b"ETag"[..], etag.as_bytes()).unwrap();
                    req.respond(tiny_http::Response::empty(200).with_header(h))
                        .unwrap();
                }
                ("POST", ["lfs", "verify"]) | ("POST", ["lfs", "complete", _]) => {
                    respond(req, 200, json!({}))
                }
                ("GET", ["api", "models", _, _, "xet-write-token", _]) => respond(
                    req,
                    503,
                    json!({"error": "no Xet storage on this fake Hub"}),
                ),
                ("GET", ["api", "models", _, _, "revision", _]) => {
                    respond(req, 200, json!({"sha": head}))
                }
                ("POST", ["api", "models", owner, name, "commit", rev]) => match failures.next() {
                    Some(404) => respond(req, 404, json!({"error": "Repository not found"})),
                    Some(s) => {
                        if script.apply_failed_commits {
                            head = OID.to_string();
                        }
                        respond(req, s, json!({"error": "upstream failure"}))
                    }
                    None => {
                        head = OID.to_string();
                        respond(
                            req,
                            200,
                            json!({
                                "commitUrl": format!("{base}/{owner}/{name}/commit/{OID}"),
                                "commitOid": OID,
                                "commitMessage": format!("on {rev}"),
                            }),
                        )
                    }
                },
                _ => respond(req, 404, json!({"error": "no such endpoint"})),
            }
        }
    });
    FakeHub {
        url,
        log,
        puts,
        server,
        thread: Some(thread),
    }
}

/// Commit requests the fake Hub received on `main`.
fn commit_attempts(hub: &FakeHub) -> usize {
    hub.log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.ends_with("/commit/main"))
        .count()
}

fn hub_opts(url: &str, token: &str) -> HubOptions {
    HubOptions {
        endpoint: Some(url.to_string()),
        token: Some(token.to_string()),
        ..Default::default()
    }
}

fn publish_opts(revision: Option<&str>) -> PublishOptions {
    PublishOptions {
        revision: revision.map(String::from),
        message: Some("Upload a test model".into()),
        ..PublishOptions::new("alice/resnet18-cars-test")
    }
}

/// A small but real model folder: ResNet-18 (3 classes, random init), its export and config.
fn model_folder(dir: &Path) -> (VarMap, candle_resnet::resnet::ResNet) {
    let varmap = VarMap::new();
    let model = resnet18(
        3,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    candle_resnet::export::export_safetensors(&varmap, 0, &dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = ["sedan", "coupe", "van"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let cfg = ModelConfig::new(Arch::ResNet18, &names, &Default::default());
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("README.md"),
        "---\nlibrary_name: candle\n---\n# test\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("plots")).unwrap();
    std::fs::write(
        dir.join("plots/curves.png"),
        [0x89u8, b'P', b'N', b'G', 0, 1, 2],
    )
    .unwrap();
    // What a training run leaves next to the model: checkpoints (weights + optimizer state).
    for c in ["checkpoint-best.safetensors", "checkpoint-last.safetensors"] {
        std::fs::write(dir.join(c), vec![7u8; 300_000]).unwrap();
    }
    (varmap, model)
}

/// The folder's files that belong on the Hub.
const UPLOADED: [&str; 4] = [
    "README.md",
    "config.json",
    "model.safetensors",
    "plots/curves.png",
];

/// An `lfsFile` entry of a commit.
#[derive(Debug, PartialEq)]
struct LfsEntry {
    path: String,
    oid: String,
    size: u64,
}

/// The last commit the fake Hub received: its header line, the inline files (path -> bytes)
/// and the `lfsFile` entries.
fn committed(log: &[Req]) -> (Value, BTreeMap<String, Vec<u8>>, Vec<LfsEntry>) {
    let commits: Vec<&Req> = log.iter().filter(|r| r.path.contains("/commit/")).collect();
    let last = commits.last().expect("a commit request");
    let text = std::str::from_utf8(&last.body).unwrap();
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let header = lines.next().unwrap();
    let (mut files, mut lfs) = (BTreeMap::new(), Vec::new());
    for l in lines {
        let v = &l["value"];
        match l["key"].as_str() {
            Some("file") => {
                assert_eq!(v["encoding"], "base64");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v["content"].as_str().unwrap())
                    .unwrap();
                files.insert(v["path"].as_str().unwrap().to_string(), bytes);
            }
            Some("lfsFile") => {
                assert_eq!(v["algo"], "sha256");
                lfs.push(LfsEntry {
                    path: v["path"].as_str().unwrap().into(),
                    oid: v["oid"].as_str().unwrap().into(),
                    size: v["size"].as_u64().unwrap(),
                });
            }
            _ => panic!("unexpected commit entry {l}"),
        }
    }
    (header, files, lfs)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn paths(hub: &FakeHub) -> Vec<String> {
    hub.log
        .lock()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[test]
fn publish_creates_the_repo_and_uploads_the_folder_in_one_commit() {
    let hub = fake_hub(Script::default());
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let p: Published =
        publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None)).unwrap();
    let log = hub.log.lock().unwrap().clone();
    assert_eq!(
        paths(&hub),
        [
            "POST /api/repos/create",
            "POST /api/models/alice/resnet18-cars-test/preupload/main",
            "GET /api/models/alice/resnet18-cars-test/revision/main",
            "POST /api/models/alice/resnet18-cars-test/commit/main",
        ]
    );
    for r in &log {
        assert_eq!(
            r.auth.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{}",
            r.path
        );
    }
    let create: Value = serde_json::from_slice(&log[0].body).unwrap();
    assert_eq!(create["name"], "resnet18-cars-test");
    assert_eq!(create["organization"], "alice");
    assert_eq!(create["type"], "model");
    assert_eq!(create["private"], false);
    assert_eq!(log[3].content_type.as_deref(), Some("application/x-ndjson"));
    let (header, files, lfs) = committed(&log);
    assert_eq!(header["key"], "header");
    assert_eq!(header["value"]["summary"], "Upload a test model");
    // The head read before the commit guards it against a double application.
    assert_eq!(header["value"]["parentCommit"], HEAD0);
    let want = UPLOADED;
    assert_eq!(files.keys().map(String::as_str).collect::<Vec<_>>(), want);
    assert!(lfs.is_empty());
    for (path, bytes) in &files {
        assert_eq!(
            bytes,
            &std::fs::read(dir.path().join(path)).unwrap(),
            "{path}"
        );
    }
    assert_eq!(p.files, want);
    // The checkpoints stayed local.
    assert_eq!(
        p.kept_local,
        ["checkpoint-best.safetensors", "checkpoint-last.safetensors"]
    );
    assert_eq!((p.transfer.as_deref(), p.lfs_files.len()), (None, 0));
    assert_eq!(p.commit_oid.as_deref(), Some(OID));
    assert_eq!(
        p.commit_url.as_deref(),
        Some(format!("{}/alice/resnet18-cars-test/commit/{OID}", hub.url).as_str())
    );
    assert!(!format!("{p:?}").contains(TOKEN));
    assert!(!format!("{:?}", hub_opts(&hub.url, TOKEN)).contains(TOKEN));
}

#[test]
fn existing_repo_and_a_branch_commit_to_that_branch() {
    let hub = fake_hub(Script {
        create: 409,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    publish_folder(
        &hub_opts(&hub.url, TOKEN),
        dir.path(),
        &publish_opts(Some("candidate")),
    )
    .unwrap();
    assert_eq!(
        paths(&hub),
        [
            "POST /api/repos/create",
            "POST /api/models/alice/resnet18-cars-test/branch/candidate",
            "POST /api/models/alice/resnet18-cars-test/preupload/candidate",
            "GET /api/models/alice/resnet18-cars-test/revision/candidate",
            "POST /api/models/alice/resnet18-cars-test/commit/candidate",
        ]
    );
}

#[test]
fn rejected_token_stops_before_any_upload() {
    let hub = fake_hub(Script {
        create: 401,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Authentication required"), "{err}");
    assert!(err.contains("alice/resnet18-cars-test"), "{err}");
    assert!(!err.contains(TOKEN));
    let log = hub.log.lock().unwrap();
    assert_eq!(log.len(), 1, "only the create request: {log:?}");
}

#[test]
fn missing_repo_on_commit_is_a_clear_error() {
    let hub = fake_hub(Script {
        commit_failures: vec![404],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("commit to alice/resnet18-cars-test failed"),
        "{err}"
    );
    assert!(err.contains("Repository not found"), "{err}");
}

#[test]
fn a_failed_commit_is_resent_only_while_the_branch_head_has_not_moved() {
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let revision_reads = |hub: &FakeHub| {
        paths(hub)
            .iter()
            .filter(|p| p.ends_with("/revision/main"))
            .count()
    };
    // Two 503s that were not applied: the head is read after each, then the commit re-sent.
    let hub = fake_hub(Script {
        commit_failures: vec![503, 503],
        ..Default::default()
    });
    publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None)).unwrap();
    assert_eq!((commit_attempts(&hub), revision_reads(&hub)), (3, 3));
    drop(hub);
    // A 500 the server applied anyway: the head moved, so the commit is not sent again.
    let hub = fake_hub(Script {
        commit_failures: vec![500; 10],
        apply_failed_commits: true,
        ..Default::default()
    });
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert_eq!(commit_attempts(&hub), 1, "{err}");
    assert!(
        err.contains("500") && err.contains("probably applied"),
        "{err}"
    );
    assert!(err.contains(HEAD0) && err.contains(OID), "{err}");
    drop(hub);
    // A 500 that does not go away and is never applied: three attempts, then an error.
    let hub = fake_hub(Script {
        commit_failures: vec![500; 10],
        ..Default::default()
    });
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert_eq!(commit_attempts(&hub), 3, "{err}");
    assert!(
        err.contains("500") && err.contains("none was applied"),
        "{err}"
    );
}

#[test]
fn large_files_go_by_the_basic_lfs_transfer() {
    let hub = fake_hub(Script {
        lfs_over: Some(1_000_000),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let mut seen = Vec::new();
    let p = publish_folder_with(
        &hub_opts(&hub.url, TOKEN),
        dir.path(),
        &publish_opts(None),
        &mut |u| seen.push(u),
    )
    .unwrap();
    let model = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let oid = sha256_hex(&model);
    // The progress of the one large file: nothing sent, then all of it.
    let size = model.len() as u64;
    assert_eq!(
        seen,
        [
            UploadProgress {
                sent: 0,
                total: size
            },
            UploadProgress {
                sent: size,
                total: size
            }
        ]
    );
    assert_eq!(
        paths(&hub),
        [
            "POST /api/repos/create".to_string(),
            "POST /api/models/alice/resnet18-cars-test/preupload/main".into(),
            "POST /alice/resnet18-cars-test.git/info/lfs/objects/batch".into(),
            format!("PUT /s3/{oid}"),
            "POST /lfs/verify".into(),
            "GET /api/models/alice/resnet18-cars-test/revision/main".into(),
            "POST /api/models/alice/resnet18-cars-test/commit/main".into(),
        ]
    );
    let log = hub.log.lock().unwrap().clone();
    let batch: Value = serde_json::from_slice(&log[2].body).unwrap();
    assert_eq!(batch["operation"], "upload");
    assert_eq!(batch["objects"], json!([{"oid": oid, "size": model.len()}]));
    assert_eq!(
        log[2].content_type.as_deref(),
        Some("application/vnd.git-lfs+json")
    );
    // The PUT carried exactly the file; the verify call names it.
    assert_eq!(hub.puts.lock().unwrap()[&format!("/s3/{oid}")], model);
    let verify: Value = serde_json::from_slice(&log[4].body).unwrap();
    assert_eq!(verify, json!({"oid": oid, "size": model.len()}));
    // The commit: an lfsFile entry (oid = sha256), everything else inline, nothing large inline.
    let (_, files, lfs) = committed(&log);
    assert_eq!(
        lfs,
        [LfsEntry {
            path: "model.safetensors".into(),
            oid: oid.clone(),
            size: model.len() as u64
        }]
    );
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        ["README.md", "config.json", "plots/curves.png"]
    );
    assert!(
        log[6].body.len() < 100_000,
        "{} byte commit",
        log[6].body.len()
    );
    assert_eq!(p.transfer.as_deref(), Some("basic"));
    assert_eq!(p.lfs_files, ["model.safetensors"]);
    assert_eq!(p.files, UPLOADED);
}

#[test]
fn multipart_uploads_send_every_part_then_complete() {
    let chunk = 10 << 20;
    let hub = fake_hub(Script {
        lfs_over: Some(1_000_000),
        transfer: "multipart",
        chunk,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None)).unwrap();
    let model = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let oid = sha256_hex(&model);
    let puts = hub.puts.lock().unwrap().clone();
    let n = (model.len() as u64).div_ceil(chunk);
    assert!(n >= 3, "{n} parts");
    let mut joined: Vec<u8> = Vec::new();
    for i in 1..=n {
        joined.extend(&puts[&format!("/s3/{oid}/{i}")]);
    }
    assert_eq!(joined, model);
    let log = hub.log.lock().unwrap().clone();
    let done = log
        .iter()
        .find(|r| r.path == format!("/lfs/complete/{oid}"))
        .expect("the completion call");
    let v: Value = serde_json::from_slice(&done.body).unwrap();
    assert_eq!(v["oid"], oid);
    let parts = v["parts"].as_array().unwrap();
    assert_eq!(parts.len() as u64, n);
    assert_eq!(parts[0], json!({"partNumber": 1, "etag": "\"etag-1\""}));
    let (_, _, lfs) = committed(&log);
    assert_eq!(lfs[0].oid, oid);
}

#[test]
fn when_the_hub_picks_xet_hf_hub_takes_the_upload_there() {
    let hub = fake_hub(Script {
        lfs_over: Some(1_000_000),
        transfer: "xet",
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    // This fake Hub has no Xet storage: its token endpoint fails, and so does the publication,
    // but only after the request sequence reached the Xet token endpoint.
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("Xet"), "{err}");
    let p = paths(&hub);
    let token_call = p
        .iter()
        .position(|x| x == "GET /api/models/alice/resnet18-cars-test/xet-write-token/main")
        .unwrap_or_else(|| panic!("no Xet token request: {p:?}"));
    // Our batch saw "xet" first; nothing was PUT and nothing committed.
    assert!(p[..token_call]
        .iter()
        .any(|x| x.ends_with("/info/lfs/objects/batch")));
    assert!(
        !p.iter()
            .any(|x| x.starts_with("PUT ") || x.contains("/commit/")),
        "{p:?}"
    );
    assert!(hub.puts.lock().unwrap().is_empty());
}

/// A loopback server that accepts connections and never writes a byte back: its URL and the
/// connections it holds.
fn silent_server() -> (String, Arc<Mutex<Vec<std::net::TcpStream>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    (url, held)
}

#[test]
fn a_server_that_never_answers_ends_within_the_time_limit() {
    let (url, held) = silent_server();
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let opts = HubOptions {
        timeout: Some(Duration::from_secs(1)),
        ..hub_opts(&url, TOKEN)
    };
    let t0 = Instant::now();
    let err = publish_folder(&opts, dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    let took = t0.elapsed();
    // The whole publish, not one request: hf-hub's create call and its one retry, each 1 s,
    // plus a sub-second backoff: within twice the limit and a margin for a loaded machine.
    assert!(took < Duration::from_millis(3500), "took {took:?}: {err}");
    assert!(took >= Duration::from_secs(2), "took {took:?}: {err}");
    assert!(
        err.contains("cannot create alice/resnet18-cars-test"),
        "{err}"
    );
    assert!(err.contains("no answer within the time limit"), "{err}");
    assert!(!held.lock().unwrap().is_empty(), "the server was reached");
}

#[test]
fn a_commit_that_gets_no_answer_times_out_and_is_not_resent_blindly() {
    let hub = fake_hub(Script {
        hang: "/commit/",
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let opts = HubOptions {
        timeout: Some(Duration::from_secs(1)),
        ..hub_opts(&hub.url, TOKEN)
    };
    let t0 = Instant::now();
    let err = publish_folder(&opts, dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(3500), "took {took:?}: {err}");
    assert!(err.contains("no answer within the time limit"), "{err}");
    assert!(err.contains("did not move, so it was not applied"), "{err}");
    // Sent once; then one read of the branch head said it was not applied.
    let p = paths(&hub);
    let commits: Vec<usize> = (0..p.len())
        .filter(|&i| p[i].contains("/commit/"))
        .collect();
    assert_eq!(commits.len(), 1, "{p:?}");
    assert!(p[commits[0] + 1].ends_with("/revision/main"), "{p:?}");
}

/// Downloads against a server that never answers end within twice the time limit too.
#[test]
fn a_download_from_a_server_that_never_answers_ends_within_twice_the_limit() {
    let (url, held) = silent_server();
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        timeout: Some(Duration::from_secs(1)),
        cache_dir: Some(cache.path().to_path_buf()),
        ..hub_opts(&url, TOKEN)
    };
    let t0 = Instant::now();
    let err = opts
        .model_file("timm/resnet18.tv_in1k", "main", "model.safetensors")
        .unwrap_err()
        .to_string();
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(3500), "took {took:?}: {err}");
    assert!(err.contains("no answer within the time limit"), "{err}");
    assert!(!held.lock().unwrap().is_empty(), "the server was reached");
}

#[test]
fn exclude_patterns_can_be_changed() {
    let hub = fake_hub(Script::default());
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let mut o = publish_opts(None);
    o.exclude = vec!["plots/*".into(), "checkpoint-best*".into()];
    let p = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &o).unwrap();
    assert_eq!(
        p.files,
        [
            "README.md",
            "checkpoint-last.safetensors",
            "config.json",
            "model.safetensors"
        ]
    );
    assert_eq!(
        p.kept_local,
        ["checkpoint-best.safetensors", "plots/curves.png"]
    );
    // Excluding what a model folder needs is an error before any upload.
    o.exclude = vec!["*.json".into()];
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &o)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn local_problems_are_reported_before_any_request() {
    let hub = fake_hub(Script::default());
    let dir = tempfile::tempdir().unwrap();
    // Not a model folder yet.
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing model.safetensors, config.json, README.md"),
        "{err}"
    );
    model_folder(dir.path());
    // An explicitly empty token means "none" (whatever the environment holds).
    let err = publish_folder(&hub_opts(&hub.url, ""), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no Hugging Face token"), "{err}");
    let mut bad = publish_opts(None);
    bad.repo = "no-owner".into();
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("OWNER/NAME"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    assert!(hub.log.lock().unwrap().is_empty());
}

#[test]
fn published_folder_loads_back_with_identical_logits() {
    let hub = fake_hub(Script::default());
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = model_folder(dir.path());
    publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None)).unwrap();
    let (_, files, _) = committed(&hub.log.lock().unwrap());
    // What the Hub received, placed in a temporary Hub cache at the commit it reported.
    let cache = tempfile::tempdir().unwrap();
    let staging = tempfile::tempdir().unwrap();
    for (path, bytes) in &files {
        let src = staging.path().join(path.replace('/', "_"));
        std::fs::write(&src, bytes).unwrap();
        seed_cache(
            cache.path(),
            RepoKind::Model,
            "alice/resnet18-cars-test",
            OID,
            path,
            &src,
        )
        .unwrap();
    }
    let opts = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        offline: true,
        ..Default::default()
    };
    let p = from_pretrained(&opts, "alice/resnet18-cars-test", None, &Device::Cpu).unwrap();
    assert_eq!(p.labels, ["sedan", "coupe", "van"]);
    assert_eq!(p.config.num_classes, 3);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
    let want = model
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got = p
        .model
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
    // A revision that is not in the cache is an error, offline.
    assert!(from_pretrained(&opts, "alice/resnet18-cars-test", Some("v2"), &Device::Cpu).is_err());
}
