//! Image-classification data: any Hub parquet dataset ([`DataSource`]: the repo listed at a
//! pinned revision, its splits ([`layout`]) and columns ([`features`]) found from what it
//! declares), local parquet files and image folders behind one [`Dataset`] type; the validation
//! split ([`holdout`]); decoding, transforms and a parallel, prefetching [`Loader`].

pub mod augment;
mod decode;
pub mod erasing;
pub mod features;
pub mod holdout;
pub mod imageops;
mod info;
pub mod layout;
mod loader;
pub mod mixup;
pub mod parquet;
mod source;
pub mod stream;
mod transform;

pub use decode::{check_jpeg_structure, check_png_structure, decode_rgb};
pub use info::{DatasetInfo, DATASET_INFO_FILE};
pub use loader::{Batch, EpochIter, EpochReport, Loader, LoaderConfig, Shard};
pub use source::{DataSource, SplitData};
pub use transform::{
    center_crop_box, random_resized_crop_box, random_resized_crop_box_in, sample_rng, CropBox,
    Interpolation, Preprocess, PreprocessOverrides, Transform,
};

use crate::hub::HubOptions;
use candle_core::{bail, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The Stanford Cars mirror on the Hub (parquet shards, 196 ClassLabel names).
pub const DEFAULT_DATASET_REPO: &str = "tanganke/stanford_cars";
/// The pinned commit of [`DEFAULT_DATASET_REPO`].
pub const DEFAULT_DATASET_REVISION: &str = "9abf6cf7d6dfa7b95152a0d6e791ea9435b47a40";

/// The 196 Stanford Cars class names in label order (`assets/stanford_cars_classes.json`, also
/// the published model's `models/resnet18-stanford-cars/classes.json`).
pub const STANFORD_CARS_CLASSES_JSON: &str =
    include_str!("../../assets/stanford_cars_classes.json");

/// About how many images one window of [`Dataset::order`] shuffles together.
pub const ORDER_WINDOW_IMAGES: usize = 4096;

/// A dataset split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Training images.
    Train,
    /// Validation images: what chooses the epoch.
    Validation,
    /// Test images: evaluated once, for the chosen model.
    Test,
}

impl Split {
    /// `train`, `validation` or `test`.
    ///
    /// ```
    /// assert_eq!(candle_finetune::data::Split::Test.name(), "test");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// Where a sample's encoded image lives.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// Encoded bytes held in memory.
    Encoded(Arc<[u8]>),
    /// A file on disk (image folder).
    File(PathBuf),
    /// Row `row` of row group `group` of a parquet file, read when needed
    /// ([`stream::ParquetFile::image`]).
    Parquet {
        /// The file.
        file: Arc<stream::ParquetFile>,
        /// Row group.
        group: u32,
        /// Row within the group.
        row: u32,
    },
}

/// One labelled image.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The encoded image.
    pub image: ImageData,
    /// Class index in `[0, num_classes)`.
    pub label: u32,
}

