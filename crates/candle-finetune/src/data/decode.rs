//! Image decoding to 8-bit RGB, strict: truncated or corrupt data is an error, never an image
//! padded with grey.
//!
//! The JPEG decoder the `image` crate uses (zune-jpeg) recovers from a premature end of data by
//! filling the missing rows, which is right for a browser and wrong for training data: a JPEG cut
//! to a third of its bytes would "decode" and be trained on. So JPEG bytes are first walked marker
//! by marker ([`check_jpeg_structure`]): every segment must fit in the data, every entropy-coded
//! scan must be followed by a marker, and the data must reach the end-of-image marker. PNG bytes
//! are walked chunk by chunk ([`check_png_structure`]: every chunk complete, its CRC right, IEND
//! reached) before the `png` crate decodes them (which also rejects a zlib stream that ends
//! early). The decoded size is checked against the header for both formats.

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;

/// Decodes JPEG or PNG bytes (format sniffed from the content) to 8-bit RGB: greyscale is
/// replicated, alpha dropped, palette expanded, 16-bit reduced, CMYK JPEGs converted by the
/// decoder. Empty, truncated or corrupt data is an `Err` naming the problem (for JPEG, including
/// data that stops before the end-of-image marker; for PNG, a cut image-data stream or a chunk
/// whose CRC does not match).
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
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => f,
        Some(f) => return Err(format!("unsupported image format {f:?} (JPEG and PNG are)")),
        None => return Err(format!("not a JPEG or PNG image ({} bytes)", bytes.len())),
    };
    let frame = match format {
        ImageFormat::Jpeg => check_jpeg_structure(bytes)?,
        _ => check_png_structure(bytes)?,
    };
    let img = reader
        .decode()
        .map_err(|e| format!("corrupt or truncated {format:?} image: {e}"))?;
    let (w, h) = frame;
    if (img.width(), img.height()) != (w, h) {
        return Err(format!(
            "corrupt {format:?} image: the header says {w} x {h} pixels, the decoder produced {} x {}",
            img.width(),
            img.height()
        ));
    }
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    };
    let want = rgb.width() as usize * rgb.height() as usize * 3;
    if rgb.as_raw().len() != want {
        return Err(format!(
            "corrupt image: {} bytes of pixels for {} x {}",
            rgb.as_raw().len(),
            rgb.width(),
            rgb.height()
        ));
    }
    Ok(rgb)
}

/// Walks the markers of a JPEG file from SOI to EOI and returns the frame size `(width, height)`
/// of its SOF header. An `Err` says where the structure breaks: a segment that runs past the end
/// of the data, an entropy-coded scan that the data ends inside, a missing end-of-image marker,
/// no frame header, or bytes that are not a marker where one must be. Bytes after EOI are
/// allowed (cameras append thumbnails and padding).
///
/// ```
/// use candle_finetune::data::check_jpeg_structure;
/// let mut jpeg = Vec::new();
/// image::RgbImage::new(16, 8).write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
/// assert_eq!(check_jpeg_structure(&jpeg).unwrap(), (16, 8));
/// let cut = check_jpeg_structure(&jpeg[..jpeg.len() - 2]).unwrap_err();
/// assert!(cut.contains("end-of-image"), "{cut}");
/// ```
pub fn check_jpeg_structure(b: &[u8]) -> Result<(u32, u32), String> {
    let n = b.len();
    let truncated = |what: &str, at: usize| {
        format!("truncated JPEG: the data ends {what} (byte {at} of {n}), before the end-of-image marker")
    };
    if n < 2 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG: no start-of-image marker".into());
    }
    let mut i = 2;
    let mut frame = None;
    let mut scans = 0usize;
    loop {
        // A marker: 0xFF, optional 0xFF fill bytes, then the code.
        if i >= n {
            return Err(truncated("between segments", i));
        }
        if b[i] != 0xFF {
            return Err(format!(
                "corrupt JPEG: byte {i} of {n} is 0x{:02X} where a marker must start",
                b[i]
            ));
        }
        while i < n && b[i] == 0xFF {
            i += 1;
        }
        if i >= n {
            return Err(truncated("inside a marker", i));
        }
        let code = b[i];
        i += 1;
        match code {
            0xD9 => {
                // EOI.
                if scans == 0 {
                    return Err("corrupt JPEG: end-of-image marker before any scan".into());
                }
                return frame.ok_or_else(|| "corrupt JPEG: no frame header (SOF)".to_string());
            }
            0xD8 => {
                return Err(format!(
                    "corrupt JPEG: a second start-of-image at byte {}",
                    i - 2
                ))
            }
            0x01 | 0xD0..=0xD7 => continue, // TEM, a stray RST: no length
            0x00 => {
                return Err(format!(
                    "corrupt JPEG: invalid marker 0xFF00 at byte {}",
                    i - 2
                ))
            }
            _ => {}
        }
        if i + 2 > n {
            return Err(truncated("inside a segment length", i));
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 {
            return Err(format!(
                "corrupt JPEG: segment 0xFF{code:02X} of length {len} at byte {i}"
            ));
        }
        if i + len > n {
            return Err(truncated(&format!("inside segment 0xFF{code:02X}"), n));
        }
        let body = &b[i + 2..i + len];
        // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC) {
            if body.len() < 6 {
                return Err("corrupt JPEG: frame header too short".into());
            }
            let h = u16::from_be_bytes([body[1], body[2]]) as u32;
            let w = u16::from_be_bytes([body[3], body[4]]) as u32;
            if w == 0 || h == 0 {
                return Err(format!("corrupt JPEG: frame of {w} x {h} pixels"));
            }
            frame = Some((w, h));
        }
        i += len;
        if code == 0xDA {
            // SOS: entropy-coded data up to the next marker that is not a stuffed 0xFF00 or a
            // restart marker.
            if frame.is_none() {
                return Err("corrupt JPEG: a scan before the frame header".into());
            }
            scans += 1;
            loop {
                match b[i..].iter().position(|&x| x == 0xFF) {
                    None => return Err(truncated(&format!("inside scan {scans}"), n)),
                    Some(p) => {
                        i += p;
                        let mut j = i + 1;
                        while j < n && b[j] == 0xFF {
                            j += 1;
                        }
                        if j >= n {
                            return Err(truncated(&format!("inside scan {scans}"), n));
                        }
                        match b[j] {
                            0x00 | 0xD0..=0xD7 => i = j + 1,
                            _ => break, // a real marker: the scan is complete
                        }
                    }
                }
            }
        }
    }
}

