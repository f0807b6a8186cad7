//! Where a run's images come from: a Hub dataset repo at a pinned revision or a local folder,
//! opened into its train / validation / test splits.

use super::features::{self, ColumnChoice, Columns};
use super::layout::{self, SplitFiles};
use super::stream::{RowGroupCache, DEFAULT_CACHE_BYTES};
use super::{parquet, Dataset, DatasetInfo, Split, DEFAULT_DATASET_REPO, DEFAULT_DATASET_REVISION};
use crate::hub::HubOptions;
use candle_core::{bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The Hub's parquet conversion of a repository, for repos that hold no parquet files.
pub const PARQUET_CONVERSION: &str = "refs/convert/parquet";

/// Where the images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// Any Hub dataset repo: its files are listed at `revision` through the Hub API (the
    /// cache's snapshot offline), split by the card's `configs:` or the Hub's file-name
    /// conventions, and read from parquet (the Hub's parquet conversion,
    /// [`PARQUET_CONVERSION`], when the repo has none).
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit (a commit pins the data).
        revision: String,
        /// The configuration (subset) to read (`None`: the card's default, or the only one).
        config: Option<String>,
    },
    /// A local folder: parquet files split as in a Hub repo (`train-*.parquet`,
    /// `data/validation-*.parquet`, `test/...`, or its README's `configs:`), or `train/`,
    /// `validation/` (also `valid/`, `val/`, `dev/`) and `test/` image folders with one
    /// sub-folder per class.
    Dir(PathBuf),
}

impl Default for DataSource {
    /// Stanford Cars at its pinned revision.
    fn default() -> Self {
        DataSource::Hub {
            repo: DEFAULT_DATASET_REPO.into(),
            revision: DEFAULT_DATASET_REVISION.into(),
            config: None,
        }
    }
}

/// The splits of a dataset as opened.
#[derive(Debug, Clone)]
pub struct SplitData {
    /// Training images.
    pub train: Dataset,
    /// The dataset's own validation split, if it has one.
    pub validation: Option<Dataset>,
    /// The test split, if it has one.
    pub test: Option<Dataset>,
    /// The columns read (`None`: image folders).
    pub columns: Option<Columns>,
    /// The commit the files were read at (Hub data).
    pub commit: Option<String>,
    /// The card's YAML front matter, when the data has a card.
    pub card: Option<Value>,
    /// Where the files came from, for logs (`owner/name@commit`, the parquet conversion, a
    /// folder).
    pub origin: String,
    /// Remarks on how the data was read, for the caller to show (e.g. a Hub dataset read from
    /// its parquet conversion because it has no parquet files of its own).
    pub notes: Vec<String>,
}

impl SplitData {
    /// A split, or `None` when the data has none of that name.
    pub fn get(&self, split: Split) -> Option<&Dataset> {
        match split {
            Split::Train => Some(&self.train),
            Split::Validation => self.validation.as_ref(),
            Split::Test => self.test.as_ref(),
        }
    }
}

fn walk(dir: &Path) -> Result<Vec<String>> {
    crate::files::relative_files(dir, |p| {
        p.extension().is_some_and(|e| e == "parquet" || e == "md")
    })
}

fn card_of(readme: Option<PathBuf>) -> Result<Option<Value>> {
    match readme {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", p.display())))?;
            layout::front_matter(&text)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", p.display())))
        }
        None => Ok(None),
    }
}

/// Reads the splits of parquet `paths` with the columns chosen from the first training file,
/// classes named alike in every split.
fn read_parquet_splits(
    paths: [Vec<PathBuf>; 3],
    card: Option<&Value>,
    config: Option<&str>,
    choice: &ColumnChoice,
    cache_bytes: usize,
) -> Result<([Option<Dataset>; 3], Columns)> {
    let first = paths[0].first().expect("checked: training files exist");
    let (stored, declared) = parquet::inspect(first).map_err(candle_core::Error::Msg)?;
    let declared = declared.or_else(|| card.and_then(|c| features::from_card(c, config)));
    let columns = features::resolve(&stored, declared.as_ref(), choice)
        .map_err(|e| candle_core::Error::Msg(format!("{e} (in {})", first.display())))?;
    // One cache for every split: the images held in memory stay within one bound.
    let cache = RowGroupCache::new(cache_bytes);
    let mut out: [Option<Dataset>; 3] = [None, None, None];
    for (slot, p) in out.iter_mut().zip(&paths) {
        if !p.is_empty() {
            *slot = Some(Dataset::from_parquet_streaming(p, &columns, &cache)?);
        }
    }
    if columns.class_names.is_none() {
        // Plain integer classes: one set of names "0".."C-1" over every split.
        let c = out
            .iter()
            .flatten()
            .map(|d| d.num_classes())
            .max()
            .unwrap_or(0);
        let names: Vec<String> = (0..c).map(|i| i.to_string()).collect();
        for d in out.iter_mut().flatten() {
            d.class_names = names.clone();
        }
    }
    Ok((out, columns))
}

