//! The Hub-ready model folder: `config.json`, `README.md` (model card with YAML front matter and
//! `model-index`), `training_args.json`, plots, next to `model.safetensors` and `eval.json`.

use crate::config::ModelConfig;
use crate::data::DatasetInfo;
use crate::eval::EvalResult;
use crate::files::atomic_write_bytes;
use crate::train::FitSummary;
use candle_core::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Provenance shown in the model card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Base weights: `owner/name@revision`, or the file name of local weights (never a path).
    pub base_model: String,
    /// Hub id of the base model for `base_model:`, if on the Hub.
    pub base_model_hub_id: Option<String>,
    /// The training data.
    pub dataset: DatasetInfo,
}

/// `Stanford Cars` -> `stanford-cars`: the model-index name.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "finetuned".into()
    } else {
        out
    }
}

/// A YAML scalar: plain when safe, else double-quoted with escapes.
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || " ._/-()".contains(c))
        && !s.starts_with([' ', '-'])
        && !s.ends_with(' ');
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("a string serialises")
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

/// The model card template (`assets/card.md`, also kept as the published model's
/// `models/resnet18-stanford-cars/card.md`): `{{name}}` placeholders filled by [`model_card`].
pub const CARD_TEMPLATE: &str = include_str!("../assets/card.md");

