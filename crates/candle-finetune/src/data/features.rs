//! Which columns of a parquet dataset hold the image and the class: from the features the
//! dataset declares (the `huggingface` schema metadata that the `datasets` library writes into
//! each parquet file, or the card's `dataset_info`), else from the arrow types, with the user's
//! `--image-column` / `--label-column` / `--class-names` on top.

use arrow_schema::{DataType, Schema};
use candle_core::{bail, Result};
use serde_json::Value;
use std::fmt;

/// What a column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feature {
    /// An encoded image: the `datasets` `Image` feature, or a struct column with a `bytes`
    /// field, or a binary column.
    Image,
    /// Class indices with names (the `datasets` `ClassLabel` feature).
    ClassLabel(Vec<String>),
    /// Plain integers.
    Integer,
    /// Anything else, by its declared or arrow type.
    Other(String),
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Feature::Image => write!(f, "Image"),
            Feature::ClassLabel(n) => write!(f, "ClassLabel with {} names", n.len()),
            Feature::Integer => write!(f, "integer"),
            Feature::Other(t) => write!(f, "{t}"),
        }
    }
}

/// A dataset's columns, in order, with what each holds.
pub type Features = Vec<(String, Feature)>;

fn list(features: &Features) -> String {
    features
        .iter()
        .map(|(n, f)| format!("{n} ({f})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The features the `datasets` library records in a parquet file's `huggingface` metadata
/// (`{"info": {"features": {column: {"_type": ...}}}}`); `None` when it declares none.
///
/// ```
/// use candle_finetune::data::features::{from_hf_metadata, Feature};
/// let f = from_hf_metadata(r#"{"info": {"features": {"img": {"_type": "Image"},
///     "fine_label": {"_type": "ClassLabel", "names": ["a", "b"]},
///     "id": {"_type": "Value", "dtype": "int64"}}}}"#).unwrap().unwrap();
/// // Sorted by column name.
/// assert_eq!(f[0], ("fine_label".to_string(), Feature::ClassLabel(vec!["a".into(), "b".into()])));
/// assert_eq!((f[1].1.clone(), f[2].1.clone()), (Feature::Integer, Feature::Image));
/// ```
pub fn from_hf_metadata(json: &str) -> Result<Option<Features>> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| candle_core::Error::Msg(format!("huggingface metadata: {e}")))?;
    let Some(features) = v
        .pointer("/info/features")
        .or_else(|| v.get("features"))
        .and_then(|f| f.as_object())
    else {
        return Ok(None);
    };
    // serde_json keeps the file's key order only with `preserve_order`; the order matters
    // only for messages, so sort by name for stable ones.
    let mut out: Features = features
        .iter()
        .map(|(name, f)| (name.clone(), hf_feature(f)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(out))
}

fn is_int_dtype(d: &str) -> bool {
    matches!(
        d,
        "int8" | "int16" | "int32" | "int64" | "uint8" | "uint16" | "uint32" | "uint64"
    )
}

fn hf_feature(f: &Value) -> Feature {
    match f.get("_type").and_then(|t| t.as_str()) {
        Some("Image") => Feature::Image,
        Some("ClassLabel") => Feature::ClassLabel(
            f.get("names")
                .and_then(|n| n.as_array())
                .map(|a| {
                    a.iter()
                        .map(|s| s.as_str().map_or_else(|| s.to_string(), String::from))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Some("Value") => match f.get("dtype").and_then(|d| d.as_str()) {
            Some(d) if is_int_dtype(d) => Feature::Integer,
            Some(d) => Feature::Other(d.to_string()),
            None => Feature::Other("Value".into()),
        },
        Some(t) => Feature::Other(t.to_string()),
        None => Feature::Other("unknown".into()),
    }
}

/// The features a dataset card declares in its YAML `dataset_info` (one mapping, or a list
/// with one entry per `config_name`), for `config` (`None`: the only one, or `default`).
///
/// ```
/// use candle_finetune::data::features::{from_card, Feature};
/// let card = serde_json::json!({"dataset_info": {"features": [
///     {"name": "image", "dtype": "image"},
///     {"name": "label", "dtype": {"class_label": {"names": {"0": "cat", "1": "dog"}}}}]}});
/// let f = from_card(&card, None).unwrap();
/// assert_eq!(f[1].1, Feature::ClassLabel(vec!["cat".into(), "dog".into()]));
/// ```
pub fn from_card(card: &Value, config: Option<&str>) -> Option<Features> {
    let info = card.get("dataset_info")?;
    let entry = match info {
        Value::Array(a) => {
            let named = |n: &str| {
                a.iter()
                    .find(|e| e.get("config_name").and_then(|c| c.as_str()) == Some(n))
            };
            match config {
                Some(c) => named(c)?,
                None if a.len() == 1 => &a[0],
                None => named("default")?,
            }
        }
        other => other,
    };
    let features = entry.get("features")?.as_array()?;
    Some(
        features
            .iter()
            .filter_map(|f| {
                let name = f.get("name")?.as_str()?.to_string();
                Some((name, card_feature(f.get("dtype")?)))
            })
            .collect(),
    )
}

fn card_feature(dtype: &Value) -> Feature {
    match dtype {
        Value::String(s) if s == "image" => Feature::Image,
        Value::String(s) if is_int_dtype(s) => Feature::Integer,
        Value::String(s) => Feature::Other(s.clone()),
        Value::Object(m) => match m.get("class_label").and_then(|c| c.get("names")) {
            Some(Value::Object(names)) => {
                let mut v: Vec<(u64, String)> = names
                    .iter()
                    .map(|(k, n)| {
                        (
                            k.parse().unwrap_or(u64::MAX),
                            n.as_str().map_or_else(|| n.to_string(), String::from),
                        )
                    })
                    .collect();
                v.sort();
                Feature::ClassLabel(v.into_iter().map(|(_, n)| n).collect())
            }
            Some(Value::Array(names)) => Feature::ClassLabel(
                names
                    .iter()
                    .map(|n| n.as_str().map_or_else(|| n.to_string(), String::from))
                    .collect(),
            ),
            _ => Feature::Other(dtype.to_string()),
        },
        other => Feature::Other(other.to_string()),
    }
}

/// The features an arrow schema shows by its types alone: image-like columns (a struct with a
/// `bytes` field, or binary) and integers.
///
/// ```
/// use arrow_schema::{DataType, Field, Schema};
/// use candle_finetune::data::features::{from_schema, Feature};
/// let s = Schema::new(vec![Field::new("pic", DataType::Binary, true), Field::new("y", DataType::UInt8, true)]);
/// assert_eq!(from_schema(&s), [("pic".to_string(), Feature::Image), ("y".to_string(), Feature::Integer)]);
/// ```
pub fn from_schema(schema: &Schema) -> Features {
    schema
        .fields()
        .iter()
        .map(|f| {
            let feature = match f.data_type() {
                DataType::Struct(fields) if fields.iter().any(|c| c.name() == "bytes") => {
                    Feature::Image
                }
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Feature::Image,
                t if t.is_integer() => Feature::Integer,
                t => Feature::Other(t.to_string()),
            };
            (f.name().clone(), feature)
        })
        .collect()
}

/// The user's choices, each overriding what the data declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnChoice {
    /// The image column (`--image-column`).
    pub image: Option<String>,
    /// The class column (`--label-column`).
    pub label: Option<String>,
    /// Class names in label order (`--class-names FILE`).
    pub class_names: Option<Vec<String>>,
}

/// The columns a run reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// Column of the encoded images.
    pub image: String,
    /// Column of the class indices.
    pub label: String,
    /// Class names in label order, when known (ClassLabel or `--class-names`); `None`: classes
    /// are named "0".."C-1" once every split's labels are seen.
    pub class_names: Option<Vec<String>>,
}

/// Chooses the image and class columns. `stored` are the columns the file has (from
/// [`from_schema`]); `declared` what the dataset says they hold (metadata or card), if anything.
/// Declared features win over types: the one `Image` feature and the one `ClassLabel`; without
/// declarations, the one image-like column and the integer column named `label`/`labels`, else
/// the only integer column. Ambiguity or absence is an error listing every column and its type.
///
/// ```
/// use candle_finetune::data::features::{resolve, ColumnChoice, Feature};
/// let stored = vec![("img".to_string(), Feature::Image), ("fine".to_string(), Feature::Integer),
///                   ("coarse".to_string(), Feature::Integer)];
/// let e = resolve(&stored, None, &ColumnChoice::default()).unwrap_err();
/// assert!(e.to_string().contains("coarse (integer)"), "{e}");
/// let c = resolve(&stored, None, &ColumnChoice { label: Some("fine".into()), ..Default::default() }).unwrap();
/// assert_eq!((c.image.as_str(), c.label.as_str()), ("img", "fine"));
/// ```
pub fn resolve(
    stored: &Features,
    declared: Option<&Features>,
    choice: &ColumnChoice,
) -> Result<Columns> {
    // What each stored column holds: its declaration when it has one, else its type.
    let view: Features = stored
        .iter()
        .map(|(n, f)| {
            let d = declared
                .and_then(|d| d.iter().find(|(m, _)| m == n))
                .map(|(_, f)| f.clone());
            (n.clone(), d.unwrap_or_else(|| f.clone()))
        })
        .collect();
    let stored_is =
        |name: &str, want: fn(&Feature) -> bool| stored.iter().any(|(n, f)| n == name && want(f));
    let columns = list(&view);
    let image = match &choice.image {
        Some(c) => {
            if !stored.iter().any(|(n, _)| n == c) {
                bail!("dataset: no image column {c:?}; the columns are: {columns}");
            }
            if !stored_is(c, |f| *f == Feature::Image) {
                bail!(
                    "dataset: column {c:?} cannot hold encoded images (it needs a struct with \
                     `bytes`, or binary); the columns are: {columns}"
                );
            }
            c.clone()
        }
        None => {
            let declared_images: Vec<&String> = view
                .iter()
                .filter(|(n, f)| *f == Feature::Image && stored_is(n, |g| *g == Feature::Image))
                .map(|(n, _)| n)
                .collect();
            match declared_images.as_slice() {
                [one] => (*one).clone(),
                [] => bail!(
                    "dataset: no image column (an Image feature, a struct with `bytes`, or \
                     binary); the columns are: {columns}"
                ),
                many => bail!(
                    "dataset: several image columns ({}); choose one with `ColumnChoice::image`; the \
                     columns are: {columns}",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    fn is_int(f: &Feature) -> bool {
        matches!(f, Feature::Integer | Feature::ClassLabel(_))
    }
    let label = match &choice.label {
        Some(c) => {
            if !stored.iter().any(|(n, _)| n == c) {
                bail!("dataset: no label column {c:?}; the columns are: {columns}");
            }
            if !stored_is(c, is_int) {
                bail!("dataset: column {c:?} does not hold integers; the columns are: {columns}");
            }
            c.clone()
        }
        None => {
            let class_labels: Vec<&String> = view
                .iter()
                .filter(|(n, f)| matches!(f, Feature::ClassLabel(_)) && stored_is(n, is_int))
                .map(|(n, _)| n)
                .collect();
            match class_labels.as_slice() {
                [one] => (*one).clone(),
                [] => {
                    let ints: Vec<&String> = view
                        .iter()
                        .filter(|(n, f)| is_int(f) && stored_is(n, is_int) && *n != image)
                        .map(|(n, _)| n)
                        .collect();
                    match ints
                        .iter()
                        .find(|n| matches!(n.as_str(), "label" | "labels"))
                    {
                        Some(n) => (*n).clone(),
                        None if ints.len() == 1 => ints[0].clone(),
                        None if ints.is_empty() => bail!(
                            "dataset: no class column (a ClassLabel feature or an integer \
                             column); the columns are: {columns}"
                        ),
                        None => bail!(
                            "dataset: several integer columns and no ClassLabel to tell which \
                             holds the class; choose one with `ColumnChoice::label`; the columns are: \
                             {columns}"
                        ),
                    }
                }
                many => {
                    bail!(
                    "dataset: several ClassLabel columns ({}); choose one with `ColumnChoice::label`; \
                     the columns are: {columns}",
                    many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )
                }
            }
        }
    };
    let class_names = match &choice.class_names {
        Some(n) => Some(n.clone()),
        None => view
            .iter()
            .find(|(n, _)| *n == label)
            .and_then(|(_, f)| match f {
                Feature::ClassLabel(names) if !names.is_empty() => Some(names.clone()),
                _ => None,
            }),
    };
    Ok(Columns {
        image,
        label,
        class_names,
    })
}

/// Class names from a file: a JSON list of strings, or one name per line (blank lines
/// skipped).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("c.txt");
/// std::fs::write(&p, "cat\ndog\n").unwrap();
/// assert_eq!(candle_finetune::data::features::read_class_names(&p).unwrap(), ["cat", "dog"]);
/// ```
pub fn read_class_names(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("class names {}: {e}", path.display())))?;
    let names: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("class names {}: {e}", path.display())))?
    } else {
        text.lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    if names.is_empty() {
        bail!("class names {}: the file lists no names", path.display());
    }
    Ok(names)
}