fn image_folder_splits(dir: &Path) -> Result<Option<[Option<Dataset>; 3]>> {
    let find = |names: &[&str]| names.iter().map(|n| dir.join(n)).find(|p| p.is_dir());
    let Some(train_dir) = find(&["train", "training"]) else {
        return Ok(None);
    };
    let train = Dataset::from_image_folder(&train_dir)?;
    let other = |names: &[&str]| -> Result<Option<Dataset>> {
        match find(names) {
            Some(d) => Ok(Some(
                Dataset::from_image_folder(&d)?
                    .remap_to(&train.class_names)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", d.display())))?,
            )),
            None => Ok(None),
        }
    };
    let validation = other(&["validation", "valid", "val", "dev"])?;
    let test = other(&["test", "testing"])?;
    Ok(Some([Some(train), validation, test]))
}

impl DataSource {
    /// Stanford Cars at its pinned revision ([`DataSource::default`]).
    pub fn stanford_cars() -> Self {
        Self::default()
    }

    /// Opens every split the data has. Hub repos: the files are listed at the revision (see
    /// [`HubOptions::list_dataset`]), split by [`layout::resolve`], downloaded at the listed
    /// commit into the Hub cache (or found there) and read with the columns of
    /// [`features::resolve`]. A repo without parquet files is read from its parquet conversion
    /// ([`PARQUET_CONVERSION`]). No training files is an error naming what was found. Parquet
    /// images are read as needed through a cache of [`DEFAULT_CACHE_BYTES`].
    pub fn open(&self, opts: &HubOptions, choice: &ColumnChoice) -> Result<SplitData> {
        self.open_with_cache(opts, choice, DEFAULT_CACHE_BYTES)
    }

    /// [`DataSource::open`] with the parquet image cache bounded to `cache_bytes`.
    pub fn open_with_cache(
        &self,
        opts: &HubOptions,
        choice: &ColumnChoice,
        cache_bytes: usize,
    ) -> Result<SplitData> {
        match self {
            DataSource::Dir(dir) => self.open_dir(dir, choice, cache_bytes),
            DataSource::Hub {
                repo,
                revision,
                config,
            } => {
                let listing = opts.list_dataset(repo, revision)?;
                let card = match listing.files.iter().any(|f| f == "README.md") {
                    true => card_of(Some(opts.dataset_file(
                        repo,
                        &listing.commit,
                        "README.md",
                    )?))?,
                    false => None,
                };
                let mut splits = layout::resolve(&listing.files, card.as_ref(), config.as_deref())?;
                let mut commit = listing.commit.clone();
                let mut notes = Vec::new();
                let mut origin = format!("{repo}@{}", listing.commit);
                let mut config = config.clone();
                let non_parquet = splits.all().any(|f| !f.ends_with(".parquet"));
                if splits.train.is_empty() || non_parquet {
                    // No parquet to read: the Hub's conversion of the repo.
                    let conv = opts.list_dataset(repo, PARQUET_CONVERSION).map_err(|e| {
                        candle_core::Error::Msg(format!(
                            "dataset repo {repo} at {revision} has no parquet training files \
                             (files: {}), and its parquet conversion cannot be listed: {e}",
                            preview(&listing.files)
                        ))
                    })?;
                    let cfg = match config.clone() {
                        Some(c) => c,
                        None => conversion_config(&conv.files).map_err(|e| {
                            candle_core::Error::Msg(format!("dataset repo {repo}: {e}"))
                        })?,
                    };
                    splits = layout::resolve(&conv.files, None, Some(&cfg))?;
                    notes.push(format!(
                        "{repo} has no parquet files at {revision}; reading its parquet \
                         conversion ({PARQUET_CONVERSION} at {}, configuration {cfg})",
                        conv.commit
                    ));
                    origin = format!(
                        "{repo}@{} ({PARQUET_CONVERSION} of {})",
                        conv.commit, listing.commit
                    );
                    commit = conv.commit;
                    config = Some(cfg);
                }
                if splits.train.is_empty() {
                    bail!(
                        "dataset repo {repo} at {revision}: no training files (files: {})",
                        preview(&listing.files)
                    );
                }
                let fetch = |files: &[String]| -> Result<Vec<PathBuf>> {
                    files
                        .iter()
                        .map(|f| opts.dataset_file(repo, &commit, f))
                        .collect()
                };
                let paths = [
                    fetch(&splits.train)?,
                    fetch(&splits.validation)?,
                    fetch(&splits.test)?,
                ];
                let ([train, validation, test], columns) = read_parquet_splits(
                    paths,
                    card.as_ref(),
                    config.as_deref(),
                    choice,
                    cache_bytes,
                )?;
                Ok(SplitData {
                    train: train.expect("training files exist"),
                    validation,
                    test,
                    columns: Some(columns),
                    commit: Some(commit),
                    card,
                    origin,
                    notes,
                })
            }
        }
    }

