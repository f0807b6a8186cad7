//! What a recipe change buys: the same data, seed and budget trained once per variant, compared
//! on accuracy and calibration. `cargo xtask ablate-smoothing` varies the label smoothing;
//! `cargo xtask ablate` compares named recipes (`none`, `smoothing`, `mixup+cutmix`, ...; see
//! [`recipe_variants`]).
//!
//! Each run is [`FineTune::run`] with only its training settings and the output folder changed
//! (`OUT/<variant>/`, a complete model folder). Each run's epoch is chosen on validation and
//! its model evaluated once on test; the comparison is of those test figures, in `OUT`:
//! `ablation.json` and `ablation.md` (top-1, top-5, NLL, ECE, mean top probability on correct
//! and on wrong predictions), `ablation-reliability.png` (the reliability diagrams side by side)
//! and `ablation-curves.png` (validation top-1 per epoch, overlaid). Every run's
//! model card gets the comparison as a section, its files copied into the folder so the card
//! reads the same on the Hub; [`link_into_card`] does the same for any other train-cars folder.

use crate::eval::{Bin, EvalResult};
use crate::files::atomic_write_bytes;
use crate::recipe::{FineTune, RunReport};
use crate::train::{Notice, Observer, TrainConfig};
use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The smoothing values compared by default.
pub const DEFAULT_EPS: [f64; 4] = [0.0, 0.05, 0.1, 0.2];

/// The recipes `cargo xtask ablate` compares by default.
pub const DEFAULT_RECIPES: [&str; 5] = [
    "none",
    "smoothing",
    "mixup+cutmix",
    "smoothing+mixup+cutmix",
    "smoothing+mixup+cutmix+ema",
];

/// The ingredients a recipe name joins with `+`, each with what it turns on when the command
/// line leaves that setting off.
pub const INGREDIENTS: [(&str, &str); 11] = [
    ("smoothing", "label smoothing 0.1"),
    ("mixup", "mixup alpha 0.2"),
    ("cutmix", "CutMix alpha 1.0"),
    ("ema", "weight EMA (decay 0.9998 unless given)"),
    ("ta", "TrivialAugmentWide"),
    ("ra", "RandAugment, 2 ops at magnitude 9"),
    ("jitter", "colour jitter 0.4"),
    ("erasing", "random erasing 0.25"),
    ("droppath", "drop path 0.05"),
    ("clip", "gradient clipping at norm 1"),
    ("none", "nothing (alone: the plain recipe)"),
];

/// One run of an ablation: a name, its folder and its training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Name in the table (`smoothing+mixup`, `eps 0.1`).
    pub name: String,
    /// Folder of its run, under the ablation folder.
    pub folder: String,
    /// Its training settings.
    pub train: TrainConfig,
}

/// One variant per smoothing value: `base` with `label_smoothing` replaced.
///
/// ```
/// let v = candle_finetune::ablation::smoothing_variants(&Default::default(), &[0.0, 0.1]).unwrap();
/// assert_eq!((v[1].folder.as_str(), v[1].train.label_smoothing), ("eps-0.1", 0.1));
/// assert!(candle_finetune::ablation::smoothing_variants(&Default::default(), &[0.1, 0.1]).is_err());
/// ```
pub fn smoothing_variants(base: &TrainConfig, eps: &[f64]) -> Result<Vec<Variant>> {
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
    Ok(eps
        .iter()
        .map(|&e| Variant {
            name: format!("label smoothing {e}"),
            folder: format!("eps-{e}"),
            train: TrainConfig {
                label_smoothing: e,
                ..base.clone()
            },
        })
        .collect())
}

