//! Parquet images read as the loader needs them: a split is its labels and, per image, the file,
//! row group and row where its bytes are; the bytes of a row group are read when one of its
//! images is first wanted and kept in a cache bounded in bytes ([`RowGroupCache`]), so that a
//! dataset far larger than memory trains at flat resident memory. The epoch order
//! ([`super::Dataset::order`]) visits row groups in a shuffled order, a window of them at a time,
//! shuffling the images within each window, so that each row group is read about once an epoch.

use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The cache's default bound: 256 MiB of encoded images.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

/// The images of one row group, in row order.
type Group = Arc<Vec<Arc<[u8]>>>;
type Slot = Arc<OnceLock<Result<Group, String>>>;

struct Inner {
    /// (file id, row group) -> the slot and its size in bytes once read (0 while reading).
    map: HashMap<(usize, usize), (Slot, usize)>,
    /// Least recently used first.
    order: VecDeque<(usize, usize)>,
    bytes: usize,
}

/// Row groups read recently, bounded in bytes (least recently used dropped first). Shared by
/// the files of a dataset (and its splits); each row group is read by one thread while others
/// that want it wait.
pub struct RowGroupCache {
    capacity: usize,
    inner: Mutex<Inner>,
    reads: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for RowGroupCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.inner.lock().map(|i| i.bytes).unwrap_or(0);
        f.debug_struct("RowGroupCache")
            .field("capacity", &self.capacity)
            .field("bytes", &bytes)
            .finish()
    }
}

impl RowGroupCache {
    /// A cache holding at most about `capacity` bytes of encoded images (the row group being
    /// read is always kept).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            reads: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Row groups read from disk so far (a row group read again after being dropped counts
    /// again).
    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }

    fn get(
        &self,
        key: (usize, usize),
        load: impl FnOnce() -> Result<Group, String>,
    ) -> Result<Group, String> {
        let slot = {
            let mut g = self
                .inner
                .lock()
                .map_err(|_| "row group cache poisoned".to_string())?;
            match g.map.get(&key) {
                Some((s, _)) => {
                    let s = s.clone();
                    if let Some(p) = g.order.iter().position(|k| *k == key) {
                        g.order.remove(p);
                    }
                    g.order.push_back(key);
                    s
                }
                None => {
                    let s: Slot = Arc::new(OnceLock::new());
                    g.map.insert(key, (s.clone(), 0));
                    g.order.push_back(key);
                    s
                }
            }
        };
        let mut fresh = false;
        let got = slot
            .get_or_init(|| {
                fresh = true;
                self.reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                load()
            })
            .clone();
        if fresh {
            let size = got
                .as_ref()
                .map_or(0, |g| g.iter().map(|b| b.len()).sum::<usize>());
            let mut g = self
                .inner
                .lock()
                .map_err(|_| "row group cache poisoned".to_string())?;
            if let Some(e) = g.map.get_mut(&key) {
                e.1 = size;
                g.bytes += size;
            }
            // Drop the least recently used groups that are read, never the one just read.
            let mut i = 0;
            while g.bytes > self.capacity && i < g.order.len() {
                let k = g.order[i];
                let size = g.map.get(&k).map_or(0, |e| e.1);
                if k == key || size == 0 {
                    i += 1;
                    continue;
                }
                g.order.remove(i);
                g.map.remove(&k);
                g.bytes -= size;
            }
            if got.is_err() {
                // A failed read is not kept: the next request tries again.
                g.map.remove(&key);
                if let Some(p) = g.order.iter().position(|k| *k == key) {
                    g.order.remove(p);
                }
            }
        }
        got
    }
}

/// One parquet file of a split: where it is, which column holds the images, and its row
/// groups.
#[derive(Debug)]
pub struct ParquetFile {
    id: usize,
    path: PathBuf,
    image_column: String,
    metadata: ArrowReaderMetadata,
    /// Rows per row group.
    pub group_rows: Vec<usize>,
    /// Uncompressed bytes of the image column per row group (the footer's figure).
    pub group_bytes: Vec<usize>,
    cache: Arc<RowGroupCache>,
}

static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl ParquetFile {
    /// Opens `path` (its footer only) to read `image_column` through `cache`.
    pub fn open(
        path: &Path,
        image_column: &str,
        cache: Arc<RowGroupCache>,
    ) -> Result<Arc<Self>, String> {
        let ctx = |e: &dyn std::fmt::Display| format!("parquet {}: {e}", path.display());
        let file = std::fs::File::open(path).map_err(|e| ctx(&e))?;
        let metadata =
            ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|e| ctx(&e))?;
        let md = metadata.metadata();
        let schema = md.file_metadata().schema_descr();
        let leaves: Vec<usize> = (0..schema.num_columns())
            .filter(|&i| schema.get_column_root(i).name() == image_column)
            .collect();
        if leaves.is_empty() {
            return Err(ctx(&format!("no `{image_column}` column")));
        }
        let group_rows = md
            .row_groups()
            .iter()
            .map(|g| g.num_rows().max(0) as usize)
            .collect();
        let group_bytes = md
            .row_groups()
            .iter()
            .map(|g| {
                leaves
                    .iter()
                    .map(|&i| g.column(i).uncompressed_size().max(0) as usize)
                    .sum()
            })
            .collect();
        Ok(Arc::new(Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            path: path.to_path_buf(),
            image_column: image_column.to_string(),
            metadata,
            group_rows,
            group_bytes,
            cache,
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bound of the cache this file reads through.
    pub fn cache_capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// A number that tells files apart (for grouping samples by row group).
    pub fn id(&self) -> usize {
        self.id
    }

    /// The encoded image of `row` in `group`.
    pub fn image(&self, group: usize, row: usize) -> Result<Arc<[u8]>, String> {
        let g = self
            .cache
            .get((self.id, group), || self.read_group(group))?;
        g.get(row).cloned().ok_or_else(|| {
            format!(
                "parquet {}: row group {group} has no row {row}",
                self.path.display()
            )
        })
    }

    fn read_group(&self, group: usize) -> Result<Group, String> {
        let ctx = |e: &dyn std::fmt::Display| format!("parquet {}: {e}", self.path.display());
        let file = std::fs::File::open(&self.path).map_err(|e| ctx(&e))?;
        let b = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone());
        let schema = b.parquet_schema();
        let leaves: Vec<usize> = (0..schema.num_columns())
            .filter(|&i| schema.get_column_root(i).name() == self.image_column)
            .collect();
        let mask = ProjectionMask::leaves(schema, leaves);
        let reader = b
            .with_projection(mask)
            .with_row_groups(vec![group])
            .build()
            .map_err(|e| ctx(&e))?;
        let mut out = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| ctx(&e))?;
            out.extend(
                super::parquet::image_bytes(&batch, &self.image_column).map_err(|e| ctx(&e))?,
            );
        }
        Ok(Arc::new(out))
    }
}
