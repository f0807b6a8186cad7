//! Image decoding to 8-bit RGB, with errors that say what is wrong with the file.

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;

/// Decodes JPEG or PNG bytes (format sniffed from the content) to 8-bit RGB: greyscale is
/// replicated, alpha dropped, palette expanded, 16-bit reduced, CMYK JPEGs converted by the
/// decoder. Empty, truncated or corrupt data is an `Err` naming the problem.
///
/// ```
/// let mut png = Vec::new();
/// image::RgbImage::new(3, 2).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
/// let rgb = candle_finetune::data::decode_rgb(&png).unwrap();
/// assert_eq!(rgb.dimensions(), (3, 2));
/// assert!(candle_finetune::data::decode_rgb(&png[..png.len() / 2]).is_err());
/// assert!(candle_finetune::data::decode_rgb(&[]).is_err());
/// ```
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty image (0 bytes)".into());
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read image header: {e}"))?;
    match reader.format() {
        Some(ImageFormat::Jpeg) | Some(ImageFormat::Png) => {}
        Some(f) => return Err(format!("unsupported image format {f:?} (JPEG and PNG are)")),
        None => return Err(format!("not a JPEG or PNG image ({} bytes)", bytes.len())),
    }
    let img = reader
        .decode()
        .map_err(|e| format!("corrupt or truncated image: {e}"))?;
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}
