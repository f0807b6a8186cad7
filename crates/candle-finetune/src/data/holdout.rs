//! A validation split held out of the training images, for data that has none: stratified by
//! class and seeded, so the same seed and data always hold out the same images (on resume too).

use super::{sample_rng, Dataset};
use candle_core::{bail, Result};
use rand::seq::SliceRandom;

/// The stream of [`sample_rng`] the hold-out draws from (apart from every epoch's).
const HOLDOUT_STREAM: u64 = u64::MAX - 1;

/// Splits `ds` into `(train, validation)`: `round(fraction * len)` images (at least one when
/// `fraction > 0` and there are two or more) go to validation, shared among the classes in
/// proportion to their sizes (largest remainders), each class's drawn by a shuffle seeded with
/// `seed` and the class; the rest stay in training (both in their original order). `fraction`
/// must lie in `[0, 1)`; 0 holds out nothing. A class keeps at least one training image.
///
/// ```
/// use candle_finetune::data::{holdout::stratified, Dataset, ImageData, Sample};
/// let samples = (0..40).map(|i| Sample { image: ImageData::Encoded(vec![i as u8].into()), label: (i % 4) as u32 }).collect();
/// let ds = Dataset { samples, class_names: ["a", "b", "c", "d"].map(String::from).to_vec() };
/// let (train, val) = stratified(&ds, 0.2, 7).unwrap();
/// assert_eq!((train.len(), val.len()), (32, 8));
/// assert_eq!(val.class_counts(), [2, 2, 2, 2]);
/// assert!(stratified(&ds, 1.0, 7).is_err());
/// ```
pub fn stratified(ds: &Dataset, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
    if !(0.0..1.0).contains(&fraction) {
        bail!("validation fraction {fraction} is outside [0, 1)");
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); ds.num_classes()];
    for (i, s) in ds.samples.iter().enumerate() {
        let c = s.label as usize;
        if c >= by_class.len() {
            bail!(
                "dataset: sample {i} has label {c}, outside the {} classes",
                by_class.len()
            );
        }
        by_class[c].push(i);
    }
    let n = ds.len();
    let total = match (fraction > 0.0, n >= 2) {
        (true, true) => ((fraction * n as f64).round() as usize).max(1),
        _ => 0,
    };
    // Each class's share: the floor of its exact quota, then one more for the largest
    // remainders until the total is reached, never taking a class's last training image.
    let cap = |c: usize| by_class[c].len().saturating_sub(1);
    let exact: Vec<f64> = by_class
        .iter()
        .map(|v| total as f64 * v.len() as f64 / n.max(1) as f64)
        .collect();
    let mut quota: Vec<usize> = (0..by_class.len())
        .map(|c| (exact[c].floor() as usize).min(cap(c)))
        .collect();
    let mut order: Vec<usize> = (0..by_class.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - quota[a] as f64, exact[b] - quota[b] as f64);
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let mut left = total.saturating_sub(quota.iter().sum());
    while left > 0 {
        let before = left;
        for &c in &order {
            if left > 0 && quota[c] < cap(c) {
                quota[c] += 1;
                left -= 1;
            }
        }
        if left == before {
            break; // every class is down to one training image
        }
    }
    let mut held = vec![false; n];
    for (c, idx) in by_class.iter_mut().enumerate() {
        let k = quota[c];
        idx.shuffle(&mut sample_rng(seed, HOLDOUT_STREAM, c as u64));
        for &i in &idx[..k] {
            held[i] = true;
        }
    }
    let pick = |keep: bool| Dataset {
        samples: ds
            .samples
            .iter()
            .zip(&held)
            .filter(|(_, h)| **h != keep)
            .map(|(s, _)| s.clone())
            .collect(),
        class_names: ds.class_names.clone(),
    };
    Ok((pick(true), pick(false)))
}
