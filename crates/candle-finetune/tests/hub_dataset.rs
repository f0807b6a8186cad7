//! Any Hub dataset, through the real hf-hub client against a loopback fake of the Hub's API
//! (hub-fake): the repo listed at a revision, splits from the card's YAML or file names,
//! columns from the dataset's features, the parquet conversion, offline reads from the cache,
//! and the errors.

use candle_finetune::data::features::ColumnChoice;
use candle_finetune::data::parquet::{write_shard, write_shard_with, ShardLayout};
use candle_finetune::data::DataSource;
use candle_finetune::hub::HubOptions;
use candle_finetune::smoke::{dataset_repo_files, RepoSpec, SMOKE_CLASSES};
use hub_fake::{FakeHub, Kind};
use std::time::Duration;

fn spec() -> RepoSpec {
    RepoSpec {
        train_shards: 3,
        train_per_shard: 7,
        validation: 5,
        test: 4,
        scale: 1,
        rows_per_group: 3,
    }
}

fn online(hub: &FakeHub, cache: &std::path::Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.into()),
        offline: false,
        endpoint: Some(hub.url().into()),
        token: None,
        timeout: Some(Duration::from_secs(20)),
    }
}

fn hub_source(repo: &str, revision: &str) -> DataSource {
    DataSource::Hub {
        repo: repo.into(),
        revision: revision.into(),
        config: None,
    }
}

#[test]
fn a_sharded_repo_with_a_card_is_read_whole_and_then_offline() {
    let hub = FakeHub::start();
    let commit = hub.put(
        Kind::Dataset,
        "someone/shapes",
        "main",
        dataset_repo_files(&spec()).unwrap(),
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = online(&hub, cache.path());
    let data = hub_source("someone/shapes", "main")
        .open(&opts, &ColumnChoice::default())
        .unwrap();
    // Every shard, every image; the columns the features declare.
    assert_eq!(data.train.len(), 21);
    assert_eq!(data.validation.as_ref().map(|v| v.len()), Some(5));
    assert_eq!(data.test.as_ref().map(|v| v.len()), Some(4));
    let cols = data.columns.clone().unwrap();
    assert_eq!(
        (cols.image.as_str(), cols.label.as_str()),
        ("img", "fine_label")
    );
    assert_eq!(data.train.class_names, SMOKE_CLASSES.map(String::from));
    assert_eq!(data.commit.as_deref(), Some(commit.as_str()));
    assert!(data.train.load_image(20).is_ok());
    // The card's licence reaches the model card's description of the data.
    let info = hub_source("someone/shapes", "main")
        .info(data.card.as_ref(), data.commit.as_deref())
        .unwrap();
    assert_eq!(
        (info.license.as_deref(), info.revision.as_deref()),
        (Some("cc-by-4.0"), Some(commit.as_str()))
    );
    // The client asked the API for the listing and resolved each file at the listed commit.
    let reqs = hub.requests();
    assert!(reqs.iter().any(|r| r
        .url
        .starts_with("/api/datasets/someone/shapes/revision/main")));
    let resolved: Vec<&str> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.url.contains("/resolve/"))
        .map(|r| r.url.as_str())
        .collect();
    assert_eq!(
        resolved.len(),
        6,
        "README + 3 train + validation + test: {resolved:?}"
    );
    assert!(resolved.iter().all(|u| u.contains(&commit)), "{resolved:?}");

    // Offline, from the cache alone: the same data, no request.
    let before = hub.requests().len();
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let again = hub_source("someone/shapes", "main")
        .open(&offline, &ColumnChoice::default())
        .unwrap();
    assert_eq!(
        (again.train.len(), again.commit.as_deref()),
        (21, Some(commit.as_str()))
    );
    assert_eq!(hub.requests().len(), before, "offline made a request");
    // A revision never fetched is a clear offline error.
    let e = hub_source("someone/shapes", "v2")
        .open(&offline, &ColumnChoice::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("offline") && e.contains("v2"), "{e}");
}

#[test]
fn file_names_split_a_repo_without_a_card_and_a_card_overrides_them() {
    let hub = FakeHub::start();
    let files: Vec<(String, Vec<u8>)> = dataset_repo_files(&spec())
        .unwrap()
        .into_iter()
        .filter(|(p, _)| p != "README.md")
        .map(|(p, b)| (p.replace("validation", "dev"), b))
        .collect();
    hub.put(Kind::Dataset, "someone/nocard", "main", files.clone());
    let cache = tempfile::tempdir().unwrap();
    let data = hub_source("someone/nocard", "main")
        .open(&online(&hub, cache.path()), &ColumnChoice::default())
        .unwrap();
    // `dev` is a validation name; the columns come from the parquet metadata.
    assert_eq!(
        (data.train.len(), data.validation.map(|v| v.len())),
        (21, Some(5))
    );
    // A card that declares other split files wins over the names.
    let mut with_card = files;
    with_card.push((
        "README.md".into(),
        b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-0000[01]-*\n  - split: test\n    path: data/test-*\n---\n".to_vec(),
    ));
    hub.put(Kind::Dataset, "someone/declared", "main", with_card);
    let data = hub_source("someone/declared", "main")
        .open(&online(&hub, cache.path()), &ColumnChoice::default())
        .unwrap();
    assert_eq!(
        (
            data.train.len(),
            data.validation.is_none(),
            data.test.map(|t| t.len())
        ),
        (14, true, Some(4))
    );
}

