//! Pixel operations of the augmentations, on 8-bit RGB images, with the arithmetic of
//! torchvision.transforms.v2 on `uint8` tensors: each op computes in `f32` in the order torchvision
//! does (its `add(.., alpha)` is a fused multiply-add on x86), rounds where it rounds and truncates
//! to `u8` where it casts, so outputs agree with torchvision's value for value (the tests hold them
//! to its outputs; the few values that can differ are at an `f32` rounding boundary of a mean or a
//! sampling coordinate).
//!
//! The geometric ops sample with nearest neighbour at pixel centres, as torchvision's
//! `grid_sample(align_corners=False)`: the `image` crate's and `imageproc`'s warps sample at pixel
//! corners with a different rounding, which moves edges by a pixel, hence this module.

use image::RgbImage;

const BOUND: f32 = 255.0;

/// `x` truncated to `u8` after clamping to [0, 255], as torch's float -> uint8 cast of a clamped
/// value.
fn to_u8(x: f32) -> u8 {
    x.clamp(0.0, BOUND) as u8
}

/// torchvision's `_blend`: `clamp(a * ratio + (1 - ratio) * b)` in `f32`, truncated.
fn blend(a: u8, b: f32, ratio: f32, alpha: f32) -> u8 {
    to_u8(b.mul_add(alpha, a as f32 * ratio))
}

/// Luma of each pixel in `f32` (`0.2989 r + 0.587 g + 0.114 b`, torchvision's weights and order),
/// floored as the `uint8` path of `adjust_saturation` / `adjust_contrast` floors it.
fn luma_floor(img: &RgbImage) -> Vec<f32> {
    img.pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(|v| v as f32);
            (b.mul_add(0.114, g.mul_add(0.587, r * 0.2989))).floor()
        })
        .collect()
}

/// Multiplies every value by `factor` (torchvision `adjust_brightness`).
pub fn adjust_brightness(img: &mut RgbImage, factor: f64) {
    let f = factor as f32;
    for v in img.iter_mut() {
        *v = to_u8(*v as f32 * f);
    }
}

/// Blends with the luma image (`factor` 0: grey, 1: unchanged; torchvision `adjust_saturation`).
pub fn adjust_saturation(img: &mut RgbImage, factor: f64) {
    let luma = luma_floor(img);
    let (ratio, alpha) = (factor as f32, (1.0 - factor) as f32);
    for (p, l) in img.pixels_mut().zip(luma) {
        for v in p.0.iter_mut() {
            *v = blend(*v, l, ratio, alpha);
        }
    }
}

/// Blends with the mean luma (torchvision `adjust_contrast`).
pub fn adjust_contrast(img: &mut RgbImage, factor: f64) {
    let luma = luma_floor(img);
    let n = luma.len().max(1);
    let mean = (luma.iter().map(|&l| l as f64).sum::<f64>() / n as f64) as f32;
    let (ratio, alpha) = (factor as f32, (1.0 - factor) as f32);
    for v in img.iter_mut() {
        *v = blend(*v, mean, ratio, alpha);
    }
}

/// Blends the interior with a 3 x 3 smoothing (weights 1, centre 5, over 13; rounded); the
/// border keeps its values (torchvision `adjust_sharpness`). Images of side 2 or less are kept.
pub fn adjust_sharpness(img: &mut RgbImage, factor: f64) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w <= 2 || h <= 2 {
        return;
    }
    let (a, b) = ((1.0f64 / 13.0) as f32, (5.0f64 / 13.0) as f32);
    let alpha = (1.0 - factor) as f32;
    let src = img.as_raw().clone();
    let dst: &mut [u8] = img;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let at = |yy: usize, xx: usize| src[(yy * w + xx) * 3 + c] as f32;
                let mut ring = 0.0f32;
                for (dy, dx) in [
                    (0, 0),
                    (0, 1),
                    (0, 2),
                    (1, 0),
                    (1, 2),
                    (2, 0),
                    (2, 1),
                    (2, 2),
                ] {
                    ring += at(y + dy - 1, x + dx - 1);
                }
                let blurred = ring.mul_add(a, at(y, x) * b).round_ties_even();
                let v = at(y, x);
                dst[(y * w + x) * 3 + c] = to_u8((blurred - v).mul_add(alpha, v));
            }
        }
    }
}

/// Keeps the `bits` high bits of each value (torchvision `posterize`; 8 or more: unchanged).
pub fn posterize(img: &mut RgbImage, bits: u8) {
    if bits >= 8 {
        return;
    }
    let mask = (((1u16 << bits) - 1) << (8 - bits)) as u8;
    for v in img.iter_mut() {
        *v &= mask;
    }
}

