//! Mixup and CutMix with timm's semantics (`timm.data.Mixup`): per batch, per pair or per
//! element, mixup (`x = lam x + (1 - lam) x_flipped`) or CutMix (a box of the flipped batch
//! pasted in, `lam` corrected to the box's clipped area), `lam ~ Beta(alpha, alpha)` applied with
//! probability `prob`, CutMix chosen with `switch_prob` when both are on, and the targets mixed
//! the same way from label-smoothed one-hots: `lam * smooth(y) + (1 - lam) * smooth(y_flipped)`,
//! trained through candle-xent's soft-target path. The partner of image `i` is image `n - 1 - i`
//! (timm's `flip(0)`).
//!
//! A draw ([`Mixup::plan`]) is separate from its application ([`Mixup::apply`]), so the random
//! part comes from a seeded stream of ours (the same for a resumed run) and the deterministic
//! part is checked against timm with its draws.

use candle_core::{bail, Result};
use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

/// How mixing parameters are shared (timm's `--mixup-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum MixMode {
    /// One draw for the whole batch.
    #[default]
    Batch,
    /// One draw per pair `(i, n - 1 - i)`, applied to both.
    Pair,
    /// One draw per image.
    Elem,
}

/// The mixing of one image (or of every image, in batch mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    /// Weight of the image itself (1: unmixed); for CutMix, after the box correction.
    pub lam: f64,
    /// CutMix box `[y_low, y_high, x_low, x_high)` taken from the partner; `None`: mixup.
    pub cutmix_box: Option<[usize; 4]>,
}

impl Mix {
    const NONE: Mix = Mix {
        lam: 1.0,
        cutmix_box: None,
    };
}

/// The draws for one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum MixPlan {
    /// One mix for every image.
    Batch(Mix),
    /// A mix per image `i < n / 2`, shared with its partner `n - 1 - i`.
    Pair(Vec<Mix>),
    /// A mix per image.
    Elem(Vec<Mix>),
}

/// Mixup / CutMix settings, with timm train.py's names.
#[derive(Debug, Clone, PartialEq)]
pub struct Mixup {
    /// `--mixup`: mixup alpha; mixup is on when > 0.
    pub mixup_alpha: f64,
    /// `--cutmix`: CutMix alpha; CutMix is on when > 0.
    pub cutmix_alpha: f64,
    /// `--cutmix-minmax`: box sides drawn as these fractions of the image instead of from
    /// `lam` (turns CutMix on).
    pub cutmix_minmax: Option<[f64; 2]>,
    /// `--mixup-prob`: probability of mixing a batch / pair / image.
    pub prob: f64,
    /// `--mixup-switch-prob`: probability of CutMix instead of mixup when both are on.
    pub switch_prob: f64,
    /// `--mixup-mode`.
    pub mode: MixMode,
    /// Correct `lam` to the CutMix box's area after clipping (timm's default, true).
    pub correct_lam: bool,
    /// Label smoothing of the one-hot targets before mixing.
    pub label_smoothing: f64,
    /// Classes.
    pub num_classes: usize,
}

fn beta(alpha: f64, rng: &mut impl Rng) -> Result<f64> {
    let d = Beta::new(alpha, alpha)
        .map_err(|e| candle_core::Error::Msg(format!("mixup: Beta({alpha}, {alpha}): {e}")))?;
    Ok(d.sample(rng))
}

impl Mixup {
    /// Whether any mixing is on.
    pub fn enabled(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0 || self.cutmix_minmax.is_some()
    }

