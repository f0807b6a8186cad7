//! Train and eval transforms with torchvision's geometry, from the weights' preprocessing config.

use fast_image_resize as fr;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::augment::Augment;

/// Resampling filter of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// PIL-style antialiased bilinear (torchvision `BILINEAR`, antialias on).
    #[default]
    Bilinear,
    /// PIL-style antialiased bicubic.
    Bicubic,
    /// Nearest neighbour.
    Nearest,
}

impl Interpolation {
    fn alg(self) -> fr::ResizeAlg {
        match self {
            Interpolation::Bilinear => fr::ResizeAlg::Convolution(fr::FilterType::Bilinear),
            Interpolation::Bicubic => fr::ResizeAlg::Convolution(fr::FilterType::CatmullRom),
            Interpolation::Nearest => fr::ResizeAlg::Nearest,
        }
    }
}

/// Preprocessing of the pretrained weights (timm's `pretrained_cfg`).
///
/// ```
/// let p = candle_finetune::data::Preprocess::default();
/// assert_eq!((p.size, p.crop_pct), (224, 0.875));
/// assert_eq!(p.eval_resize(), 256);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Output side in pixels.
    pub size: u32,
    /// Eval crop fraction: the shorter side is resized to `floor(size / crop_pct)` first.
    pub crop_pct: f64,
    /// Resampling filter.
    pub interpolation: Interpolation,
    /// Per-channel mean (RGB, on [0, 1] pixels).
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Default for Preprocess {
    /// ImageNet defaults of `timm/resnet18.tv_in1k`.
    fn default() -> Self {
        Self {
            size: 224,
            crop_pct: 0.875,
            interpolation: Interpolation::Bilinear,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// Values that replace the base model's preprocessing (each `None` keeps it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreprocessOverrides {
    /// Input side in pixels.
    pub size: Option<u32>,
    /// Eval crop fraction.
    pub crop_pct: Option<f64>,
    /// Resampling filter.
    pub interpolation: Option<Interpolation>,
    /// Per-channel mean.
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation.
    pub std: Option<[f32; 3]>,
}

impl std::str::FromStr for Interpolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bilinear" => Ok(Interpolation::Bilinear),
            "bicubic" => Ok(Interpolation::Bicubic),
            "nearest" => Ok(Interpolation::Nearest),
            other => Err(format!(
                "unsupported interpolation {other:?} (bilinear, bicubic, nearest)"
            )),
        }
    }
}