/// Fills `{{key}}` placeholders of `template`; fails on a placeholder without a value, so a
/// card never ships with a hole.
pub fn render(template: &str, values: &BTreeMap<&str, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(j) = after.find("}}") else {
            candle_core::bail!(
                "card template: unclosed {{{{ near {:?}",
                &rest[i..rest.len().min(i + 30)]
            );
        };
        let key = after[..j].trim();
        match values.get(key) {
            Some(v) => out.push_str(v),
            None => candle_core::bail!("card template: no value for {{{{{key}}}}}"),
        }
        rest = &after[j + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The model card (README.md) text: YAML front matter (library, licence, datasets, base model,
/// `model-index` with top-1/top-5) and [`CARD_TEMPLATE`] filled from the config, provenance,
/// training arguments and best evaluation.
pub fn model_card(
    cfg: &ModelConfig,
    prov: &Provenance,
    args: &serde_json::Value,
    best: &EvalResult,
    best_epoch: usize,
) -> Result<String> {
    let d = &prov.dataset;
    // timm is a library the Hub knows: the model page shows its "use this model" snippet.
    let mut y = String::from("---\nlibrary_name: timm\n");
    // The weights inherit the data's terms: its licence, or `unknown` when none was given.
    match (d.license.as_deref(), d.license_name.as_deref()) {
        (Some(l), Some(name)) => {
            y += &format!(
                "license: {}\nlicense_name: {}\n",
                yaml_str(l),
                yaml_str(name)
            )
        }
        (Some(l), None) => y += &format!("license: {}\n", yaml_str(l)),
        (None, _) => y += "license: unknown\n",
    }
    y += "pipeline_tag: image-classification\ntags:\n- image-classification\n- timm\n- candle\n- resnet\n- label-smoothing\n";
    if let Some(h) = &d.hub_id {
        y += &format!("datasets:\n- {}\n", yaml_str(h));
    }
    if let Some(b) = &prov.base_model_hub_id {
        y += &format!("base_model: {}\n", yaml_str(b));
    }
    let dataset_type = d.hub_id.clone().unwrap_or_else(|| d.name.clone());
    y += &format!(
        "model-index:\n- name: {arch}-{slug}\n  results:\n  - task:\n      type: image-classification\n      name: Image Classification\n    dataset:\n      name: {name}\n      type: {dataset_type}\n      split: test\n    metrics:\n    - type: accuracy\n      name: top-1 accuracy\n      value: {t1}\n    - type: top_5_accuracy\n      name: top-5 accuracy\n      value: {t5}\n---",
        arch = cfg.architecture,
        slug = slug(&d.name),
        name = yaml_str(&d.name),
        dataset_type = yaml_str(&dataset_type),
        t1 = pct(best.top1),
        t5 = pct(best.top5),
    );
    let arg = |k: &str| match args.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(v) => v.to_string(),
    };
    let smoke = args.get("smoke").and_then(|v| v.as_bool()) == Some(true);
    let mut v: BTreeMap<&str, String> = BTreeMap::new();
    v.insert("front_matter", y);
    v.insert(
        "smoke_note",
        if smoke {
            "\n> **Smoke run**: generated images and random weights placed in a temporary Hub \
             cache under the names below. Not a real model.\n"
                .to_string()
        } else {
            String::new()
        },
    );
    v.insert("arch", cfg.architecture.to_string());
    v.insert("num_classes", cfg.num_classes.to_string());
    v.insert("base_model", prov.base_model.clone());
    v.insert("dataset_name", d.name.clone());
    v.insert(
        "dataset_source",
        match (&d.hub_id, &d.revision) {
            (Some(h), Some(r)) => format!("`{h}` (revision `{r}`)"),
            (Some(h), None) => format!("`{h}`"),
            _ => "local data".to_string(),
        },
    );
    v.insert(
        "classes",
        d.classes.clone().unwrap_or_else(|| "classes".to_string()),
    );
    v.insert(
        "limitations",
        match &d.limitations {
            Some(l) => format!("{l} "),
            None => format!(
                "The model knows only the {} classes of {}. ",
                cfg.num_classes, d.name
            ),
        },
    );
    let base_terms = "The ImageNet base weights (torchvision) are BSD-3-Clause.";
    v.insert(
        "licence",
        match (&d.license_terms, &d.license) {
            (Some(t), _) => format!("{t} {base_terms}"),
            (None, Some(l)) => format!(
                "The training data, {}, is licensed `{l}`; use of these weights must respect its \
                 terms. {base_terms}",
                d.name
            ),
            (None, None) => format!(
                "The licence of the training data, {}, was not given (`license: unknown`): check \
                 it before using or sharing these weights. {base_terms}",
                d.name
            ),
        },
    );
    v.insert("best_epoch", best_epoch.to_string());
    v.insert("top1", pct(best.top1));
    v.insert("top5", pct(best.top5));
    v.insert("nll", format!("{:.4}", best.nll));
    v.insert("ece", pct(best.ece));
    v.insert("count", best.n.to_string());
    // Schedules serialise as {"kind": "cosine", "min_lr": 0.0}: "cosine decay (min_lr 0)".
    let decay = match args.get("decay") {
        Some(serde_json::Value::Object(m)) => {
            let rest: Vec<String> = m
                .iter()
                .filter(|(k, _)| k.as_str() != "kind")
                .map(|(k, x)| format!("{k} {x}"))
                .collect();
            let kind = m.get("kind").and_then(|k| k.as_str()).unwrap_or("-");
            if rest.is_empty() {
                format!("{kind} decay")
            } else {
                format!("{kind} decay ({})", rest.join(", "))
            }
        }
        _ => arg("decay"),
    };
    v.insert("decay", decay);
    for k in [
        "label_smoothing",
        "optimizer",
        "momentum",
        "nesterov",
        "lr",
        "warmup_epochs",
        "backbone_lr_mult",
        "weight_decay",
        "epochs",
        "batch_size",
        "accum_steps",
        "seed",
    ] {
        v.insert(k, arg(k));
    }
    v.insert("size", cfg.image_size.to_string());
    v.insert("resize", cfg.preprocess().eval_resize().to_string());
    v.insert(
        "interpolation",
        format!("{:?}", cfg.interpolation).to_lowercase(),
    );
    v.insert("mean", format!("{:?}", cfg.mean));
    v.insert("std", format!("{:?}", cfg.std));
    v.insert(
        "args",
        serde_json::to_string_pretty(args).map_err(candle_core::Error::wrap)?,
    );
    render(CARD_TEMPLATE, &v)
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
        model_card(cfg, prov, args, &fit.best, fit.best_epoch)?.as_bytes(),
    )?;
    let h = &fit.history;
    let col = |f: fn(&crate::train::EpochMetrics) -> Option<f64>| {
        h.iter()
            .map(|m| f(m).unwrap_or(f64::NAN))
            .collect::<Vec<_>>()
    };
    crate::plot::curves(
        &out.join("curves.png"),
        &col(|m| Some(m.train_loss)),
        &col(|m| m.nll),
        &col(|m| m.top1.map(|v| 100.0 * v)),
        &col(|m| m.top5.map(|v| 100.0 * v)),
    )?;
    crate::plot::reliability(
        &out.join("reliability.png"),
        &fit.best.reliability,
        fit.best.ece,
    )
}
