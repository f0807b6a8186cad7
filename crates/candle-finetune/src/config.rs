//! `config.json` of an exported classifier: architecture, class names and the preprocessing to
//! use at inference (what [`crate::pretrained::load_model_folder`] reads back).

use crate::data::{Interpolation, Preprocess};
use candle_resnet::resnet::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `config.json` of an exported classifier (also what [`crate::pretrained::load_model_folder`] reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `resnet18`, `resnet34` or `resnet50`.
    pub architecture: Arch,
    /// Number of classes.
    pub num_classes: usize,
    /// Class index (as a string key) to name.
    pub id2label: BTreeMap<String, String>,
    /// Name to class index.
    pub label2id: BTreeMap<String, usize>,
    /// Input side in pixels.
    pub image_size: u32,
    /// Normalisation mean.
    pub mean: [f32; 3],
    /// Normalisation std.
    pub std: [f32; 3],
    /// Eval crop fraction.
    pub crop_pct: f64,
    /// Resize filter.
    pub interpolation: Interpolation,
}

impl ModelConfig {
    /// The config of a model trained on `class_names` with preprocessing `pre`.
    ///
    /// ```
    /// use candle_finetune::config::ModelConfig;
    /// use candle_resnet::resnet::Arch;
    /// let c = ModelConfig::new(Arch::ResNet18, &["a".into(), "b".into()], &Default::default());
    /// assert_eq!(c.label2id["b"], 1);
    /// assert_eq!(c.preprocess().size, 224);
    /// ```
    pub fn new(arch: Arch, class_names: &[String], pre: &Preprocess) -> Self {
        Self {
            architecture: arch,
            num_classes: class_names.len(),
            id2label: class_names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), n.clone()))
                .collect(),
            label2id: class_names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            image_size: pre.size,
            mean: pre.mean,
            std: pre.std,
            crop_pct: pre.crop_pct,
            interpolation: pre.interpolation,
        }
    }

    /// The preprocessing to use at inference.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            size: self.image_size,
            crop_pct: self.crop_pct,
            interpolation: self.interpolation,
            mean: self.mean,
            std: self.std,
        }
    }

    /// Class names in index order.
    pub fn class_names(&self) -> Vec<String> {
        (0..self.num_classes)
            .map(|i| {
                self.id2label
                    .get(&i.to_string())
                    .cloned()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect()
    }
}
