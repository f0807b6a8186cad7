//! Train-transform throughput (decode JPEG + RandomResizedCrop + flip + normalise to 224 px) on
//! generated 600 x 400 JPEGs, with 1 thread and with all threads; then, on 1 thread, the same
//! with TrivialAugmentWide, with RandAugment (2 ops, magnitude 9) and with TrivialAugmentWide +
//! ColorJitter 0.4. Prints one JSON line. Used by `cargo xtask bench-data`.
//!
//! ```text
//! cargo run --release -p candle-finetune --example data_bench -- [IMAGES]
//! ```

use candle_finetune::data::augment::{Augment, AutoAugment, ColorJitter};
use candle_finetune::data::{decode_rgb, Preprocess, Transform};
use image::{ImageFormat, Rgb, RgbImage};
use rayon::prelude::*;
use std::time::Instant;

/// A photo-like image: smooth colour fields, edges and noise (JPEG size ~ real photos').
fn photo(seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    let img = RgbImage::from_fn(600, 400, |x, y| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let n = (s % 24) as i32 - 12;
        let band = if (x / 75 + y / 50 + seed).is_multiple_of(3) {
            60
        } else {
            0
        };
        let v = |base: i32| (base + n + band).clamp(0, 255) as u8;
        Rgb([
            v((x * 255 / 600) as i32),
            v((y * 255 / 400) as i32),
            v(((x + y) % 256) as i32),
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Jpeg)
        .unwrap();
    out
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(256), |s| s.parse())?;
    let jpegs: Vec<Vec<u8>> = (0..n as u32).into_par_iter().map(photo).collect();
    let mean_kb = jpegs.iter().map(|j| j.len()).sum::<usize>() as f64 / n as f64 / 1024.0;
    let plain = Transform::for_training(Preprocess::default());
    let run_with = |t: &Transform, threads: usize| -> anyhow::Result<f64> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let t0 = Instant::now();
        pool.install(|| {
            jpegs
                .par_iter()
                .enumerate()
                .try_for_each(|(i, j)| -> Result<(), String> {
                    let mut out = vec![0f32; 3 * 224 * 224];
                    let img = decode_rgb(j)?;
                    t.apply(&img, 0, 0, i as u64, &mut out)
                })
        })
        .map_err(anyhow::Error::msg)?;
        Ok(n as f64 / t0.elapsed().as_secs_f64())
    };
    let run = |threads: usize| run_with(&plain, threads);
    run(1)?; // warm-up
    let one = run(1)?;
    let all_threads = rayon::current_num_threads();
    let all = run(all_threads)?;
    let augmented = |aug: Augment| {
        run_with(
            &Transform::for_training(Preprocess::default()).with_augment(aug),
            1,
        )
    };
    let ta = Some(AutoAugment::TrivialAugmentWide { bins: 31 });
    let ta_wide = augmented(Augment {
        auto_augment: ta,
        ..Default::default()
    })?;
    let rand_augment = augmented(Augment {
        auto_augment: Some(AutoAugment::RandAugment {
            num_ops: 2,
            magnitude: 9,
            bins: 31,
        }),
        ..Default::default()
    })?;
    let ta_jitter = augmented(Augment {
        auto_augment: ta,
        color_jitter: ColorJitter::timm(&[0.4]).map_err(anyhow::Error::msg)?,
        ..Default::default()
    })?;
    // Decode alone, one thread, for the breakdown.
    let t0 = Instant::now();
    for j in &jpegs {
        decode_rgb(j).map_err(anyhow::Error::msg)?;
    }
    let decode = n as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{{\"images\":{n},\"mean_jpeg_kb\":{mean_kb:.1},\"decode_only_1_thread\":{decode:.0},\"train_transform_1_thread\":{one:.0},\"threads\":{all_threads},\"train_transform_all_threads\":{all:.0},\"ta_wide_1_thread\":{ta_wide:.0},\"rand_augment_1_thread\":{rand_augment:.0},\"ta_wide_jitter_1_thread\":{ta_jitter:.0}}}"
    );
    Ok(())
}
