//! Batches: per-epoch shuffling, parallel decode + transform (rayon) on a producer thread that
//! keeps `prefetch` batches ready while the model trains.

use super::{Dataset, Transform};
use candle_core::{bail, Device, Result, Tensor};
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The `index` stream of [`super::sample_rng`] the batches' mixup draws come from (apart from
/// the per-image augmentations, which use the image's index).
const MIXUP_STREAM: u64 = 1 << 62;

/// The `index` stream of [`super::sample_rng`] the random erasing of image `i` draws from
/// (`ERASING_STREAM + i`).
const ERASING_STREAM: u64 = 1 << 61;

/// Batching options.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle the order every epoch (from `seed` and the epoch number).
    pub shuffle: bool,
    /// Drop the last, smaller batch.
    pub drop_last: bool,
    /// Seed of the order and of the random transforms.
    pub seed: u64,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Mixup / CutMix applied to each batch on the loader's thread (draws from `seed`, the
    /// epoch and the batch's position); batches then carry soft [`Batch::targets`].
    pub mixup: Option<super::mixup::Mixup>,
    /// Random erasing of each image after its transform (draws from `seed`, the epoch and the
    /// image's index).
    pub erasing: Option<super::erasing::RandomErasing>,
    /// This process's part of every batch in data-parallel training: `batch_size` is then the
    /// global batch, each rank taking its contiguous slice of each (see [`Shard`]).
    pub shard: Shard,
}

/// Rank `rank` of `world` data-parallel processes: of every batch of the epoch's order (the
/// same on every rank), the rank takes images `rank * n / world .. (rank + 1) * n / world`, so
/// the ranks' batches at one position are disjoint and together are the one-process batch.
/// The default is the one-process world.
///
/// ```
/// let s = candle_finetune::data::Shard { rank: 1, world: 4 };
/// assert_eq!(s.range(10), 2..5);
/// assert_eq!(candle_finetune::data::Shard::default().range(10), 0..10);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank, in `0..world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { rank: 0, world: 1 }
    }
}

impl Shard {
    /// This rank's slice of a batch of `n` images.
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        let w = self.world.max(1);
        self.rank * n / w..(self.rank + 1) * n / w
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            shuffle: true,
            drop_last: false,
            seed: 0,
            prefetch: 2,
            mixup: None,
            erasing: None,
            shard: Shard::default(),
        }
    }
}

/// One batch: `(N, 3, S, S)` f32 images on the CPU, `(N,)` u32 labels, and the dataset indices.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Normalised images.
    pub images: Tensor,
    /// Class indices.
    pub labels: Tensor,
    /// Dataset index of each image.
    pub indices: Vec<usize>,
    /// Soft targets `(N, classes)` f32 when the loader mixes (Mixup / CutMix, label smoothing
    /// included); `None`: train on [`Batch::labels`].
    pub targets: Option<Tensor>,
    /// Position of the batch in its epoch (0-based; a batch whose every image was undecodable
    /// is not sent, so positions can skip).
    pub position: usize,
}

/// What an epoch skipped: `(dataset index, reason)` for every image that could not be decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochReport {
    /// Images delivered.
    pub images: usize,
    /// Seconds spent reading, decoding and transforming images, summed over the threads that
    /// did it (CPU time of the data pipeline; divide by `images` for the cost per image).
    pub busy_s: f64,
    /// Undecodable images.
    pub skipped: Vec<(usize, String)>,
}

impl std::fmt::Display for EpochReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} images", self.images)?;
        if !self.skipped.is_empty() {
            write!(f, ", {} skipped:", self.skipped.len())?;
            for (i, why) in self.skipped.iter().take(10) {
                write!(f, "\n  sample {i}: {why}")?;
            }
            if self.skipped.len() > 10 {
                write!(f, "\n  ... and {} more", self.skipped.len() - 10)?;
            }
        }
        Ok(())
    }
}