    fn open_dir(&self, dir: &Path, choice: &ColumnChoice, cache_bytes: usize) -> Result<SplitData> {
        let files = walk(dir)?;
        let readme = dir.join("README.md");
        let card = card_of(readme.is_file().then_some(readme))?;
        let splits: SplitFiles = layout::resolve(&files, card.as_ref(), None)?;
        let origin = dir.display().to_string();
        if !splits.train.is_empty() {
            let abs = |v: &[String]| v.iter().map(|f| dir.join(f)).collect::<Vec<_>>();
            let paths = [
                abs(&splits.train),
                abs(&splits.validation),
                abs(&splits.test),
            ];
            let ([train, validation, test], columns) =
                read_parquet_splits(paths, card.as_ref(), None, choice, cache_bytes)?;
            return Ok(SplitData {
                train: train.expect("training files exist"),
                validation,
                test,
                columns: Some(columns),
                commit: None,
                card,
                origin,
                notes: Vec::new(),
            });
        }
        match image_folder_splits(dir)? {
            Some([train, validation, test]) => Ok(SplitData {
                train: train.expect("train folder exists"),
                validation,
                test,
                columns: None,
                commit: None,
                card,
                origin,
                notes: Vec::new(),
            }),
            None => bail!(
                "{}: no train-*.parquet files (directly, under data/ or as the README's \
                 configs declare) and no train/ image folder",
                dir.display()
            ),
        }
    }

    /// Opens the data and returns one split; a split the data does not have is an error.
    ///
    /// ```
    /// use candle_finetune::{data::{features::ColumnChoice, DataSource, Split}, hub::HubOptions};
    /// let dir = tempfile::tempdir().unwrap();
    /// let e = DataSource::Dir(dir.path().into()).load(&HubOptions::default(), &ColumnChoice::default(), Split::Test).unwrap_err();
    /// assert!(e.to_string().contains("no train-*.parquet files"), "{e}");
    /// ```
    pub fn load(&self, opts: &HubOptions, choice: &ColumnChoice, split: Split) -> Result<Dataset> {
        let data = self.open(opts, choice)?;
        match data.get(split) {
            Some(d) => Ok(d.clone()),
            None => bail!("{}: the data has no {} split", data.origin, split.name()),
        }
    }

    /// What the model card says about this data, before flags override it: Stanford Cars'
    /// terms for its mirror, a folder's `dataset.json`, else the repo id with the licence its
    /// card declares (when `card` is given).
    pub fn info(&self, card: Option<&Value>, commit: Option<&str>) -> Result<DatasetInfo> {
        Ok(match self {
            DataSource::Dir(d) => {
                let mut i = DatasetInfo::from_dir(d)?;
                if i.license.is_none() {
                    i.license = card_license(card);
                }
                i
            }
            DataSource::Hub { repo, revision, .. } if repo == DEFAULT_DATASET_REPO => DatasetInfo {
                revision: Some(commit.unwrap_or(revision).to_string()),
                ..DatasetInfo::stanford_cars()
            },
            DataSource::Hub { repo, revision, .. } => DatasetInfo {
                license: card_license(card),
                ..DatasetInfo::hub(repo, commit.unwrap_or(revision))
            },
        })
    }

    /// `owner/name@revision` or the folder, for logs (not for the card).
    pub fn describe(&self) -> String {
        match self {
            DataSource::Dir(d) => d.display().to_string(),
            DataSource::Hub {
                repo,
                revision,
                config: Some(c),
            } => format!("{repo}@{revision} ({c})"),
            DataSource::Hub { repo, revision, .. } => format!("{repo}@{revision}"),
        }
    }
}

/// The licence a card's YAML declares (`license: mit`, or the first of a list).
fn card_license(card: Option<&Value>) -> Option<String> {
    match card?.get("license")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.first()?.as_str().map(String::from),
        _ => None,
    }
}

/// The configuration folder of a parquet conversion to read when none was named: `default`,
/// else the only one.
fn conversion_config(files: &[String]) -> std::result::Result<String, String> {
    let mut configs: Vec<&str> = files
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .filter_map(|f| f.split_once('/').map(|(c, _)| c))
        .collect();
    configs.sort();
    configs.dedup();
    match configs.as_slice() {
        [] => Err("its parquet conversion holds no parquet files".into()),
        [one] => Ok(one.to_string()),
        many if many.contains(&"default") => Ok("default".into()),
        many => Err(format!(
            "its parquet conversion has several configurations ({}); choose one with \
             `DataSource::Hub::config`",
            many.join(", ")
        )),
    }
}

fn preview(files: &[String]) -> String {
    let mut s: Vec<&str> = files.iter().take(8).map(|f| f.as_str()).collect();
    if files.len() > 8 {
        s.push("...");
    }
    if s.is_empty() {
        "none".into()
    } else {
        s.join(", ")
    }
}
