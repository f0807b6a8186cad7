//! The export has exactly torchvision's state-dict keys and shapes (from PyTorch, in
//! tests/fixtures/torchvision_keys.json) for ResNet-18, -34 and -50.

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_resnet::export::state_dict;
use candle_resnet::resnet::Arch;
use std::collections::BTreeMap;

#[test]
fn export_has_torchvision_keys_and_shapes() {
    let keys: BTreeMap<String, BTreeMap<String, Vec<usize>>> = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torchvision_keys.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for arch in [Arch::ResNet18, Arch::ResNet34, Arch::ResNet50] {
        let vm = VarMap::new();
        arch.build(196, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
            .unwrap();
        let sd = state_dict(&vm, 0).unwrap();
        let ours: BTreeMap<String, Vec<usize>> = sd
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        assert_eq!(ours, keys[arch.name()], "{arch}");
    }
}
