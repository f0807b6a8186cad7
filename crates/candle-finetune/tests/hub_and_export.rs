//! Weights through the real hf-hub code path from a Hub cache the test writes (offline),
//! parameter groups and freezing, and the torchvision-named export.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_finetune::hub::{seed_cache, HubOptions, RepoKind};
use candle_finetune::pretrained::{self, Head, WeightsSource};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use candle_resnet::export::export_safetensors;
use candle_resnet::params::ParamGroups;
use candle_resnet::resnet::{resnet18, Arch};

/// An ImageNet-shaped (1000-class) ResNet-18 with deterministic weights, exported to `path`.
fn imagenet_like(path: &std::path::Path) -> VarMap {
    let vm = VarMap::new();
    resnet18(1000, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    candle_resnet::init::fill_deterministic(&vm).unwrap();
    export_safetensors(&vm, 0, path).unwrap();
    vm
}

fn values(vm: &VarMap, name: &str) -> Vec<f32> {
    vm.data().lock().unwrap()[name]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn default_weights_load_offline_from_a_hub_cache() {
    let cache = tempfile::tempdir().unwrap();
    let src = cache.path().join("src.safetensors");
    let reference = imagenet_like(&src);
    seed_cache(
        cache.path(),
        RepoKind::Model,
        pretrained::DEFAULT_REPO,
        pretrained::DEFAULT_REVISION,
        pretrained::DEFAULT_FILE,
        &src,
    )
    .unwrap();
    // Offline, and also online with an endpoint that cannot answer: a pinned commit already in
    // the cache needs no request.
    for opts in [
        HubOptions {
            cache_dir: Some(cache.path().into()),
            offline: true,
            endpoint: None,
            token: None,
            timeout: None,
        },
        HubOptions {
            cache_dir: Some(cache.path().into()),
            offline: false,
            endpoint: Some("http://127.0.0.1:9".into()),
            token: None,
            timeout: None,
        },
    ] {
        let path = opts.resolve(&WeightsSource::default()).unwrap();
        assert!(path.starts_with(
            cache
                .path()
                .join("models--timm--resnet18.tv_in1k/snapshots")
        ));
        let (vm, model) = pretrained::pretrained(Arch::ResNet18, 196, &path, &Device::Cpu).unwrap();
        assert_eq!(model.num_classes(), 196);
        for name in [
            "conv1.weight",
            "layer3.1.bn2.running_var",
            "layer4.0.downsample.0.weight",
        ] {
            assert_eq!(values(&vm, name), values(&reference, name), "{name}");
        }
        // The fresh head: PyTorch's Linear init, U(-1/sqrt(512), 1/sqrt(512)).
        let w = values(&vm, "fc.weight");
        assert_eq!(w.len(), 196 * 512);
        let bound = 1.0 / 512f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let want = bound * bound / 3.0;
        assert!((var - want).abs() < 0.05 * want, "variance {var} vs {want}");
    }
}

#[test]
fn branch_revisions_resolve_through_refs_offline_and_misses_are_clear() {
    let cache = tempfile::tempdir().unwrap();
    let src = cache.path().join("src.safetensors");
    imagenet_like(&src);
    let rev = "1111111111111111111111111111111111111111";
    seed_cache(
        cache.path(),
        RepoKind::Model,
        "someone/resnet",
        rev,
        "weights/model.safetensors",
        &src,
    )
    .unwrap();
    let opts = HubOptions {
        cache_dir: Some(cache.path().into()),
        offline: true,
        endpoint: None,
        token: None,
        timeout: None,
    };
    let p = opts
        .resolve(&WeightsSource::Hub {
            repo: "someone/resnet".into(),
            revision: "main".into(),
            file: "weights/model.safetensors".into(),
        })
        .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&src).unwrap());

    let err = opts
        .resolve(&WeightsSource::Hub {
            repo: "someone/other".into(),
            revision: "main".into(),
            file: "model.safetensors".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("someone/other") && err.contains("offline"),
        "{err}"
    );
    let err = opts
        .resolve(&WeightsSource::Hub {
            repo: "no-slash".into(),
            revision: "main".into(),
            file: "m".into(),
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("OWNER/NAME"), "{err}");
    // Offline cache miss: the hint says how to fill the cache or use local files.
    let err = opts
        .dataset_file("someone/data", "main", "data/train.parquet")
        .unwrap_err()
        .to_string();
    assert!(
        err.lines()
            .any(|l| l.contains("run once online") && l.contains("DataSource::Dir")),
        "{err}"
    );
}

#[test]
fn an_unreachable_hub_says_how_to_run_offline_in_one_line() {
    // A port nothing listens on: the connection is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        cache_dir: Some(cache.path().into()),
        offline: false,
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        token: None,
        timeout: None,
    };
    let err = opts
        .model_file("timm/resnet18.tv_in1k", "main", "model.safetensors")
        .unwrap_err()
        .to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines[0].contains("model.safetensors") && lines[0].contains("timm/resnet18.tv_in1k"),
        "{err}"
    );
    // The hint is the second line, whole, before the cause.
    assert!(
        lines[1].contains("HF_HUB_OFFLINE=1")
            && lines[1].contains("DataSource::Dir")
            && lines[1].contains("weights file"),
        "{err}"
    );
    assert!(lines[2].trim_start().starts_with("cause:"), "{err}");
}