impl Preprocess {
    /// Reads timm's `config.json` (`pretrained_cfg`: `input_size`, `crop_pct`, `interpolation`,
    /// `mean`, `std`); missing fields keep the defaults.
    ///
    /// ```
    /// let cfg = r#"{"architecture": "resnet18", "pretrained_cfg": {"input_size": [3, 288, 288],
    ///   "crop_pct": 0.95, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}"#;
    /// let p = candle_finetune::data::Preprocess::from_timm_config(cfg).unwrap();
    /// assert_eq!(p.size, 288);
    /// assert_eq!(p.interpolation, candle_finetune::data::Interpolation::Bicubic);
    /// ```
    pub fn from_timm_config(json: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("config.json: {e}"))?;
        let c = v.get("pretrained_cfg").unwrap_or(&v);
        let mut p = Self::default();
        if let Some(s) = c.get("input_size").and_then(|s| s.as_array()) {
            let dims: Vec<u64> = s.iter().filter_map(|d| d.as_u64()).collect();
            match dims[..] {
                [3, h, w] if h == w && h > 0 => p.size = h as u32,
                _ => {
                    return Err(format!(
                        "config.json: input_size {s:?} is not [3, S, S] (square RGB input)"
                    ))
                }
            }
        }
        match c.get("crop_mode").and_then(|m| m.as_str()) {
            None | Some("center") => {}
            Some(other) => {
                return Err(format!(
                    "config.json: crop_mode {other:?} is not supported (only \"center\")"
                ))
            }
        }
        if let Some(x) = c.get("crop_pct").and_then(|x| x.as_f64()) {
            p.crop_pct = x;
        }
        if let Some(i) = c.get("interpolation").and_then(|i| i.as_str()) {
            p.interpolation = i.parse().map_err(|e| format!("config.json: {e}"))?;
        }
        let triple = |k: &str| -> Result<Option<[f32; 3]>, String> {
            match c.get(k).and_then(|m| m.as_array()) {
                None => Ok(None),
                Some(a) if a.len() == 3 => Ok(Some(
                    [0, 1, 2].map(|i| a[i].as_f64().unwrap_or(f64::NAN) as f32),
                )),
                Some(_) => Err(format!("config.json: {k} must have 3 values")),
            }
        };
        if let Some(m) = triple("mean")? {
            p.mean = m;
        }
        if let Some(s) = triple("std")? {
            p.std = s;
        }
        if p.size == 0
            || !(p.crop_pct > 0.0 && p.crop_pct <= 1.0)
            || p.std.iter().any(|s| s.is_nan() || *s <= 0.0)
        {
            return Err(format!("config.json: invalid preprocessing {p:?}"));
        }
        Ok(p)
    }

    /// These settings with each value `o` gives replaced, checked.
    ///
    /// ```
    /// use candle_finetune::data::{Interpolation, Preprocess, PreprocessOverrides};
    /// let o = PreprocessOverrides { crop_pct: Some(0.95), interpolation: Some(Interpolation::Bicubic), ..Default::default() };
    /// let p = Preprocess::default().with_overrides(&o).unwrap();
    /// assert_eq!((p.crop_pct, p.interpolation, p.size), (0.95, Interpolation::Bicubic, 224));
    /// assert!(Preprocess::default().with_overrides(&PreprocessOverrides { crop_pct: Some(1.5), ..Default::default() }).is_err());
    /// ```
    pub fn with_overrides(mut self, o: &PreprocessOverrides) -> Result<Self, String> {
        if let Some(s) = o.size {
            self.size = s;
        }
        if let Some(c) = o.crop_pct {
            self.crop_pct = c;
        }
        if let Some(i) = o.interpolation {
            self.interpolation = i;
        }
        if let Some(m) = o.mean {
            self.mean = m;
        }
        if let Some(s) = o.std {
            self.std = s;
        }
        if self.size == 0
            || !(self.crop_pct > 0.0 && self.crop_pct <= 1.0)
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(format!(
                "preprocessing: size must be > 0, crop_pct in (0, 1], std > 0 and finite mean, \
                 got {self:?}"
            ));
        }
        Ok(self)
    }

    /// Side the shorter edge is resized to before the eval center crop (timm: `floor(size / crop_pct)`).
    ///
    /// ```
    /// let p = candle_finetune::data::Preprocess { size: 64, crop_pct: 0.9, ..Default::default() };
    /// assert_eq!(p.eval_resize(), 71);
    /// ```
    pub fn eval_resize(&self) -> u32 {
        (self.size as f64 / self.crop_pct).floor() as u32
    }
}

/// A crop box in source pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    /// First column.
    pub left: f64,
    /// First row.
    pub top: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

