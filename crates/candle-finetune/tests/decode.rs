//! Strict decoding: truncated or corrupt JPEG and PNG data is an error naming the problem (never
//! an image padded with grey), and intact images decode exactly as before.

use candle_finetune::data::{check_jpeg_structure, decode_rgb};
use image::{ImageFormat, Rgb, RgbImage};
use std::io::Cursor;

/// Noisy, detailed pixels: every scan of the JPEG carries real data.
fn picture(w: u32, h: u32) -> RgbImage {
    let mut s = 0x2545F4914F6CDD1Du64;
    RgbImage::from_fn(w, h, |x, y| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        Rgb([
            (x * 255 / w) as u8 ^ (s as u8 & 0x3F),
            (y * 255 / h) as u8,
            (s >> 8) as u8,
        ])
    })
}

fn jpeg(img: &RgbImage, progressive: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
    enc.set_progressive(progressive);
    enc.encode(
        img.as_raw(),
        img.width() as u16,
        img.height() as u16,
        jpeg_encoder::ColorType::Rgb,
    )
    .unwrap();
    out
}

/// The error of decoding `bytes`; panics (without dumping pixels) if they decode.
fn err(bytes: &[u8], what: &str) -> String {
    match decode_rgb(bytes) {
        Ok(img) => panic!(
            "{what}: decoded to {} x {} instead of an error",
            img.width(),
            img.height()
        ),
        Err(e) => e,
    }
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut v = Vec::new();
    img.write_to(&mut Cursor::new(&mut v), ImageFormat::Png)
        .unwrap();
    v
}

#[test]
fn truncated_jpegs_are_errors_baseline_and_progressive() {
    let img = picture(96, 64);
    for progressive in [false, true] {
        let j = jpeg(&img, progressive);
        assert_eq!(&j[j.len() - 2..], [0xFF, 0xD9]);
        // Intact: exactly what the decoder gives without the structure check.
        let want = image::load_from_memory(&j).unwrap().to_rgb8();
        let got = decode_rgb(&j).unwrap();
        assert_eq!(got.dimensions(), (96, 64));
        assert_eq!(got.as_raw(), want.as_raw(), "progressive={progressive}");
        for frac in [0.10, 0.33, 0.50, 0.90, 0.99] {
            let cut = &j[..(j.len() as f64 * frac) as usize];
            let e = err(cut, &format!("progressive={progressive}, cut at {frac}"));
            assert!(
                e.contains("truncated JPEG"),
                "progressive={progressive}, cut at {frac}: {e}"
            );
        }
        // Only the end-of-image marker missing.
        let e = err(&j[..j.len() - 2], "no EOI");
        assert!(e.contains("end-of-image"), "progressive={progressive}: {e}");
        // One byte of EOI left.
        err(&j[..j.len() - 1], "half an EOI");
    }
}

#[test]
fn jpeg_structure_check_accepts_trailing_bytes_and_names_breaks() {
    let j = jpeg(&picture(32, 24), false);
    let mut trailing = j.clone();
    trailing.extend_from_slice(&[0u8; 100]);
    assert_eq!(check_jpeg_structure(&trailing).unwrap(), (32, 24));
    assert_eq!(
        decode_rgb(&trailing).unwrap().as_raw(),
        decode_rgb(&j).unwrap().as_raw()
    );
    // Restart markers inside the scan and an APP segment.
    let img = picture(64, 40);
    let mut rst = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut rst, 85);
    enc.set_restart_interval(2);
    enc.add_app_segment(1, b"Exif\0\0not really exif").unwrap();
    enc.encode(img.as_raw(), 64, 40, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    assert!(rst.windows(2).any(|w| w == [0xFF, 0xD0]), "no RST0 written");
    assert_eq!(check_jpeg_structure(&rst).unwrap(), (64, 40));
    assert_eq!(
        decode_rgb(&rst).unwrap().as_raw(),
        image::load_from_memory(&rst).unwrap().to_rgb8().as_raw()
    );
    err(&rst[..rst.len() * 2 / 3], "RST JPEG cut at 2/3");
    // A segment length that runs past the end of the data (the header of the first segment).
    let e = check_jpeg_structure(&j[..8]).unwrap_err();
    assert!(e.contains("truncated JPEG") && e.contains("segment"), "{e}");
    // Garbage where a marker must start.
    let mut bad = j.clone();
    let second = 4 + u16::from_be_bytes([j[4], j[5]]) as usize; // after the first segment
    bad[second] = 0x12;
    let e = err(&bad, "garbage marker");
    assert!(e.contains("where a marker must start"), "{e}");
    // No start-of-image.
    assert!(check_jpeg_structure(&j[2..]).is_err());
}

/// The byte offset of the first chunk of type `ty` and its data length.
fn chunk(p: &[u8], ty: &[u8; 4]) -> (usize, usize) {
    let mut i = 8;
    loop {
        let len = u32::from_be_bytes(p[i..i + 4].try_into().unwrap()) as usize;
        if &p[i + 4..i + 8] == ty {
            return (i, len);
        }
        i += 12 + len;
    }
}

#[test]
fn cut_or_corrupt_pngs_are_errors_and_intact_ones_are_exact() {
    let img = picture(64, 48);
    let p = png(&img);
    assert_eq!(decode_rgb(&p).unwrap().as_raw(), img.as_raw());
    let (at, len) = chunk(&p, b"IDAT");
    // IDAT cut in half, file ends there.
    let e = err(&p[..at + 8 + len / 2], "cut IDAT");
    assert!(e.contains("truncated PNG") && e.contains("IDAT"), "{e}");
    // IDAT cut in half, then IEND: the chunk's length no longer matches.
    let mut cut = p[..at + 8 + len / 2].to_vec();
    cut.extend_from_slice(&p[p.len() - 12..]);
    err(&cut, "cut IDAT + IEND");
    // Bad CRC of IDAT.
    let mut bad = p.clone();
    bad[at + 8 + len] ^= 0xFF;
    let e = err(&bad, "bad CRC");
    assert!(e.contains("CRC") && e.contains("IDAT"), "{e}");
    // Corrupt compressed data inside IDAT with a CRC recomputed to match: the zlib stream breaks.
    let mut bad = p.clone();
    for b in &mut bad[at + 8 + 2..at + 8 + len - 4] {
        *b = !*b;
    }
    let crc = crc32(&bad[at + 4..at + 8 + len]);
    bad[at + 8 + len..at + 12 + len].copy_from_slice(&crc.to_be_bytes());
    err(&bad, "corrupt zlib data");
    // Truncated at every tenth of the file.
    for k in 1..10 {
        err(&p[..p.len() * k / 10], &format!("PNG cut at {k}/10"));
    }
}

/// CRC-32 (IEEE), as PNG uses it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}
