//! The Hub-ready model folder: `config.json`, `README.md` (model card with YAML front matter and
//! `model-index`), `training_args.json`, plots, next to `model.safetensors` and `eval.json`.

use crate::config::ModelConfig;
use crate::data::DatasetInfo;
use crate::eval::EvalResult;
use crate::files::atomic_write_bytes;
use crate::train::{FitSummary, Selection};
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

/// What a run reports: the chosen epoch, what chose it, and its evaluations.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The chosen model on the test split, evaluated once (`None`: no test split).
    pub test: Option<EvalResult>,
    /// Its validation evaluation (`None`: no validation split).
    pub validation: Option<EvalResult>,
    /// The chosen epoch (1-based).
    pub epoch: usize,
    /// What chose it.
    pub selected_on: Selection,
    /// Where the validation images came from, in words.
    pub validation_source: String,
}

impl Outcome {
    /// The evaluation reported as the result: test, else validation.
    pub fn reported(&self) -> Option<(&EvalResult, &'static str)> {
        match (&self.test, &self.validation) {
            (Some(t), _) => Some((t, "test")),
            (None, Some(v)) => Some((v, "validation")),
            (None, None) => None,
        }
    }

    /// Writes `eval.json`: the reported evaluation's figures with `split` (`test`, or
    /// `validation` when the data has no test split), `selected_on` (`validation` or
    /// `last-epoch`), `images`, `epoch` and `validation` (where its images came from). Nothing
    /// is written when nothing was evaluated.
    pub fn write_eval_json(&self, path: &Path) -> Result<()> {
        let Some((r, split)) = self.reported() else {
            return Ok(());
        };
        let mut v = serde_json::to_value(r).map_err(candle_core::Error::wrap)?;
        v["split"] = serde_json::json!(split);
        v["selected_on"] = serde_json::json!(self.selected_on.name());
        v["images"] = serde_json::json!(r.n);
        v["epoch"] = serde_json::json!(self.epoch);
        v["validation"] = serde_json::json!(self.validation_source);
        if let (Some(val), "test") = (&self.validation, split) {
            v["validation_top1"] = serde_json::json!(val.top1);
        }
        atomic_write_bytes(
            path,
            serde_json::to_string_pretty(&v)
                .map_err(candle_core::Error::wrap)?
                .as_bytes(),
        )
    }
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
/// `model-index` with the test top-1/top-5) and [`CARD_TEMPLATE`] filled from the config,
/// provenance, training arguments and the outcome (test once, for the epoch chosen on
/// validation).
pub fn model_card(
    cfg: &ModelConfig,
    prov: &Provenance,
    args: &serde_json::Value,
    outcome: &Outcome,
) -> Result<String> {
    let smoke = args.get("smoke").and_then(|v| v.as_bool()) == Some(true);
    let mut v: BTreeMap<&str, String> = BTreeMap::new();
    v.insert("front_matter", front_matter(cfg, prov, outcome));
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
    dataset_values(&mut v, cfg, prov);
    v.insert("results", results_section(outcome));
    training_values(&mut v, cfg, args);
    v.insert(
        "args",
        serde_json::to_string_pretty(args).map_err(candle_core::Error::wrap)?,
    );
    render(CARD_TEMPLATE, &v)
}

/// The card's YAML front matter: library, licence, tags, dataset, base model and the
/// `model-index` entry with the reported split's top-1 and top-5.
fn front_matter(cfg: &ModelConfig, prov: &Provenance, outcome: &Outcome) -> String {
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
        "model-index:\n- name: {arch}-{slug}\n  results:\n",
        arch = cfg.architecture,
        slug = slug(&d.name),
    );
    if let Some((r, split)) = outcome.reported() {
        y += &format!(
            "  - task:\n      type: image-classification\n      name: Image Classification\n    dataset:\n      name: {name}\n      type: {dataset_type}\n      split: {split}\n    metrics:\n    - type: accuracy\n      name: top-1 accuracy\n      value: {t1}\n    - type: top_5_accuracy\n      name: top-5 accuracy\n      value: {t5}\n",
            name = yaml_str(&d.name),
            dataset_type = yaml_str(&dataset_type),
            t1 = pct(r.top1),
            t5 = pct(r.top5),
        );
    } else {
        y += "  []\n";
    }
    y += "---";
    y
}