#[test]
fn wrong_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r18.safetensors");
    imagenet_like(&path);
    // ResNet-18 weights into a ResNet-34: missing tensors.
    let vm = VarMap::new();
    Arch::ResNet34
        .build(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap();
    let e = pretrained::load_weights(&vm, &path, Head::Fresh)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing from the file"), "{e}");
    // A 1000-class fc into a 10-class model, keeping the file's head: shape error.
    let vm = VarMap::new();
    resnet18(10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let e = pretrained::load_weights(&vm, &path, Head::FromFile)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.") && e.contains("shape"), "{e}");
    // A truncated file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = pretrained::load_weights(&vm, &cut, Head::Fresh)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot read weights"), "{e}");
}

#[test]
fn export_round_trips_through_load_weights() {
    // The key names and shapes themselves: candle-resnet's tests/export.rs.
    // Train one step (BN statistics move), export, reload into a fresh model: same logits.
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = resnet18(5, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &dev).unwrap();
    m.forward_t(&x, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out/model.safetensors");
    export_safetensors(&vm, 1, &path).unwrap();
    let vm2 = VarMap::new();
    let m2 = resnet18(5, VarBuilder::from_varmap(&vm2, DType::F32, &dev)).unwrap();
    assert_eq!(
        pretrained::load_weights(&vm2, &path, Head::FromFile).unwrap(),
        102
    );
    let a = m
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = m2
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
    // No temporary file is left next to the export.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("model.safetensors")]);
}

#[test]
fn parameter_groups_and_frozen_backbone() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = resnet18(4, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let g = ParamGroups::from_varmap(&vm);
    let names = |grp: &candle_resnet::params::Group| {
        grp.vars.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&g.head_decay), ["fc.weight"]);
    assert_eq!(names(&g.head_no_decay), ["fc.bias"]);
    assert!(names(&g.backbone_decay)
        .iter()
        .all(|n| n.ends_with(".weight")
            && !n.contains("bn")
            && !n.ends_with("downsample.1.weight")));
    assert!(names(&g.backbone_no_decay)
        .iter()
        .all(|n| n.contains("bn") || n.contains("downsample.1.")));
    assert!(names(&g.backbone_no_decay)
        .iter()
        .all(|n| !n.contains("running")));
    assert_eq!(
        g.backbone_decay.numel() + g.backbone_no_decay.numel(),
        11_176_512
    );
    assert_eq!(g.trainable(false).len(), 62);

    // One SGD step on the head alone leaves the backbone untouched.
    let before = values(&vm, "layer2.1.conv2.weight");
    let head_before = values(&vm, "fc.weight");
    let mut opt = SGD::new(g.trainable(true), 0.1).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &dev).unwrap();
    let y = Tensor::new(&[0u32, 3], &dev).unwrap();
    let loss = candle_xent::cross_entropy(&m.forward_t(&x, true).unwrap(), &y, 0.1).unwrap();
    opt.backward_step(&loss).unwrap();
    assert_eq!(values(&vm, "layer2.1.conv2.weight"), before);
    assert_ne!(values(&vm, "fc.weight"), head_before);
}
