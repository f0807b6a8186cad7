//! What label smoothing buys: the same recipe, seed and data trained once per smoothing value,
//! compared on accuracy and calibration (`cargo xtask ablate-smoothing`).
//!
//! Each run is [`FineTune::run`] with only `label_smoothing` and the output folder changed
//! (`OUT/eps-<value>/`, a complete model folder). Each run's epoch is chosen on validation and
//! its model evaluated once on test; the comparison is of those test figures, in `OUT`:
//! `ablation.json` and `ablation.md` (top-1, top-5, NLL, ECE, mean top probability on correct
//! and on wrong predictions), `ablation-reliability.png` (the reliability diagrams side by side)
//! and `ablation-curves.png` (validation top-1 per epoch, overlaid). Every run's
//! model card gets the comparison as a section, its files copied into the folder so the card
//! reads the same on the Hub; [`link_into_card`] does the same for any other train-cars folder.

use crate::eval::{Bin, EvalResult};
use crate::files::atomic_write_bytes;
use crate::recipe::{FineTune, RunReport};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The smoothing values compared by default.
pub const DEFAULT_EPS: [f64; 4] = [0.0, 0.05, 0.1, 0.2];

/// One run of the ablation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationRow {
    /// Label smoothing of the run.
    pub eps: f64,
    /// Its model folder, relative to the ablation folder (`eps-0.1`).
    pub folder: String,
    /// The epoch chosen on validation (1-based).
    pub best_epoch: usize,
    /// Test metrics of the chosen epoch (validation ones when the data has no test split; see
    /// `split`).
    pub top1: f64,
    /// Top-5 accuracy.
    pub top5: f64,
    /// Mean NLL.
    pub nll: f64,
    /// Expected calibration error.
    pub ece: f64,
    /// Mean top probability on correct predictions.
    pub mean_confidence_correct: f64,
    /// Mean top probability on wrong predictions.
    pub mean_confidence_wrong: f64,
    /// Reliability bins of the chosen epoch.
    pub reliability: Vec<Bin>,
    /// Validation top-1 per epoch (NaN where not evaluated).
    pub top1_by_epoch: Vec<f64>,
    /// The split of the figures: `test`, or `validation` when the data has no test split.
    #[serde(default)]
    pub split: String,
}

impl AblationRow {
    fn new(eps: f64, folder: String, report: &RunReport) -> Result<Self> {
        let (b, split): (&EvalResult, &str) = match (&report.test, &report.fit.best) {
            (Some(t), _) => (t, "test"),
            (None, Some(v)) => (v, "validation"),
            (None, None) => bail!(
                "ablate-smoothing: the run of smoothing {eps} evaluated nothing (the data has \
                 no validation and no test split)"
            ),
        };
        Ok(Self {
            eps,
            folder,
            best_epoch: report.fit.best_epoch,
            top1: b.top1,
            top5: b.top5,
            nll: b.nll,
            ece: b.ece,
            mean_confidence_correct: b.mean_confidence_correct,
            mean_confidence_wrong: b.mean_confidence_wrong,
            reliability: b.reliability.clone(),
            top1_by_epoch: report
                .fit
                .history
                .iter()
                .map(|m| m.val_top1.unwrap_or(f64::NAN))
                .collect(),
            split: split.into(),
        })
    }
}

/// The comparison `ablation.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ablation {
    /// The data the runs used (the card's dataset name).
    pub dataset: String,
    /// One row per smoothing value, in the order run.
    pub rows: Vec<AblationRow>,
}

/// An ablation over `eps` of the recipe `base` (its `label_smoothing` and `out` are replaced).
///
/// ```no_run
/// use candle_finetune::ablation::{ablate_smoothing, DEFAULT_EPS};
/// use candle_finetune::{recipe::FineTune, train::TrainConfig};
/// let base = FineTune { train: TrainConfig { epochs: 30, ..Default::default() },
///     out: "out/ablate-smoothing".into(), ..Default::default() };
/// let a = ablate_smoothing(&base, &DEFAULT_EPS).unwrap();
/// for r in &a.rows {
///     println!("eps {}: top-1 {:.2} %, ECE {:.2} %", r.eps, 100.0 * r.top1, 100.0 * r.ece);
/// }
/// ```
pub fn ablate_smoothing(base: &FineTune, eps: &[f64]) -> Result<Ablation> {
    if eps.is_empty() {
        bail!("ablate-smoothing: no smoothing values given");
    }
    for (i, &e) in eps.iter().enumerate() {
        if !(0.0..=1.0).contains(&e) {
            bail!("ablate-smoothing: label smoothing must be in [0, 1], got {e}");
        }
        if eps[..i].contains(&e) {
            bail!("ablate-smoothing: smoothing {e} is listed twice");
        }
    }
    let root = base.out.clone();
    std::fs::create_dir_all(&root)?;
    let dataset = base.dataset_info(None, None)?.name;
    let mut rows = Vec::new();
    for &e in eps {
        let folder = format!("eps-{e}");
        eprintln!(
            "ablate-smoothing: label smoothing {e} -> {}",
            root.join(&folder).display()
        );
        let mut run = base.clone();
        run.train.label_smoothing = e;
        run.out = root.join(&folder);
        let report = run.run()?;
        rows.push(AblationRow::new(e, folder, &report)?);
    }
    let ablation = Ablation { dataset, rows };
    write(&root, &ablation)?;
    for r in &ablation.rows {
        link_into_card(&root.join(&r.folder), &root)?;
    }
    Ok(ablation)
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2}", 100.0 * x)
    } else {
        "-".into()
    }
}

