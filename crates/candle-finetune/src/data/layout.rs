//! Which files of a dataset repository hold which split: the card's YAML `configs:`
//! `data_files` when it declares them, else the Hub's file-name conventions (`data/train-*`,
//! `train/...`, `{config}/test-*`, `..._validation.parquet`; train / validation, valid, val, dev /
//! test, testing, eval, evaluation).

use super::Split;
use candle_core::{bail, Result};
use globset::GlobBuilder;
use serde_json::Value;

/// The YAML front matter of a card (`---` ... `---` at the top of `README.md`) as JSON; `None`
/// when the card has none.
///
/// ```
/// let card = "---\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n---\n# Cars\n";
/// let v = candle_finetune::data::layout::front_matter(card).unwrap().unwrap();
/// assert_eq!(v["configs"][0]["data_files"], "data/*.parquet");
/// assert!(candle_finetune::data::layout::front_matter("# no yaml").unwrap().is_none());
/// ```
pub fn front_matter(card: &str) -> Result<Option<Value>> {
    let text = card.strip_prefix('\u{feff}').unwrap_or(card);
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return Ok(None);
    };
    let end = rest.match_indices("\n---").map(|(i, _)| i).find(|&i| {
        let after = &rest[i + 4..];
        after.is_empty() || after.starts_with('\n') || after.starts_with('\r')
    });
    let yaml = match end {
        Some(i) => &rest[..i],
        None if rest.starts_with("---") => "",
        None => bail!("dataset card: the YAML front matter has no closing `---`"),
    };
    if yaml.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_yaml_ng::from_str(yaml)
        .map_err(|e| candle_core::Error::Msg(format!("dataset card YAML: {e}")))?;
    Ok(Some(v))
}

/// The files of each split, repository-relative.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitFiles {
    /// Training files.
    pub train: Vec<String>,
    /// Validation files (empty: the data has no validation split).
    pub validation: Vec<String>,
    /// Test files (empty: the data has no test split).
    pub test: Vec<String>,
}

impl SplitFiles {
    /// The files of `split`.
    pub fn get(&self, split: Split) -> &[String] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    fn get_mut(&mut self, split: Split) -> &mut Vec<String> {
        match split {
            Split::Train => &mut self.train,
            Split::Validation => &mut self.validation,
            Split::Test => &mut self.test,
        }
    }

    /// Every file of every split.
    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.train.iter().chain(&self.validation).chain(&self.test)
    }

    fn sort(mut self) -> Self {
        for v in [&mut self.train, &mut self.validation, &mut self.test] {
            v.sort();
            v.dedup();
        }
        self
    }
}

/// The split a name stands for, as the `datasets` library reads split names and file names
/// (`None`: not one of ours).
///
/// ```
/// use candle_finetune::data::{layout::split_of_name, Split};
/// assert_eq!(split_of_name("dev"), Some(Split::Validation));
/// assert_eq!(split_of_name("Evaluation"), Some(Split::Test));
/// assert_eq!(split_of_name("unlabeled"), None);
/// ```
pub fn split_of_name(name: &str) -> Option<Split> {
    match name.to_ascii_lowercase().as_str() {
        "train" | "training" => Some(Split::Train),
        "validation" | "valid" | "val" | "dev" => Some(Split::Validation),
        "test" | "testing" | "eval" | "evaluation" => Some(Split::Test),
        _ => None,
    }
}

const KEYWORDS: [(Split, &[&str]); 3] = [
    (Split::Train, &["train", "training"]),
    (Split::Validation, &["validation", "valid", "dev", "val"]),
    (Split::Test, &["test", "testing", "eval", "evaluation"]),
];

fn is_delim(c: char) -> bool {
    matches!(c, '-' | '.' | '_' | ' ') || c.is_ascii_digit()
}