/// The card's values that describe the data: name, source, classes, limitations, licence.
fn dataset_values(v: &mut BTreeMap<&str, String>, cfg: &ModelConfig, prov: &Provenance) {
    let d = &prov.dataset;
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
}

/// A training argument as the card shows it (`-` when absent or null).
fn arg(args: &serde_json::Value, k: &str) -> String {
    match args.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_string(),
        Some(v) => v.to_string(),
    }
}

/// The card's values that describe the training: schedule, regularisation, transforms,
/// precision, the command, the hyper-parameters and the preprocessing.
fn training_values(v: &mut BTreeMap<&str, String>, cfg: &ModelConfig, args: &serde_json::Value) {
    let arg = |k: &str| arg(args, k);
    let decay = match args.get("schedule").and_then(|s| s.as_str()) {
        Some("cosine") => format!("cosine decay to {}", arg("min_lr")),
        Some("step") => format!("x {} every {} epochs", arg("gamma"), arg("step_epochs")),
        _ => arg("schedule"),
    };
    v.insert("decay", decay);
    v.insert("regularisation", regularisation(args));
    v.insert("train_transform", train_transform(args));
    v.insert(
        "precision",
        match args.get("amp").and_then(|v| v.as_str()) {
            Some("bf16") => "bf16 mixed precision (f32 master weights, loss and optimizer)".into(),
            _ => "f32".to_string(),
        },
    );
    v.insert(
        "command",
        match args.get("command").and_then(|c| c.as_str()) {
            Some(c) if !c.is_empty() => c.to_string(),
            _ => "cargo xtask train".to_string(),
        },
    );
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
}

/// The recipe's mixing, weight EMA, random erasing and gradient clipping in words ("none" when
/// none is on), from the training arguments.
fn regularisation(args: &serde_json::Value) -> String {
    let num = |k: &str| args.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let text = |k: &str| {
        args.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_string()
    };
    let mut parts = Vec::new();
    let (mixup, cutmix) = (num("mixup_alpha"), num("cutmix_alpha"));
    let minmax = args.get("cutmix_minmax").filter(|v| !v.is_null());
    if mixup > 0.0 || cutmix > 0.0 || minmax.is_some() {
        let mut m = Vec::new();
        if mixup > 0.0 {
            m.push(format!("mixup alpha {mixup}"));
        }
        if cutmix > 0.0 || minmax.is_some() {
            m.push(match minmax {
                Some(r) => format!("CutMix box {r}"),
                None => format!("CutMix alpha {cutmix}"),
            });
        }
        parts.push(format!(
            "{} (probability {}, switch {}, per {})",
            m.join(" + "),
            num("mixup_prob"),
            num("mixup_switch_prob"),
            text("mixup_mode")
        ));
    }
    if args.get("model_ema").and_then(|v| v.as_bool()) == Some(true) {
        parts.push(format!("weight EMA decay {}", num("model_ema_decay")));
    }
    if num("reprob") > 0.0 {
        parts.push(format!(
            "random erasing {} ({}, {} box)",
            num("reprob"),
            text("remode"),
            num("recount")
        ));
    }
    if let Some(c) = args.get("clip_grad").and_then(|v| v.as_f64()) {
        parts.push(format!("gradient norm clipped to {c}"));
    }
    if num("drop_path") > 0.0 {
        parts.push(format!("drop path {}", num("drop_path")));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("; ")
    }
}

