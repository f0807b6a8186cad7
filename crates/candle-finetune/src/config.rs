//! `config.json` of an exported classifier: architecture, class names and the preprocessing to
//! use at inference, in timm's format (what `timm.create_model("hf-hub:...")` and
//! [`crate::pretrained::load_model_folder`] read).
//!
//! Written as timm writes it: `architecture`, `num_classes`, `num_features`, `global_pool`,
//! `label_names` (class order) and a `pretrained_cfg` whose keys are all fields of timm's
//! `PretrainedCfg` dataclass (a key it does not know is a `TypeError` in timm). Read back from
//! that format, and from the flat format this crate wrote before (`id2label`, `label2id`,
//! `image_size`, `mean`, `std`, `crop_pct`, `interpolation`), so older folders keep loading.

use crate::data::{Interpolation, Preprocess};
use candle_resnet::resnet::Arch;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// `config.json` of an exported classifier (also what [`crate::pretrained::load_model_folder`]
/// reads). Serialises to timm's format; deserialises from it or from the older flat format.
///
/// ```
/// use candle_finetune::config::ModelConfig;
/// use candle_resnet::resnet::Arch;
/// let c = ModelConfig::new(Arch::ResNet18, &["cat".into(), "dog".into()], &Default::default());
/// let text = serde_json::to_string(&c).unwrap();
/// let v: serde_json::Value = serde_json::from_str(&text).unwrap();
/// assert_eq!(v["architecture"], "resnet18");
/// assert_eq!(v["label_names"][1], "dog");
/// assert_eq!(v["pretrained_cfg"]["input_size"], serde_json::json!([3, 224, 224]));
/// let back: ModelConfig = serde_json::from_str(&text).unwrap();
/// assert_eq!(back, c);
/// ```
#[derive(Debug, Clone, PartialEq)]
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
    /// Licence of the weights (`pretrained_cfg.license`), if known.
    pub license: Option<String>,
}

/// An f32 as the f64 of its shortest decimal form (0.4f32 is written 0.4, not
/// 0.4000000059604645), so the JSON holds the numbers the run was given.
fn short(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

/// The flat format written before timm's (read only).
#[derive(Deserialize)]
struct LegacyConfig {
    architecture: Arch,
    num_classes: usize,
    id2label: BTreeMap<String, String>,
    image_size: u32,
    mean: [f32; 3],
    std: [f32; 3],
    crop_pct: f64,
    interpolation: Interpolation,
}

impl Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_timm().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Self::from_value(&v).map_err(serde::de::Error::custom)
    }
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
            license: None,
        }
    }

    /// The same config with `pretrained_cfg.license` set.
    pub fn with_license(mut self, license: Option<String>) -> Self {
        self.license = license;
        self
    }

    /// timm's `config.json`: the model and `pretrained_cfg` (every key a `PretrainedCfg` field).
    pub fn to_timm(&self) -> Value {
        let s = self.image_size;
        // ResNets downsample by 32; timm records the final feature map's size.
        let pool = s.div_ceil(32);
        let mut pc = json!({
            "custom_load": false,
            "input_size": [3, s, s],
            "fixed_input_size": false,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "mean": self.mean.map(short),
            "std": self.std.map(short),
            "num_classes": self.num_classes,
            "pool_size": [pool, pool],
            "first_conv": "conv1",
            "classifier": "fc",
        });
        if let Some(l) = &self.license {
            pc["license"] = json!(l);
        }
        json!({
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "num_features": self.architecture.feature_dim(),
            "global_pool": "avg",
            "label_names": self.class_names(),
            "pretrained_cfg": pc,
        })
    }

    /// Parses a `config.json` in timm's format or the older flat one.
    pub fn from_value(v: &Value) -> Result<Self, String> {
        if v.get("pretrained_cfg").is_none() {
            let l: LegacyConfig = serde_json::from_value(v.clone())
                .map_err(|e| format!("config.json (flat format): {e}"))?;
            let names: Vec<String> = (0..l.num_classes)
                .map(|i| {
                    l.id2label
                        .get(&i.to_string())
                        .cloned()
                        .unwrap_or_else(|| i.to_string())
                })
                .collect();
            let pre = Preprocess {
                size: l.image_size,
                crop_pct: l.crop_pct,
                interpolation: l.interpolation,
                mean: l.mean,
                std: l.std,
            };
            return Ok(Self::new(l.architecture, &names, &pre));
        }
        let arch: Arch = match v.get("architecture").and_then(|a| a.as_str()) {
            // timm names a pretrained tag after a dot (`resnet18.tv_in1k`).
            Some(a) => a.split('.').next().unwrap_or(a).parse()?,
            None => return Err("config.json: no `architecture`".into()),
        };
        let pc = &v["pretrained_cfg"];
        let num_classes = v
            .get("num_classes")
            .or_else(|| pc.get("num_classes"))
            .and_then(|n| n.as_u64())
            .ok_or("config.json: no `num_classes`")? as usize;
        let names: Vec<String> = match v.get("label_names").or_else(|| pc.get("label_names")) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or("config.json: `label_names` must be strings")?,
            _ => (0..num_classes).map(|i| i.to_string()).collect(),
        };
        if names.len() != num_classes {
            return Err(format!(
                "config.json: {} label_names for num_classes {num_classes}",
                names.len()
            ));
        }
        let pre = Preprocess::from_timm_config(&v.to_string())?;
        let license = pc
            .get("license")
            .and_then(|l| l.as_str())
            .map(str::to_string);
        Ok(Self::new(arch, &names, &pre).with_license(license))
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
