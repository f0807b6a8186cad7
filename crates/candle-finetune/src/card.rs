//! The Hub-ready model folder: `config.json`, `README.md` (model card with YAML front matter and
//! `model-index`), `training_args.json`, plots, next to `model.safetensors` and `eval.json`.

use crate::data::{Interpolation, Preprocess};
use crate::eval::EvalResult;
use crate::export::atomic_write_bytes;
use crate::resnet::Arch;
use crate::train::FitSummary;
use candle_core::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `config.json` of an exported classifier (also what [`crate::hub::load_model_folder`] reads).
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
    /// use candle_finetune::{card::ModelConfig, resnet::Arch};
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

/// Provenance shown in the model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Base weights (`owner/name@revision` or a file).
    pub base_model: String,
    /// Dataset (`owner/name@revision` or a path).
    pub dataset: String,
    /// Hub id of the dataset for the YAML `datasets:` field, if it is on the Hub.
    pub dataset_hub_id: Option<String>,
    /// Hub id of the base model for `base_model:`, if on the Hub.
    pub base_model_hub_id: Option<String>,
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

/// The model card (README.md) text.
pub fn model_card(
    cfg: &ModelConfig,
    prov: &Provenance,
    args: &serde_json::Value,
    best: &EvalResult,
    best_epoch: usize,
) -> String {
    let mut y = String::from(
        "---\nlibrary_name: candle\nlicense: other\nlicense_name: stanford-cars-non-commercial\n",
    );
    y += "pipeline_tag: image-classification\ntags:\n- image-classification\n- candle\n- resnet\n- label-smoothing\n";
    if let Some(d) = &prov.dataset_hub_id {
        y += &format!("datasets:\n- {d}\n");
    }
    if let Some(b) = &prov.base_model_hub_id {
        y += &format!("base_model: {b}\n");
    }
    let dataset_name = prov
        .dataset_hub_id
        .clone()
        .unwrap_or_else(|| prov.dataset.clone());
    y += &format!(
        "model-index:\n- name: {arch}-finetuned\n  results:\n  - task:\n      type: image-classification\n      name: Image Classification\n    dataset:\n      name: {dataset_name}\n      type: {dataset_name}\n      split: test\n    metrics:\n    - type: accuracy\n      name: top-1 accuracy\n      value: {t1}\n    - type: top_5_accuracy\n      name: top-5 accuracy\n      value: {t5}\n---\n",
        arch = cfg.architecture,
        t1 = pct(best.top1),
        t5 = pct(best.top5),
    );
    let ls = args
        .get("label_smoothing")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    if args.get("smoke").and_then(|v| v.as_bool()) == Some(true) {
        y += "\n> **Smoke run**: generated images and random weights placed in a temporary Hub cache under the names below. Not a real model.\n";
    }
    y += &format!(
        "\n# {arch} fine-tuned with label smoothing {ls}\n\n\
         A {arch} ({n} classes) fine-tuned with [candle-finetune](https://github.com/candle-xent/candle-xent) from `{base}` on `{data}`, with the loss of candle-xent (cross-entropy, label smoothing {ls}).\n\n\
         ## Results (test split, best epoch {best_epoch})\n\n| metric | value |\n|---|---|\n| top-1 | {t1} % |\n| top-5 | {t5} % |\n| NLL | {nll:.4} |\n| ECE (15 bins) | {ece} % |\n| images | {count} |\n\n\
         ![curves](curves.png) ![reliability](reliability.png)\n\n\
         ## Intended use and licence\n\nResearch and education on fine-grained image classification. The training data (Stanford Cars) is for non-commercial research use only; so are these weights. The base weights are BSD-3-Clause (torchvision).\n\n\
         ## Use\n\nCandle (Rust):\n\n```rust\nlet (model, config, varmap) = candle_finetune::hub::load_model_folder(\"path/to/this/folder\".as_ref(), &candle_core::Device::Cpu)?;\n```\n\ntimm / PyTorch:\n\n```python\nimport timm\nfrom safetensors.torch import load_file\nm = timm.create_model(\"{arch}\", num_classes={n})\nm.load_state_dict(load_file(\"model.safetensors\"))\n```\n\nPreprocessing: resize the shorter side to {resize} px ({interp:?}), center-crop {size} px, normalise with mean {mean:?} and std {std:?}.\n\n\
         ## Training arguments\n\n```json\n{args}\n```\n",
        arch = cfg.architecture,
        n = cfg.num_classes,
        base = prov.base_model,
        data = prov.dataset,
        t1 = pct(best.top1),
        t5 = pct(best.top5),
        nll = best.nll,
        ece = pct(best.ece),
        count = best.n,
        resize = cfg.preprocess().eval_resize(),
        interp = cfg.interpolation,
        size = cfg.image_size,
        mean = cfg.mean,
        std = cfg.std,
        args = serde_json::to_string_pretty(args).unwrap_or_default(),
    );
    y
}

/// Writes `config.json`, `README.md`, `training_args.json`, `curves.png` and
/// `reliability.png` into `out` (the run folder that already holds `model.safetensors`).
pub fn write_model_folder(
    out: &Path,
    cfg: &ModelConfig,
    prov: &Provenance,
    args: &serde_json::Value,
    fit: &FitSummary,
) -> Result<()> {
    let config = serde_json::to_string_pretty(cfg).map_err(candle_core::Error::wrap)?;
    atomic_write_bytes(&out.join("config.json"), config.as_bytes())?;
    atomic_write_bytes(
        &out.join("training_args.json"),
        serde_json::to_string_pretty(args)
            .map_err(candle_core::Error::wrap)?
            .as_bytes(),
    )?;
    atomic_write_bytes(
        &out.join("README.md"),
        model_card(cfg, prov, args, &fit.best, fit.best_epoch).as_bytes(),
    )?;
    let h = &fit.history;
    let col = |f: fn(&crate::train::EpochMetrics) -> f64| h.iter().map(f).collect::<Vec<_>>();
    crate::plot::curves(
        &out.join("curves.png"),
        &col(|m| m.train_loss),
        &col(|m| m.nll),
        &col(|m| 100.0 * m.top1),
        &col(|m| 100.0 * m.top5),
    )?;
    crate::plot::reliability(
        &out.join("reliability.png"),
        &fit.best.reliability,
        fit.best.ece,
    )
}