/// Inverts values at or above `threshold` (torchvision `solarize`; the comparison is in `f32`).
pub fn solarize(img: &mut RgbImage, threshold: f64) {
    let t = threshold as f32;
    for v in img.iter_mut() {
        if *v as f32 >= t {
            *v = 255 - *v;
        }
    }
}

/// Stretches each channel to [0, 255] (torchvision `autocontrast`; a constant channel is kept).
pub fn autocontrast(img: &mut RgbImage) {
    for c in 0..3 {
        let (lo, hi) = img
            .pixels()
            .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p[c]), hi.max(p[c])));
        if lo == hi {
            continue;
        }
        let inv_scale = (hi - lo) as f32 * (1.0f64 / 255.0) as f32;
        for p in img.pixels_mut() {
            p[c] = to_u8((p[c] - lo) as f32 / inv_scale);
        }
    }
}

/// Histogram equalisation of each channel with PIL's lookup table, as torchvision `equalize`
/// computes it: `lut[k] = (cdf[k - 1] + step / 2) / step`, `step` = pixels not of the channel's
/// largest value / 255; a channel whose `step` is 0 is kept.
pub fn equalize(img: &mut RgbImage) {
    let n = (img.width() * img.height()) as u64;
    for c in 0..3 {
        let mut hist = [0u64; 256];
        for p in img.pixels() {
            hist[p[c] as usize] += 1;
        }
        let last = hist.iter().rposition(|&h| h > 0).unwrap_or(0);
        let step = (n - hist[last]) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cum = 0u64;
        for k in 1..256 {
            cum += hist[k - 1];
            lut[k] = ((cum + step / 2) / step).min(255) as u8;
        }
        for p in img.pixels_mut() {
            p[c] = lut[p[c] as usize];
        }
    }
}

/// Rotates the hue by `factor` turns, in [-0.5, 0.5] (torchvision `adjust_hue`: HSV in `f32`
/// after scaling to [0, 1], back to `u8` by `x * 255.999` truncated).
pub fn adjust_hue(img: &mut RgbImage, factor: f64) {
    let f = factor as f32;
    let inv = (1.0f64 / 255.0) as f32;
    let sixth = (1.0f64 / 6.0) as f32;
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(|v| v as f32 * inv);
        let (maxc, minc) = (r.max(g).max(b), r.min(g).min(b));
        let eqc = maxc == minc;
        let range = maxc - minc;
        let s = range / if eqc { 1.0 } else { maxc };
        let div = if eqc { 1.0 } else { range };
        let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        // torchvision sums the three masked candidates: the unselected ones add +0.0 (or -0.0),
        // which leaves the selected value unchanged.
        let h = (h * sixth + 1.0) % 1.0;
        // torch.remainder: fmod, moved into [0, 1) when negative.
        let mut h = (h + f) % 1.0;
        if h != 0.0 && h < 0.0 {
            h += 1.0;
        }
        // HSV -> RGB.
        let h6 = h * 6.0;
        let i = h6.floor();
        let fr = h6 - i;
        let i = (i as i32).rem_euclid(6);
        let sxf = s * fr;
        let v = maxc;
        let q = ((1.0 - sxf) * v).clamp(0.0, 1.0);
        let t = ((sxf + (1.0 - s)) * v).clamp(0.0, 1.0);
        let pp = ((1.0 - s) * v).clamp(0.0, 1.0);
        let rgb = match i {
            0 => [v, t, pp],
            1 => [q, v, pp],
            2 => [pp, v, t],
            3 => [pp, q, v],
            4 => [t, pp, v],
            _ => [v, pp, q],
        };
        let scale = (255.0f64 + 1.0 - 1e-3) as f32;
        p.0 = rgb.map(|x| (x * scale) as u8);
    }
}

/// Inverse affine map from output to input pixel coordinates, both relative to the image
/// centre (torchvision's `_get_inverse_affine_matrix` with scale 1): rotation `angle` degrees,
/// shear (`shear_x`, `shear_y`) degrees, translation `(tx, ty)` pixels, about `center` (pixels
/// relative to the image centre).
fn inverse_affine(center: [f64; 2], angle: f64, translate: [f64; 2], shear: [f64; 2]) -> [f64; 6] {
    let rot = angle.to_radians();
    let (sx, sy) = (shear[0].to_radians(), shear[1].to_radians());
    let [cx, cy] = center;
    let [tx, ty] = translate;
    let cos_sy = sy.cos();
    let tan_sx = sx.tan();
    let a = (rot - sy).cos() / cos_sy;
    let b = -(a * tan_sx + rot.sin());
    let c = (rot - sy).sin() / cos_sy;
    let d = rot.cos() - c * tan_sx;
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += cx - m[0] * (cx + tx) - m[1] * (cy + ty);
    m[5] += cy - m[3] * (cx + tx) - m[4] * (cy + ty);
    m
}

