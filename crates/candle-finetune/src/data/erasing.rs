//! Random erasing with timm's semantics (`timm.data.random_erasing.RandomErasing`, train.py's
//! `--reprob`, `--remode`, `--recount`): with probability `probability`, `count` boxes of a
//! normalised image are replaced, each covering a share of the image drawn from
//! `[min_area, max_area] / count` with an aspect ratio drawn log-uniformly from
//! `[min_aspect, 1 / min_aspect]` (ten tries for a box that fits), by zeros (`const`), one normal
//! value per channel (`rand`) or one per pixel (`pixel`).

use candle_core::{bail, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// What fills an erased box (timm's `--remode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EraseMode {
    /// Zeros (the normalised mean).
    Const,
    /// One standard normal value per channel.
    Rand,
    /// One standard normal value per pixel and channel (timm train.py's default).
    #[default]
    Pixel,
}

/// One erased box: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EraseBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Random erasing settings (timm's defaults for the areas and aspect).
#[derive(Debug, Clone, PartialEq)]
pub struct RandomErasing {
    /// Probability of erasing an image (`--reprob`).
    pub probability: f64,
    /// Smallest share of the image a box covers (0.02).
    pub min_area: f64,
    /// Largest share (1/3).
    pub max_area: f64,
    /// Smallest aspect ratio (0.3; the largest is its inverse).
    pub min_aspect: f64,
    /// Fill (`--remode`).
    pub mode: EraseMode,
    /// Boxes per erased image (`--recount`).
    pub count: usize,
}

impl RandomErasing {
    /// timm's erasing with probability `probability`, fill `mode` and `count` boxes.
    ///
    /// ```
    /// use candle_finetune::data::erasing::{EraseMode, RandomErasing};
    /// let e = RandomErasing::timm(0.25, EraseMode::Pixel, 1);
    /// assert_eq!((e.min_area, e.max_area, e.min_aspect), (0.02, 1.0 / 3.0, 0.3));
    /// ```
    pub fn timm(probability: f64, mode: EraseMode, count: usize) -> Self {
        Self {
            probability,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            min_aspect: 0.3,
            mode,
            count,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.probability) {
            bail!(
                "random erasing: probability must lie in [0, 1], not {}",
                self.probability
            );
        }
        if !(self.min_area > 0.0 && self.min_area <= self.max_area && self.max_area <= 1.0) {
            bail!(
                "random erasing: areas must be 0 < min <= max <= 1, not {}, {}",
                self.min_area,
                self.max_area
            );
        }
        if !(self.min_aspect > 0.0 && self.min_aspect.is_finite()) || self.count == 0 {
            bail!("random erasing: the aspect must be positive and the count at least 1");
        }
        Ok(())
    }

    /// The boxes erased in an `h x w` image (none when the image is left alone).
    pub fn plan(&self, h: usize, w: usize, rng: &mut impl Rng) -> Vec<EraseBox> {
        if rng.random::<f64>() > self.probability || h == 0 || w == 0 {
            return Vec::new();
        }
        let area = (h * w) as f64;
        let (la, lb) = (self.min_aspect.ln(), (1.0 / self.min_aspect).ln());
        let mut out = Vec::new();
        for _ in 0..self.count {
            for _ in 0..10 {
                let target =
                    rng.random_range(self.min_area..=self.max_area) * area / self.count as f64;
                let aspect = rng.random_range(la.min(lb)..=la.max(lb)).exp();
                let bh = (target * aspect).sqrt().round() as usize;
                let bw = (target / aspect).sqrt().round() as usize;
                if bw < w && bh < h {
                    let top = rng.random_range(0..=h - bh);
                    let left = rng.random_range(0..=w - bw);
                    out.push(EraseBox {
                        top,
                        left,
                        height: bh,
                        width: bw,
                    });
                    break;
                }
            }
        }
        out
    }

    /// Erases `boxes` of `image` (`c x h x w`, normalised), the fill drawn from `rng`.
    pub fn apply(
        &self,
        boxes: &[EraseBox],
        image: &mut [f32],
        (c, h, w): (usize, usize, usize),
        rng: &mut impl Rng,
    ) -> Result<()> {
        if image.len() != c * h * w {
            bail!(
                "random erasing: {} values for a {c}x{h}x{w} image",
                image.len()
            );
        }
        for b in boxes {
            if b.top + b.height > h || b.left + b.width > w {
                bail!("random erasing: box {b:?} outside a {h}x{w} image");
            }
            for ch in 0..c {
                let per_channel: f32 = match self.mode {
                    EraseMode::Rand => StandardNormal.sample(rng),
                    _ => 0.0,
                };
                for y in b.top..b.top + b.height {
                    let row = &mut image
                        [ch * h * w + y * w + b.left..ch * h * w + y * w + b.left + b.width];
                    match self.mode {
                        EraseMode::Pixel => {
                            for v in row.iter_mut() {
                                *v = StandardNormal.sample(rng);
                            }
                        }
                        _ => row.fill(per_channel),
                    }
                }
            }
        }
        Ok(())
    }
}