#[test]
fn a_repo_without_parquet_is_read_from_its_parquet_conversion() {
    let hub = FakeHub::start();
    hub.put(
        Kind::Dataset,
        "someone/jpegs",
        "main",
        vec![
            ("train/cat/0.jpg".into(), b"not read".to_vec()),
            ("README.md".into(), b"# images".to_vec()),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let shard = |n: usize, salt: u64| {
        let ds = candle_finetune::smoke::generated_dataset(n, 1, salt);
        let rows: Vec<(Vec<u8>, i64)> = (0..ds.len())
            .map(|i| (ds.encoded(i).unwrap().to_vec(), ds.samples[i].label as i64))
            .collect();
        let p = dir.path().join(format!("{salt}.parquet"));
        write_shard(&p, &rows, &SMOKE_CLASSES.map(String::from)).unwrap();
        std::fs::read(p).unwrap()
    };
    let conv_commit = hub.put(
        Kind::Dataset,
        "someone/jpegs",
        "refs/convert/parquet",
        vec![
            ("default/train/0000.parquet".into(), shard(12, 1)),
            ("default/test/0000.parquet".into(), shard(6, 2)),
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let data = hub_source("someone/jpegs", "main")
        .open(&online(&hub, cache.path()), &ColumnChoice::default())
        .unwrap();
    assert_eq!(
        (data.train.len(), data.test.map(|t| t.len())),
        (12, Some(6))
    );
    assert_eq!(data.commit.as_deref(), Some(conv_commit.as_str()));
    assert!(
        data.origin.contains("refs/convert/parquet"),
        "{}",
        data.origin
    );
}

#[test]
fn ambiguous_or_missing_columns_and_unknown_repos_are_clear_errors() {
    let hub = FakeHub::start();
    let dir = tempfile::tempdir().unwrap();
    // Two integer columns and no ClassLabel declared: which is the class?
    let p = dir.path().join("s.parquet");
    write_shard_with(
        &p,
        &[(b"x".to_vec(), 1), (b"y".to_vec(), 2)],
        &[],
        &ShardLayout {
            image_column: "picture".into(),
            label_column: "fine".into(),
            extra_integer_column: Some("coarse".into()),
            rows_per_group: 0,
        },
    )
    .unwrap();
    // Without names the metadata declares a ClassLabel of no names: strip the declaration by
    // rewriting the file with the schema only (the plain parquet a non-`datasets` tool writes).
    let plain = plain_parquet(&p);
    hub.put(
        Kind::Dataset,
        "someone/ints",
        "main",
        vec![("train.parquet".into(), plain)],
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = online(&hub, cache.path());
    let e = hub_source("someone/ints", "main")
        .open(&opts, &ColumnChoice::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ColumnChoice::label")
            && e.contains("fine (integer)")
            && e.contains("coarse (integer)"),
        "{e}"
    );
    let ok = hub_source("someone/ints", "main")
        .open(
            &opts,
            &ColumnChoice {
                label: Some("fine".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(ok.train.class_names, ["0", "1", "2"]);
    let e = hub_source("someone/ints", "main")
        .open(
            &opts,
            &ColumnChoice {
                image: Some("coarse".into()),
                label: Some("fine".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot hold encoded images"), "{e}");
    // Unknown repository, unknown revision.
    let e = hub_source("someone/missing", "main")
        .open(&opts, &ColumnChoice::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("someone/missing"), "{e}");
    let e = hub_source("someone/ints", "nope")
        .open(&opts, &ColumnChoice::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    // Not a repository id.
    let e = hub_source("no-slash", "main")
        .open(&opts, &ColumnChoice::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("OWNER/NAME"), "{e}");
}

/// The same columns without the `huggingface` metadata.
fn plain_parquet(path: &std::path::Path) -> Vec<u8> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;
    let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap()).unwrap();
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(b.schema().fields().clone()));
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema.clone(), None).unwrap();
    for batch in b.build().unwrap() {
        let batch = batch.unwrap();
        let batch =
            arrow_array::RecordBatch::try_new(schema.clone(), batch.columns().to_vec()).unwrap();
        w.write(&batch).unwrap();
    }
    w.close().unwrap();
    out
}

/// One HTTP/1.0 exchange: (status, lower-case header lines, body).
fn http(base: &str, method: &str, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

#[test]
fn the_fake_answers_ranges_and_head_as_the_hub_does() {
    let hub = FakeHub::start();
    let commit = hub.put(
        Kind::Model,
        "someone/m",
        "main",
        vec![("w.bin".into(), b"0123456789".to_vec())],
    );
    let path = "/someone/m/resolve/main/w.bin";
    let (status, head, body) = http(hub.url(), "HEAD", path, "");
    assert_eq!(status, 200);
    assert!(head.contains(&format!("x-repo-commit: {commit}")), "{head}");
    assert!(
        head.contains("content-length: 10") && head.contains("etag: \""),
        "{head}"
    );
    assert!(body.is_empty());
    let (status, head, body) = http(hub.url(), "GET", path, "Range: bytes=2-4\r\n");
    assert_eq!(status, 206);
    assert!(head.contains("content-range: bytes 2-4/10"), "{head}");
    assert_eq!(body, b"234");
    let (status, head, _) = http(hub.url(), "GET", "/someone/m/resolve/main/nope", "");
    assert_eq!(status, 404);
    assert!(head.contains("x-error-code: entrynotfound"), "{head}");
    let (status, _, body) = http(
        hub.url(),
        "GET",
        "/api/models/someone/m/tree/main?recursive=true",
        "",
    );
    let tree: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, tree[0]["path"].as_str()), (200, Some("w.bin")));
}
