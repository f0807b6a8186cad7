//! Parquet images read as the loader needs them: every image decodes as stored, the cache stays
//! within its bound, and a shuffled epoch reads each row group about once.

use candle_finetune::data::features::Columns;
use candle_finetune::data::parquet::{write_shard_with, ShardLayout};
use candle_finetune::data::stream::RowGroupCache;
use candle_finetune::data::{Dataset, ImageData, Loader, LoaderConfig, Transform};
use std::sync::Arc;

/// `shards` files of `per` generated images in row groups of `group` rows; returns the paths
/// and the images in order.
fn shards(
    dir: &std::path::Path,
    shards: usize,
    per: usize,
    group: usize,
) -> (Vec<std::path::PathBuf>, Vec<Vec<u8>>) {
    let mut paths = Vec::new();
    let mut all = Vec::new();
    for k in 0..shards {
        let ds = candle_finetune::smoke::generated_dataset(per, 1, 100 + k as u64);
        let rows: Vec<(Vec<u8>, i64)> = (0..ds.len())
            .map(|i| (ds.encoded(i).unwrap().to_vec(), ds.samples[i].label as i64))
            .collect();
        all.extend(rows.iter().map(|r| r.0.clone()));
        let p = dir.join(format!("train-{k}.parquet"));
        let layout = ShardLayout {
            rows_per_group: group,
            ..Default::default()
        };
        write_shard_with(
            &p,
            &rows,
            &(0..6).map(|i| i.to_string()).collect::<Vec<_>>(),
            &layout,
        )
        .unwrap();
        paths.push(p);
    }
    (paths, all)
}

fn columns() -> Columns {
    Columns {
        image: "image".into(),
        label: "label".into(),
        class_names: None,
    }
}

#[test]
fn streamed_images_are_the_stored_bytes_and_the_cache_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, images) = shards(dir.path(), 3, 50, 8);
    // Room for about two row groups of ~3 KB images.
    let cache = RowGroupCache::new(60_000);
    let ds = Dataset::from_parquet_streaming(&paths, &columns(), &cache).unwrap();
    assert_eq!(ds.len(), 150);
    assert!(ds
        .samples
        .iter()
        .all(|s| matches!(s.image, ImageData::Parquet { .. })));
    assert_eq!(cache.reads(), 0, "opening reads labels only");
    let mut peak = 0;
    for i in (0..ds.len()).rev() {
        assert_eq!(&*ds.encoded(i).unwrap(), images[i].as_slice(), "image {i}");
        peak = peak.max(cache.bytes());
    }
    let largest_group = 8 * images.iter().map(|b| b.len()).max().unwrap();
    assert!(
        peak <= cache.capacity() + largest_group,
        "cache held {peak} bytes, bound {}",
        cache.capacity()
    );
    assert!(ds.load_image(3).is_ok());
}

#[test]
fn a_shuffled_epoch_reads_each_row_group_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = shards(dir.path(), 2, 64, 16); // 8 row groups
    let cache = RowGroupCache::new(8 << 20);
    let ds = Arc::new(Dataset::from_parquet_streaming(&paths, &columns(), &cache).unwrap());
    let order = ds.order(5, 0);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..128).collect::<Vec<_>>(), "a permutation");
    assert_ne!(order, (0..128).collect::<Vec<_>>(), "shuffled");
    assert_ne!(order, ds.order(5, 1), "each epoch its own order");
    let loader = Loader::new(
        ds.clone(),
        Transform::for_training(candle_finetune::data::Preprocess {
            size: 16,
            ..Default::default()
        }),
        LoaderConfig {
            batch_size: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let mut seen = 0;
    let mut it = loader.epoch(0);
    for b in it.by_ref() {
        seen += b.unwrap().indices.len();
    }
    assert!(it.finish().skipped.is_empty());
    assert_eq!(seen, 128);
    assert_eq!(cache.reads(), 8, "8 row groups, each read once");
}

#[test]
fn a_corrupt_row_group_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = shards(dir.path(), 1, 20, 5);
    let cache = RowGroupCache::new(1 << 20);
    let ds = Dataset::from_parquet_streaming(&paths, &columns(), &cache).unwrap();
    // The file changes under the run: truncated, its last row group gone.
    let bytes = std::fs::read(&paths[0]).unwrap();
    std::fs::write(&paths[0], &bytes[..bytes.len() / 3]).unwrap();
    let e = match ds.encoded(19) {
        Ok(b) => panic!("read {} bytes of a truncated file", b.len()),
        Err(e) => e,
    };
    assert!(e.contains("train-0.parquet"), "{e}");
    assert!(ds.load_image(19).unwrap_err().contains("train-0.parquet"));
    // Missing columns are found when the file is opened.
    let e = Dataset::from_parquet_streaming(&paths[..0], &columns(), &cache).unwrap_err();
    assert!(e.to_string().contains("no parquet files"), "{e}");
}
