//! The training configuration: the official YAML keys (`ssl_default_config.yaml`) as typed structs.
//!
//! CONTRACT (skeleton; the loading, merging, overrides and validation are to be implemented):
//! * `TrainConfig::default()` = the official `ssl_default_config.yaml` values plus this crate's additions.
//! * `TrainConfig::load(files, overrides)` merges YAML files onto the defaults, then `key=value` overrides.
//! * `TrainConfig::validate()` rejects impossible values before any work starts.

use serde::{Deserialize, Serialize};

/// Every section of the configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct TrainConfig {
    /// `MODEL.WEIGHTS`.
    #[serde(rename = "MODEL")]
    pub model: ModelSection,
    /// `compute_precision` (accepted for compatibility; the CPU trainer computes in f32).
    pub compute_precision: serde_json::Value,
    /// `dino`.
    pub dino: DinoSection,
    /// `ibot`.
    pub ibot: IbotSection,
    /// `train`.
    pub train: TrainSection,
    /// `student`.
    pub student: StudentSection,
    /// `teacher`.
    pub teacher: TeacherSection,
    /// `optim`.
    pub optim: OptimSection,
    /// `crops`.
    pub crops: CropsSection,
    /// `evaluation`.
    pub evaluation: EvaluationSection,
}

/// `MODEL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `MODEL.WEIGHTS`: official resume/load path ('' = none).
    #[serde(rename = "WEIGHTS")]
    pub weights: String,
}

/// `dino`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DinoSection {
    /// 1.0
    pub loss_weight: f64,
    /// 65536
    pub head_n_prototypes: usize,
    /// 256
    pub head_bottleneck_dim: usize,
    /// 3
    pub head_nlayers: usize,
    /// 2048
    pub head_hidden_dim: usize,
    /// 0.1
    pub koleo_loss_weight: f64,
}

/// `ibot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IbotSection {
    /// 1.0
    pub loss_weight: f64,
    /// 0.5
    pub mask_sample_probability: f64,
    /// [0.1, 0.5]
    pub mask_ratio_min_max: [f64; 2],
    /// false
    pub separate_head: bool,
    /// 65536
    pub head_n_prototypes: usize,
    /// 256
    pub head_bottleneck_dim: usize,
    /// 3
    pub head_nlayers: usize,
    /// 2048
    pub head_hidden_dim: usize,
}

/// `train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(non_snake_case)]
pub struct TrainSection {
    /// 64
    pub batch_size_per_gpu: usize,
    /// An image folder (recursive), or a dinov2-data dataset string (`ImageNet:split=TRAIN:root=...`).
    pub dataset_path: String,
    /// `.`
    pub output_dir: String,
    /// 20 (never read by the official code; accepted).
    pub saveckp_freq: u64,
    /// 0: seeds the initialisation, the data order, the augmentations and stochastic depth.
    pub seed: u64,
    /// 10: data loader threads.
    pub num_workers: usize,
    /// 1250 iterations per "epoch".
    pub OFFICIAL_EPOCH_LENGTH: u64,
    /// true (accepted; no effect).
    pub cache_dataset: bool,
    /// `centering` or `sinkhorn_knopp`.
    pub centering: String,
    /// Ours: iterations between full checkpoints; 0 = the official 3 × OFFICIAL_EPOCH_LENGTH.
    pub checkpoint_period: u64,
    /// Ours: full checkpoints kept (official 3).
    pub checkpoints_to_keep: usize,
    /// Ours: iterations between metric lines (official 10).
    pub log_period: u64,
}

/// `student`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentSection {
    /// `vit_small`, `vit_base`, `vit_large`, `vit_giant2`, or `vit_tiny` (ours: 192 wide, 3 heads, 12 blocks).
    pub arch: String,
    /// 16
    pub patch_size: usize,
    /// 0.3
    pub drop_path_rate: f64,
    /// 1e-5 (LayerScale init; 0 = no LayerScale)
    pub layerscale: f64,
    /// true
    pub drop_path_uniform: bool,
    /// '' or a checkpoint whose backbone initialises the student.
    pub pretrained_weights: String,
    /// `mlp`, `swiglu`, `swiglufused`.
    pub ffn_layer: String,
    /// 0 (accepted; checkpoints use unchunked names).
    pub block_chunks: usize,
    /// true
    pub qkv_bias: bool,
    /// true
    pub proj_bias: bool,
    /// true
    pub ffn_bias: bool,
    /// 0
    pub num_register_tokens: usize,
    /// false
    pub interpolate_antialias: bool,
    /// 0.1
    pub interpolate_offset: f64,
}

/// `teacher`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// 0.992
    pub momentum_teacher: f64,
    /// 1.0
    pub final_momentum_teacher: f64,
    /// 0.04
    pub warmup_teacher_temp: f64,
    /// 0.07
    pub teacher_temp: f64,
    /// 30
    pub warmup_teacher_temp_epochs: u64,
}

/// `optim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    /// 100
    pub epochs: u64,
    /// 0.04
    pub weight_decay: f64,
    /// 0.4
    pub weight_decay_end: f64,
    /// 0.004 (for a batch of 1024)
    pub base_lr: f64,
    /// 0 (set by the scaling rule: `base_lr · sqrt(batch / 1024)`)
    pub lr: f64,
    /// 10
    pub warmup_epochs: u64,
    /// 1e-6
    pub min_lr: f64,
    /// 3.0 (0 = no clipping)
    pub clip_grad: f64,
    /// 1
    pub freeze_last_layer_epochs: u64,
    /// `sqrt_wrt_1024`
    pub scaling_rule: String,
    /// 0.2
    pub patch_embed_lr_mult: f64,
    /// 0.9
    pub layerwise_decay: f64,
    /// 0.9
    pub adamw_beta1: f64,
    /// 0.999
    pub adamw_beta2: f64,
}

/// `crops`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropsSection {
    /// [0.32, 1.0]
    pub global_crops_scale: [f64; 2],
    /// 8
    pub local_crops_number: usize,
    /// [0.05, 0.32]
    pub local_crops_scale: [f64; 2],
    /// 224
    pub global_crops_size: usize,
    /// 96
    pub local_crops_size: usize,
}

/// `evaluation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSection {
    /// 12500
    pub eval_period_iterations: u64,
}
