//! Classification metrics: top-1/top-5, NLL, expected calibration error (15 bins), per-class
//! accuracy, confusion matrix and the most-confused class pairs.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Number of confidence bins of the ECE and the reliability diagram.
pub const ECE_BINS: usize = 15;

/// One reliability bin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    /// Mean confidence of the predictions in the bin.
    #[serde(deserialize_with = "f64_or_nan")]
    pub confidence: f64,
    /// Their accuracy.
    #[serde(deserialize_with = "f64_or_nan")]
    pub accuracy: f64,
    /// How many.
    pub count: usize,
}

/// JSON has no NaN: serde_json writes it as `null`; read `null` back as NaN.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn vec_f64_or_nan<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// The metrics of one evaluation. Undefined figures (the accuracy of a class without images,
/// the mean confidence of no prediction) are NaN, written `null` in JSON and read back as NaN.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Evaluated images.
    pub n: usize,
    /// Top-1 accuracy in [0, 1].
    #[serde(deserialize_with = "f64_or_nan")]
    pub top1: f64,
    /// Top-5 accuracy.
    #[serde(deserialize_with = "f64_or_nan")]
    pub top5: f64,
    /// Mean negative log-likelihood of the true class.
    #[serde(deserialize_with = "f64_or_nan")]
    pub nll: f64,
    /// Expected calibration error over [`ECE_BINS`] equal-width confidence bins.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ece: f64,
    /// Accuracy per class (NaN for a class without images).
    #[serde(deserialize_with = "vec_f64_or_nan")]
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u32>>,
    /// `(true, predicted, count)` of the most frequent errors, largest first (at most 20).
    pub most_confused: Vec<(usize, usize, u32)>,
    /// Reliability diagram bins.
    pub reliability: Vec<Bin>,
    /// Mean top probability of the correct predictions (NaN when none): how sure the model is
    /// when right.
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub mean_confidence_correct: f64,
    /// Mean top probability of the wrong predictions (NaN when none): overconfidence shows here.
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub mean_confidence_wrong: f64,
}

/// Accumulates predictions batch by batch.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_finetune::eval::Accumulator;
/// # fn main() -> candle_core::Result<()> {
/// let mut acc = Accumulator::new(3);
/// let logits = Tensor::new(&[[5f32, 0., 0.], [0., 0., 5.]], &Device::Cpu)?;
/// acc.add(&logits, &[0, 1])?;
/// let r = acc.finish();
/// assert_eq!(r.top1, 0.5);
/// assert_eq!(r.most_confused, vec![(1, 2, 1)]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Accumulator {
    classes: usize,
    n: usize,
    top1: usize,
    top5: usize,
    nll: f64,
    confusion: Vec<Vec<u32>>,
    bins: Vec<(f64, usize, usize)>,
    /// Summed top probability of correct and of wrong predictions.
    conf_right: f64,
    conf_wrong: f64,
}