/// Whether `word` holds keyword `kw` as a whole token: at its start or after a delimiter
/// (`-._ ` or a digit), and at its end or before one.
fn has_token(word: &str, kw: &str) -> bool {
    let w = word.to_ascii_lowercase();
    w.match_indices(kw).any(|(i, _)| {
        let before = w[..i].chars().next_back();
        let after = w[i + kw.len()..].chars().next();
        before.is_none_or(is_delim) && after.is_none_or(is_delim)
    })
}

fn split_by_file_name(path: &str) -> Option<Split> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let stem = name.split_once('.').map_or(name, |(s, _)| s);
    KEYWORDS
        .iter()
        .find(|(_, kws)| kws.iter().any(|k| has_token(stem, k)))
        .map(|(s, _)| *s)
}

fn split_by_dir_name(path: &str) -> Option<Split> {
    let dirs: Vec<&str> = path.split('/').collect();
    let dirs = &dirs[..dirs.len().saturating_sub(1)];
    KEYWORDS
        .iter()
        .find(|(_, kws)| {
            dirs.iter().any(|d| {
                kws.iter()
                    .any(|k| d.eq_ignore_ascii_case(k) || ends_with_token(d, k))
            })
        })
        .map(|(s, _)| *s)
}

fn ends_with_token(dir: &str, kw: &str) -> bool {
    let d = dir.to_ascii_lowercase();
    d.strip_suffix(kw)
        .is_some_and(|head| head.chars().next_back().is_some_and(is_delim))
}

/// Splits parquet `files` by the Hub's conventions: split names in file names first
/// (`data/train-00000-of-00003.parquet`, `cifar100_test.parquet`); only when no file name
/// names a split, directory names (`train/0000.parquet`, `default/partial-test/0.parquet`); when
/// neither names one, every file is training data.
///
/// ```
/// use candle_finetune::data::layout::by_convention;
/// let files = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
///     "data/validation-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"].map(String::from);
/// let s = by_convention(&files);
/// assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (2, 1, 1));
/// ```
pub fn by_convention(files: &[String]) -> SplitFiles {
    let parquet: Vec<&String> = files.iter().filter(|f| f.ends_with(".parquet")).collect();
    let mut out = SplitFiles::default();
    let named: Vec<(&String, Split)> = parquet
        .iter()
        .filter_map(|f| split_by_file_name(f).map(|s| (*f, s)))
        .collect();
    let by_dir: Vec<(&String, Split)>;
    let chosen = if !named.is_empty() {
        &named
    } else {
        by_dir = parquet
            .iter()
            .filter_map(|f| split_by_dir_name(f).map(|s| (*f, s)))
            .collect();
        &by_dir
    };
    if chosen.is_empty() {
        out.train = parquet.into_iter().cloned().collect();
    } else {
        for (f, s) in chosen {
            out.get_mut(*s).push((*f).clone());
        }
    }
    out.sort()
}

fn patterns(v: &Value) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|p| match p {
                Value::String(s) => Ok(s.clone()),
                other => bail!("dataset card: data_files path {other} is not a string"),
            })
            .collect(),
        other => bail!("dataset card: data_files path {other} is neither a string nor a list"),
    }
}

fn matching(files: &[String], pattern: &str) -> Result<Vec<String>> {
    let p = pattern.trim_start_matches("./");
    let glob = GlobBuilder::new(p)
        .literal_separator(true)
        .build()
        .map_err(|e| candle_core::Error::Msg(format!("dataset card: pattern {pattern:?}: {e}")))?
        .compile_matcher();
    Ok(files.iter().filter(|f| glob.is_match(f)).cloned().collect())
}