/// One variant per recipe name: `base` with every ingredient of [`INGREDIENTS`] turned off,
/// then the named ones turned on, each at the value `base` gives it or, where `base` leaves it
/// off, at the value [`INGREDIENTS`] states. Names join ingredients with `+`.
///
/// ```
/// use candle_finetune::{ablation::recipe_variants, train::TrainConfig};
/// let base = TrainConfig { mixup_alpha: 0.8, ..Default::default() };
/// let v = recipe_variants(&base, &["none".into(), "smoothing+mixup".into()]).unwrap();
/// assert_eq!((v[0].train.label_smoothing, v[0].train.mixup_alpha), (0.0, 0.0));
/// assert_eq!((v[1].train.label_smoothing, v[1].train.mixup_alpha), (0.1, 0.8));
/// assert!(recipe_variants(&base, &["smoothing+dropout".into()]).unwrap_err().to_string().contains("dropout"));
/// ```
pub fn recipe_variants(base: &TrainConfig, names: &[String]) -> Result<Vec<Variant>> {
    if names.is_empty() {
        bail!("ablate: no recipes given");
    }
    let off = TrainConfig {
        label_smoothing: 0.0,
        mixup_alpha: 0.0,
        cutmix_alpha: 0.0,
        cutmix_minmax: None,
        model_ema: false,
        auto_augment: None,
        color_jitter: None,
        reprob: 0.0,
        drop_path: 0.0,
        clip_grad: None,
        ..base.clone()
    };
    let or = |given: f64, default: f64| if given > 0.0 { given } else { default };
    let mut out: Vec<Variant> = Vec::new();
    for name in names {
        let mut t = off.clone();
        let mut parts: Vec<&str> = name.split('+').map(str::trim).collect();
        parts.sort();
        parts.dedup();
        for p in &parts {
            match *p {
                "none" if parts.len() == 1 => {}
                "smoothing" => t.label_smoothing = or(base.label_smoothing, 0.1),
                "mixup" => t.mixup_alpha = or(base.mixup_alpha, 0.2),
                "cutmix" => {
                    t.cutmix_alpha = or(base.cutmix_alpha, 1.0);
                    t.cutmix_minmax = base.cutmix_minmax.clone();
                }
                "ema" => t.model_ema = true,
                "ta" | "ra" if t.auto_augment.is_some() => {
                    bail!("ablate: recipe {name:?} names two auto-augment policies (ta, ra)")
                }
                "ta" => t.auto_augment = Some("ta_wide".into()),
                "ra" => t.auto_augment = Some("ra".into()),
                "jitter" => t.color_jitter = Some(base.color_jitter.clone().unwrap_or(vec![0.4])),
                "erasing" => t.reprob = or(base.reprob, 0.25),
                "droppath" => t.drop_path = or(base.drop_path, 0.05),
                "clip" => t.clip_grad = Some(base.clip_grad.unwrap_or(1.0)),
                other => {
                    let known: Vec<&str> = INGREDIENTS.iter().map(|i| i.0).collect();
                    bail!(
                        "ablate: recipe {name:?}: {other:?} is not an ingredient ({}; join them \
                         with +, `none` alone)",
                        known.join(", ")
                    )
                }
            }
        }
        t.validate()?;
        let folder = format!("recipe-{}", name.replace('+', "-").replace(' ', ""));
        if out.iter().any(|v| v.train == t) {
            bail!("ablate: recipe {name:?} is listed twice (or equals another)");
        }
        out.push(Variant {
            name: name.clone(),
            folder,
            train: t,
        });
    }
    Ok(out)
}

