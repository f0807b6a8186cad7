//! Training-time augmentation as torchvision defines it: the random-resized-crop range and flip
//! probability, TrivialAugmentWide, RandAugment and ColorJitter. The ops' arithmetic is in
//! [`super::imageops`]; this module draws which ops run, with what magnitude, from the sample's
//! own random stream (so results depend on the seed, the epoch and the image, never on threads).
//!
//! Order per image, as timm's and torchvision's training transforms: random resized crop,
//! horizontal flip, auto-augment, colour jitter, then (after normalising) random erasing.

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::imageops;

pub use super::imageops::linspace_f32;

/// The ops of TrivialAugmentWide and RandAugment, in torchvision's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// No change.
    Identity,
    /// Horizontal shear; magnitude `m` shears by `atan(m)`.
    ShearX,
    /// Vertical shear.
    ShearY,
    /// Horizontal translation by `trunc(m)` pixels.
    TranslateX,
    /// Vertical translation.
    TranslateY,
    /// Rotation by `m` degrees, counter-clockwise.
    Rotate,
    /// Brightness factor `1 + m`.
    Brightness,
    /// Saturation factor `1 + m` (PIL's "Color").
    Color,
    /// Contrast factor `1 + m`.
    Contrast,
    /// Sharpness factor `1 + m`.
    Sharpness,
    /// Keep `trunc(m)` bits.
    Posterize,
    /// Invert values at or above `255 m`.
    Solarize,
    /// Per-channel stretch to [0, 255].
    AutoContrast,
    /// Per-channel histogram equalisation.
    Equalize,
}

impl OpKind {
    /// All ops, in the order of torchvision's augmentation spaces.
    pub const ALL: [OpKind; 14] = [
        OpKind::Identity,
        OpKind::ShearX,
        OpKind::ShearY,
        OpKind::TranslateX,
        OpKind::TranslateY,
        OpKind::Rotate,
        OpKind::Brightness,
        OpKind::Color,
        OpKind::Contrast,
        OpKind::Sharpness,
        OpKind::Posterize,
        OpKind::Solarize,
        OpKind::AutoContrast,
        OpKind::Equalize,
    ];

    /// torchvision's name of the op (`"ShearX"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Identity => "Identity",
            OpKind::ShearX => "ShearX",
            OpKind::ShearY => "ShearY",
            OpKind::TranslateX => "TranslateX",
            OpKind::TranslateY => "TranslateY",
            OpKind::Rotate => "Rotate",
            OpKind::Brightness => "Brightness",
            OpKind::Color => "Color",
            OpKind::Contrast => "Contrast",
            OpKind::Sharpness => "Sharpness",
            OpKind::Posterize => "Posterize",
            OpKind::Solarize => "Solarize",
            OpKind::AutoContrast => "AutoContrast",
            OpKind::Equalize => "Equalize",
        }
    }

    /// The op of a torchvision name.
    ///
    /// ```
    /// use candle_finetune::data::augment::OpKind;
    /// assert_eq!(OpKind::from_name("Solarize"), Some(OpKind::Solarize));
    /// assert_eq!(OpKind::from_name("Invert"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One op with its (signed) magnitude, as torchvision's auto-augment dispatch reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Op {
    /// Which op.
    pub kind: OpKind,
    /// Its magnitude (meaning per [`OpKind`]).
    pub magnitude: f64,
}

