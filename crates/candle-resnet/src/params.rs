//! Parameter groups for optimizers: backbone vs head, decayed vs not decayed, and freezing.

use candle_core::Var;
use candle_nn::VarMap;

/// Whether a variable is a batch-norm running statistic (a buffer, never trained).
///
/// ```
/// use candle_resnet::params::is_buffer;
/// assert!(is_buffer("layer1.0.bn1.running_var"));
/// assert!(!is_buffer("layer1.0.bn1.weight"));
/// ```
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// Whether a variable belongs to the classification head (`fc.*`).
///
/// ```
/// assert!(candle_resnet::params::is_head("fc.bias"));
/// assert!(!candle_resnet::params::is_head("layer4.1.conv2.weight"));
/// ```
pub fn is_head(name: &str) -> bool {
    name.starts_with("fc.")
}

/// One group of trainable variables, sorted by name.
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// `(name, variable)` pairs.
    pub vars: Vec<(String, Var)>,
}

impl Group {
    /// The variables alone.
    ///
    /// ```
    /// assert!(candle_resnet::params::Group::default().vars().is_empty());
    /// ```
    pub fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Number of scalar parameters in the group.
    ///
    /// ```
    /// assert_eq!(candle_resnet::params::Group::default().numel(), 0);
    /// ```
    pub fn numel(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

/// The trainable variables of a ResNet split four ways. Batch-norm weights and biases and every
/// bias (all tensors of rank <= 1) take no weight decay; `fc.*` is the head.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_resnet::params::ParamGroups;
/// let vm = VarMap::new();
/// candle_resnet::resnet::resnet18(196, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
/// let g = ParamGroups::from_varmap(&vm);
/// assert_eq!(g.head_decay.vars.len(), 1);     // fc.weight
/// assert_eq!(g.head_no_decay.vars.len(), 1);  // fc.bias
/// assert_eq!(g.backbone_decay.vars.len(), 20); // the convolutions
/// assert_eq!(g.trainable(true).len(), 2);     // frozen backbone: the head only
/// ```
#[derive(Debug, Clone, Default)]
pub struct ParamGroups {
    /// Backbone convolution weights.
    pub backbone_decay: Group,
    /// Backbone batch-norm weights and biases.
    pub backbone_no_decay: Group,
    /// `fc.weight`.
    pub head_decay: Group,
    /// `fc.bias`.
    pub head_no_decay: Group,
}

impl ParamGroups {
    /// Splits the trainable variables of `varmap` (running statistics are left out).
    ///
    /// ```
    /// let g = candle_resnet::params::ParamGroups::from_varmap(&candle_nn::VarMap::new());
    /// assert!(g.trainable(false).is_empty());
    /// ```
    pub fn from_varmap(varmap: &VarMap) -> Self {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        let mut names: Vec<&String> = data.keys().filter(|n| !is_buffer(n)).collect();
        names.sort();
        let mut g = Self::default();
        for name in names {
            let var = data[name].clone();
            let no_decay = var.rank() <= 1 || name.ends_with(".bias");
            let group = match (is_head(name), no_decay) {
                (false, false) => &mut g.backbone_decay,
                (false, true) => &mut g.backbone_no_decay,
                (true, false) => &mut g.head_decay,
                (true, true) => &mut g.head_no_decay,
            };
            group.vars.push((name.clone(), var));
        }
        g
    }

    /// Every variable to hand to an optimizer; only the head's when `freeze_backbone`.
    ///
    /// ```
    /// let g = candle_resnet::params::ParamGroups::default();
    /// assert!(g.trainable(true).is_empty());
    /// ```
    pub fn trainable(&self, freeze_backbone: bool) -> Vec<Var> {
        let mut v = Vec::new();
        if !freeze_backbone {
            v.extend(self.backbone_decay.vars());
            v.extend(self.backbone_no_decay.vars());
        }
        v.extend(self.head_decay.vars());
        v.extend(self.head_no_decay.vars());
        v
    }
}