/// One run of the ablation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationRow {
    /// Name of the run's variant (`label smoothing 0.1`, `smoothing+mixup`).
    #[serde(default)]
    pub recipe: String,
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
    fn new(v: &Variant, report: &RunReport) -> Result<Self> {
        let (b, split): (&EvalResult, &str) = match (&report.test, &report.fit.best) {
            (Some(t), _) => (t, "test"),
            (None, Some(v)) => (v, "validation"),
            (None, None) => bail!(
                "ablation: the run {:?} evaluated nothing (the data has no validation and no \
                 test split)",
                v.name
            ),
        };
        Ok(Self {
            recipe: v.name.clone(),
            eps: v.train.label_smoothing,
            folder: v.folder.clone(),
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
    /// What was varied (`Label smoothing ablation`, `Recipe ablation`): the title of the
    /// cards' section.
    #[serde(default = "default_title")]
    pub title: String,
    /// The data the runs used (the card's dataset name).
    pub dataset: String,
    /// One row per smoothing value, in the order run.
    pub rows: Vec<AblationRow>,
}

fn default_title() -> String {
    "Label smoothing ablation".into()
}

/// An ablation over `eps` of the recipe `base` (its `label_smoothing` and `out` are replaced).
///
/// ```no_run
/// use candle_finetune::ablation::{ablate_smoothing, DEFAULT_EPS};
/// use candle_finetune::{recipe::FineTune, train::TrainConfig};
/// let base = FineTune { train: TrainConfig { epochs: 30, ..Default::default() },
///     out: "out/ablate-smoothing".into(), ..Default::default() };
/// let a = ablate_smoothing(&base, &DEFAULT_EPS, &mut candle_finetune::train::Silent).unwrap();
/// for r in &a.rows {
///     println!("eps {}: top-1 {:.2} %, ECE {:.2} %", r.eps, 100.0 * r.top1, 100.0 * r.ece);
/// }
/// ```
pub fn ablate_smoothing(
    base: &FineTune,
    eps: &[f64],
    observer: &mut dyn Observer,
) -> Result<Ablation> {
    let variants = smoothing_variants(&base.train, eps)?;
    ablate(base, &variants, "Label smoothing ablation", observer)
}

/// An ablation over named recipes ([`recipe_variants`]) of `base`.
///
/// ```no_run
/// use candle_finetune::ablation::{ablate_recipes, DEFAULT_RECIPES};
/// use candle_finetune::{recipe::FineTune, train::TrainConfig};
/// let base = FineTune { train: TrainConfig { epochs: 30, ..Default::default() },
///     out: "out/ablate".into(), ..Default::default() };
/// let names: Vec<String> = DEFAULT_RECIPES.iter().map(|s| s.to_string()).collect();
/// let a = ablate_recipes(&base, &names, &mut candle_finetune::train::Silent).unwrap();
/// println!("{}", candle_finetune::ablation::markdown(&a));
/// ```
pub fn ablate_recipes(
    base: &FineTune,
    names: &[String],
    observer: &mut dyn Observer,
) -> Result<Ablation> {
    let variants = recipe_variants(&base.train, names)?;
    ablate(base, &variants, "Recipe ablation", observer)
}

/// Runs `base` once per variant (its training settings and output folder replaced: `base.out`
/// is the ablation folder), then writes and links the comparison titled `title`. Each run reports
/// to `observer`, after a [`Notice::Variant`] naming it.
pub fn ablate(
    base: &FineTune,
    variants: &[Variant],
    title: &str,
    observer: &mut dyn Observer,
) -> Result<Ablation> {
    if variants.is_empty() {
        bail!("ablation: nothing to compare");
    }
    let root = base.out.clone();
    std::fs::create_dir_all(&root)?;
    let dataset = base.dataset_info(None, None)?.name;
    let mut rows = Vec::new();
    for v in variants {
        let mut run = base.clone();
        run.train = v.train.clone();
        run.out = root.join(&v.folder);
        observer.notice(&Notice::Variant {
            name: v.name.clone(),
            out: run.out.clone(),
        });
        let report = run.run_with(observer)?;
        rows.push(AblationRow::new(v, &report)?);
    }
    let ablation = Ablation {
        title: title.into(),
        dataset,
        rows,
    };
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
        "{} on {}: the same data, seed and budget for each run; each run's epoch chosen on \
         validation, its model evaluated once on the {split} split.\n\n\
         | run | label smoothing | top-1 % | top-5 % | NLL | ECE % | mean top prob., correct | mean top prob., wrong | chosen epoch |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        a.title, a.dataset
    );
    for r in &a.rows {
        let name = if r.recipe.is_empty() {
            format!("label smoothing {}", r.eps)
        } else {
            r.recipe.clone()
        };
        s += &format!(
            "| {} | {} | {} | {} | {:.4} | {} | {:.3} | {:.3} | {} |\n",
            name,
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

/// A row's name in the plots.
fn label(r: &AblationRow) -> String {
    if r.recipe.is_empty() || r.recipe.starts_with("label smoothing") {
        format!("eps {}", r.eps)
    } else {
        r.recipe.clone()
    }
}

/// Writes `ablation.json`, `ablation.md` and the two plots into `dir`.
fn write(dir: &Path, a: &Ablation) -> Result<()> {
    let json = serde_json::to_string_pretty(a).map_err(candle_core::Error::wrap)?;
    atomic_write_bytes(&dir.join("ablation.json"), json.as_bytes())?;
    atomic_write_bytes(&dir.join("ablation.md"), markdown(a).as_bytes())?;
    let panels: Vec<(String, Vec<Bin>, f64)> = a
        .rows
        .iter()
        .map(|r| (label(r), r.reliability.clone(), r.ece))
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
            (label(r), pts)
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
        "{BEGIN}\n## {}\n\n{}\n![reliability diagrams](ablation-reliability.png)\n\n![validation top-1 by epoch](ablation-curves.png)\n{END}\n",
        a.title,
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