/// A dataset, a transform and a batching policy.
///
/// ```
/// use std::sync::Arc;
/// use candle_finetune::data::{Dataset, Loader, LoaderConfig, Preprocess, Transform};
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::create_dir(dir.path().join("a")).unwrap();
/// for i in 0..3 {
///     image::RgbImage::new(40, 30).save(dir.path().join("a").join(format!("{i}.png"))).unwrap();
/// }
/// let ds = Arc::new(Dataset::from_image_folder(dir.path()).unwrap());
/// let t = Transform::for_training(Preprocess { size: 16, ..Default::default() });
/// let loader = Loader::new(ds, t, LoaderConfig { batch_size: 2, ..Default::default() }).unwrap();
/// let mut epoch = loader.epoch(0);
/// let sizes: Vec<usize> = epoch.by_ref().map(|b| b.unwrap().indices.len()).collect();
/// assert_eq!(sizes, [2, 1]);
/// assert_eq!(epoch.finish().images, 3);
/// ```
pub struct Loader {
    dataset: Arc<Dataset>,
    transform: Transform,
    cfg: LoaderConfig,
}

impl Loader {
    /// A loader; `batch_size`, `prefetch` and the transform's image size must be positive.
    pub fn new(dataset: Arc<Dataset>, transform: Transform, cfg: LoaderConfig) -> Result<Self> {
        if cfg.shard.world == 0 || cfg.shard.rank >= cfg.shard.world {
            bail!(
                "loader: rank {} does not exist in a world of {} processes",
                cfg.shard.rank,
                cfg.shard.world
            );
        }
        if !cfg.batch_size.is_multiple_of(cfg.shard.world) {
            bail!(
                "loader: the global batch size {} is not divisible by the {} data-parallel \
                 processes (each takes batch_size / world images)",
                cfg.batch_size,
                cfg.shard.world
            );
        }
        if cfg.batch_size == 0 || cfg.prefetch == 0 {
            bail!("loader: batch_size and prefetch must be positive, got {cfg:?}");
        }
        if transform.pre.size == 0 {
            bail!(
                "loader: the image size must be positive, got {:?}",
                transform.pre
            );
        }
        Ok(Self {
            dataset,
            transform,
            cfg,
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Images per batch (all ranks together when sharded).
    pub fn batch_size(&self) -> usize {
        self.cfg.batch_size
    }

    /// This loader's data-parallel shard.
    pub fn shard(&self) -> super::Shard {
        self.cfg.shard
    }

    /// Batches per epoch (before any skipped image).
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// The sample order of an epoch ([`super::Dataset::order`] when shuffling, else index
    /// order).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        if self.cfg.shuffle {
            self.dataset.order(self.cfg.seed, epoch)
        } else {
            (0..self.dataset.len()).collect()
        }
    }

    /// Starts producing the batches of `epoch` in the background.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` after its first `skip` (which are not read): where a run resumed
    /// mid-epoch continues, with the same images and augmentations as an uninterrupted epoch.
    pub fn epoch_from(&self, epoch: u64, skip: usize) -> EpochIter {
        let (tx, rx) = sync_channel(self.cfg.prefetch);
        let mut order = self.order(epoch);
        order.drain(..(skip * self.cfg.batch_size).min(order.len()));
        let ds = self.dataset.clone();
        let t = self.transform.clone();
        let cfg = self.cfg.clone();
        let handle = std::thread::Builder::new()
            .name(format!("loader-epoch-{epoch}"))
            .spawn(move || {
                let mut report = EpochReport::default();
                let s = t.pre.size as usize;
                let per = 3 * s * s;
                for (position, global) in order.chunks(cfg.batch_size).enumerate() {
                    let position = position + skip;
                    if cfg.drop_last && global.len() < cfg.batch_size {
                        break;
                    }
                    let chunk = &global[cfg.shard.range(global.len())];
                    let mut buf = vec![0f32; chunk.len() * per];
                    let timed: Vec<(std::result::Result<(), String>, f64)> = buf
                        .par_chunks_mut(per)
                        .zip(chunk.par_iter())
                        .map(|(out, &i)| {
                            let t0 = std::time::Instant::now();
                            let r = ds
                                .load_image(i)
                                .and_then(|img| t.apply(&img, cfg.seed, epoch, i as u64, out))
                                .and_then(|()| match &cfg.erasing {
                                    Some(e) => {
                                        let mut rng = super::sample_rng(
                                            cfg.seed,
                                            epoch,
                                            ERASING_STREAM + i as u64,
                                        );
                                        let boxes = e.plan(s, s, &mut rng);
                                        e.apply(&boxes, out, (3, s, s), &mut rng)
                                            .map_err(|e| e.to_string())
                                    }
                                    None => Ok(()),
                                });
                            (r, t0.elapsed().as_secs_f64())
                        })
                        .collect();
                    report.busy_s += timed.iter().map(|(_, s)| s).sum::<f64>();
                    let results = timed.into_iter().map(|(r, _)| r);
                    let mut kept = Vec::with_capacity(chunk.len());
                    for (slot, (r, &i)) in results.zip(chunk).enumerate() {
                        match r {
                            Ok(()) => {
                                if kept.len() != slot {
                                    buf.copy_within(slot * per..(slot + 1) * per, kept.len() * per);
                                }
                                kept.push(i);
                            }
                            Err(why) => report.skipped.push((i, why)),
                        }
                    }
                    // One process skips a position without images; data-parallel ranks keep
                    // it (an empty batch) so that every rank steps at every position.
                    if kept.is_empty() && cfg.shard.world == 1 {
                        continue;
                    }
                    buf.truncate(kept.len() * per);
                    report.images += kept.len();
                    let labels: Vec<u32> = kept.iter().map(|&i| ds.samples[i].label).collect();
                    let batch = (|| -> Result<Batch> {
                        let targets = match &cfg.mixup {
                            Some(m) if !kept.is_empty() => {
                                // Each rank mixes its own slice with its own draws.
                                let stream = (position * cfg.shard.world + cfg.shard.rank) as u64;
                                let mut rng =
                                    super::sample_rng(cfg.seed, epoch, MIXUP_STREAM + stream);
                                let plan = m.plan(kept.len(), s, s, &mut rng)?;
                                let t = m.apply(&plan, &mut buf, &labels, (3, s, s))?;
                                Some(Tensor::from_vec(
                                    t,
                                    (kept.len(), m.num_classes),
                                    &Device::Cpu,
                                )?)
                            }
                            _ => None,
                        };
                        Ok(Batch {
                            images: Tensor::from_vec(buf, (kept.len(), 3, s, s), &Device::Cpu)?,
                            labels: Tensor::new(labels.as_slice(), &Device::Cpu)?,
                            targets,
                            indices: kept,
                            position,
                        })
                    })();
                    if tx.send(batch).is_err() {
                        break; // the consumer went away
                    }
                }
                report
            })
            .expect("cannot spawn the loader thread");
        EpochIter {
            rx,
            handle: Some(handle),
            report: None,
        }
    }
}

/// The batches of one epoch; [`EpochIter::finish`] returns what was skipped.
pub struct EpochIter {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<EpochReport>>,
    /// The producer's report, once `next` has joined it.
    report: Option<EpochReport>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.rx.recv() {
            Ok(b) => Some(b),
            // The producer is gone: the epoch's end, or a panic there, which is this epoch's
            // error rather than a silent early end.
            Err(_) => match self.handle.take().map(|h| h.join()) {
                Some(Err(p)) => {
                    let why = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "(no message)".into());
                    Some(Err(candle_core::Error::Msg(format!(
                        "loader: the batch producer panicked: {why}"
                    ))))
                }
                Some(Ok(report)) => {
                    self.report = Some(report);
                    None
                }
                None => None,
            },
        }
    }
}

impl EpochIter {
    /// Waits for the producer and returns the epoch's report (images delivered, images skipped
    /// with the reason). Call after the last batch.
    pub fn finish(self) -> EpochReport {
        let mut this = self;
        // Drain so a producer blocked on a full channel can finish.
        while this.rx.recv().is_ok() {}
        if let Some(r) = this.report.take() {
            return r;
        }
        this.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// Stops the producer (batches not taken yet are not made) and returns the report of what
    /// was produced.
    pub fn stop(self) -> EpochReport {
        let EpochIter {
            rx,
            mut handle,
            report,
        } = self;
        if let Some(r) = report {
            return r;
        }
        drop(rx);
        handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}