/// The training transform of the run's arguments: crop range, flip, auto-augment, jitter
/// (arguments written before these settings existed read as the defaults).
fn train_transform(args: &serde_json::Value) -> String {
    let list = |k: &str| -> Option<Vec<f64>> {
        args.get(k)?
            .as_array()?
            .iter()
            .map(|v| v.as_f64())
            .collect()
    };
    let range = |v: Option<Vec<f64>>, default: &str| match v.as_deref() {
        Some([a, b]) => format!("{}-{}", trim(*a), trim(*b)),
        _ => default.to_string(),
    };
    let mut t = format!(
        "RandomResizedCrop (scale {}, ratio {}) + horizontal flip {}",
        range(list("scale"), "0.08-1"),
        range(list("ratio"), "0.75-1.333"),
        args.get("hflip").and_then(|v| v.as_f64()).unwrap_or(0.5)
    );
    if let Some(a) = args.get("auto_augment").and_then(|v| v.as_str()) {
        if !a.is_empty() && a != "none" {
            let name = match a.parse::<crate::data::augment::AutoAugment>() {
                Ok(crate::data::augment::AutoAugment::TrivialAugmentWide { .. }) => {
                    "TrivialAugmentWide".to_string()
                }
                Ok(crate::data::augment::AutoAugment::RandAugment {
                    num_ops, magnitude, ..
                }) => format!("RandAugment ({num_ops} ops, magnitude {magnitude})"),
                Err(_) => a.to_string(),
            };
            t.push_str(&format!(" + {name}"));
        }
    }
    if let Some(j) = list("color_jitter") {
        let j: Vec<String> = j.iter().map(|v| trim(*v)).collect();
        t.push_str(&format!(" + ColorJitter {}", j.join(", ")));
    }
    t
}

/// A number with at most 3 decimals, trailing zeros dropped.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The card's results section: which split chose the epoch, and the test figures of that model
/// (reported once), else what there is.
fn results_section(o: &Outcome) -> String {
    let chosen = match o.selected_on {
        Selection::Validation => format!(
            "Epoch {} was chosen by its validation top-1; the validation images are {}.",
            o.epoch, o.validation_source
        ),
        Selection::LastEpoch => format!(
            "Epoch {} is the last one, kept as is: no validation split chose it.",
            o.epoch
        ),
    };
    let table = |r: &EvalResult, split: &str| {
        format!(
            "| metric | value |\n|---|---|\n| top-1 accuracy | {} % |\n| top-5 accuracy | {} % |\n| negative log-likelihood | {:.4} |\n| expected calibration error (15 bins) | {} % |\n| {split} images | {} |\n",
            pct(r.top1),
            pct(r.top5),
            r.nll,
            pct(r.ece),
            r.n
        )
    };
    match (&o.test, &o.validation) {
        (Some(t), v) => {
            let val = match v {
                Some(v) => format!(" (its validation top-1: {} %)", pct(v.top1)),
                None => String::new(),
            };
            format!(
                "## Results (test split)\n\n{chosen} The test split played no part in training or \
                 in that choice: it was evaluated once, on the chosen model{val}.\n\n{}",
                table(t, "test")
            )
        }
        (None, Some(v)) => format!(
            "## Results (validation split)\n\n{chosen} The data has no test split, so these are \
             the validation figures of the chosen epoch, which are optimistic: the same images \
             chose it.\n\n{}",
            table(v, "validation")
        ),
        (None, None) => format!(
            "## Results\n\n{chosen} The data has neither a validation nor a test split: nothing \
             was evaluated.\n"
        ),
    }
}

/// Writes `config.json`, `README.md`, `training_args.json`, `curves.png` and
/// `reliability.png` into `out` (the run folder that already holds `model.safetensors`).
pub fn write_model_folder(
    out: &Path,
    cfg: &ModelConfig,
    prov: &Provenance,
    args: &serde_json::Value,
    fit: &FitSummary,
    outcome: &Outcome,
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
        model_card(cfg, prov, args, outcome)?.as_bytes(),
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
        &col(|m| m.val_nll),
        &col(|m| m.val_top1.map(|v| 100.0 * v)),
        &col(|m| m.val_top5.map(|v| 100.0 * v)),
    )?;
    match outcome.reported() {
        Some((r, _)) => {
            crate::plot::reliability(&out.join("reliability.png"), &r.reliability, r.ece)
        }
        None => Ok(()),
    }
}
