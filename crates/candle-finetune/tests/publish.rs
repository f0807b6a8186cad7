//! Publishing through hf-hub 1.0 against a loopback HTTP server that implements the endpoints
//! hf-hub calls (repo creation, branch, preupload answering "regular", NDJSON commit), and the
//! round trip back through `from_pretrained`.

use base64::Engine;
use candle_core::{DType, Device, ModuleT, Tensor};
use candle_finetune::config::ModelConfig;
use candle_finetune::hub::{seed_cache, HubOptions, RepoKind};
use candle_finetune::pretrained::from_pretrained;
use candle_finetune::publish::{publish_folder, PublishOptions, Published};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::resnet::{resnet18, Arch};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

const TOKEN: &str = "hf_loopback_secret_token";
const OID: &str = "0123456789abcdef0123456789abcdef01234567";

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
}

struct FakeHub {
    url: String,
    log: Arc<Mutex<Vec<Req>>>,
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
    let (srv, lg, base) = (server.clone(), log.clone(), url.clone());
    let thread = std::thread::spawn(move || {
        let mut failures = script.commit_failures.into_iter();
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
                        .map(|f| json!({"path": f["path"], "uploadMode": "regular"}))
                        .collect();
                    respond(req, 200, json!({"files": files}));
                }
                ("POST", ["api", "models", owner, name, "commit", rev]) => match failures.next() {
                    Some(404) => respond(req, 404, json!({"error": "Repository not found"})),
                    Some(s) => respond(req, s, json!({"error": "upstream failure"})),
                    None => respond(
                        req,
                        200,
                        json!({
                            "commitUrl": format!("{base}/{owner}/{name}/commit/{OID}"),
                            "commitOid": OID,
                            "commitMessage": format!("on {rev}"),
                        }),
                    ),
                },
                _ => respond(req, 404, json!({"error": "no such endpoint"})),
            }
        }
    });
    FakeHub {
        url,
        log,
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
        repo: "alice/resnet18-cars-test".into(),
        private: false,
        revision: revision.map(String::from),
        message: Some("Upload a test model".into()),
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
    (varmap, model)
}

/// The files of the one commit the fake Hub received: path -> bytes, plus the header line.
fn committed(log: &[Req]) -> (Value, BTreeMap<String, Vec<u8>>) {
    let commits: Vec<&Req> = log.iter().filter(|r| r.path.contains("/commit/")).collect();
    let last = commits.last().expect("a commit request");
    let text = std::str::from_utf8(&last.body).unwrap();
    let mut lines = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap());
    let header = lines.next().unwrap();
    let mut files = BTreeMap::new();
    for l in lines {
        assert_eq!(l["key"], "file", "inline file entry: {l}");
        assert_eq!(l["value"]["encoding"], "base64");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(l["value"]["content"].as_str().unwrap())
            .unwrap();
        files.insert(l["value"]["path"].as_str().unwrap().to_string(), bytes);
    }
    (header, files)
}

#[test]
fn publish_creates_the_repo_and_uploads_the_folder_in_one_commit() {
    let hub = fake_hub(Script::default());
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    let p: Published =
        publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None)).unwrap();
    let log = hub.log.lock().unwrap().clone();
    let paths: Vec<&str> = log.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/repos/create",
            "/api/models/alice/resnet18-cars-test/preupload/main",
            "/api/models/alice/resnet18-cars-test/commit/main",
        ]
    );
    for r in &log {
        assert_eq!(r.method, "POST");
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
    assert_eq!(log[2].content_type.as_deref(), Some("application/x-ndjson"));
    let (header, files) = committed(&log);
    assert_eq!(header["key"], "header");
    assert_eq!(header["value"]["summary"], "Upload a test model");
    let want = [
        "README.md",
        "config.json",
        "model.safetensors",
        "plots/curves.png",
    ];
    assert_eq!(files.keys().map(String::as_str).collect::<Vec<_>>(), want);
    for (path, bytes) in &files {
        assert_eq!(
            bytes,
            &std::fs::read(dir.path().join(path)).unwrap(),
            "{path}"
        );
    }
    assert_eq!(p.files, want);
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
    let log = hub.log.lock().unwrap().clone();
    let paths: Vec<&str> = log.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/repos/create",
            "/api/models/alice/resnet18-cars-test/branch/candidate",
            "/api/models/alice/resnet18-cars-test/preupload/candidate",
            "/api/models/alice/resnet18-cars-test/commit/candidate",
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
fn server_errors_are_retried_then_reported() {
    // Two 503s, then success: hf-hub retries transient statuses.
    let hub = fake_hub(Script {
        commit_failures: vec![503, 503],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    model_folder(dir.path());
    publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None)).unwrap();
    let commits = commit_attempts(&hub);
    assert_eq!(commits, 3);
    drop(hub);
    // A 500 that does not go away: every retry made, then an error naming the status.
    let hub = fake_hub(Script {
        commit_failures: vec![500; 10],
        ..Default::default()
    });
    let err = publish_folder(&hub_opts(&hub.url, TOKEN), dir.path(), &publish_opts(None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("500"), "{err}");
    let commits = commit_attempts(&hub);
    assert_eq!(commits, 6, "the first attempt and hf-hub's five retries");
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
    let (_, files) = committed(&hub.log.lock().unwrap());
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
