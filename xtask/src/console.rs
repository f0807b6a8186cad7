//! What the training commands show on the terminal: a progress bar per epoch, a line per epoch,
//! the run's settings and notices (an [`Observer`] of the library's run), and the result line.
//! The library computes and reports events; this module decides how they look.

use candle_finetune::recipe::RunReport;
use candle_finetune::train::{
    BatchProgress, EpochEnd, EpochMetrics, EpochStart, Notice, Observer, Selection, Settings,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Draws a run on standard error.
#[derive(Default)]
pub struct Console {
    bar: Option<ProgressBar>,
}

impl Console {
    /// A line printed above the bar (or plainly when there is none).
    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // A run that ended with an error leaves its last bar where it stood.
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

impl Observer for Console {
    fn settings(&mut self, s: &Settings) {
        let mut lines = vec![
            "fine-tuning settings:".to_string(),
            format!(
                "  data       {} ({}): {} train / {} validation / {} test images, {} classes",
                s.data, s.origin, s.train_images, s.validation_images, s.test_images, s.classes
            ),
        ];
        if let Some((image, label)) = &s.columns {
            lines.push(format!("  columns    image {image:?}, class {label:?}"));
        }
        lines.push(format!("  validation {}", s.validation));
        lines.push(format!(
            "  weights    {} ({}), preprocessing {}",
            s.weights, s.arch, s.preprocessing
        ));
        lines.push(format!(
            "  device     {}, output {}",
            s.device,
            s.out.display()
        ));
        lines.push(format!("  recipe     {}", s.recipe));
        if s.ranks > 1 {
            lines.push(format!(
                "  data-parallel {} ranks (this is rank 0)",
                s.ranks
            ));
        }
        self.say(&lines.join("\n"));
    }

    fn notice(&mut self, n: &Notice) {
        match n {
            // Lines that say what the run is doing, not remarks.
            Notice::Variant { .. } | Notice::Resumed { .. } | Notice::NothingToResume { .. } => {
                self.say(&n.to_string())
            }
            _ => self.say(&format!("note: {n}")),
        }
    }

    fn epoch_start(&mut self, e: &EpochStart) {
        if let Some(old) = self.bar.take() {
            old.finish_and_clear();
        }
        let bar = ProgressBar::new(e.batches as u64);
        let style = ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} (epoch {elapsed}<{eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{}/{}", e.epoch, e.epochs));
        bar.set_position(e.first_batch as u64);
        self.bar = Some(bar);
    }

    fn batch(&mut self, e: &BatchProgress) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.1} img/s, run ETA {}",
                e.mean_loss,
                e.lr,
                e.images_per_s,
                eta(e.run_eta_s)
            ));
            bar.set_position(e.batch as u64);
        }
    }

    fn epoch_end(&mut self, e: &EpochEnd) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{}", epoch_line(e.metrics, e.epochs, &eta(e.run_eta_s)));
        if !e.train_data.skipped.is_empty() {
            eprintln!("  train data: {}", e.train_data);
        }
    }
}

/// Runs `f` with a progress callback that draws the large-file upload as a bar of bytes
/// (`publish-cars`), cleared when `f` returns.
pub fn with_upload_bar<R>(
    f: impl FnOnce(&mut dyn FnMut(candle_finetune::publish::UploadProgress)) -> R,
) -> R {
    let mut bar: Option<ProgressBar> = None;
    let r = f(&mut |p| {
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(p.total);
            let style = ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b.set_message("large files");
            b
        });
        b.set_position(p.sent);
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

/// `h:mm:ss`, or `-` before there is an estimate.
fn eta(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) => {
            let s = s.max(0.0).round() as u64;
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
    }
}

/// The line printed after every epoch.
fn epoch_line(m: &EpochMetrics, epochs: usize, run_eta: &str) -> String {
    let val = match (m.val_top1, m.val_top5, m.val_nll, m.val_ece) {
        (Some(t1), Some(t5), Some(nll), Some(ece)) => format!(
            "validation top-1 {:.2}% top-5 {:.2}% NLL {nll:.4} ECE {:.2}%",
            100.0 * t1,
            100.0 * t5,
            100.0 * ece
        ),
        _ => "not evaluated".into(),
    };
    let val = match m.ema_val_top1 {
        Some(e) => format!("{val} (EMA top-1 {:.2}%)", 100.0 * e),
        None => val,
    };
    format!(
        "epoch {}/{epochs}: train loss {:.4}, {val}, {:.1} img/s (waited {:.1} s for data, loader \
         {:.2} ms/image), skipped images {} (train {}, validation {}), run ETA {run_eta}",
        m.epoch,
        m.train_loss,
        m.images_per_s,
        m.data_wait_s,
        m.loader_ms_per_image,
        m.skipped_images,
        m.skipped_train,
        m.skipped_validation
    )
}

/// The line that ends a finished run: the kept epoch and what it scored, once, on test (or on
/// validation when the data has no test split).
pub fn result_line(r: &RunReport) -> String {
    let dir = r.out.display();
    match (&r.test, &r.fit.best) {
        (Some(t), _) => format!(
            "epoch {} ({}): test top-1 {:.2}%, top-5 {:.2}%, ECE {:.2}% on {} images; model folder {dir}",
            r.fit.best_epoch,
            match r.fit.selected_on {
                Selection::Validation => "chosen on validation",
                Selection::LastEpoch => "the last, no validation split",
            },
            100.0 * t.top1,
            100.0 * t.top5,
            100.0 * t.ece,
            t.n,
        ),
        (None, Some(v)) => format!(
            "epoch {} (chosen on validation): validation top-1 {:.2}%; no test split; model folder {dir}",
            r.fit.best_epoch,
            100.0 * v.top1,
        ),
        (None, None) => format!(
            "epoch {} kept; nothing evaluated (no validation or test split); model folder {dir}",
            r.fit.best_epoch,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_reads_hours_minutes_seconds() {
        assert_eq!(eta(None), "-");
        assert_eq!(eta(Some(3725.4)), "1:02:05");
        assert_eq!(eta(Some(59.6)), "0:01:00");
    }

    #[test]
    fn the_epoch_line_says_when_validation_was_not_run() {
        let m = EpochMetrics {
            epoch: 2,
            train_loss: 1.25,
            images_per_s: 10.0,
            ..Default::default()
        };
        let line = epoch_line(&m, 5, "0:00:10");
        assert!(
            line.starts_with("epoch 2/5: train loss 1.2500, not evaluated"),
            "{line}"
        );
        assert!(line.ends_with("run ETA 0:00:10"), "{line}");
    }
}