/// Nearest-neighbour warp by the inverse map `m` (pixel units about the image centre), as
/// torchvision's `_affine_grid` + `grid_sample(mode="nearest", align_corners=False)` in `f32`;
/// pixels that map outside the image get `fill`.
fn warp_nearest(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let (wf, hf) = (w as f32, h as f32);
    // theta / (w/2, h/2): output pixel offsets -> normalised input coordinates.
    let t: [f32; 6] = m.map(|v| v as f32);
    let (hw, hh) = (0.5 * wf, 0.5 * hf);
    let (r00, r10, r20) = (t[0] / hw, t[1] / hw, t[2] / hw);
    let (r01, r11, r21) = (t[3] / hh, t[4] / hh, t[5] / hh);
    let src = img.as_raw();
    let mut out = RgbImage::new(w, h);
    let linspace = |n: u32| -> Vec<f32> {
        let (start, end) = ((1.0 - n as f32) * 0.5, (n as f32 - 1.0) * 0.5);
        linspace_f32(start, end, n as usize)
    };
    let (xs, ys) = (linspace(w), linspace(h));
    for (oy, &y) in ys.iter().enumerate() {
        for (ox, &x) in xs.iter().enumerate() {
            let gx = x * r00 + y * r10 + r20;
            let gy = x * r01 + y * r11 + r21;
            let ix = ((gx + 1.0) * hw - 0.5).round_ties_even();
            let iy = ((gy + 1.0) * hh - 0.5).round_ties_even();
            let px = if ix >= 0.0 && ix < wf && iy >= 0.0 && iy < hf {
                let at = (iy as usize * w as usize + ix as usize) * 3;
                [src[at], src[at + 1], src[at + 2]]
            } else {
                fill
            };
            out.put_pixel(ox as u32, oy as u32, image::Rgb(px));
        }
    }
    out
}

/// Rotates counter-clockwise by `degrees` about the centre, same size, nearest neighbour
/// (torchvision `rotate`, including its exact paths for multiples of 90 degrees).
pub fn rotate(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let angle = degrees.rem_euclid(360.0);
    let square = img.width() == img.height();
    if angle == 0.0 {
        return img.clone();
    }
    if angle == 180.0 {
        return image::imageops::rotate180(img);
    }
    if square && angle == 90.0 {
        return image::imageops::rotate270(img);
    }
    if square && angle == 270.0 {
        return image::imageops::rotate90(img);
    }
    warp_nearest(
        img,
        inverse_affine([0.0; 2], -angle, [0.0; 2], [0.0; 2]),
        fill,
    )
}

/// Shears along x by `degrees` about the top-left corner (torchvision `affine(shear=[deg, 0],
/// center=[0, 0])`).
pub fn shear_x(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let c = [-0.5 * img.width() as f64, -0.5 * img.height() as f64];
    warp_nearest(img, inverse_affine(c, 0.0, [0.0; 2], [degrees, 0.0]), fill)
}

/// Shears along y by `degrees` about the top-left corner.
pub fn shear_y(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let c = [-0.5 * img.width() as f64, -0.5 * img.height() as f64];
    warp_nearest(img, inverse_affine(c, 0.0, [0.0; 2], [0.0, degrees]), fill)
}

/// Translates by whole pixels (torchvision `affine(translate=[dx, dy])`).
pub fn translate(img: &RgbImage, dx: i64, dy: i64, fill: [u8; 3]) -> RgbImage {
    warp_nearest(
        img,
        inverse_affine([0.0; 2], 0.0, [dx as f64, dy as f64], [0.0; 2]),
        fill,
    )
}

/// Flips left-right in place.
pub fn flip_horizontal(img: &mut RgbImage) {
    image::imageops::flip_horizontal_in_place(img);
}

/// `torch.linspace(start, end, steps)` in `f32` as PyTorch's CPU kernel computes it: the first
/// half as `start + step * i`, the second as `end - step * (steps - 1 - i)`, each with one
/// rounding (a fused multiply-add), `step = (end - start) / (steps - 1)` in `f32`.
///
/// ```
/// let v = candle_finetune::data::augment::linspace_f32(0.0, 1.0, 5);
/// assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
/// ```
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        n => {
            let step = (end - start) / (n - 1) as f32;
            (0..n)
                .map(|i| {
                    if i < n / 2 {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}