/// The configuration of the card's `configs:` list to read: `config` by `config_name`, else
/// the one marked `default: true`, else the only one, else the one named `default`.
fn pick_config<'a>(configs: &'a [Value], config: Option<&str>) -> Result<&'a Value> {
    let name = |c: &Value| {
        c.get("config_name")
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string()
    };
    let names = || configs.iter().map(name).collect::<Vec<_>>().join(", ");
    if let Some(want) = config {
        return configs.iter().find(|c| name(c) == want).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "dataset: no configuration {want:?}; the card declares: {}",
                names()
            ))
        });
    }
    if let Some(c) = configs
        .iter()
        .find(|c| c.get("default").and_then(|d| d.as_bool()) == Some(true))
    {
        return Ok(c);
    }
    if configs.len() == 1 {
        return Ok(&configs[0]);
    }
    configs
        .iter()
        .find(|c| name(c) == "default")
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "dataset: the card declares several configurations ({}); choose one with \
                 `DataSource::Hub::config`",
                names()
            ))
        })
}

/// The split files of a repository: from the card's `configs:` (`data_files` as a pattern, a
/// list of patterns (all training data), or a list of `{split, path}`; or `data_dir`) when it
/// has them, else [`by_convention`] (under `config/` when a configuration is named). Patterns
/// follow the Hub's globs: `*` stays within a folder, `**` crosses folders.
///
/// ```
/// use candle_finetune::data::layout::resolve;
/// let files = ["README.md", "train/a.parquet", "train/b.parquet", "holdout/c.parquet"].map(String::from);
/// let card = serde_json::json!({"configs": [{"config_name": "default", "data_files": [
///     {"split": "train", "path": "train/*"}, {"split": "test", "path": "holdout/*.parquet"}]}]});
/// let s = resolve(&files, Some(&card), None).unwrap();
/// assert_eq!((s.train.len(), s.test, s.validation.len()), (2, vec!["holdout/c.parquet".to_string()], 0));
/// ```
pub fn resolve(files: &[String], card: Option<&Value>, config: Option<&str>) -> Result<SplitFiles> {
    let configs = card
        .and_then(|c| c.get("configs"))
        .and_then(|c| c.as_array());
    let Some(configs) = configs.filter(|c| !c.is_empty()) else {
        let scoped: Vec<String> = match config {
            Some(c) => {
                let prefix = format!("{c}/");
                let v: Vec<String> = files
                    .iter()
                    .filter(|f| f.starts_with(&prefix))
                    .cloned()
                    .collect();
                if v.is_empty() {
                    bail!("dataset: no configuration {c:?} (no folder {prefix} in the repository)");
                }
                v
            }
            None => files.to_vec(),
        };
        return Ok(by_convention(&scoped));
    };
    let chosen = pick_config(configs, config)?;
    let mut out = SplitFiles::default();
    match chosen.get("data_files") {
        Some(Value::Array(entries)) if entries.iter().all(|e| e.is_object()) => {
            for e in entries {
                let split = e.get("split").and_then(|s| s.as_str()).unwrap_or("train");
                let Some(role) = split_of_name(split) else {
                    continue; // a split we do not train or evaluate on ("unlabeled", ...)
                };
                let path = e.get("path").ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "dataset card: the data_files entry of split {split:?} has no path"
                    ))
                })?;
                for p in patterns(path)? {
                    let found = matching(files, &p)?;
                    if found.is_empty() {
                        bail!(
                            "dataset card: pattern {p:?} of split {split:?} matches no file of \
                             the repository"
                        );
                    }
                    out.get_mut(role).extend(found);
                }
            }
        }
        Some(Value::Object(map)) => {
            for (split, path) in map {
                let Some(role) = split_of_name(split) else {
                    continue;
                };
                for p in patterns(path)? {
                    out.get_mut(role).extend(matching(files, &p)?);
                }
            }
        }
        Some(v) => {
            for p in patterns(v)? {
                out.train.extend(matching(files, &p)?);
            }
        }
        None => {
            let dir = chosen
                .get("data_dir")
                .and_then(|d| d.as_str())
                .map(|d| format!("{}/", d.trim_matches('/')));
            let scoped: Vec<String> = match &dir {
                Some(prefix) => files
                    .iter()
                    .filter(|f| f.starts_with(prefix.as_str()))
                    .cloned()
                    .collect(),
                None => files.to_vec(),
            };
            return Ok(by_convention(&scoped));
        }
    }
    Ok(out.sort())
}
