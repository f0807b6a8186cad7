//! What a dataset is, for the model card: its name, where it lives, its licence and what its
//! classes are. Stanford Cars is known; any other dataset is described by flags or by a
//! `dataset.json` file next to its data.

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The description of the training data that a model card shows.
///
/// ```
/// use candle_finetune::data::DatasetInfo;
/// let cars = DatasetInfo::stanford_cars();
/// assert_eq!(cars.hub_id.as_deref(), Some("tanganke/stanford_cars"));
/// let local = DatasetInfo::local("flowers");
/// assert_eq!((local.name.as_str(), local.license.as_deref()), ("flowers", None));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Human-readable name ("Stanford Cars"), used in the card's title and text.
    pub name: String,
    /// Hub dataset id, for the card's `datasets:` field; `None` for local data.
    #[serde(default)]
    pub hub_id: Option<String>,
    /// Revision of the Hub dataset that was used.
    #[serde(default)]
    pub revision: Option<String>,
    /// Licence of the data: a Hub licence id (`cc-by-4.0`, `mit`, ...) or `other`; `None`:
    /// unknown.
    #[serde(default)]
    pub license: Option<String>,
    /// Name of a licence that is `other` (the Hub's `license_name`).
    #[serde(default)]
    pub license_name: Option<String>,
    /// Sentence on the licence terms for the card ("non-commercial research only").
    #[serde(default)]
    pub license_terms: Option<String>,
    /// What the classes are, as a plural noun phrase ("car models (make, model, year)");
    /// `None`: "classes".
    #[serde(default)]
    pub classes: Option<String>,
    /// Known limits of the data, a paragraph for the card.
    #[serde(default)]
    pub limitations: Option<String>,
}

/// The file a local dataset folder may hold to describe itself (the fields of [`DatasetInfo`];
/// `name` is required, the rest optional).
pub const DATASET_INFO_FILE: &str = "dataset.json";

impl DatasetInfo {
    /// Stanford Cars (Krause et al., 2013) as mirrored at [`super::DEFAULT_DATASET_REPO`].
    pub fn stanford_cars() -> Self {
        Self {
            name: "Stanford Cars".into(),
            hub_id: Some(super::DEFAULT_DATASET_REPO.into()),
            revision: Some(super::DEFAULT_DATASET_REVISION.into()),
            license: Some("other".into()),
            license_name: Some("stanford-cars-non-commercial".into()),
            license_terms: Some(
                "The training data, Stanford Cars (Krause et al., 2013), is licensed for \
                 **non-commercial research purposes only**, and so are these fine-tuned weights."
                    .into(),
            ),
            classes: Some("car models (make, model, year)".into()),
            limitations: Some(
                "The classes are cars sold in the US around 2012; the model knows nothing about \
                 other vehicles or newer models."
                    .into(),
            ),
        }
    }

    /// A Hub dataset other than Stanford Cars: named by its id, licence unknown until given.
    ///
    /// ```
    /// let d = candle_finetune::data::DatasetInfo::hub("me/flowers", "main");
    /// assert_eq!(d.name, "me/flowers");
    /// ```
    pub fn hub(repo: &str, revision: &str) -> Self {
        Self {
            hub_id: Some(repo.into()),
            revision: Some(revision.into()),
            ..Self::local(repo)
        }
    }

    /// A local dataset called `name`, nothing else known.
    pub fn local(name: &str) -> Self {
        Self {
            name: name.into(),
            hub_id: None,
            revision: None,
            license: None,
            license_name: None,
            license_terms: None,
            classes: None,
            limitations: None,
        }
    }

    /// The description of a local dataset folder: its [`DATASET_INFO_FILE`] if there is one,
    /// else the folder's name. Never an absolute path: this goes to the Hub.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// std::fs::write(dir.path().join("dataset.json"), r#"{"name": "Oxford Pets", "license": "cc-by-sa-4.0"}"#).unwrap();
    /// let d = candle_finetune::data::DatasetInfo::from_dir(dir.path()).unwrap();
    /// assert_eq!((d.name.as_str(), d.license.as_deref()), ("Oxford Pets", Some("cc-by-sa-4.0")));
    /// ```
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join(DATASET_INFO_FILE);
        if file.is_file() {
            let text = std::fs::read_to_string(&file)?;
            let info: DatasetInfo = serde_json::from_str(&text)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
            if info.name.trim().is_empty() {
                bail!("{}: `name` is empty", file.display());
            }
            return Ok(info);
        }
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "local dataset".into());
        Ok(Self::local(&name))
    }

    /// Overrides the name and licence (flags of a run), keeping the rest.
    ///
    /// ```
    /// let d = candle_finetune::data::DatasetInfo::local("x").with_overrides(Some("Birds"), Some("cc-by-4.0"));
    /// assert_eq!((d.name.as_str(), d.license.as_deref()), ("Birds", Some("cc-by-4.0")));
    /// ```
    pub fn with_overrides(mut self, name: Option<&str>, license: Option<&str>) -> Self {
        if let Some(n) = name {
            self.name = n.into();
        }
        if let Some(l) = license {
            self.license = Some(l.into());
            self.license_name = None;
            self.license_terms = None;
        }
        self
    }

    /// Whether this is the Stanford Cars mirror.
    pub fn is_stanford_cars(&self) -> bool {
        self.hub_id.as_deref() == Some(super::DEFAULT_DATASET_REPO)
    }
}