impl Accumulator {
    /// An empty accumulator for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            n: 0,
            top1: 0,
            top5: 0,
            nll: 0.0,
            confusion: vec![vec![0; classes]; classes],
            bins: vec![(0.0, 0, 0); ECE_BINS],
            conf_right: 0.0,
            conf_wrong: 0.0,
        }
    }

    /// Adds a batch of `(N, C)` logits and their labels.
    pub fn add(&mut self, logits: &Tensor, labels: &[u32]) -> Result<()> {
        let rows = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        if rows.len() != labels.len() {
            candle_core::bail!(
                "eval: {} logit rows for {} labels",
                rows.len(),
                labels.len()
            );
        }
        for (row, &y) in rows.iter().zip(labels) {
            let y = y as usize;
            if row.len() != self.classes || y >= self.classes {
                candle_core::bail!(
                    "eval: row of {} logits or label {y} for {} classes",
                    row.len(),
                    self.classes
                );
            }
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            self.nll += lse - row[y];
            // Rank of the true class: how many logits beat it (ties count against it).
            let pred = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, v)| if *v > row[b] { i } else { b });
            let better = row
                .iter()
                .enumerate()
                .filter(|(i, v)| **v > row[y] || (**v == row[y] && *i < y))
                .count();
            self.top1 += (pred == y) as usize;
            self.top5 += (better < 5) as usize;
            self.confusion[y][pred] += 1;
            let conf = (row[pred] - lse).exp();
            let b = ((conf * ECE_BINS as f64).ceil() as usize).clamp(1, ECE_BINS) - 1;
            self.bins[b].0 += conf;
            self.bins[b].1 += 1;
            self.bins[b].2 += (pred == y) as usize;
            if pred == y {
                self.conf_right += conf;
            } else {
                self.conf_wrong += conf;
            }
            self.n += 1;
        }
        Ok(())
    }

    /// Every count and sum of this accumulator as `f64` values, in a fixed order: adding the
    /// vectors of several accumulators (of the same classes) element-wise and reading the result
    /// back with [`Accumulator::from_sums`] gives the accumulator of all their images, counts
    /// exactly (below 2^53) and sums as sums, not averages of averages. How data-parallel ranks
    /// reduce their shards' evaluations.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_finetune::eval::Accumulator;
    /// # fn main() -> candle_core::Result<()> {
    /// let logits = Tensor::new(&[[2f32, 0.], [0., 1.], [3., 0.]], &Device::Cpu)?;
    /// let mut all = Accumulator::new(2);
    /// all.add(&logits, &[0, 1, 1])?;
    /// let (mut a, mut b) = (Accumulator::new(2), Accumulator::new(2));
    /// a.add(&logits.narrow(0, 0, 1)?, &[0])?;
    /// b.add(&logits.narrow(0, 1, 2)?, &[1, 1])?;
    /// let sums: Vec<f64> = a.to_sums().iter().zip(b.to_sums()).map(|(x, y)| x + y).collect();
    /// let merged = Accumulator::from_sums(2, &sums)?;
    /// assert_eq!(merged.finish().top1, all.finish().top1);
    /// # Ok(()) }
    /// ```
    pub fn to_sums(&self) -> Vec<f64> {
        let mut v = vec![
            self.n as f64,
            self.top1 as f64,
            self.top5 as f64,
            self.nll,
            self.conf_right,
            self.conf_wrong,
        ];
        for &(c, k, ok) in &self.bins {
            v.extend([c, k as f64, ok as f64]);
        }
        for row in &self.confusion {
            v.extend(row.iter().map(|&c| c as f64));
        }
        v
    }

    /// The accumulator of [`Accumulator::to_sums`]'s values (summed over shards) for `classes`
    /// classes; an error when their number does not fit.
    pub fn from_sums(classes: usize, sums: &[f64]) -> Result<Self> {
        let want = 6 + 3 * ECE_BINS + classes * classes;
        if sums.len() != want {
            candle_core::bail!(
                "eval: {} sums for {classes} classes, expected {want}",
                sums.len()
            );
        }
        let mut a = Accumulator::new(classes);
        a.n = sums[0] as usize;
        a.top1 = sums[1] as usize;
        a.top5 = sums[2] as usize;
        a.nll = sums[3];
        a.conf_right = sums[4];
        a.conf_wrong = sums[5];
        for (i, b) in a.bins.iter_mut().enumerate() {
            let at = 6 + 3 * i;
            *b = (sums[at], sums[at + 1] as usize, sums[at + 2] as usize);
        }
        let base = 6 + 3 * ECE_BINS;
        for (r, row) in a.confusion.iter_mut().enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = sums[base + r * classes + c] as u32;
            }
        }
        Ok(a)
    }

    /// The metrics.
    pub fn finish(&self) -> EvalResult {
        let n = self.n.max(1) as f64;
        let reliability: Vec<Bin> = self
            .bins
            .iter()
            .map(|&(c, k, ok)| Bin {
                confidence: if k > 0 { c / k as f64 } else { 0.0 },
                accuracy: if k > 0 { ok as f64 / k as f64 } else { 0.0 },
                count: k,
            })
            .collect();
        let ece = reliability
            .iter()
            .map(|b| (b.accuracy - b.confidence).abs() * b.count as f64)
            .sum::<f64>()
            / n;
        let per_class_accuracy = self
            .confusion
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let t: u32 = r.iter().sum();
                if t == 0 {
                    f64::NAN
                } else {
                    r[i] as f64 / t as f64
                }
            })
            .collect();
        let mut pairs: Vec<(usize, usize, u32)> = self
            .confusion
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.iter()
                    .enumerate()
                    .filter(move |(j, c)| *j != i && **c > 0)
                    .map(move |(j, c)| (i, j, *c))
            })
            .collect();
        pairs.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        pairs.truncate(20);
        EvalResult {
            n: self.n,
            top1: self.top1 as f64 / n,
            top5: self.top5 as f64 / n,
            nll: self.nll / n,
            ece,
            per_class_accuracy,
            confusion: self.confusion.clone(),
            most_confused: pairs,
            reliability,
            mean_confidence_correct: self.conf_right / self.top1 as f64,
            mean_confidence_wrong: self.conf_wrong / (self.n - self.top1) as f64,
        }
    }
}