impl Op {
    /// Applies the op to `img`; geometric ops fill uncovered pixels with `fill`.
    ///
    /// ```
    /// use candle_finetune::data::augment::{Op, OpKind};
    /// let mut img = image::RgbImage::from_pixel(4, 4, image::Rgb([100, 150, 200]));
    /// Op { kind: OpKind::Solarize, magnitude: 0.5 }.apply(&mut img, [0; 3]);
    /// assert_eq!(img.get_pixel(0, 0).0, [100, 105, 55]);
    /// ```
    pub fn apply(&self, img: &mut RgbImage, fill: [u8; 3]) {
        let m = self.magnitude;
        match self.kind {
            OpKind::Identity => {}
            OpKind::ShearX => *img = imageops::shear_x(img, m.atan().to_degrees(), fill),
            OpKind::ShearY => *img = imageops::shear_y(img, m.atan().to_degrees(), fill),
            OpKind::TranslateX => *img = imageops::translate(img, m.trunc() as i64, 0, fill),
            OpKind::TranslateY => *img = imageops::translate(img, 0, m.trunc() as i64, fill),
            OpKind::Rotate => *img = imageops::rotate(img, m, fill),
            OpKind::Brightness => imageops::adjust_brightness(img, 1.0 + m),
            OpKind::Color => imageops::adjust_saturation(img, 1.0 + m),
            OpKind::Contrast => imageops::adjust_contrast(img, 1.0 + m),
            OpKind::Sharpness => imageops::adjust_sharpness(img, 1.0 + m),
            OpKind::Posterize => imageops::posterize(img, m.trunc().clamp(0.0, 8.0) as u8),
            OpKind::Solarize => imageops::solarize(img, 255.0 * m),
            OpKind::AutoContrast => imageops::autocontrast(img),
            OpKind::Equalize => imageops::equalize(img),
        }
    }
}

/// An automatic augmentation policy (torchvision's definitions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoAugment {
    /// TrivialAugmentWide: one op per image, uniform over the 14 ops, a uniform magnitude bin,
    /// a random sign.
    TrivialAugmentWide {
        /// Magnitude bins (torchvision: 31).
        bins: usize,
    },
    /// RandAugment: `num_ops` ops per image, uniform over the 14 ops, at the fixed bin
    /// `magnitude`, a random sign.
    RandAugment {
        /// Ops per image (torchvision: 2).
        num_ops: usize,
        /// Magnitude bin (torchvision: 9).
        magnitude: usize,
        /// Magnitude bins (torchvision: 31).
        bins: usize,
    },
}

impl std::str::FromStr for AutoAugment {
    type Err = String;
    /// Reads `ta_wide` (also `trivialaugment`), `ra` (RandAugment 2 ops at magnitude 9 of 31)
    /// and timm's `rand-m{M}-n{N}` spelling of RandAugment (`m`, `n`, and `mmax` for the bins).
    ///
    /// ```
    /// use candle_finetune::data::augment::AutoAugment;
    /// assert_eq!("ta_wide".parse(), Ok(AutoAugment::TrivialAugmentWide { bins: 31 }));
    /// assert_eq!("rand-m7-n3".parse(), Ok(AutoAugment::RandAugment { num_ops: 3, magnitude: 7, bins: 31 }));
    /// assert!("rand-m9-mstd0.5-inc1".parse::<AutoAugment>().unwrap_err().contains("mstd"));
    /// ```
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "ta_wide" | "trivialaugment" | "trivial_augment_wide" => {
                return Ok(AutoAugment::TrivialAugmentWide { bins: 31 })
            }
            "ra" | "randaugment" => {
                return Ok(AutoAugment::RandAugment {
                    num_ops: 2,
                    magnitude: 9,
                    bins: 31,
                })
            }
            _ => {}
        }
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(format!(
                "auto-augment policy {s:?} is not known: use ta_wide (TrivialAugmentWide), ra \
                 (RandAugment, 2 ops at magnitude 9) or rand-mM-nN"
            ));
        }
        let (mut num_ops, mut magnitude, mut bins) = (2usize, 9usize, 31usize);
        for p in parts {
            let num = |key: &str| -> Result<usize, String> {
                p[key.len()..].parse::<usize>().map_err(|_| {
                    format!("auto-augment {s:?}: {p:?} needs a whole number after {key:?}")
                })
            };
            if p.starts_with("mmax") {
                bins = num("mmax")? + 1;
            } else if p.starts_with("mstd") || p.starts_with("inc") || p.starts_with('w') {
                return Err(format!(
                    "auto-augment {s:?}: {p:?} belongs to timm's own RandAugment variant; this \
                     RandAugment is torchvision's (fixed magnitude, every op), which takes m, n \
                     and mmax"
                ));
            } else if p.starts_with('m') {
                magnitude = num("m")?;
            } else if p.starts_with('n') {
                num_ops = num("n")?;
            } else {
                return Err(format!(
                    "auto-augment {s:?}: unknown part {p:?} (m, n, mmax)"
                ));
            }
        }
        let ra = AutoAugment::RandAugment {
            num_ops,
            magnitude,
            bins,
        };
        ra.validate()?;
        Ok(ra)
    }
}

