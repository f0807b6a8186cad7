//! Data-parallel sharding of the loader: at every position the ranks' batches are disjoint,
//! in rank order they are the one-process batch (the same images, with the same augmentation
//! and pixels), a rank may get an empty batch at the last position, and bad worlds are errors.

use candle_finetune::data::{Loader, LoaderConfig, Preprocess, Shard, Transform};
use std::sync::Arc;

fn loader(ds: &Arc<candle_finetune::data::Dataset>, shard: Shard) -> Loader {
    Loader::new(
        ds.clone(),
        Transform::for_training(Preprocess {
            size: 16,
            ..Default::default()
        }),
        LoaderConfig {
            batch_size: 6,
            seed: 4,
            shard,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn ranks_split_every_batch_of_the_one_process_order() {
    let ds = Arc::new(candle_finetune::smoke::generated_dataset(20, 1, 3));
    let single = loader(&ds, Shard::default());
    let world = 3;
    let ranks: Vec<Loader> = (0..world)
        .map(|rank| loader(&ds, Shard { rank, world }))
        .collect();
    for epoch in [0u64, 1] {
        let whole: Vec<_> = single.epoch(epoch).map(|b| b.unwrap()).collect();
        assert_eq!(whole.len(), 4); // 6 + 6 + 6 + 2
        let parts: Vec<Vec<_>> = ranks
            .iter()
            .map(|l| l.epoch(epoch).map(|b| b.unwrap()).collect())
            .collect();
        for w in &whole {
            let mut joined_idx = Vec::new();
            let mut joined_px = Vec::new();
            for p in &parts {
                if let Some(b) = p.iter().find(|b| b.position == w.position) {
                    joined_idx.extend(b.indices.iter().copied());
                    joined_px.extend(b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
            }
            assert_eq!(
                joined_idx, w.indices,
                "epoch {epoch} position {}",
                w.position
            );
            assert_eq!(
                joined_px,
                w.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "the same pixels"
            );
        }
        // Full batches give every rank 2 images; the last (2 images) gives ranks 1 and 2 one
        // each and rank 0 an empty batch, which it still gets so that every rank steps at
        // every position.
        for (r, p) in parts.iter().enumerate() {
            assert_eq!(p.len(), 4);
            for b in p {
                let want = match (b.position, r) {
                    (3, 0) => 0,
                    (3, _) => 1,
                    _ => 2,
                };
                assert_eq!(b.indices.len(), want, "rank {r} position {}", b.position);
                assert_eq!(b.images.dims()[0], want);
            }
        }
        assert_eq!(single.num_batches(), ranks[0].num_batches());
    }
}

#[test]
fn bad_worlds_are_errors() {
    let ds = Arc::new(candle_finetune::smoke::generated_dataset(4, 1, 3));
    let make = |batch_size: usize, shard: Shard| {
        Loader::new(
            ds.clone(),
            Transform::for_eval(Preprocess {
                size: 8,
                ..Default::default()
            }),
            LoaderConfig {
                batch_size,
                shard,
                ..Default::default()
            },
        )
        .err()
        .map(|e| e.to_string())
    };
    let e = make(6, Shard { rank: 0, world: 4 }).unwrap();
    assert!(e.contains("not divisible") && e.contains('4'), "{e}");
    let e = make(4, Shard { rank: 4, world: 4 }).unwrap();
    assert!(e.contains("rank 4"), "{e}");
    assert!(make(4, Shard { rank: 0, world: 0 }).is_some());
    assert!(make(8, Shard { rank: 3, world: 4 }).is_none());
}