/// A labelled image dataset with its class names.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// for (class, n) in [("cat", 2), ("dog", 1)] {
///     std::fs::create_dir(dir.path().join(class)).unwrap();
///     for i in 0..n {
///         image::RgbImage::new(8, 8).save(dir.path().join(class).join(format!("{i}.png"))).unwrap();
///     }
/// }
/// let ds = candle_finetune::data::Dataset::from_image_folder(dir.path()).unwrap();
/// assert_eq!(ds.class_names, ["cat", "dog"]);
/// assert_eq!(ds.class_counts(), [2, 1]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The samples.
    pub samples: Vec<Sample>,
    /// Class names, indexed by label.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Number of samples.
    ///
    /// ```
    /// assert_eq!(candle_finetune::data::Dataset::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    ///
    /// ```
    /// assert!(candle_finetune::data::Dataset::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of classes.
    ///
    /// ```
    /// assert_eq!(candle_finetune::data::Dataset::default().num_classes(), 0);
    /// ```
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Samples per class.
    ///
    /// ```
    /// assert!(candle_finetune::data::Dataset::default().class_counts().is_empty());
    /// ```
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.num_classes()];
        for s in &self.samples {
            c[s.label as usize] += 1;
        }
        c
    }

    /// Reads parquet shards in the `datasets` layout, the columns chosen from the first shard
    /// ([`features::resolve`] with no overrides); classes named by the ClassLabel, else by
    /// index.
    ///
    /// ```
    /// use candle_finetune::data::{parquet::write_shard, Dataset};
    /// let dir = tempfile::tempdir().unwrap();
    /// let p = dir.path().join("a.parquet");
    /// write_shard(&p, &[(vec![1, 2], 0)], &["x".into()]).unwrap();
    /// assert_eq!(Dataset::from_parquet(&[p]).unwrap().len(), 1);
    /// ```
    pub fn from_parquet(paths: &[PathBuf]) -> Result<Self> {
        let Some(first) = paths.first() else {
            bail!("dataset: no parquet files given");
        };
        let (stored, declared) = parquet::inspect(first).map_err(candle_core::Error::Msg)?;
        let columns = features::resolve(
            &stored,
            declared.as_ref(),
            &features::ColumnChoice::default(),
        )?;
        Self::from_parquet_columns(paths, &columns)
    }

    /// Reads parquet shards with the image and class columns of `columns`: the labels now, the
    /// images when the loader wants them (see [`stream`]), through a cache of
    /// [`stream::DEFAULT_CACHE_BYTES`]. Classes are named by
    /// [`features::Columns::class_names`], else "0".."max label"; a label outside them is an
    /// error naming the file and row.
    pub fn from_parquet_columns(paths: &[PathBuf], columns: &features::Columns) -> Result<Self> {
        let cache = stream::RowGroupCache::new(stream::DEFAULT_CACHE_BYTES);
        Self::from_parquet_streaming(paths, columns, &cache)
    }

    /// [`Dataset::from_parquet_columns`] reading images through `cache` (one cache for the
    /// splits of a dataset keeps their sum bounded).
    pub fn from_parquet_streaming(
        paths: &[PathBuf],
        columns: &features::Columns,
        cache: &Arc<stream::RowGroupCache>,
    ) -> Result<Self> {
        if paths.is_empty() {
            bail!("dataset: no parquet files given");
        }
        let mut ds = Dataset::default();
        let mut max_label = -1i64;
        let limit = columns
            .class_names
            .as_ref()
            .map_or(u32::MAX as i64, |n| n.len() as i64 - 1);
        for p in paths {
            let file = stream::ParquetFile::open(p, &columns.image, cache.clone())
                .map_err(candle_core::Error::Msg)?;
            let labels =
                parquet::read_labels(p, &columns.label).map_err(candle_core::Error::Msg)?;
            let rows: usize = file.group_rows.iter().sum();
            if rows != labels.len() {
                bail!(
                    "dataset: {} has {rows} rows in its row groups but {} labels",
                    p.display(),
                    labels.len()
                );
            }
            let mut i = 0;
            for (g, &n) in file.group_rows.iter().enumerate() {
                for r in 0..n {
                    let label = labels[i];
                    if label < 0 || label > limit {
                        match &columns.class_names {
                            Some(names) => bail!(
                                "dataset: {} row {i} has label {label}, outside the {} classes",
                                p.display(),
                                names.len()
                            ),
                            None => bail!("dataset: {} row {i} has label {label}", p.display()),
                        }
                    }
                    max_label = max_label.max(label);
                    ds.samples.push(Sample {
                        image: ImageData::Parquet {
                            file: file.clone(),
                            group: g as u32,
                            row: r as u32,
                        },
                        label: label as u32,
                    });
                    i += 1;
                }
            }
        }
        ds.class_names = match &columns.class_names {
            Some(n) => n.clone(),
            None => (0..=max_label).map(|i| i.to_string()).collect(),
        };
        Ok(ds)
    }

    /// The encoded bytes of sample `i` (read from its file or parquet row group if need be).
    ///
    /// ```
    /// use candle_finetune::data::{Dataset, ImageData, Sample};
    /// let ds = Dataset { samples: vec![Sample { image: ImageData::Encoded(vec![7u8].into()), label: 0 }], class_names: vec!["a".into()] };
    /// assert_eq!(&*ds.encoded(0).unwrap(), &[7u8]);
    /// ```
    pub fn encoded(&self, i: usize) -> std::result::Result<Arc<[u8]>, String> {
        let s = self
            .samples
            .get(i)
            .ok_or_else(|| format!("sample {i} out of range"))?;
        match &s.image {
            ImageData::Encoded(b) => Ok(b.clone()),
            ImageData::File(p) => std::fs::read(p)
                .map(Arc::from)
                .map_err(|e| format!("{}: {e}", p.display())),
            ImageData::Parquet { file, group, row } => file.image(*group as usize, *row as usize),
        }
    }

    /// The sample order of an epoch: a permutation of `0..len` drawn from `(seed, epoch)`.
    /// Images that live in parquet row groups are ordered a window of row groups at a time
    /// (the row groups shuffled, then the images of each window shuffled; a window holds
    /// about [`ORDER_WINDOW_IMAGES`] images and at most a quarter of the cache's bytes), so
    /// that streaming reads each row group about once an epoch; other images are shuffled
    /// as a whole.
    ///
    /// ```
    /// use candle_finetune::data::{Dataset, ImageData, Sample};
    /// let samples = (0..10).map(|i| Sample { image: ImageData::Encoded(vec![].into()), label: i % 2 }).collect();
    /// let ds = Dataset { samples, class_names: vec!["a".into(), "b".into()] };
    /// let mut o = ds.order(1, 0);
    /// assert_ne!(o, (0..10).collect::<Vec<_>>());
    /// o.sort();
    /// assert_eq!(o, (0..10).collect::<Vec<_>>());
    /// ```
    pub fn order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        use rand::seq::SliceRandom;
        let mut rng = sample_rng(seed, epoch, u64::MAX);
        // Units: a parquet row group's samples, or one sample.
        let mut units: Vec<(Vec<usize>, usize)> = Vec::new(); // (indices, bytes)
        let mut by_group: std::collections::HashMap<(usize, u32), usize> =
            std::collections::HashMap::new();
        let mut capacity = usize::MAX;
        for (i, s) in self.samples.iter().enumerate() {
            match &s.image {
                ImageData::Parquet { file, group, .. } => {
                    capacity = capacity.min(file.cache_capacity());
                    let key = (file.id(), *group);
                    match by_group.get(&key) {
                        Some(&u) => units[u].0.push(i),
                        None => {
                            by_group.insert(key, units.len());
                            let bytes = file.group_bytes.get(*group as usize).copied().unwrap_or(0);
                            units.push((vec![i], bytes));
                        }
                    }
                }
                _ => units.push((vec![i], 0)),
            }
        }
        units.shuffle(&mut rng);
        let max_bytes = if capacity == usize::MAX {
            usize::MAX
        } else {
            capacity / 4
        };
        let mut out = Vec::with_capacity(self.len());
        let mut window: Vec<usize> = Vec::new();
        let mut window_bytes = 0usize;
        for (idx, bytes) in units {
            let full = !window.is_empty()
                && (window.len() >= ORDER_WINDOW_IMAGES
                    || window_bytes.saturating_add(bytes) > max_bytes);
            if full {
                window.shuffle(&mut rng);
                out.append(&mut window);
                window_bytes = 0;
            }
            window.extend(idx);
            window_bytes = window_bytes.saturating_add(bytes);
        }
        window.shuffle(&mut rng);
        out.append(&mut window);
        out
    }

    /// A split of Stanford Cars from [`DEFAULT_DATASET_REPO`] at [`DEFAULT_DATASET_REVISION`].
    ///
    /// ```no_run
    /// use candle_finetune::{data::{Dataset, Split}, hub::HubOptions};
    /// let train = Dataset::stanford_cars(&HubOptions::from_env(), Split::Train).unwrap();
    /// assert_eq!(train.num_classes(), 196);
    /// ```
    pub fn stanford_cars(opts: &HubOptions, split: Split) -> Result<Self> {
        DataSource::default()
            .load(opts, &features::ColumnChoice::default(), split)?
            .with_stanford_cars_names()
    }

    /// Names the classes with the 196 Stanford Cars names of
    /// [`STANFORD_CARS_CLASSES_JSON`] when the shards carried no names (classes
    /// named by index); a dataset with real names is returned as is, one whose class count is
    /// not 196 is an error.
    ///
    /// ```
    /// use candle_finetune::data::Dataset;
    /// let ds = Dataset { samples: vec![], class_names: (0..196).map(|i| i.to_string()).collect() };
    /// let ds = ds.with_stanford_cars_names().unwrap();
    /// assert_eq!(ds.class_names[0], "AM General Hummer SUV 2000");
    /// ```
    pub fn with_stanford_cars_names(mut self) -> Result<Self> {
        let by_index = self
            .class_names
            .iter()
            .enumerate()
            .all(|(i, n)| *n == i.to_string());
        if !by_index {
            return Ok(self);
        }
        let names: Vec<String> =
            serde_json::from_str(STANFORD_CARS_CLASSES_JSON).map_err(candle_core::Error::wrap)?;
        if self.class_names.len() != names.len() {
            bail!(
                "dataset: {} unnamed classes, but Stanford Cars has {}",
                self.class_names.len(),
                names.len()
            );
        }
        self.class_names = names;
        Ok(self)
    }

    /// An image folder: one sub-folder per class (sorted by name), JPEG/PNG files inside
    /// (`.jpg`, `.jpeg`, `.png`, any case), sorted by path.
    pub fn from_image_folder(root: &Path) -> Result<Self> {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|e| candle_core::Error::Msg(format!("image folder {}: {e}", root.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        if classes.is_empty() {
            bail!("image folder {} has no class sub-folders", root.display());
        }
        let mut ds = Dataset::default();
        for (label, dir) in classes.iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                        })
                })
                .collect();
            files.sort();
            ds.class_names.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            ds.samples.extend(files.into_iter().map(|f| Sample {
                image: ImageData::File(f),
                label: label as u32,
            }));
        }
        Ok(ds)
    }

    /// Relabels the samples to the class order `names` (e.g. a model's `id2label`), matching by
    /// class name; a class of the dataset missing from `names` is an error.
    ///
    /// ```
    /// use candle_finetune::data::{Dataset, ImageData, Sample};
    /// let ds = Dataset { samples: vec![Sample { image: ImageData::Encoded(vec![].into()), label: 0 }], class_names: vec!["b".into()] };
    /// let r = ds.remap_to(&["a".into(), "b".into()]).unwrap();
    /// assert_eq!((r.samples[0].label, r.num_classes()), (1, 2));
    /// assert!(ds.remap_to(&["a".into()]).is_err());
    /// ```
    pub fn remap_to(&self, names: &[String]) -> Result<Dataset> {
        let map = self
            .class_names
            .iter()
            .map(|n| {
                names
                    .iter()
                    .position(|m| m == n)
                    .map(|p| p as u32)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "dataset class {n:?} is not a class of the model"
                        ))
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(Dataset {
            samples: self
                .samples
                .iter()
                .map(|s| Sample {
                    image: s.image.clone(),
                    label: map[s.label as usize],
                })
                .collect(),
            class_names: names.to_vec(),
        })
    }

    /// Decodes sample `i` to RGB.
    ///
    /// ```
    /// let ds = candle_finetune::data::Dataset::default();
    /// assert!(ds.load_image(0).is_err());
    /// ```
    pub fn load_image(&self, i: usize) -> std::result::Result<RgbImage, String> {
        let s = self
            .samples
            .get(i)
            .ok_or_else(|| format!("sample {i} out of range"))?;
        match &s.image {
            ImageData::Encoded(b) => decode_rgb(b),
            ImageData::File(p) => {
                let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                decode_rgb(&bytes).map_err(|e| format!("{}: {e}", p.display()))
            }
            ImageData::Parquet { file, group, row } => {
                let bytes = file.image(*group as usize, *row as usize)?;
                decode_rgb(&bytes).map_err(|e| {
                    format!("{} row group {group} row {row}: {e}", file.path().display())
                })
            }
        }
    }
}