    /// Checks the settings (alphas >= 0, probabilities and smoothing in [0, 1], minmax inside
    /// (0, 1] and ordered, classes > 0).
    ///
    /// ```
    /// use candle_finetune::data::mixup::{Mixup, MixMode};
    /// let m = Mixup { mixup_alpha: 0.2, cutmix_alpha: 1.0, cutmix_minmax: None, prob: 1.0,
    ///     switch_prob: 0.5, mode: MixMode::Batch, correct_lam: true, label_smoothing: 0.1, num_classes: 10 };
    /// assert!(m.validate().is_ok());
    /// assert!(Mixup { prob: 2.0, ..m }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        for (n, v) in [("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)] {
            if !v.is_finite() || v < 0.0 {
                bail!("mixup: --{n} alpha must be a finite number >= 0, not {v}");
            }
        }
        for (n, v) in [
            ("mixup-prob", self.prob),
            ("mixup-switch-prob", self.switch_prob),
            ("label smoothing", self.label_smoothing),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("mixup: {n} must lie in [0, 1], not {v}");
            }
        }
        if let Some([lo, hi]) = self.cutmix_minmax {
            if !(lo > 0.0 && lo < hi && hi <= 1.0) {
                bail!("mixup: `cutmix_minmax` must be 0 < min < max <= 1, not {lo},{hi}");
            }
        }
        if self.num_classes == 0 {
            bail!("mixup: no classes");
        }
        Ok(())
    }

    fn cutmix_on(&self) -> bool {
        self.cutmix_alpha > 0.0 || self.cutmix_minmax.is_some()
    }

    /// timm's `(lam, use_cutmix)` draw for one batch / pair / image.
    fn draw(&self, rng: &mut impl Rng) -> Result<(f64, bool)> {
        if !self.enabled() || rng.random::<f64>() >= self.prob {
            return Ok((1.0, false));
        }
        // timm sets cutmix_alpha to 1 when a minmax is given.
        let cut_alpha = if self.cutmix_minmax.is_some() {
            1.0
        } else {
            self.cutmix_alpha
        };
        Ok(match (self.mixup_alpha > 0.0, self.cutmix_on()) {
            (true, true) => {
                if rng.random::<f64>() < self.switch_prob {
                    (beta(cut_alpha, rng)?, true)
                } else {
                    (beta(self.mixup_alpha, rng)?, false)
                }
            }
            (true, false) => (beta(self.mixup_alpha, rng)?, false),
            (false, _) => (beta(cut_alpha, rng)?, true),
        })
    }

    /// The CutMix box of `lam` on an `h x w` image and the corrected `lam` (timm's
    /// `cutmix_bbox_and_lam`, the box centre or corner drawn from `rng`).
    fn cutmix_box(&self, lam: f64, h: usize, w: usize, rng: &mut impl Rng) -> Mix {
        let (yl, yh, xl, xh) = match self.cutmix_minmax {
            Some([lo, hi]) => {
                let side = |n: usize, rng: &mut dyn rand::RngCore| {
                    let (a, b) = ((n as f64 * lo) as usize, (n as f64 * hi) as usize);
                    if b > a {
                        rng.random_range(a..b)
                    } else {
                        a
                    }
                };
                let (ch, cw) = (side(h, rng), side(w, rng));
                let yl = rng.random_range(0..=h - ch.min(h));
                let xl = rng.random_range(0..=w - cw.min(w));
                (yl, yl + ch, xl, xl + cw)
            }
            None => {
                let ratio = (1.0 - lam).sqrt();
                let (ch, cw) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
                let cy = rng.random_range(0..h.max(1)) as i64;
                let cx = rng.random_range(0..w.max(1)) as i64;
                let clip = |v: i64, n: usize| v.clamp(0, n as i64) as usize;
                (
                    clip(cy - ch / 2, h),
                    clip(cy + (ch + 1) / 2, h),
                    clip(cx - cw / 2, w),
                    clip(cx + (cw + 1) / 2, w),
                )
            }
        };
        let lam = if self.correct_lam || self.cutmix_minmax.is_some() {
            1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w).max(1) as f64
        } else {
            lam
        };
        Mix {
            lam,
            cutmix_box: Some([yl, yh, xl, xh]),
        }
    }

    fn one(&self, h: usize, w: usize, rng: &mut impl Rng) -> Result<Mix> {
        let (lam, cut) = self.draw(rng)?;
        Ok(if lam == 1.0 {
            Mix::NONE
        } else if cut {
            self.cutmix_box(lam, h, w, rng)
        } else {
            Mix {
                lam,
                cutmix_box: None,
            }
        })
    }

    /// The draws for a batch of `n` images of `h x w` pixels.
    pub fn plan(&self, n: usize, h: usize, w: usize, rng: &mut impl Rng) -> Result<MixPlan> {
        Ok(match self.mode {
            MixMode::Batch => MixPlan::Batch(self.one(h, w, rng)?),
            MixMode::Pair => MixPlan::Pair(
                (0..n / 2)
                    .map(|_| self.one(h, w, rng))
                    .collect::<Result<_>>()?,
            ),
            MixMode::Elem => {
                MixPlan::Elem((0..n).map(|_| self.one(h, w, rng)).collect::<Result<_>>()?)
            }
        })
    }

    /// Mixes `images` (`n` images of `c x h x w`, f32, in place) by `plan` and returns the soft
    /// targets (`n x num_classes`, f32, row-major) of `labels`.
    pub fn apply(
        &self,
        plan: &MixPlan,
        images: &mut [f32],
        labels: &[u32],
        (c, h, w): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let n = labels.len();
        let per = c * h * w;
        if images.len() != n * per {
            bail!(
                "mixup: {} image values for {n} images of {c}x{h}x{w}",
                images.len()
            );
        }
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= self.num_classes) {
            bail!(
                "mixup: label {l} out of range for {} classes",
                self.num_classes
            );
        }
        // Per image: its mix, in timm's order of application.
        let mixes: Vec<Mix> = match plan {
            MixPlan::Batch(m) => vec![*m; n],
            MixPlan::Elem(v) => {
                if v.len() != n {
                    bail!("mixup: {} element draws for {n} images", v.len());
                }
                v.clone()
            }
            MixPlan::Pair(v) => {
                if v.len() != n / 2 {
                    bail!("mixup: {} pair draws for {n} images", v.len());
                }
                (0..n)
                    .map(|i| {
                        if i < n / 2 {
                            v[i]
                        } else if n - 1 - i < n / 2 {
                            v[n - 1 - i]
                        } else {
                            Mix::NONE // the middle image of an odd batch
                        }
                    })
                    .collect()
            }
        };
        // timm keeps per-image lambdas in an f32 array (1 - lam then in f32); a batch's lambda
        // is a Python float (1 - lam in f64, each rounded to f32 when used).
        let per_image = !matches!(plan, MixPlan::Batch(_));
        let weights = |lam: f64| -> (f32, f32) {
            if per_image {
                let l = lam as f32;
                (l, 1.0 - l)
            } else {
                (lam as f32, (1.0 - lam) as f32)
            }
        };
        let orig = images.to_vec();
        for (i, m) in mixes.iter().enumerate() {
            if weights(m.lam).0 == 1.0 {
                continue;
            }
            let j = n - 1 - i;
            let (dst, src) = (
                &mut images[i * per..(i + 1) * per],
                &orig[j * per..(j + 1) * per],
            );
            match m.cutmix_box {
                Some([yl, yh, xl, xh]) => {
                    for ch in 0..c {
                        for y in yl..yh.min(h) {
                            let row = ch * h * w + y * w;
                            dst[row + xl..row + xh.min(w)]
                                .copy_from_slice(&src[row + xl..row + xh.min(w)]);
                        }
                    }
                }
                None => {
                    let (a, b) = weights(m.lam);
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = *d * a + *s * b;
                    }
                }
            }
        }
        // Targets: lam * smooth(y_i) + (1 - lam) * smooth(y_partner), in f32 as timm forms them.
        let classes = self.num_classes;
        let off64 = self.label_smoothing / classes as f64;
        let (off, on) = (off64 as f32, (1.0 - self.label_smoothing + off64) as f32);
        let mut t = vec![0f32; n * classes];
        for (i, m) in mixes.iter().enumerate() {
            let (lam, rest) = weights(m.lam);
            let row = &mut t[i * classes..(i + 1) * classes];
            let (yi, yj) = (labels[i] as usize, labels[n - 1 - i] as usize);
            for (k, v) in row.iter_mut().enumerate() {
                let a = if k == yi { on } else { off };
                let b = if k == yj { on } else { off };
                *v = a * lam + b * rest;
            }
        }
        Ok(t)
    }
}