/// The comparison as a Markdown table.
pub fn markdown(a: &Ablation) -> String {
    let split = a.rows.first().map_or("test", |r| {
        if r.split.is_empty() {
            "test"
        } else {
            r.split.as_str()
        }
    });
    let mut s = format!(
        "Label smoothing ablation on {}: the same recipe, seed and data for each value; each \
         run's epoch chosen on validation, its model evaluated once on the {split} split.\n\n\
         | label smoothing | top-1 % | top-5 % | NLL | ECE % | mean top prob., correct | mean top prob., wrong | chosen epoch |\n\
         |---|---|---|---|---|---|---|---|\n",
        a.dataset
    );
    for r in &a.rows {
        s += &format!(
            "| {} | {} | {} | {:.4} | {} | {:.3} | {:.3} | {} |\n",
            r.eps,
            pct(r.top1),
            pct(r.top5),
            r.nll,
            pct(r.ece),
            r.mean_confidence_correct,
            r.mean_confidence_wrong,
            r.best_epoch
        );
    }
    s
}

/// Writes `ablation.json`, `ablation.md` and the two plots into `dir`.
fn write(dir: &Path, a: &Ablation) -> Result<()> {
    let json = serde_json::to_string_pretty(a).map_err(candle_core::Error::wrap)?;
    atomic_write_bytes(&dir.join("ablation.json"), json.as_bytes())?;
    atomic_write_bytes(&dir.join("ablation.md"), markdown(a).as_bytes())?;
    let panels: Vec<(String, Vec<Bin>, f64)> = a
        .rows
        .iter()
        .map(|r| (format!("eps {}", r.eps), r.reliability.clone(), r.ece))
        .collect();
    crate::plot::reliability_panels(&dir.join("ablation-reliability.png"), &panels)?;
    let series: Vec<(String, Vec<(f64, f64)>)> = a
        .rows
        .iter()
        .map(|r| {
            let pts = r
                .top1_by_epoch
                .iter()
                .enumerate()
                .map(|(i, v)| ((i + 1) as f64, 100.0 * v))
                .collect();
            (format!("eps {}", r.eps), pts)
        })
        .collect();
    crate::plot::lines(
        &dir.join("ablation-curves.png"),
        "validation top-1 by epoch",
        "epoch",
        "top-1 %",
        &series,
    )
}

const BEGIN: &str = "<!-- ablate-smoothing -->";
const END: &str = "<!-- /ablate-smoothing -->";

/// Adds the ablation in `ablation_dir` (its `ablation.json` and plots) to the model card of the
/// train-cars folder `model_dir`: the plots are copied into the folder and the card gets (or has
/// replaced) a "Label smoothing ablation" section with the table, so the card reads the same
/// once the folder is on the Hub (no local path goes into it).
pub fn link_into_card(model_dir: &Path, ablation_dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(ablation_dir.join("ablation.json")).map_err(|e| {
        candle_core::Error::Msg(format!(
            "ablation: cannot read {}: {e}",
            ablation_dir.join("ablation.json").display()
        ))
    })?;
    let a: Ablation = serde_json::from_str(&text).map_err(|e| {
        candle_core::Error::Msg(format!(
            "ablation: {} is not an ablation: {e}",
            ablation_dir.display()
        ))
    })?;
    for f in ["ablation-reliability.png", "ablation-curves.png"] {
        let bytes = std::fs::read(ablation_dir.join(f))?;
        atomic_write_bytes(&model_dir.join(f), &bytes)?;
    }
    let card_path: PathBuf = model_dir.join("README.md");
    let card = std::fs::read_to_string(&card_path).map_err(|e| {
        candle_core::Error::Msg(format!(
            "ablation: no model card at {}: {e}",
            card_path.display()
        ))
    })?;
    let section = format!(
        "{BEGIN}\n## Label smoothing ablation\n\n{}\n![reliability diagrams](ablation-reliability.png)\n\n![validation top-1 by epoch](ablation-curves.png)\n{END}\n",
        markdown(&a)
    );
    let new = match (card.find(BEGIN), card.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!(
                "{}{section}{}",
                &card[..b],
                card[e + END.len()..].trim_start_matches('\n')
            )
        }
        _ => format!(
            "{}\n{section}",
            card.trim_end_matches('\n').to_string() + "\n"
        ),
    };
    atomic_write_bytes(&card_path, new.as_bytes())
}