/// Walks the chunks of a PNG file and returns the image size `(width, height)` of its IHDR. An
/// `Err` names the problem: no PNG signature, a chunk that runs past the end of the data, a chunk
/// whose CRC does not match its contents, no IHDR first, or no IEND chunk. Bytes after IEND are
/// allowed.
///
/// ```
/// use candle_finetune::data::check_png_structure;
/// let mut png = Vec::new();
/// image::RgbImage::new(5, 4).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
/// assert_eq!(check_png_structure(&png).unwrap(), (5, 4));
/// let e = check_png_structure(&png[..png.len() - 12]).unwrap_err();
/// assert!(e.contains("IEND"), "{e}");
/// ```
pub fn check_png_structure(b: &[u8]) -> Result<(u32, u32), String> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let n = b.len();
    if n < 8 || b[..8] != SIGNATURE {
        return Err("not a PNG: no PNG signature".into());
    }
    let mut i = 8;
    let mut size = None;
    loop {
        if i + 8 > n {
            return Err(format!(
                "truncated PNG: the data ends at byte {n} inside a chunk header, before the IEND chunk"
            ));
        }
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let ty = &b[i + 4..i + 8];
        let name = String::from_utf8_lossy(ty).into_owned();
        if len > 0x7FFF_FFFF || i + 12 + len > n {
            return Err(format!(
                "truncated PNG: chunk {name} at byte {i} declares {len} bytes, the data ends at byte {n} (before the IEND chunk)"
            ));
        }
        let stored = u32::from_be_bytes(b[i + 8 + len..i + 12 + len].try_into().expect("4 bytes"));
        let actual = crc32fast::hash(&b[i + 4..i + 8 + len]);
        if stored != actual {
            return Err(format!(
                "corrupt PNG: chunk {name} at byte {i} has CRC {stored:08x}, its contents give {actual:08x}"
            ));
        }
        let data = &b[i + 8..i + 8 + len];
        if size.is_none() {
            if ty != b"IHDR" || len < 8 {
                return Err(format!("corrupt PNG: the first chunk is {name}, not IHDR"));
            }
            let w = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
            let h = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes"));
            if w == 0 || h == 0 {
                return Err(format!("corrupt PNG: image of {w} x {h} pixels"));
            }
            size = Some((w, h));
        }
        i += 12 + len;
        if ty == b"IEND" {
            return size.ok_or_else(|| "corrupt PNG: no IHDR chunk".to_string());
        }
    }
}