impl AutoAugment {
    /// Checks the bins and the magnitude.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            AutoAugment::TrivialAugmentWide { bins } if bins < 2 => Err(format!(
                "TrivialAugmentWide needs at least 2 magnitude bins, got {bins}"
            )),
            AutoAugment::RandAugment {
                magnitude, bins, ..
            } if bins < 2 || magnitude >= bins => Err(format!(
                "RandAugment magnitude {magnitude} must be below the number of bins {bins} \
                 (and bins >= 2)"
            )),
            _ => Ok(()),
        }
    }

    /// The magnitudes of `kind` over the bins for an image of `height` x `width` (`None`: the
    /// op has no magnitude) and whether their sign is drawn, as torchvision's
    /// `_AUGMENTATION_SPACE` of this policy.
    ///
    /// ```
    /// use candle_finetune::data::augment::{AutoAugment, OpKind};
    /// let ta = AutoAugment::TrivialAugmentWide { bins: 31 };
    /// let (m, signed) = ta.magnitudes(OpKind::Rotate, 224, 224);
    /// assert_eq!((m.unwrap()[30], signed), (135.0, true));
    /// ```
    pub fn magnitudes(&self, kind: OpKind, height: u32, width: u32) -> (Option<Vec<f32>>, bool) {
        let (bins, wide) = match *self {
            AutoAugment::TrivialAugmentWide { bins } => (bins, true),
            AutoAugment::RandAugment { bins, .. } => (bins, false),
        };
        let lin = |end: f64| Some(linspace_f32(0.0, end as f32, bins));
        let (shear, rotate, color) = if wide {
            (0.99, 135.0, 0.99)
        } else {
            (0.3, 30.0, 0.9)
        };
        match kind {
            OpKind::Identity | OpKind::AutoContrast | OpKind::Equalize => (None, false),
            OpKind::ShearX | OpKind::ShearY => (lin(shear), true),
            OpKind::TranslateX | OpKind::TranslateY => {
                let side = if kind == OpKind::TranslateX {
                    width
                } else {
                    height
                };
                let end = if wide {
                    32.0
                } else {
                    150.0 / 331.0 * side as f64
                };
                (lin(end), true)
            }
            OpKind::Rotate => (lin(rotate), true),
            OpKind::Brightness | OpKind::Color | OpKind::Contrast | OpKind::Sharpness => {
                (lin(color), true)
            }
            OpKind::Posterize => {
                let levels = if wide { 6.0 } else { 4.0 };
                let div = ((bins - 1) as f64 / levels) as f32;
                let v = (0..bins)
                    .map(|i| (8.0 - i as f32 / div).round_ties_even())
                    .collect();
                (Some(v), false)
            }
            OpKind::Solarize => (Some(linspace_f32(1.0, 0.0, bins)), false),
        }
    }

    /// Draws the ops of one image of `height` x `width`.
    pub fn sample(&self, height: u32, width: u32, rng: &mut impl Rng) -> Vec<Op> {
        let draw = |rng: &mut dyn rand::RngCore, bin: Option<usize>| {
            let kind = OpKind::ALL[rng.random_range(0..OpKind::ALL.len())];
            let (mags, signed) = self.magnitudes(kind, height, width);
            let magnitude = match mags {
                None => 0.0,
                Some(v) => {
                    let i = bin.unwrap_or_else(|| rng.random_range(0..v.len()));
                    let m = v[i.min(v.len() - 1)] as f64;
                    if signed && rng.random_bool(0.5) {
                        -m
                    } else {
                        m
                    }
                }
            };
            Op { kind, magnitude }
        };
        match *self {
            AutoAugment::TrivialAugmentWide { .. } => vec![draw(rng, None)],
            AutoAugment::RandAugment {
                num_ops, magnitude, ..
            } => (0..num_ops).map(|_| draw(rng, Some(magnitude))).collect(),
        }
    }
}

