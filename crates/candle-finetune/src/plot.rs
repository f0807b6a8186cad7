//! PNG plots of training curves and the reliability diagram (plotters, bundled DejaVu Sans).

use crate::eval::Bin;
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws one PNG with `draw` on a white `size` canvas and writes it atomically to `path` (a
/// temporary file beside it, then a rename).
fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(
        &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    ) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn err<E: std::fmt::Display>(e: E) -> candle_core::Error {
    candle_core::Error::Msg(format!("plot: {e}"))
}

/// Per-epoch curves: train loss and test NLL (left), test top-1 and top-5 in % (right). A NaN
/// value (an epoch that was not evaluated) is left out of its curve.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("curves.png");
/// candle_finetune::plot::curves(&p, &[2.0, 1.0], &[1.8, 1.2], &[40.0, 60.0], &[70.0, 85.0]).unwrap();
/// assert!(std::fs::metadata(&p).unwrap().len() > 1000);
/// ```
pub fn curves(
    path: &Path,
    train_loss: &[f64],
    test_nll: &[f64],
    top1: &[f64],
    top5: &[f64],
) -> candle_core::Result<()> {
    write_png(path, (1200, 450), |root| {
        let (left, right) = root.split_horizontally(600);
        let n = train_loss.len().max(1) as f64;
        let ymax = train_loss
            .iter()
            .chain(test_nll)
            .cloned()
            .filter(|v| v.is_finite())
            .fold(0.1, f64::max)
            * 1.05;
        let mut c = ChartBuilder::on(&left)
            .caption("loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..n.max(2.0), 0f64..ymax)
            .map_err(err)?;
        c.configure_mesh().x_desc("epoch").draw().map_err(err)?;
        let series = |v: &[f64]| {
            v.iter()
                .enumerate()
                .map(|(i, y)| (i as f64 + 1.0, *y))
                .filter(|(_, y)| y.is_finite()) // NaN: an epoch without evaluation
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(series(train_loss), &BLUE))
            .map_err(err)?
            .label("train loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
        c.draw_series(LineSeries::new(series(test_nll), &RED))
            .map_err(err)?
            .label("validation NLL")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED));
        c.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(err)?;
        let mut a = ChartBuilder::on(&right)
            .caption("validation accuracy (%)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..n.max(2.0), 0f64..100f64)
            .map_err(err)?;
        a.configure_mesh().x_desc("epoch").draw().map_err(err)?;
        a.draw_series(LineSeries::new(series(top1), &GREEN))
            .map_err(err)?
            .label("top-1")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], GREEN));
        a.draw_series(LineSeries::new(series(top5), &MAGENTA))
            .map_err(err)?
            .label("top-5")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], MAGENTA));
        a.configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

/// One reliability diagram (accuracy per confidence bin against the diagonal) on `area`.
fn draw_reliability<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    title_size: u32,
    bins: &[Bin],
) -> candle_core::Result<()>
where
    DB::ErrorType: 'static,
{
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", title_size))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc("confidence")
        .y_desc("accuracy")
        .draw()
        .map_err(err)?;
    let w = 1.0 / bins.len().max(1) as f64;
    c.draw_series(
        bins.iter()
            .enumerate()
            .filter(|(_, b)| b.count > 0)
            .map(|(i, b)| {
                Rectangle::new(
                    [(i as f64 * w, 0.0), ((i + 1) as f64 * w, b.accuracy)],
                    BLUE.mix(0.6).filled(),
                )
            }),
    )
    .map_err(err)?;
    c.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], &BLACK))
        .map_err(err)?;
    Ok(())
}

/// Reliability diagram: accuracy per confidence bin against the diagonal, with the ECE.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("rel.png");
/// let bins = vec![candle_finetune::eval::Bin { confidence: 0.5, accuracy: 0.4, count: 3 }; 15];
/// candle_finetune::plot::reliability(&p, &bins, 0.1).unwrap();
/// assert!(p.exists());
/// ```
pub fn reliability(path: &Path, bins: &[Bin], ece: f64) -> candle_core::Result<()> {
    write_png(path, (600, 600), |root| {
        let title = format!("reliability (ECE {:.2} %)", ece * 100.0);
        draw_reliability(root, &title, 22, bins)?;
        Ok(())
    })
}

/// One line plot of `points` `(x, y)`, e.g. memory over training steps.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("rss.png");
/// candle_finetune::plot::line(&p, "RSS", "step", "MiB", &[(0.0, 300.0), (10.0, 310.0)]).unwrap();
/// assert!(std::fs::metadata(&p).unwrap().len() > 1000);
/// ```
pub fn line(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> candle_core::Result<()> {
    write_png(path, (900, 450), |root| {
        let finite = || {
            points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let xmax = finite().map(|p| p.0).fold(1.0, f64::max);
        let ymax = finite().map(|p| p.1).fold(1e-9, f64::max) * 1.1;
        let mut c = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(err)?;
        c.draw_series(LineSeries::new(finite().cloned(), &BLUE))
            .map_err(err)?;
        Ok(())
    })
}

/// Reliability diagrams side by side, one panel per `(title, bins, ece)`, e.g. one per label
/// smoothing of an ablation.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("rel.png");
/// let bins = vec![candle_finetune::eval::Bin { confidence: 0.5, accuracy: 0.4, count: 3 }; 15];
/// candle_finetune::plot::reliability_panels(&p, &[("eps 0".into(), bins.clone(), 0.1), ("eps 0.1".into(), bins, 0.05)]).unwrap();
/// assert!(std::fs::metadata(&p).unwrap().len() > 1000);
/// ```
pub fn reliability_panels(
    path: &Path,
    panels: &[(String, Vec<Bin>, f64)],
) -> candle_core::Result<()> {
    let n = panels.len().max(1);
    write_png(path, (420 * n as u32, 440), |root| {
        for (area, (title, bins, ece)) in root.split_evenly((1, n)).iter().zip(panels) {
            let title = format!("{title}: ECE {:.2} %", ece * 100.0);
            draw_reliability(area, &title, 18, bins)?;
        }
        Ok(())
    })
}

/// Several named series `(x, y)` overlaid on one plot with a legend (NaN points left out).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("top1.png");
/// let a = vec![(1.0, 40.0), (2.0, 60.0)];
/// let b = vec![(1.0, 45.0), (2.0, 62.0)];
/// candle_finetune::plot::lines(&p, "test top-1", "epoch", "%", &[("eps 0".into(), a), ("eps 0.1".into(), b)]).unwrap();
/// assert!(std::fs::metadata(&p).unwrap().len() > 1000);
/// ```
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> candle_core::Result<()> {
    write_png(path, (900, 500), |root| {
        let finite = |s: &[(f64, f64)]| {
            s.iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .cloned()
                .collect::<Vec<_>>()
        };
        let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, s)| finite(s)).collect();
        let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
        let ymax = all.iter().map(|p| p.1).fold(1e-9, f64::max) * 1.1;
        let mut c = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(err)?;
        for (i, (name, s)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(finite(s), color.stroke_width(2)))
                .map_err(err)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}