/// torchvision's `RandomResizedCrop.get_params` with its defaults (scale 0.08-1, ratio
/// 3/4-4/3): see [`random_resized_crop_box_in`].
///
/// ```
/// use rand::SeedableRng;
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
/// let b = candle_finetune::data::random_resized_crop_box(600, 400, &mut rng);
/// assert!(b.left + b.width <= 600.0 && b.top + b.height <= 400.0);
/// ```
pub fn random_resized_crop_box(width: u32, height: u32, rng: &mut impl Rng) -> CropBox {
    random_resized_crop_box_in(width, height, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0], rng)
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at an area uniform in `scale` (of
/// the image's) and an aspect ratio log-uniform in `ratio`, then a center crop clamped to the
/// ratio range. `scale` and `ratio` are `[min, max]` with `0 < min <= max`
/// ([`super::augment::Augment::validate`] checks them).
///
/// ```
/// use rand::SeedableRng;
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
/// let b = candle_finetune::data::random_resized_crop_box_in(600, 400, [1.0, 1.0], [1.5, 1.5], &mut rng);
/// assert_eq!((b.width, b.height), (600.0, 400.0));
/// ```
pub fn random_resized_crop_box_in(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> CropBox {
    let (w, h) = (width as f64, height as f64);
    let area = w * h;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    let mut uniform = |lo: f64, hi: f64| {
        if hi > lo {
            rng.random_range(lo..hi)
        } else {
            lo
        }
    };
    for _ in 0..10 {
        let target = area * uniform(scale[0], scale[1]);
        let aspect = uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
            let top = rng.random_range(0..=(height - ch as u32)) as f64;
            let left = rng.random_range(0..=(width - cw as u32)) as f64;
            return CropBox {
                left,
                top,
                width: cw,
                height: ch,
            };
        }
    }
    let in_ratio = w / h;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, (w / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((h * ratio[1]).round(), h)
    } else {
        (w, h)
    };
    CropBox {
        left: ((w - cw) / 2.0).floor(),
        top: ((h - ch) / 2.0).floor(),
        width: cw,
        height: ch,
    }
}

/// Eval geometry: resize the shorter side to `resize` (torchvision `Resize(int)`: the longer side
/// becomes `int(resize * long / short)`), then a centered `size` x `size` crop (torchvision
/// `CenterCrop`: offsets `round((resized - size) / 2)` with Python's ties-to-even `round`).
/// Returned as the equivalent box in source pixels and the resized dimensions.
///
/// ```
/// let (b, rw, rh) = candle_finetune::data::center_crop_box(600, 400, 256, 224);
/// assert_eq!((rw, rh), (384, 256));
/// // 28 px resized to 33, cropped to 32: torchvision starts at round(0.5) = 0, not 1.
/// let (b33, _, _) = candle_finetune::data::center_crop_box(28, 28, 33, 32);
/// assert_eq!((b33.left, b33.top), (0.0, 0.0));
/// let (b35, _, _) = candle_finetune::data::center_crop_box(28, 28, 35, 32);
/// assert_eq!(b35.left, 2.0 * 28.0 / 35.0);
/// assert_eq!((b.left, b.top), (80.0 * 600.0 / 384.0, 16.0 * 400.0 / 256.0));
/// ```
pub fn center_crop_box(width: u32, height: u32, resize: u32, size: u32) -> (CropBox, u32, u32) {
    let (rw, rh) = if width <= height {
        (
            resize,
            (resize as u64 * height as u64 / width.max(1) as u64) as u32,
        )
    } else {
        (
            (resize as u64 * width as u64 / height.max(1) as u64) as u32,
            resize,
        )
    };
    // Python's round(), as torchvision calls it: ties to even (round(0.5) = 0, round(1.5) = 2).
    let left = ((rw as f64 - size as f64) / 2.0).round_ties_even();
    let top = ((rh as f64 - size as f64) / 2.0).round_ties_even();
    let (sx, sy) = (width as f64 / rw as f64, height as f64 / rh as f64);
    (
        CropBox {
            left: left * sx,
            top: top * sy,
            width: size as f64 * sx,
            height: size as f64 * sy,
        },
        rw,
        rh,
    )
}

/// Train (random resized crop, horizontal flip, then the pixel ops of [`Augment`]) or eval
/// (resize + center crop) transform; both normalise to `(x / 255 - mean) / std` and return CHW
/// f32.
///
/// ```
/// use candle_finetune::data::{augment::Augment, Preprocess, Transform};
/// let t = Transform::for_training(Preprocess::default())
///     .with_augment(Augment { hflip: 0.0, ..Default::default() });
/// assert!(t.train && !Transform::for_eval(Preprocess::default()).train);
/// ```
#[derive(Debug, Clone)]
pub struct Transform {
    /// Preprocessing parameters.
    pub pre: Preprocess,
    /// Train mode (random) or eval mode (deterministic).
    pub train: bool,
    /// The random part of train mode (unused in eval mode).
    pub aug: Augment,
}

/// The RNG of one sample in one epoch: results do not depend on thread count or order.
///
/// ```
/// use rand::Rng;
/// let a: u64 = candle_finetune::data::sample_rng(1, 2, 3).random();
/// let b: u64 = candle_finetune::data::sample_rng(1, 2, 3).random();
/// assert_eq!(a, b);
/// ```
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&epoch.to_le_bytes());
    s[16..24].copy_from_slice(&index.to_le_bytes());
    s[24..].copy_from_slice(b"xentdata");
    ChaCha8Rng::from_seed(s)
}

impl Transform {
    /// The training transform of `pre` with torchvision's default crop and flip.
    pub fn for_training(pre: Preprocess) -> Self {
        Self {
            pre,
            train: true,
            aug: Augment::default(),
        }
    }

    /// The evaluation transform of `pre` (resize, center crop).
    pub fn for_eval(pre: Preprocess) -> Self {
        Self {
            pre,
            train: false,
            aug: Augment::default(),
        }
    }