/// torchvision's `ColorJitter`: brightness, contrast, saturation and hue factors drawn
/// uniformly from their ranges, applied in a random order.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ColorJitter {
    /// Brightness factor range.
    pub brightness: Option<[f64; 2]>,
    /// Contrast factor range.
    pub contrast: Option<[f64; 2]>,
    /// Saturation factor range.
    pub saturation: Option<[f64; 2]>,
    /// Hue shift range, within [-0.5, 0.5].
    pub hue: Option<[f64; 2]>,
}

/// The factors and order of one colour jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterDraw {
    /// Order of the four adjustments (0 brightness, 1 contrast, 2 saturation, 3 hue).
    pub order: [usize; 4],
    /// Factors (`None`: that adjustment is off).
    pub brightness: Option<f64>,
    /// Contrast factor.
    pub contrast: Option<f64>,
    /// Saturation factor.
    pub saturation: Option<f64>,
    /// Hue shift.
    pub hue: Option<f64>,
}

impl JitterDraw {
    /// Applies the adjustments in `order`.
    pub fn apply(&self, img: &mut RgbImage) {
        for k in self.order {
            match (k, self.brightness, self.contrast, self.saturation, self.hue) {
                (0, Some(b), ..) => imageops::adjust_brightness(img, b),
                (1, _, Some(c), ..) => imageops::adjust_contrast(img, c),
                (2, _, _, Some(s), _) => imageops::adjust_saturation(img, s),
                (3, .., Some(h)) => imageops::adjust_hue(img, h),
                _ => {}
            }
        }
    }
}

impl ColorJitter {
    /// timm's `--color-jitter`: one value `v` for brightness, contrast and saturation
    /// (`[max(0, 1 - v), 1 + v]`), three for each, or four with a hue range `[-h, h]`.
    ///
    /// ```
    /// let j = candle_finetune::data::augment::ColorJitter::timm(&[0.4]).unwrap().unwrap();
    /// assert_eq!((j.brightness, j.hue), (Some([0.6, 1.4]), None));
    /// assert!(candle_finetune::data::augment::ColorJitter::timm(&[0.1, 0.2]).is_err());
    /// ```
    pub fn timm(values: &[f64]) -> Result<Option<Self>, String> {
        let (b, c, s, h) = match *values {
            [v] => (v, v, v, 0.0),
            [b, c, s] => (b, c, s, 0.0),
            [b, c, s, h] => (b, c, s, h),
            _ => {
                return Err(format!(
                    "color jitter takes 1, 3 or 4 values (brightness, contrast, saturation, hue), \
                     got {values:?}"
                ))
            }
        };
        for (name, v) in [
            ("brightness", b),
            ("contrast", c),
            ("saturation", s),
            ("hue", h),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("color jitter {name} must be >= 0, got {v}"));
            }
        }
        if h > 0.5 {
            return Err(format!("color jitter hue must be in [0, 0.5], got {h}"));
        }
        let factor = |v: f64| (v > 0.0).then(|| [(1.0 - v).max(0.0), 1.0 + v]);
        let j = ColorJitter {
            brightness: factor(b),
            contrast: factor(c),
            saturation: factor(s),
            hue: (h > 0.0).then_some([-h, h]),
        };
        Ok((j != ColorJitter::default()).then_some(j))
    }

    /// Draws the order and factors of one image.
    pub fn sample(&self, rng: &mut impl Rng) -> JitterDraw {
        let mut order = [0, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut uniform = |r: Option<[f64; 2]>| {
            r.map(|[lo, hi]| {
                if hi > lo {
                    rng.random_range(lo..hi)
                } else {
                    lo
                }
            })
        };
        let brightness = uniform(self.brightness);
        let contrast = uniform(self.contrast);
        let saturation = uniform(self.saturation);
        let hue = uniform(self.hue);
        JitterDraw {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }
}

/// The random part of the training transform.
///
/// ```
/// let a = candle_finetune::data::augment::Augment::default();
/// assert_eq!((a.scale, a.hflip), ([0.08, 1.0], 0.5));
/// assert!(a.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Area range of the random resized crop, as fractions of the image (timm's `--scale`).
    pub scale: [f64; 2],
    /// Aspect-ratio range of the crop (timm's `--ratio`).
    pub ratio: [f64; 2],
    /// Probability of a horizontal flip (timm's `--hflip`).
    pub hflip: f64,
    /// Auto-augment policy (timm's `--aa`, with torchvision's policies).
    pub auto_augment: Option<AutoAugment>,
    /// Colour jitter (timm's `--color-jitter`).
    pub color_jitter: Option<ColorJitter>,
    /// Fill of the pixels the geometric ops uncover.
    pub fill: [u8; 3],
}

