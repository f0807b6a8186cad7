//! The Stanford Cars preset (`cargo xtask train-cars`): the general [`FineTune`] recipe with
//! the Stanford Cars mirror at its pinned revision, ImageNet ResNet-18 from
//! `timm/resnet18.tv_in1k`, the [`TrainConfig`] defaults and the output folder
//! `out/resnet18-stanford-cars`.

use super::{DeviceKind, FineTune, DEFAULT_VALIDATION_FRACTION};
use crate::data::features::ColumnChoice;
use crate::data::{DataSource, PreprocessOverrides};
use crate::hub::HubOptions;
use crate::pretrained::{WeightsSource, DEFAULT_FILE, DEFAULT_REPO, DEFAULT_REVISION};
use crate::train::TrainConfig;
use candle_resnet::resnet::Arch;
use std::path::PathBuf;

/// The preset's output folder.
pub const DEFAULT_OUT: &str = "out/resnet18-stanford-cars";

/// The Stanford Cars run: 8,144 train images (10 % held out for validation, stratified over
/// the 196 classes) and 8,041 test images, ResNet-18 from ImageNet, 90 epochs of the torchvision
/// anchor recipe with label smoothing 0.1.
///
/// ```
/// let run = candle_finetune::recipe::cars::stanford_cars();
/// assert_eq!(run.out, std::path::Path::new("out/resnet18-stanford-cars"));
/// assert_eq!(run.train.label_smoothing, 0.1);
/// ```
pub fn stanford_cars() -> FineTune {
    FineTune {
        hub: HubOptions::from_env(),
        data: DataSource::stanford_cars(),
        columns: ColumnChoice::default(),
        validation_fraction: DEFAULT_VALIDATION_FRACTION,
        parquet_cache_bytes: crate::data::stream::DEFAULT_CACHE_BYTES,
        dataset_name: None,
        dataset_license: None,
        dataset_info: None,
        weights: WeightsSource::Hub {
            repo: DEFAULT_REPO.into(),
            revision: DEFAULT_REVISION.into(),
            file: DEFAULT_FILE.into(),
        },
        arch: Arch::ResNet18,
        image_size: None,
        preprocess: PreprocessOverrides::default(),
        train: TrainConfig::default(),
        device: DeviceKind::Cpu,
        out: PathBuf::from(DEFAULT_OUT),
        resume: false,
        smoke: false,
        stop: None,
        world: None,
        command: "cargo xtask train-cars".into(),
    }
}