    /// This transform with the augmentation `aug`.
    pub fn with_augment(mut self, aug: Augment) -> Self {
        self.aug = aug;
        self
    }

    /// The crop box and flip of a sample (train: from [`sample_rng`]; eval: center, no flip).
    ///
    /// ```
    /// let t = candle_finetune::data::Transform::for_eval(Default::default());
    /// let (b, flip) = t.geometry(600, 400, 0, 0, 7);
    /// assert!(!flip && b.width < 600.0);
    /// ```
    pub fn geometry(
        &self,
        width: u32,
        height: u32,
        seed: u64,
        epoch: u64,
        index: u64,
    ) -> (CropBox, bool) {
        if self.train {
            let mut rng = sample_rng(seed, epoch, index);
            self.geometry_from(width, height, &mut rng)
        } else {
            let (b, _, _) = center_crop_box(width, height, self.pre.eval_resize(), self.pre.size);
            (b, false)
        }
    }

    /// The train-mode crop box and flip drawn from `rng` (which the pixel ops continue).
    fn geometry_from(&self, width: u32, height: u32, rng: &mut ChaCha8Rng) -> (CropBox, bool) {
        let b = random_resized_crop_box_in(width, height, self.aug.scale, self.aug.ratio, rng);
        let flip = rng.random_bool(self.aug.hflip.clamp(0.0, 1.0));
        (b, flip)
    }

    /// Crops, resizes, flips, augments and normalises `img` into `out` (3 x size x size, CHW).
    ///
    /// ```
    /// let t = candle_finetune::data::Transform::for_training(Default::default());
    /// let img = image::RgbImage::from_pixel(600, 400, image::Rgb([255, 0, 0]));
    /// let mut out = vec![0f32; 3 * 224 * 224];
    /// t.apply(&img, 0, 0, 0, &mut out).unwrap();
    /// assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
    /// ```
    pub fn apply(
        &self,
        img: &RgbImage,
        seed: u64,
        epoch: u64,
        index: u64,
        out: &mut [f32],
    ) -> Result<(), String> {
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            return Err("empty image (0 pixels)".into());
        }
        let s = self.pre.size;
        if out.len() != 3 * (s * s) as usize {
            return Err(format!(
                "output buffer has {} values, expected {}",
                out.len(),
                3 * s * s
            ));
        }
        let mut rng = sample_rng(seed, epoch, index);
        let (b, mut flip) = if self.train {
            self.geometry_from(w, h, &mut rng)
        } else {
            self.geometry(w, h, seed, epoch, index)
        };
        let src = fr::images::ImageRef::new(w, h, img.as_raw(), fr::PixelType::U8x3)
            .map_err(|e| e.to_string())?;
        let mut dst = fr::images::Image::new(s, s, fr::PixelType::U8x3);
        let opts = fr::ResizeOptions::new()
            .resize_alg(self.pre.interpolation.alg())
            .crop(b.left, b.top, b.width, b.height);
        fr::Resizer::new()
            .resize(&src, &mut dst, &opts)
            .map_err(|e| e.to_string())?;
        let pixel_ops = self.train && self.aug.has_pixel_ops();
        let augmented;
        let px = if pixel_ops {
            let mut img = RgbImage::from_raw(s, s, dst.into_vec())
                .ok_or("resized image has the wrong size")?;
            if flip {
                super::imageops::flip_horizontal(&mut img);
                flip = false;
            }
            self.aug.apply_pixel_ops(&mut img, &mut rng);
            augmented = img;
            augmented.as_raw().as_slice()
        } else {
            dst.buffer()
        };
        let plane = (s * s) as usize;
        let scale: [f32; 3] = [0, 1, 2].map(|c| 1.0 / (255.0 * self.pre.std[c]));
        let shift: [f32; 3] = [0, 1, 2].map(|c| -self.pre.mean[c] / self.pre.std[c]);
        let s = s as usize;
        for y in 0..s {
            for x in 0..s {
                let sx = if flip { s - 1 - x } else { x };
                let p = &px[(y * s + sx) * 3..(y * s + sx) * 3 + 3];
                for c in 0..3 {
                    out[c * plane + y * s + x] = p[c] as f32 * scale[c] + shift[c];
                }
            }
        }
        Ok(())
    }
}