impl Default for Augment {
    /// torchvision's `RandomResizedCrop` + `RandomHorizontalFlip`: scale 0.08-1, ratio 3/4-4/3,
    /// flip 0.5, nothing else.
    fn default() -> Self {
        Self {
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.5,
            auto_augment: None,
            color_jitter: None,
            fill: [0; 3],
        }
    }
}

impl Augment {
    /// Checks the ranges: `0 < scale[0] <= scale[1]`, `0 < ratio[0] <= ratio[1]`, `hflip` in
    /// [0, 1], a valid policy and jitter.
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, r: [f64; 2]| {
            if r.iter().all(|v| v.is_finite()) && r[0] > 0.0 && r[0] <= r[1] {
                Ok(())
            } else {
                Err(format!(
                    "{name} must be MIN,MAX with 0 < MIN <= MAX, got {},{}",
                    r[0], r[1]
                ))
            }
        };
        range("crop scale", self.scale)?;
        range("crop ratio", self.ratio)?;
        if !(0.0..=1.0).contains(&self.hflip) {
            return Err(format!(
                "hflip is a probability in [0, 1], got {}",
                self.hflip
            ));
        }
        if let Some(a) = &self.auto_augment {
            a.validate()?;
        }
        if let Some(j) = &self.color_jitter {
            for (name, r) in [
                ("brightness", j.brightness),
                ("contrast", j.contrast),
                ("saturation", j.saturation),
            ] {
                if let Some([lo, hi]) = r {
                    if !(lo >= 0.0 && lo <= hi && hi.is_finite()) {
                        return Err(format!("color jitter {name} range {lo},{hi} is not valid"));
                    }
                }
            }
            if let Some([lo, hi]) = j.hue {
                if !(-0.5 <= lo && lo <= hi && hi <= 0.5) {
                    return Err(format!(
                        "color jitter hue range {lo},{hi} is not in [-0.5, 0.5]"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether ops run on the cropped image (auto-augment or colour jitter).
    pub fn has_pixel_ops(&self) -> bool {
        self.auto_augment.is_some() || self.color_jitter.is_some()
    }

    /// Runs the auto-augment and the colour jitter of one image, drawing from `rng`.
    pub fn apply_pixel_ops(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        if let Some(a) = &self.auto_augment {
            for op in a.sample(img.height(), img.width(), rng) {
                op.apply(img, self.fill);
            }
        }
        if let Some(j) = &self.color_jitter {
            j.sample(rng).apply(img);
        }
    }
}
