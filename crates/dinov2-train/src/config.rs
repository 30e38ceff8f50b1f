//! The training configuration: the official YAML keys (`ssl_default_config.yaml`) as typed structs, loaded the
//! official way.
//!
//! * [`TrainConfig::default()`] is our `configs/default.yaml` (embedded; [`TrainConfig::default_yaml`]): the
//!   official `ssl_default_config.yaml` keys and values plus this crate's additions: three in `train`
//!   (`checkpoint_period`, `checkpoints_to_keep`, `log_period`) and the periodic k-NN in `evaluation`
//!   (`knn_train_dataset`, `knn_val_dataset`, `knn_nb_knn`, `knn_temperature`).
//! * [`TrainConfig::load`] merges a YAML file onto the defaults, then `key=value` overrides (OmegaConf dotlist style,
//!   as the official `train.py` command line), then [`validates`](TrainConfig::validate). The merge works on a
//!   generic YAML tree, key by key, as `OmegaConf.merge`: mappings merge, lists and scalars replace. Unlike
//!   OmegaConf, a key the defaults do not have is an [`Error::UnknownKey`] with the closest valid key, and a value of
//!   the wrong type an [`Error::InvalidConfig`] naming the dotted key.
//! * The conversions ([`TrainConfig::student_vit`], [`TrainConfig::dino_head`], [`TrainConfig::loss`],
//!   [`TrainConfig::augmentation`], [`TrainConfig::masking`], [`TrainConfig::lr`], ...) turn the sections into the
//!   option structs of `dinov2-model`, `dinov2-loss` and `dinov2-data`, as the official `SSLMetaArch` and `train.py`
//!   build their objects.
//!
//! ```
//! use dinov2_train::TrainConfig;
//! let cfg = TrainConfig::load(None, &["student.arch=vit_small", "optim.epochs=10", "train.dataset_path=/data/x"])?;
//! assert_eq!((cfg.student.arch.as_str(), cfg.max_iter()), ("vit_small", 10 * 1250));
//! assert_eq!(cfg.train.dataset_path, "/data/x");
//! # Ok::<(), dinov2_train::Error>(())
//! ```

use std::fmt::Display;
use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_norway::{Mapping, Value};

use dinov2_data::{
    BlurProbabilities, CropsConfig, DataAugmentationDino, MaskCollate, MaskingGenerator,
};
use dinov2_loss::{DinoHeadConfig, DinoLossConfig, DinoV2LossConfig, KoLeoLossConfig, TargetMode};
use dinov2_model::{FfnKind, PosEmbedInterpolation, VitConfig};

use crate::error::{Error, Result};

/// The default configuration text (ours; the official `ssl_default_config.yaml` keys and values plus our additions).
const DEFAULT_YAML: &str = include_str!("../configs/default.yaml");

/// Values of `student.arch` (the official names, plus `vit_tiny`: 192 wide, 12 blocks, 3 heads, MLP ratio 4).
/// The official `_memeff` suffix (`vit_large_memeff`) is accepted and ignored, as `build_model` does.
pub const ARCHS: &[&str] = &[
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "vit_giant2",
];
/// Values of `student.ffn_layer` (`swiglu` and `swiglufused` are the same layer, as official; the official
/// `identity` FFN is not supported).
pub const FFN_LAYERS: &[&str] = &["mlp", "swiglu", "swiglufused"];
/// Values of `train.centering`.
pub const CENTERINGS: &[&str] = &["centering", "sinkhorn_knopp"];
/// Values of `optim.scaling_rule` (the only rule the official code implements).
pub const SCALING_RULES: &[&str] = &["sqrt_wrt_1024"];
/// Sinkhorn-Knopp iterations of the official `sinkhorn_knopp_teacher` calls.
const SINKHORN_ITERATIONS: usize = 3;
/// The section under which values are accepted as they are (only its keys are checked).
const OPAQUE_SECTION: &str = "compute_precision";

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
    /// `distillation` (ours: the paper's distillation recipe, see [`crate::distill`]).
    pub distillation: DistillationSection,
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
    /// Ours: k-NN evaluation of the teacher during training, every `eval_period_iterations` and at the end, when
    /// this and `knn_val_dataset` are set: a labelled dataset string or image folder with one subfolder per class
    /// (`''`: off). The accuracies go to the metrics log.
    pub knn_train_dataset: String,
    /// Ours: the labelled validation set of the periodic k-NN (classes matched by name for folders).
    pub knn_val_dataset: String,
    /// Ours: the k values of the periodic k-NN ([10, 20, 100, 200], as `eval/knn.py`).
    pub knn_nb_knn: Vec<usize>,
    /// Ours: its voting temperature (0.07). The sets are embedded `train.batch_size_per_gpu` images at a time.
    pub knn_temperature: f64,
}

impl EvaluationSection {
    /// Whether the periodic k-NN evaluation is configured.
    pub fn knn_enabled(&self) -> bool {
        !self.knn_train_dataset.trim().is_empty() && !self.knn_val_dataset.trim().is_empty()
    }
}

/// `distillation` (ours; not an official section): distil a frozen pretrained teacher into the `student`
/// (see [`crate::distill`]). With `enabled`, the `teacher` section's momentum schedule drives the student's EMA
/// (the exported model) and its temperatures the frozen teacher's targets; nothing is masked (the `ibot.mask_*`
/// keys are not used: iBOT runs on every patch of the global crops) and `student.drop_path_rate` must be 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillationSection {
    /// false
    pub enabled: bool,
    /// The teacher: a weights file or directory in any layout `dinov2 embed --model` reads, an official name
    /// (`dinov2_vitg14`), a Hub id, or a `dinov2 train` output directory or checkpoint directory (whose teacher
    /// heads are used).
    pub teacher_model: String,
    /// '' or a `VitConfig` JSON file: the teacher's architecture when the weights do not say it (a width that
    /// is not a released size, without a configuration in the file).
    pub teacher_config: String,
    /// '' or the `.pth` entry holding the teacher's state dict (`teacher`, `student`, `model`).
    pub teacher_checkpoint_key: String,
}

impl Default for TrainConfig {
    /// The official defaults ([`TrainConfig::default_yaml`]).
    ///
    /// ```
    /// use dinov2_train::TrainConfig;
    /// let cfg = TrainConfig::default();
    /// assert_eq!((cfg.student.arch.as_str(), cfg.student.patch_size, cfg.train.batch_size_per_gpu), ("vit_large", 16, 64));
    /// assert_eq!((cfg.optim.base_lr, cfg.dino.head_n_prototypes, cfg.train.checkpoints_to_keep), (0.004, 65536, 3));
    /// assert!(cfg.validate().is_ok());
    /// ```
    fn default() -> Self {
        from_tree(default_tree()).expect("the embedded default configuration deserialises (tested)")
    }
}

impl TrainConfig {
    /// The text of the default configuration (`configs/default.yaml`, with comments): a starting point for a file.
    ///
    /// ```
    /// use dinov2_train::TrainConfig;
    /// let text = TrainConfig::default_yaml();
    /// assert!(text.contains("OFFICIAL_EPOCH_LENGTH: 1250"));
    /// assert_eq!(TrainConfig::from_yaml_str(text, "default.yaml")?, TrainConfig::default());
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn default_yaml() -> &'static str {
        DEFAULT_YAML
    }

    /// The configuration of a run: the defaults, then `file` (if any) merged onto them, then the `key=value`
    /// `overrides` in order (see [`TrainConfig::apply_overrides`]), then [`TrainConfig::validate`].
    ///
    /// Errors: [`Error::Io`] (unreadable file), [`Error::ConfigSyntax`] (not YAML, not `key=value`),
    /// [`Error::UnknownKey`], [`Error::InvalidConfig`] (wrong type or impossible value, naming the dotted key).
    ///
    /// ```
    /// use dinov2_train::{Error, TrainConfig};
    /// let dir = tempfile::tempdir().unwrap();
    /// let file = dir.path().join("tiny.yaml");
    /// std::fs::write(&file, "student:\n  arch: vit_tiny\n  patch_size: 14\ncrops:\n  local_crops_size: 98\n").unwrap();
    /// let cfg = TrainConfig::load(Some(&file), &["train.batch_size_per_gpu=8", "optim.epochs=20"])?;
    /// assert_eq!((cfg.student.patch_size, cfg.train.batch_size_per_gpu, cfg.optim.epochs), (14, 8, 20));
    /// assert_eq!(cfg.optim.warmup_epochs, 10); // from the defaults...
    /// let err = TrainConfig::load(Some(&file), &["optim.epochs=2"]).unwrap_err();
    /// assert!(matches!(err, Error::InvalidConfig { ref key, .. } if key == "optim.warmup_epochs")); // ...so > 2
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn load(file: Option<&Path>, overrides: &[impl AsRef<str>]) -> Result<Self> {
        let mut tree = default_tree().clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            merge_document(&mut tree, &text, &path.display().to_string())?;
        }
        for o in overrides {
            apply_override(&mut tree, o.as_ref())?;
        }
        let cfg = from_tree(&tree)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A YAML document merged onto the defaults (`source_name` names it in errors). Not validated: call
    /// [`TrainConfig::validate`] once the configuration is complete.
    ///
    /// An official file such as `train/vitl14.yaml` loads unchanged; an empty document gives the defaults.
    ///
    /// ```
    /// use dinov2_train::{Error, TrainConfig};
    /// let cfg = TrainConfig::from_yaml_str("optim:\n  epochs: 500\n  base_lr: 2.0e-04\n", "my.yaml")?;
    /// assert_eq!((cfg.optim.epochs, cfg.optim.base_lr, cfg.optim.warmup_epochs), (500, 2e-4, 10));
    /// let err = TrainConfig::from_yaml_str("optim:\n  lr_base: 0.1\n", "my.yaml").unwrap_err();
    /// assert!(matches!(err, Error::UnknownKey { suggestion: Some(ref s), .. } if s == "optim.base_lr"));
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<Self> {
        let mut tree = default_tree().clone();
        merge_document(&mut tree, text, source_name)?;
        from_tree(&tree)
    }

    /// Applies `key=value` overrides in order, in the official OmegaConf dotlist style: `key` is a dotted path
    /// (`optim.epochs`, `MODEL.WEIGHTS`), `value` a YAML scalar or flow value (`10`, `true`, `[0.1,0.4]`,
    /// `{epochs: 10}` for a section). For a string key the text is taken as it is (`train.dataset_path=/data/x`,
    /// `train.output_dir=2024`), unquoted if quoted. Not validated (see [`TrainConfig::validate`]); on error `self`
    /// is unchanged.
    ///
    /// ```
    /// use dinov2_train::{Error, TrainConfig};
    /// let mut cfg = TrainConfig::default();
    /// cfg.apply_overrides(&["ibot.mask_ratio_min_max=[0.1,0.4]", "train.dataset_path=/data/x", "MODEL.WEIGHTS="])?;
    /// assert_eq!(cfg.ibot.mask_ratio_min_max, [0.1, 0.4]);
    /// assert_eq!((cfg.train.dataset_path.as_str(), cfg.model.weights.as_str()), ("/data/x", ""));
    /// let err = cfg.apply_overrides(&["optim.epochs=ten"]).unwrap_err();
    /// assert!(matches!(err, Error::InvalidConfig { ref key, .. } if key == "optim.epochs"));
    /// assert_eq!(cfg.optim.epochs, 100);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn apply_overrides(&mut self, overrides: &[impl AsRef<str>]) -> Result<()> {
        let mut tree = serde_norway::to_value(&*self).map_err(|e| Error::ConfigSyntax {
            source_name: "the configuration".into(),
            reason: e.to_string(),
        })?;
        for o in overrides {
            apply_override(&mut tree, o.as_ref())?;
        }
        *self = from_tree(&tree)?;
        Ok(())
    }

    /// The full configuration as YAML (what the trainer writes to `OUTPUT_DIR/config.yaml`); loading it back gives
    /// an equal configuration.
    ///
    /// ```
    /// use dinov2_train::TrainConfig;
    /// let mut cfg = TrainConfig::default();
    /// cfg.apply_overrides(&["student.layerscale=1e-6", "train.dataset_path=my images"])?;
    /// let text = cfg.to_yaml();
    /// assert!(text.contains("batch_size_per_gpu: 64"));
    /// assert_eq!(TrainConfig::from_yaml_str(&text, "config.yaml")?, cfg);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn to_yaml(&self) -> String {
        match serde_norway::to_string(self) {
            Ok(text) => text,
            // unreachable with these types (string keys only), but never a panic
            Err(e) => format!("# cannot serialise the configuration: {e}\n"),
        }
    }

    /// The learning rate of the official `apply_scaling_rules_to_cfg` (`sqrt_wrt_1024`, the only rule):
    /// `base_lr * sqrt(batch_size_per_gpu * world_size / 1024)`.
    ///
    /// As in the official code, `optim.lr` is *not* read: `apply_scaling_rules_to_cfg` overwrites it
    /// unconditionally, so an `optim.lr` set in a file or an override has no effect (set `optim.base_lr`).
    ///
    /// ```
    /// use dinov2_train::TrainConfig;
    /// let mut cfg = TrainConfig::default(); // base_lr 0.004, 64 images per GPU
    /// assert!((cfg.lr(32) - 0.004 * 2f64.sqrt()).abs() < 1e-12); // vitl16_short: 32 GPUs, 2048 images
    /// cfg.optim.lr = 0.1; // ignored, as official
    /// assert_eq!(cfg.lr(16), 0.004);
    /// ```
    pub fn lr(&self, world_size: usize) -> f64 {
        let total = (self.train.batch_size_per_gpu as f64) * (world_size as f64);
        self.optim.base_lr * (total / 1024.0).sqrt()
    }

    /// Sets `optim.lr` to [`TrainConfig::lr`], as the official `apply_scaling_rules_to_cfg` does before the
    /// configuration is written to the output directory.
    ///
    /// ```
    /// let mut cfg = dinov2_train::TrainConfig::default();
    /// cfg.apply_scaling_rules(1);
    /// assert_eq!(cfg.optim.lr, 0.004 * (64f64 / 1024.0).sqrt());
    /// ```
    pub fn apply_scaling_rules(&mut self, world_size: usize) {
        self.optim.lr = self.lr(world_size);
    }

    /// Total iterations: `optim.epochs * train.OFFICIAL_EPOCH_LENGTH` (saturating; `validate` rejects an overflow).
    ///
    /// ```
    /// assert_eq!(dinov2_train::TrainConfig::default().max_iter(), 125_000);
    /// ```
    pub fn max_iter(&self) -> u64 {
        self.optim
            .epochs
            .saturating_mul(self.train.OFFICIAL_EPOCH_LENGTH)
    }

    /// Iterations between full checkpoints: `train.checkpoint_period`, or when it is 0 the official
    /// `3 * OFFICIAL_EPOCH_LENGTH`.
    ///
    /// ```
    /// let mut cfg = dinov2_train::TrainConfig::default();
    /// assert_eq!(cfg.checkpoint_period(), 3750);
    /// cfg.train.checkpoint_period = 100;
    /// assert_eq!(cfg.checkpoint_period(), 100);
    /// ```
    pub fn checkpoint_period(&self) -> u64 {
        match self.train.checkpoint_period {
            0 => self.train.OFFICIAL_EPOCH_LENGTH.saturating_mul(3),
            p => p,
        }
    }

    /// The student backbone, as the official `build_model(cfg.student, img_size=cfg.crops.global_crops_size)`:
    /// the `student.arch` size, `patch_size`, LayerScale `layerscale` (0 = none), `ffn_layer`, the biases, the
    /// registers, the interpolation `interpolate_offset`/`interpolate_antialias` as given, and stochastic depth
    /// `drop_path_rate`/`drop_path_uniform`.
    ///
    /// Errors: [`Error::InvalidConfig`] on an unknown `student.arch`/`ffn_layer`, [`Error::Model`] on a model the
    /// numbers cannot describe.
    ///
    /// ```
    /// use dinov2_model::FfnKind;
    /// use dinov2_train::TrainConfig;
    /// let cfg = TrainConfig::load(None, &["student.arch=vit_tiny", "student.patch_size=14", "crops.local_crops_size=98"])?;
    /// let vit = cfg.student_vit()?;
    /// assert_eq!((vit.embed_dim, vit.depth, vit.num_heads, vit.ffn), (192, 12, 3, FfnKind::Mlp));
    /// assert_eq!((vit.img_size, vit.patch_size, vit.layer_scale_init), (224, 14, Some(1e-5)));
    /// assert_eq!((vit.drop_path_rate, vit.drop_path_uniform), (0.3, true));
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn student_vit(&self) -> Result<VitConfig> {
        let s = &self.student;
        let mut vit = self.vit_base_config()?;
        vit.drop_path_rate = s.drop_path_rate;
        vit.drop_path_uniform = s.drop_path_uniform;
        vit.validate()?;
        Ok(vit)
    }

    /// The teacher backbone: [`TrainConfig::student_vit`] without stochastic depth (the official teacher is built
    /// with the default `drop_path_rate=0`, `drop_path_uniform=False`).
    ///
    /// ```
    /// let cfg = dinov2_train::TrainConfig::default();
    /// let (student, teacher) = (cfg.student_vit()?, cfg.teacher_vit()?);
    /// assert_eq!((teacher.drop_path_rate, teacher.drop_path_uniform), (0.0, false));
    /// assert_eq!((teacher.embed_dim, teacher.depth), (student.embed_dim, student.depth)); // ViT-L: 1024, 24
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn teacher_vit(&self) -> Result<VitConfig> {
        let vit = self.vit_base_config()?;
        vit.validate()?;
        Ok(vit)
    }

    /// The shared architecture of student and teacher, without stochastic depth.
    fn vit_base_config(&self) -> Result<VitConfig> {
        let s = &self.student;
        let mut vit = match arch_name(&s.arch) {
            "vit_tiny" => {
                let mut c = VitConfig::vit_small();
                (c.embed_dim, c.depth, c.num_heads, c.mlp_ratio) = (192, 12, 3, 4.0);
                c
            }
            "vit_small" => VitConfig::vit_small(),
            "vit_base" => VitConfig::vit_base(),
            "vit_large" => VitConfig::vit_large(),
            "vit_giant2" => VitConfig::vit_giant2(),
            _ => return Err(one_of("student.arch", &s.arch, ARCHS)),
        };
        vit.ffn = match s.ffn_layer.as_str() {
            "mlp" => FfnKind::Mlp,
            "swiglu" | "swiglufused" => FfnKind::Swiglu,
            _ => return Err(one_of("student.ffn_layer", &s.ffn_layer, FFN_LAYERS)),
        };
        vit.img_size = self.crops.global_crops_size;
        vit.patch_size = s.patch_size;
        vit.qkv_bias = s.qkv_bias;
        vit.proj_bias = s.proj_bias;
        vit.ffn_bias = s.ffn_bias;
        vit.layer_scale_init = (s.layerscale != 0.0).then_some(s.layerscale);
        vit.num_register_tokens = s.num_register_tokens;
        vit.interpolation = PosEmbedInterpolation {
            offset: s.interpolate_offset,
            antialias: s.interpolate_antialias,
        };
        vit.drop_path_rate = 0.0;
        vit.drop_path_uniform = false;
        Ok(vit)
    }

    /// The DINO head on a backbone of width `in_dim` (the official `DINOHead(in_dim, dino.head_n_prototypes,
    /// head_hidden_dim, head_bottleneck_dim, head_nlayers)`, no BatchNorm, MLP biases).
    ///
    /// ```
    /// let cfg = dinov2_train::TrainConfig::default();
    /// let head = cfg.dino_head(cfg.student_vit()?.embed_dim);
    /// assert_eq!((head.in_dim, head.out_dim, head.bottleneck_dim, head.nlayers), (1024, 65536, 256, 3));
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn dino_head(&self, in_dim: usize) -> DinoHeadConfig {
        let d = &self.dino;
        DinoHeadConfig {
            nlayers: d.head_nlayers,
            hidden_dim: d.head_hidden_dim,
            bottleneck_dim: d.head_bottleneck_dim,
            ..DinoHeadConfig::new(in_dim, d.head_n_prototypes)
        }
    }

    /// The separate iBOT head, when there is one (`ibot.separate_head` with iBOT on, `ibot.loss_weight > 0`, as
    /// official); `None` when iBOT shares the DINO head or is off.
    ///
    /// ```
    /// let mut cfg = dinov2_train::TrainConfig::default();
    /// assert!(cfg.ibot_head(384).is_none()); // shared with the DINO head
    /// cfg.apply_overrides(&["ibot.separate_head=true", "ibot.head_n_prototypes=131072"])?;
    /// assert_eq!(cfg.ibot_head(384).map(|h| (h.in_dim, h.out_dim)), Some((384, 131072)));
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn ibot_head(&self, in_dim: usize) -> Option<DinoHeadConfig> {
        let i = &self.ibot;
        (i.separate_head && i.loss_weight > 0.0).then(|| DinoHeadConfig {
            nlayers: i.head_nlayers,
            hidden_dim: i.head_hidden_dim,
            bottleneck_dim: i.head_bottleneck_dim,
            ..DinoHeadConfig::new(in_dim, i.head_n_prototypes)
        })
    }

    /// The loss options, as `SSLMetaArch` builds its losses: DINO on `dino.head_n_prototypes`, iBOT on
    /// `ibot.head_n_prototypes` with a separate head and on the DINO head's prototypes with the shared one, the
    /// three weights, and the targets of `train.centering` (`sinkhorn_knopp` with the official 3 iterations).
    /// Call [`TrainConfig::validate`] first: an unknown `train.centering` (which it rejects) maps to centering here.
    ///
    /// ```
    /// use dinov2_loss::TargetMode;
    /// let mut cfg = dinov2_train::TrainConfig::default();
    /// cfg.apply_overrides(&["ibot.head_n_prototypes=1000", "train.centering=sinkhorn_knopp"])?;
    /// let loss = cfg.loss();
    /// assert_eq!((loss.dino.out_dim, loss.ibot.out_dim), (65536, 65536)); // shared head: the DINO head's K
    /// assert_eq!(loss.target_mode, TargetMode::SinkhornKnopp { n_iterations: 3 });
    /// cfg.apply_overrides(&["ibot.separate_head=true"])?;
    /// assert_eq!(cfg.loss().ibot.out_dim, 1000);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn loss(&self) -> DinoV2LossConfig {
        let ibot_k = if self.ibot.separate_head {
            self.ibot.head_n_prototypes
        } else {
            self.dino.head_n_prototypes
        };
        DinoV2LossConfig {
            dino: DinoLossConfig::new(self.dino.head_n_prototypes),
            ibot: DinoLossConfig::new(ibot_k),
            koleo: KoLeoLossConfig::default(),
            dino_loss_weight: self.dino.loss_weight,
            koleo_loss_weight: self.dino.koleo_loss_weight,
            ibot_loss_weight: self.ibot.loss_weight,
            target_mode: self.target_mode().unwrap_or_default(),
        }
    }

    fn target_mode(&self) -> Result<TargetMode> {
        match self.train.centering.as_str() {
            "centering" => Ok(TargetMode::Centering),
            "sinkhorn_knopp" => Ok(TargetMode::SinkhornKnopp {
                n_iterations: SINKHORN_ITERATIONS,
            }),
            other => Err(one_of("train.centering", other, CENTERINGS)),
        }
    }

    /// The multi-crop augmentation of the `crops` section, with the blur probabilities of the released official
    /// code (0 / 0.9 / 0.5, [`BlurProbabilities::RELEASED`]) and its colour settings.
    ///
    /// ```
    /// let cfg = dinov2_train::TrainConfig::load(None, &["crops.local_crops_number=2", "crops.global_crops_size=112"])?;
    /// let aug = cfg.augmentation()?;
    /// assert_eq!((aug.crops.global_crops_size, aug.crops.local_crops_number), (112, 2));
    /// assert_eq!(aug.blur, dinov2_data::BlurProbabilities::RELEASED);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn augmentation(&self) -> Result<DataAugmentationDino> {
        let c = &self.crops;
        let size = |key: &str, v: usize| {
            u32::try_from(v).map_err(|_| Error::invalid(key, v, "crop size too large"))
        };
        let crops = CropsConfig {
            global_crops_scale: (c.global_crops_scale[0], c.global_crops_scale[1]),
            local_crops_number: c.local_crops_number,
            local_crops_scale: (c.local_crops_scale[0], c.local_crops_scale[1]),
            global_crops_size: size("crops.global_crops_size", c.global_crops_size)?,
            local_crops_size: size("crops.local_crops_size", c.local_crops_size)?,
        };
        Ok(DataAugmentationDino::new(
            crops,
            BlurProbabilities::RELEASED,
        )?)
    }

    /// The iBOT mask sampling of `train.py`: `ibot.mask_ratio_min_max`, `ibot.mask_sample_probability` and the
    /// official block generator for `crops.global_crops_size / student.patch_size` patches a side; in a
    /// distillation run nothing is masked (probability 0). Call [`TrainConfig::validate`] first (a zero patch
    /// size is taken as 1 here rather than divided by).
    ///
    /// ```
    /// let mut cfg = dinov2_train::TrainConfig::load(None, &["student.patch_size=14", "crops.local_crops_size=98"])?;
    /// let masking = cfg.masking();
    /// assert_eq!((masking.mask_ratio, masking.mask_probability), ((0.1, 0.5), 0.5));
    /// assert_eq!((masking.generator.height, masking.generator.max_num_patches), (16, 128.0));
    /// cfg.distillation.enabled = true;
    /// assert_eq!(cfg.masking().mask_probability, 0.0);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn masking(&self) -> MaskCollate {
        let [lo, hi] = self.ibot.mask_ratio_min_max;
        MaskCollate {
            mask_ratio: (lo as f32, hi as f32),
            mask_probability: if self.distillation.enabled {
                0.0
            } else {
                self.ibot.mask_sample_probability
            },
            generator: MaskingGenerator::for_training(
                self.crops.global_crops_size,
                self.student.patch_size.max(1),
            ),
        }
    }

    /// Rejects impossible values before any work starts, with [`Error::InvalidConfig`] naming the dotted key, the
    /// value and what it must be. Checked: sizes and counts that must be positive (batch, epochs, epoch length,
    /// head sizes and layers, patch size, checkpoints kept, log period), crop sizes (multiples of the patch size,
    /// at least one patch), the names (`student.arch`, `student.ffn_layer`, `train.centering`,
    /// `optim.scaling_rule`), probabilities, mask ratios, crop scales, momenta and betas in their ranges, positive
    /// temperatures, non-negative learning rates, weight decays, clipping and loss weights, a positive
    /// `layerwise_decay`, `warmup_epochs <= epochs`, KoLeo with one image per batch, an empty `dataset_path`.
    ///
    /// ```
    /// use dinov2_train::{Error, TrainConfig};
    /// let mut cfg = TrainConfig::default();
    /// cfg.apply_overrides(&["crops.global_crops_size=200"])?; // not a multiple of patch 16
    /// match cfg.validate() {
    ///     Err(Error::InvalidConfig { key, value, .. }) => assert_eq!((key.as_str(), value.as_str()), ("crops.global_crops_size", "200")),
    ///     other => panic!("{other:?}"),
    /// }
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.validate_finite()?;
        self.validate_train()?;
        self.validate_model()?;
        self.validate_heads()?;
        self.validate_schedules()?;
        self.validate_crops()?;
        self.validate_evaluation()?;
        self.validate_distillation()
    }

    /// No number anywhere may be NaN or infinite (YAML spells them `.nan` and `.inf`): a learning rate, a
    /// momentum or a crop scale of NaN would train on silently, or not at all.
    fn validate_finite(&self) -> Result<()> {
        fn walk(v: &Value, key: &str) -> Result<()> {
            match v {
                Value::Number(n) if n.as_f64().is_some_and(|f| !f.is_finite()) => {
                    Err(Error::invalid(key, render(v), "must be a finite number"))
                }
                Value::Mapping(m) => m
                    .iter()
                    .try_for_each(|(k, v)| walk(v, &join(key, &key_text(k)))),
                Value::Sequence(items) => items
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, v)| walk(v, &format!("{key}[{i}]"))),
                _ => Ok(()),
            }
        }
        let tree = serde_norway::to_value(self).map_err(|e| Error::ConfigSyntax {
            source_name: "the configuration".into(),
            reason: e.to_string(),
        })?;
        walk(&tree, "")
    }

    fn validate_evaluation(&self) -> Result<()> {
        let e = &self.evaluation;
        let (train, val) = (e.knn_train_dataset.trim(), e.knn_val_dataset.trim());
        if train.is_empty() != val.is_empty() {
            let (key, value) = if train.is_empty() {
                ("evaluation.knn_val_dataset", val)
            } else {
                ("evaluation.knn_train_dataset", train)
            };
            return Err(Error::invalid(
                key,
                value,
                "the periodic k-NN needs both evaluation.knn_train_dataset and evaluation.knn_val_dataset",
            ));
        }
        if !e.knn_enabled() {
            return Ok(());
        }
        positive(
            "evaluation.eval_period_iterations",
            e.eval_period_iterations,
        )?;
        if e.knn_nb_knn.is_empty() || e.knn_nb_knn.contains(&0) {
            return Err(Error::invalid(
                "evaluation.knn_nb_knn",
                format!("{:?}", e.knn_nb_knn),
                "give one or more k of at least 1, e.g. [10, 20, 100, 200]",
            ));
        }
        if !(e.knn_temperature.is_finite() && e.knn_temperature > 0.0) {
            return Err(Error::invalid(
                "evaluation.knn_temperature",
                e.knn_temperature,
                "must be positive and finite (officially 0.07)",
            ));
        }
        Ok(())
    }

    fn validate_train(&self) -> Result<()> {
        let t = &self.train;
        positive("train.batch_size_per_gpu", t.batch_size_per_gpu)?;
        if t.batch_size_per_gpu == 1
            && self.dino.loss_weight > 0.0
            && self.dino.koleo_loss_weight > 0.0
        {
            return Err(Error::invalid(
                "train.batch_size_per_gpu",
                1,
                "KoLeo needs at least 2 images per batch (it uses each image's nearest neighbour); \
                 raise the batch size or set dino.koleo_loss_weight=0",
            ));
        }
        if t.dataset_path.trim().is_empty() {
            return Err(Error::invalid(
                "train.dataset_path",
                "''",
                "give an image folder or a dataset string (ImageFolder:root=DIR, ...)",
            ));
        }
        positive("train.OFFICIAL_EPOCH_LENGTH", t.OFFICIAL_EPOCH_LENGTH)?;
        self.target_mode()?;
        positive("train.checkpoints_to_keep", t.checkpoints_to_keep)?;
        positive("train.log_period", t.log_period)
    }

    fn validate_model(&self) -> Result<()> {
        let s = &self.student;
        if !ARCHS.contains(&arch_name(&s.arch)) {
            return Err(one_of("student.arch", &s.arch, ARCHS));
        }
        if !FFN_LAYERS.contains(&s.ffn_layer.as_str()) {
            return Err(one_of("student.ffn_layer", &s.ffn_layer, FFN_LAYERS));
        }
        positive("student.patch_size", s.patch_size)?;
        in_range("student.drop_path_rate", s.drop_path_rate, 0.0, 1.0, false)?;
        at_least("student.layerscale", s.layerscale, 0.0, "0 = no LayerScale")?;
        at_least(
            "student.interpolate_offset",
            s.interpolate_offset,
            0.0,
            "officially 0.1",
        )
    }

    fn validate_heads(&self) -> Result<()> {
        let (d, i) = (&self.dino, &self.ibot);
        at_least(
            "dino.loss_weight",
            d.loss_weight,
            0.0,
            "0 turns the DINO loss off",
        )?;
        at_least(
            "dino.koleo_loss_weight",
            d.koleo_loss_weight,
            0.0,
            "0 turns KoLeo off",
        )?;
        at_least("ibot.loss_weight", i.loss_weight, 0.0, "0 turns iBOT off")?;
        if d.loss_weight == 0.0 && i.loss_weight == 0.0 {
            return Err(Error::invalid(
                "dino.loss_weight",
                0,
                "dino.loss_weight and ibot.loss_weight are both 0: nothing to learn",
            ));
        }
        head_sizes(
            "dino",
            d.head_n_prototypes,
            d.head_bottleneck_dim,
            d.head_nlayers,
            d.head_hidden_dim,
        )?;
        if i.separate_head {
            head_sizes(
                "ibot",
                i.head_n_prototypes,
                i.head_bottleneck_dim,
                i.head_nlayers,
                i.head_hidden_dim,
            )?;
        }
        in_range(
            "ibot.mask_sample_probability",
            i.mask_sample_probability,
            0.0,
            1.0,
            true,
        )?;
        let [lo, hi] = i.mask_ratio_min_max;
        for v in [lo, hi] {
            in_range("ibot.mask_ratio_min_max", v, 0.0, 1.0, true)?;
        }
        if lo > hi {
            return Err(Error::invalid(
                "ibot.mask_ratio_min_max",
                format!("[{lo}, {hi}]"),
                "min > max; give [min, max] (officially [0.1, 0.5])",
            ));
        }
        let masking = i.loss_weight > 0.0 && !self.distillation.enabled;
        if masking && (hi == 0.0 || i.mask_sample_probability == 0.0) {
            let (key, value) = if hi == 0.0 {
                ("ibot.mask_ratio_min_max", format!("[{lo}, {hi}]"))
            } else {
                (
                    "ibot.mask_sample_probability",
                    i.mask_sample_probability.to_string(),
                )
            };
            return Err(Error::invalid(
                key,
                value,
                "iBOT needs masked patches: a positive mask ratio and probability, or ibot.loss_weight=0",
            ));
        }
        Ok(())
    }

    fn validate_schedules(&self) -> Result<()> {
        let (o, t) = (&self.optim, &self.teacher);
        positive("optim.epochs", o.epochs)?;
        if o.epochs
            .checked_mul(self.train.OFFICIAL_EPOCH_LENGTH)
            .is_none()
        {
            return Err(Error::invalid(
                "optim.epochs",
                o.epochs,
                "epochs x train.OFFICIAL_EPOCH_LENGTH overflows the iteration counter",
            ));
        }
        if o.warmup_epochs > o.epochs {
            return Err(Error::invalid(
                "optim.warmup_epochs",
                o.warmup_epochs,
                format!(
                    "is more than optim.epochs ({}): the warmup must fit in the run",
                    o.epochs
                ),
            ));
        }
        if !SCALING_RULES.contains(&o.scaling_rule.as_str()) {
            return Err(one_of("optim.scaling_rule", &o.scaling_rule, SCALING_RULES));
        }
        for (key, v) in [
            ("optim.base_lr", o.base_lr),
            ("optim.lr", o.lr),
            ("optim.min_lr", o.min_lr),
            ("optim.weight_decay", o.weight_decay),
            ("optim.weight_decay_end", o.weight_decay_end),
            ("optim.clip_grad", o.clip_grad),
            ("optim.patch_embed_lr_mult", o.patch_embed_lr_mult),
        ] {
            at_least(key, v, 0.0, "must not be negative")?;
        }
        if !(o.layerwise_decay.is_finite() && o.layerwise_decay > 0.0) {
            return Err(Error::invalid(
                "optim.layerwise_decay",
                o.layerwise_decay,
                "must be > 0 (officially 0.9; 1.0 = no layer-wise decay)",
            ));
        }
        in_range("optim.adamw_beta1", o.adamw_beta1, 0.0, 1.0, false)?;
        in_range("optim.adamw_beta2", o.adamw_beta2, 0.0, 1.0, false)?;
        in_range(
            "teacher.momentum_teacher",
            t.momentum_teacher,
            0.0,
            1.0,
            true,
        )?;
        in_range(
            "teacher.final_momentum_teacher",
            t.final_momentum_teacher,
            0.0,
            1.0,
            true,
        )?;
        for (key, v) in [
            ("teacher.warmup_teacher_temp", t.warmup_teacher_temp),
            ("teacher.teacher_temp", t.teacher_temp),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(key, v, "a temperature must be > 0"));
            }
        }
        Ok(())
    }

    fn validate_crops(&self) -> Result<()> {
        let (c, p) = (&self.crops, self.student.patch_size);
        let mut sizes = vec![("crops.global_crops_size", c.global_crops_size)];
        if c.local_crops_number > 0 {
            sizes.push(("crops.local_crops_size", c.local_crops_size));
        }
        for (key, size) in sizes {
            if size < p || size % p != 0 {
                return Err(Error::invalid(
                    key,
                    size,
                    format!(
                        "must be a positive multiple of student.patch_size ({p}), e.g. {}",
                        p * (size / p).max(1)
                    ),
                ));
            }
        }
        for (key, [lo, hi]) in [
            ("crops.global_crops_scale", c.global_crops_scale),
            ("crops.local_crops_scale", c.local_crops_scale),
        ] {
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return Err(Error::invalid(
                    key,
                    format!("[{lo}, {hi}]"),
                    "a crop area range must satisfy 0 < min <= max <= 1",
                ));
            }
        }
        Ok(())
    }
}

impl TrainConfig {
    fn validate_distillation(&self) -> Result<()> {
        let d = &self.distillation;
        if !d.enabled {
            return Ok(());
        }
        if d.teacher_model.trim().is_empty() {
            return Err(Error::invalid(
                "distillation.teacher_model",
                "''",
                "distillation needs a teacher: a weights file or directory, an official name \
                 (dinov2_vitg14), a Hub id, or a `dinov2 train` output directory",
            ));
        }
        if self.student.drop_path_rate != 0.0 {
            return Err(Error::invalid(
                "student.drop_path_rate",
                self.student.drop_path_rate,
                "distillation trains without stochastic depth (the paper's recipe): set \
                 student.drop_path_rate=0",
            ));
        }
        Ok(())
    }
}

/// `student.arch` without the official `_memeff` suffix.
fn arch_name(arch: &str) -> &str {
    arch.strip_suffix("_memeff").unwrap_or(arch)
}

fn one_of(key: &str, value: &str, valid: &[&str]) -> Error {
    Error::invalid(key, value, format!("must be one of {}", valid.join(", ")))
}

fn positive<T: PartialEq + Default + Display>(key: &str, v: T) -> Result<()> {
    if v == T::default() {
        return Err(Error::invalid(key, v, "must be at least 1"));
    }
    Ok(())
}

fn at_least(key: &str, v: f64, min: f64, hint: &str) -> Result<()> {
    if !(v.is_finite() && v >= min) {
        return Err(Error::invalid(
            key,
            v,
            format!("must be finite and >= {min} ({hint})"),
        ));
    }
    Ok(())
}

/// `v` in `[lo, hi]` (`closed`) or `[lo, hi)`.
fn in_range(key: &str, v: f64, lo: f64, hi: f64, closed: bool) -> Result<()> {
    let ok = v >= lo && if closed { v <= hi } else { v < hi };
    if !ok {
        let close = if closed { ']' } else { ')' };
        return Err(Error::invalid(
            key,
            v,
            format!("must be in [{lo}, {hi}{close}"),
        ));
    }
    Ok(())
}

fn head_sizes(
    section: &str,
    prototypes: usize,
    bottleneck: usize,
    nlayers: usize,
    hidden: usize,
) -> Result<()> {
    positive(&format!("{section}.head_n_prototypes"), prototypes)?;
    positive(&format!("{section}.head_bottleneck_dim"), bottleneck)?;
    positive(&format!("{section}.head_nlayers"), nlayers)?;
    if nlayers > 1 {
        positive(&format!("{section}.head_hidden_dim"), hidden)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The YAML tree: defaults, merge, overrides, typed conversion.

fn default_tree() -> &'static Value {
    static TREE: OnceLock<Value> = OnceLock::new();
    TREE.get_or_init(|| {
        serde_norway::from_str(DEFAULT_YAML)
            .expect("the embedded default configuration is valid YAML (tested)")
    })
}

/// Every dotted key of the defaults (sections and values), in file order.
fn valid_keys() -> &'static [String] {
    static KEYS: OnceLock<Vec<String>> = OnceLock::new();
    KEYS.get_or_init(|| dotted_keys(default_tree()))
}

/// Every dotted key of a tree (sections and values), in order.
fn dotted_keys(tree: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Mapping(m) = v {
            for (k, child) in m {
                let key = join(prefix, &key_text(k));
                out.push(key.clone());
                walk(child, &key, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, "", &mut out);
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => render(other),
    }
}

/// A value as one line of YAML flow text (for messages).
fn render(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.is_empty() => "''".into(),
        Value::String(s) => s.clone(),
        Value::Sequence(items) => {
            format!(
                "[{}]",
                items.iter().map(render).collect::<Vec<_>>().join(", ")
            )
        }
        Value::Mapping(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", key_text(k), render(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Tagged(t) => format!("{} {}", t.tag, render(&t.value)),
    }
}

/// Merges a YAML document (a mapping of sections) onto `tree`.
fn merge_document(tree: &mut Value, text: &str, source_name: &str) -> Result<()> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| Error::ConfigSyntax {
        source_name: source_name.to_string(),
        reason: e.to_string(),
    })?;
    match doc {
        Value::Null => Ok(()), // an empty file, as OmegaConf.load
        Value::Mapping(m) => merge_into(tree, m, ""),
        other => Err(Error::ConfigSyntax {
            source_name: source_name.to_string(),
            reason: format!(
                "the top level must be a mapping of sections (MODEL, dino, ibot, train, student, ...), not `{}`",
                render(&other)
            ),
        }),
    }
}

/// Merges `src` into the mapping `dst` (at dotted `prefix`), as `OmegaConf.merge`: mappings merge key by key, lists
/// and values replace. Keys `dst` does not have are errors.
fn merge_into(dst: &mut Value, src: Mapping, prefix: &str) -> Result<()> {
    let Value::Mapping(dst) = dst else {
        return Err(Error::invalid(
            prefix,
            render(&Value::Mapping(src)),
            "is a value, not a section",
        ));
    };
    for (k, v) in src {
        let name = key_text(&k);
        let key = join(prefix, &name);
        let slot = dst
            .get_mut(Value::String(name))
            .ok_or_else(|| unknown_key(&key))?;
        merge_value(slot, v, &key)?;
    }
    Ok(())
}

fn merge_value(slot: &mut Value, v: Value, key: &str) -> Result<()> {
    let opaque = key.starts_with(&format!("{OPAQUE_SECTION}."));
    match (&mut *slot, v) {
        (Value::Mapping(_), Value::Mapping(m)) => merge_into(slot, m, key),
        (Value::Mapping(_), Value::Null) => Ok(()), // an empty section, e.g. all its keys commented out
        (Value::Mapping(m), other) if !opaque => {
            let first = m.keys().next().map(key_text).unwrap_or_default();
            Err(Error::invalid(
                key,
                render(&other),
                format!("is a section: give its keys (e.g. {key}.{first}: ...)"),
            ))
        }
        (_, Value::Mapping(m)) if !opaque => Err(Error::invalid(
            key,
            render(&Value::Mapping(m)),
            "is a value, not a section",
        )),
        (Value::String(_), v @ (Value::Number(_) | Value::Bool(_) | Value::Null)) => {
            // a string key keeps a scalar as text (dataset_path: 2024, WEIGHTS: with nothing after it)
            *slot = Value::String(match v {
                Value::Null => String::new(),
                other => render(&other),
            });
            Ok(())
        }
        (_, v) => {
            *slot = v;
            Ok(())
        }
    }
}

/// Applies one `key=value` override to `tree`.
fn apply_override(tree: &mut Value, text: &str) -> Result<()> {
    let syntax = |reason: String| Error::ConfigSyntax {
        source_name: format!("override `{text}`"),
        reason,
    };
    let Some((key, raw)) = text.split_once('=') else {
        return Err(syntax("expected key=value, e.g. optim.epochs=10".into()));
    };
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(syntax(format!(
            "`{key}` is not a dotted key such as optim.epochs"
        )));
    }
    let mut node = Some(&*tree);
    for part in &parts {
        match node {
            Some(Value::Mapping(m)) => node = m.get(*part),
            Some(_) => return Err(unknown_key(key)), // a key below a value
            None => break,                           // unknown: merge_into names it
        }
    }
    let target = node;
    let parsed = if raw.trim().is_empty() {
        Ok(Value::Null)
    } else {
        serde_norway::from_str::<Value>(raw)
    };
    let value = match (target, parsed) {
        // a string stays a string: the text as written, unquoted when YAML unquotes it
        (Some(Value::String(_)), Ok(Value::String(s))) => Value::String(s),
        (Some(Value::String(_)), Ok(Value::Null)) if raw.trim().is_empty() => {
            Value::String(String::new())
        }
        (Some(Value::String(_)), _) => Value::String(raw.trim().to_string()),
        (_, Ok(v)) => v,
        (_, Err(e)) => return Err(syntax(e.to_string())),
    };
    let nested = parts.iter().rev().fold(value, |v, part| {
        let mut m = Mapping::new();
        m.insert(Value::String((*part).to_string()), v);
        Value::Mapping(m)
    });
    let Value::Mapping(m) = nested else {
        return Err(syntax("empty key".into()));
    };
    merge_into(tree, m, "").map_err(|e| match e {
        // an unknown component of the dotted key: name the whole key as written
        Error::UnknownKey { key: unknown, .. }
            if key == unknown || key.starts_with(&format!("{unknown}.")) =>
        {
            unknown_key(key)
        }
        other => other,
    })
}

/// The typed configuration of a complete tree; a value of the wrong type names its dotted key.
fn from_tree(tree: &Value) -> Result<TrainConfig> {
    serde_path_to_error::deserialize(tree.clone()).map_err(|e| {
        let mut key = String::new();
        let mut node = Some(tree);
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Seq { index } => {
                    key.push_str(&format!("[{index}]"));
                    node = node.and_then(|n| n.get(*index));
                }
                serde_path_to_error::Segment::Map { key: k } => {
                    key = join(&key, k);
                    node = node.and_then(|n| n.get(k.as_str()));
                }
                serde_path_to_error::Segment::Enum { variant } => key = join(&key, variant),
                serde_path_to_error::Segment::Unknown => key = join(&key, "?"),
            }
        }
        let value = node.map_or_else(|| "(missing)".to_string(), render);
        Error::invalid(key, value, e.into_inner().to_string())
    })
}

/// [`Error::UnknownKey`] with the closest valid key.
fn unknown_key(key: &str) -> Error {
    Error::UnknownKey {
        key: key.to_string(),
        suggestion: suggest(key),
    }
}

/// Similarity of two key components in [0, 1], case-insensitive: the best of Jaro-Winkler, the edit similarity of
/// their `_`-separated words in sorted order (`lr_base` matches `base_lr`), and word containment (`batch_size` in
/// `batch_size_per_gpu`, 0.9 to 1 by the share of words matched).
fn component_similarity(a: &str, b: &str) -> f64 {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let words = |s: &str| -> Vec<String> {
        let mut w: Vec<String> = s
            .split('_')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        w.sort_unstable();
        w
    };
    let (wa, wb) = (words(&a), words(&b));
    let reordered = strsim::normalized_damerau_levenshtein(&wa.join("_"), &wb.join("_"));
    let contained = if !wa.is_empty() && wa.iter().all(|w| wb.contains(w)) {
        0.9 + 0.1 * wa.len() as f64 / wb.len() as f64
    } else {
        0.0
    };
    strsim::jaro_winkler(&a, &b).max(reordered).max(contained)
}

/// The valid dotted key closest to `key`, if one is close: the first unknown component replaced by its closest
/// sibling (keeping the rest of the key when it is valid there), or a key elsewhere with the same last component
/// (`train.epochs` -> `optim.epochs`).
fn suggest(key: &str) -> Option<String> {
    const THRESHOLD: f64 = 0.8;
    let parts: Vec<&str> = key.split('.').collect();
    let mut best: Option<(f64, String)> = None;
    let mut offer = |score: f64, candidate: String| {
        if score >= THRESHOLD && best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, candidate));
        }
    };
    // the first component that is not a key of the defaults, below a valid prefix
    let mut node = default_tree();
    let mut prefix = String::new();
    for (i, part) in parts.iter().enumerate() {
        let Value::Mapping(m) = node else {
            offer(0.9, prefix.clone()); // below a value: the value itself
            break;
        };
        match m.get(*part) {
            Some(child) => {
                node = child;
                prefix = join(&prefix, part);
            }
            None => {
                for (sibling, child) in m {
                    let name = key_text(sibling);
                    let mut candidate = join(&prefix, &name);
                    // the rest of the key, if it is valid below this sibling (case-insensitively)
                    let rest =
                        parts[i + 1..]
                            .iter()
                            .try_fold((child, String::new()), |(n, path), p| {
                                let Value::Mapping(m) = n else { return None };
                                let (k, v) = m
                                    .iter()
                                    .find(|(k, _)| key_text(k).eq_ignore_ascii_case(p))?;
                                Some((v, join(&path, &key_text(k))))
                            });
                    if let Some((_, rest)) = rest.filter(|(_, r)| !r.is_empty()) {
                        candidate = join(&candidate, &rest);
                    }
                    offer(component_similarity(part, &name), candidate);
                }
                break;
            }
        }
    }
    let last = parts.last().copied().unwrap_or_default();
    for candidate in valid_keys() {
        let name = candidate.rsplit('.').next().unwrap_or(candidate);
        offer(0.95 * component_similarity(last, name), candidate.clone());
    }
    best.map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_numbers_are_refused_naming_the_key() {
        for (yaml, key) in [
            ("optim:\n  base_lr: .nan\n", "optim.base_lr"),
            (
                "teacher:\n  momentum_teacher: .inf\n",
                "teacher.momentum_teacher",
            ),
            (
                "crops:\n  global_crops_scale: [0.32, -.inf]\n",
                "crops.global_crops_scale[1]",
            ),
        ] {
            let cfg = TrainConfig::from_yaml_str(yaml, "t.yaml").unwrap();
            match cfg.validate() {
                Err(Error::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{yaml}"),
                other => panic!("{yaml}: {other:?}"),
            }
        }
        let mut cfg = TrainConfig::default();
        cfg.apply_overrides(&["dino.koleo_loss_weight=.nan"])
            .unwrap();
        assert!(
            matches!(cfg.validate(), Err(Error::InvalidConfig { ref key, .. }) if key == "dino.koleo_loss_weight")
        );
        assert!(TrainConfig::default().validate().is_ok());
    }

    /// The official `dinov2/configs/train/vitl14.yaml`, verbatim.
    const OFFICIAL_VITL14: &str = "dino:
  head_n_prototypes: 131072
  head_bottleneck_dim: 384
ibot:
  separate_head: true
  head_n_prototypes: 131072
train:
  batch_size_per_gpu: 32
  dataset_path: ImageNet22k
  centering: sinkhorn_knopp
student:
  arch: vit_large
  patch_size: 14
  drop_path_rate: 0.4
  ffn_layer: swiglufused
  block_chunks: 4
teacher:
  momentum_teacher: 0.994
optim:
  epochs: 500
  weight_decay_end: 0.2
  base_lr: 2.0e-04  # learning rate for a batch size of 1024
  warmup_epochs: 80
  layerwise_decay: 1.0
crops:
  local_crops_size: 98";

    fn with(overrides: &[&str]) -> Result<TrainConfig> {
        let mut cfg = TrainConfig::default();
        cfg.apply_overrides(overrides)?;
        Ok(cfg)
    }

    fn invalid_key(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidConfig { key, .. }) => key,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_parse_validate_and_match_the_official_values() {
        let cfg = TrainConfig::default();
        cfg.validate().unwrap();
        assert_eq!(TrainConfig::from_yaml_str("", "empty").unwrap(), cfg);
        // a few values of every section, against the official ssl_default_config.yaml
        assert_eq!(cfg.model.weights, "");
        assert_eq!(
            cfg.compute_precision["grad_scaler"],
            serde_json::json!(true)
        );
        assert_eq!(
            cfg.compute_precision["student"]["dino_head"]["mixed_precision"]["reduce_dtype"],
            serde_json::json!("fp32")
        );
        assert_eq!(
            (cfg.dino.head_n_prototypes, cfg.dino.koleo_loss_weight),
            (65536, 0.1)
        );
        assert_eq!(
            (cfg.ibot.mask_ratio_min_max, cfg.ibot.separate_head),
            ([0.1, 0.5], false)
        );
        assert_eq!(cfg.train.dataset_path, "ImageNet:split=TRAIN");
        assert_eq!(
            (
                cfg.train.OFFICIAL_EPOCH_LENGTH,
                cfg.train.centering.as_str()
            ),
            (1250, "centering")
        );
        assert_eq!(
            (
                cfg.train.checkpoint_period,
                cfg.train.checkpoints_to_keep,
                cfg.train.log_period
            ),
            (0, 3, 10)
        );
        assert_eq!(
            (cfg.student.layerscale, cfg.student.interpolate_offset),
            (1e-5, 0.1)
        );
        assert_eq!(
            (
                cfg.teacher.momentum_teacher,
                cfg.teacher.final_momentum_teacher
            ),
            (0.992, 1.0)
        );
        assert_eq!(
            (cfg.optim.min_lr, cfg.optim.lr, cfg.optim.adamw_beta2),
            (1e-6, 0.0, 0.999)
        );
        assert_eq!(
            (cfg.crops.global_crops_scale, cfg.crops.local_crops_scale),
            ([0.32, 1.0], [0.05, 0.32])
        );
        assert_eq!(cfg.evaluation.eval_period_iterations, 12500);
        // every key of the defaults is a field, and every field a key (deny_unknown_fields both ways)
        let reloaded: Value = serde_norway::from_str(&cfg.to_yaml()).unwrap();
        let mut keys = dotted_keys(&reloaded);
        let mut expected = valid_keys().to_vec();
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected);
    }

    #[test]
    fn official_vitl14_file_loads_unchanged() {
        let cfg = TrainConfig::from_yaml_str(OFFICIAL_VITL14, "train/vitl14.yaml").unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            (
                cfg.dino.head_n_prototypes,
                cfg.dino.head_bottleneck_dim,
                cfg.dino.head_hidden_dim
            ),
            (131072, 384, 2048)
        );
        assert_eq!(
            (
                cfg.train.batch_size_per_gpu,
                cfg.train.dataset_path.as_str()
            ),
            (32, "ImageNet22k")
        );
        assert_eq!(
            (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.base_lr),
            (500, 80, 2e-4)
        );
        assert_eq!(
            (cfg.optim.weight_decay, cfg.optim.weight_decay_end),
            (0.04, 0.2)
        ); // default kept, file applied
        assert_eq!(
            (cfg.crops.global_crops_size, cfg.crops.local_crops_size),
            (224, 98)
        );
        let vit = cfg.student_vit().unwrap();
        assert_eq!(
            (vit.embed_dim, vit.depth, vit.patch_size, vit.ffn),
            (1024, 24, 14, FfnKind::Swiglu)
        );
        assert_eq!((vit.drop_path_rate, vit.img_size), (0.4, 224));
        let loss = cfg.loss();
        assert_eq!((loss.dino.out_dim, loss.ibot.out_dim), (131072, 131072));
        assert_eq!(
            loss.target_mode,
            TargetMode::SinkhornKnopp { n_iterations: 3 }
        );
        let ibot = cfg.ibot_head(vit.embed_dim).unwrap();
        assert_eq!((ibot.out_dim, ibot.bottleneck_dim), (131072, 256)); // the file sets only the DINO bottleneck
                                                                        // the README's 96 GPUs x 32 = 3072 images
        assert!((cfg.lr(96) - 2e-4 * 3f64.sqrt()).abs() < 1e-15);
        assert_eq!(cfg.max_iter(), 625_000);
        // the masking generator of train.py for 224 / 14
        assert_eq!(cfg.masking().generator.max_num_patches, 128.0);
    }

    #[test]
    fn load_merges_file_then_overrides_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vitl14.yaml");
        std::fs::write(&file, OFFICIAL_VITL14).unwrap();
        let cfg = TrainConfig::load(
            Some(&file),
            &[
                "optim.epochs=100",
                "optim.epochs=90",
                "optim.warmup_epochs=5",
                "train.dataset_path=/data/x",
            ],
        )
        .unwrap();
        assert_eq!(
            (
                cfg.optim.epochs,
                cfg.optim.warmup_epochs,
                cfg.student.patch_size
            ),
            (90, 5, 14)
        );
        assert_eq!(cfg.train.dataset_path, "/data/x");
        let missing = dir.path().join("missing.yaml");
        assert!(matches!(
            TrainConfig::load(Some(&missing), &[] as &[&str]),
            Err(Error::Io { .. })
        ));
        // load validates: vitl14 with its 80 warmup epochs does not fit in 10 epochs
        let err = TrainConfig::load(Some(&file), &["optim.epochs=10"]);
        assert_eq!(invalid_key(err), "optim.warmup_epochs");
    }

    #[test]
    fn overrides_parse_yaml_values_and_keep_strings_strings() {
        let cfg = with(&[
            "ibot.mask_ratio_min_max=[0.1,0.4]",
            "train.dataset_path=ImageFolder:root=/data/my images",
            "train.output_dir=2024",
            "MODEL.WEIGHTS='a b.pth'",
            "student.pretrained_weights=true",
            "student.qkv_bias=false",
            "optim.base_lr=1e-3",
            "crops={local_crops_number: 2, local_crops_size: 64}",
            "teacher.final_momentum_teacher=1",
        ])
        .unwrap();
        assert_eq!(cfg.ibot.mask_ratio_min_max, [0.1, 0.4]);
        assert_eq!(cfg.train.dataset_path, "ImageFolder:root=/data/my images");
        assert_eq!(cfg.train.output_dir, "2024");
        assert_eq!(cfg.model.weights, "a b.pth");
        assert_eq!(cfg.student.pretrained_weights, "true");
        assert!(!cfg.student.qkv_bias);
        assert_eq!(cfg.optim.base_lr, 1e-3);
        assert_eq!(
            (
                cfg.crops.local_crops_number,
                cfg.crops.local_crops_size,
                cfg.crops.global_crops_size
            ),
            (2, 64, 224)
        );
        assert_eq!(cfg.teacher.final_momentum_teacher, 1.0);
        // scalars in a file under a string key are text too; an empty string key is ''
        let cfg = TrainConfig::from_yaml_str(
            "train:\n  output_dir: 7\nMODEL:\n  WEIGHTS:\nevaluation:\n",
            "f",
        )
        .unwrap();
        assert_eq!(
            (cfg.train.output_dir.as_str(), cfg.model.weights.as_str()),
            ("7", "")
        );
    }

    #[test]
    fn malformed_overrides_and_files_are_syntax_errors() {
        for bad in [
            "optim.epochs",
            "optim..epochs=1",
            "=3",
            "ibot.mask_ratio_min_max=[0.1,",
        ] {
            let err = with(&[bad]).unwrap_err();
            assert!(matches!(err, Error::ConfigSyntax { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        for bad in [
            "- a\n- b\n",
            "optim: [unclosed\n",
            "optim:\n  epochs: 1\n  epochs: 2\n",
        ] {
            assert!(
                matches!(
                    TrainConfig::from_yaml_str(bad, "f.yaml"),
                    Err(Error::ConfigSyntax { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_keys_suggest_the_closest_valid_key() {
        for (key, suggestion) in [
            ("optim.lr_base", Some("optim.base_lr")),
            ("optim.epoch", Some("optim.epochs")),
            ("train.epochs", Some("optim.epochs")),
            ("student.archh", Some("student.arch")),
            ("model.weights", Some("MODEL.WEIGHTS")),
            ("optmi.base_lr", Some("optim.base_lr")),
            ("crops.global_crop_size", Some("crops.global_crops_size")),
            ("ibot.mask_ratio", Some("ibot.mask_ratio_min_max")),
            ("optim.lr.value", Some("optim.lr")),
            ("batch_size", Some("train.batch_size_per_gpu")),
            ("dino.weight", Some("dino.loss_weight")),
            ("teacher.temp", Some("teacher.teacher_temp")),
            ("optim.beta1", Some("optim.adamw_beta1")),
            (
                "compute_precision.grad_scalar",
                Some("compute_precision.grad_scaler"),
            ),
            ("zzz", None),
            ("optim.qqq", None),
        ] {
            match with(&[&format!("{key}=1")]) {
                Err(Error::UnknownKey {
                    key: k,
                    suggestion: s,
                }) => {
                    assert_eq!((k.as_str(), s.as_deref()), (key, suggestion));
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        let err = TrainConfig::from_yaml_str("optim:\n  lr_base: 0.1\n", "f.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown configuration key `optim.lr_base` (did you mean `optim.base_lr`?)"
        );
        let err = TrainConfig::from_yaml_str("optimizer:\n  epochs: 3\n", "f.yaml").unwrap_err();
        assert!(
            matches!(err, Error::UnknownKey { ref key, .. } if key == "optimizer"),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_types_name_the_dotted_key() {
        for (o, key) in [
            ("optim.epochs=1.5", "optim.epochs"),
            ("optim.epochs=-3", "optim.epochs"),
            ("optim.base_lr=fast", "optim.base_lr"),
            ("student.qkv_bias=3", "student.qkv_bias"),
            ("ibot.mask_ratio_min_max=[0.1]", "ibot.mask_ratio_min_max"),
            (
                "ibot.mask_ratio_min_max=[0.1, x]",
                "ibot.mask_ratio_min_max[1]",
            ),
            ("optim=3", "optim"),
            ("optim.lr={a: 1}", "optim.lr"),
            ("train.seed=null", "train.seed"),
        ] {
            let err = with(&[o]);
            assert_eq!(invalid_key(err), key, "{o}");
        }
        let err = TrainConfig::from_yaml_str("optim:\n  epochs: ten\n", "f.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: `optim.epochs` = ten: invalid type: string \"ten\", expected u64"
        );
    }

    #[test]
    fn compute_precision_is_opaque_below_its_keys() {
        let cfg = with(&[
            "compute_precision.grad_scaler=false",
            "compute_precision.student.backbone.mixed_precision.param_dtype=bf16",
            "compute_precision.teacher.backbone.sharding_strategy={any: thing}",
        ])
        .unwrap();
        assert_eq!(
            cfg.compute_precision["grad_scaler"],
            serde_json::json!(false)
        );
        assert_eq!(
            cfg.compute_precision["student"]["backbone"]["mixed_precision"]["param_dtype"],
            serde_json::json!("bf16")
        );
        cfg.validate().unwrap();
        assert!(matches!(
            with(&["compute_precision.fp8=true"]),
            Err(Error::UnknownKey { .. })
        ));
        assert_eq!(
            invalid_key(with(&["compute_precision=3"])),
            "compute_precision"
        );
    }

    #[test]
    fn to_yaml_round_trips() {
        let cfg = TrainConfig::from_yaml_str(OFFICIAL_VITL14, "vitl14").unwrap();
        let mut cfg2 = cfg.clone();
        cfg2.apply_overrides(&[
            "student.layerscale=1e-7",
            "train.dataset_path=: odd # text",
            "train.output_dir=''",
            "optim.min_lr=0.1234567890123",
        ])
        .unwrap();
        cfg2.apply_scaling_rules(3);
        for c in [TrainConfig::default(), cfg, cfg2] {
            let text = c.to_yaml();
            assert_eq!(
                TrainConfig::from_yaml_str(&text, "config.yaml").unwrap(),
                c,
                "{text}"
            );
        }
    }

    #[test]
    fn validate_rejects_impossible_values_naming_the_key() {
        // `overrides` (`; `-separated) -> the key named, by default that of the last override
        for (overrides, key) in [
            ("train.batch_size_per_gpu=0", ""),
            ("train.batch_size_per_gpu=1", ""),
            ("student.patch_size=14", "crops.local_crops_size"),
            ("crops.global_crops_size=8", ""),
            ("student.patch_size=0", ""),
            ("student.arch=vit_huge", ""),
            ("student.ffn_layer=identity", ""),
            ("train.centering=none", ""),
            ("optim.scaling_rule=linear", ""),
            ("dino.head_n_prototypes=0", ""),
            ("dino.head_bottleneck_dim=0", ""),
            ("dino.head_hidden_dim=0", ""),
            ("dino.head_nlayers=0", ""),
            ("ibot.separate_head=true; ibot.head_n_prototypes=0", ""),
            ("ibot.separate_head=true; ibot.head_nlayers=0", ""),
            ("optim.epochs=0", ""),
            ("train.OFFICIAL_EPOCH_LENGTH=0", ""),
            ("optim.epochs=18446744073709551615", ""),
            ("optim.warmup_epochs=101", ""),
            ("teacher.teacher_temp=0", ""),
            ("teacher.warmup_teacher_temp=-0.04", ""),
            ("teacher.momentum_teacher=1.5", ""),
            ("teacher.final_momentum_teacher=-0.1", ""),
            ("optim.adamw_beta1=1.0", ""),
            ("optim.adamw_beta2=-0.5", ""),
            ("ibot.mask_ratio_min_max=[0.1, 1.5]", ""),
            ("ibot.mask_ratio_min_max=[0.5, 0.1]", ""),
            ("ibot.mask_ratio_min_max=[0, 0]", ""),
            ("ibot.mask_sample_probability=1.2", ""),
            ("ibot.mask_sample_probability=0", ""),
            ("optim.base_lr=-1", ""),
            ("optim.min_lr=-1e-6", ""),
            ("optim.weight_decay=-0.1", ""),
            ("optim.weight_decay_end=.nan", ""),
            ("optim.clip_grad=-3", ""),
            ("optim.layerwise_decay=0", ""),
            ("crops.local_crops_scale=[0.5, 0.1]", ""),
            ("crops.global_crops_scale=[0, 1]", ""),
            ("crops.global_crops_scale=[0.3, 1.5]", ""),
            ("train.checkpoints_to_keep=0", ""),
            ("train.log_period=0", ""),
            ("train.dataset_path= ", ""),
            ("student.drop_path_rate=1.0", ""),
            ("student.drop_path_rate=-0.1", ""),
            ("dino.koleo_loss_weight=-1", ""),
            ("ibot.loss_weight=0; dino.loss_weight=0", ""),
            ("evaluation.knn_train_dataset=a", ""),
            ("evaluation.knn_val_dataset=b", ""),
            ("evaluation.knn_train_dataset=a; evaluation.knn_val_dataset=b; evaluation.knn_nb_knn=[]", ""),
            ("evaluation.knn_train_dataset=a; evaluation.knn_val_dataset=b; evaluation.knn_nb_knn=[10, 0]", ""),
            ("evaluation.knn_train_dataset=a; evaluation.knn_val_dataset=b; evaluation.knn_temperature=0", ""),
            ("evaluation.knn_train_dataset=a; evaluation.knn_val_dataset=b; evaluation.eval_period_iterations=0", ""),
        ] {
            let overrides: Vec<&str> = overrides.split("; ").collect();
            let last = overrides
                .last()
                .and_then(|o| o.split_once('='))
                .map_or("", |(k, _)| k);
            let key = if key.is_empty() { last } else { key };
            let cfg = with(&overrides).unwrap();
            assert_eq!(invalid_key(cfg.validate()), key, "{overrides:?}");
        }
        // and what is possible passes
        for overrides in [
            &["train.batch_size_per_gpu=1", "dino.koleo_loss_weight=0"][..],
            &["student.patch_size=14", "crops.local_crops_number=0"],
            &["student.arch=vit_large_memeff"],
            &["ibot.loss_weight=0", "ibot.mask_sample_probability=0"],
            &["dino.head_nlayers=1", "dino.head_hidden_dim=0"],
            &["optim.warmup_epochs=100", "student.drop_path_rate=0"],
            &["evaluation.eval_period_iterations=0"],
            &[
                "evaluation.knn_train_dataset=a",
                "evaluation.knn_val_dataset=b",
            ],
        ] {
            with(overrides)
                .unwrap()
                .validate()
                .unwrap_or_else(|e| panic!("{overrides:?}: {e}"));
        }
        let err = with(&["student.arch=vit_huge"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("vit_tiny, vit_small, vit_base, vit_large, vit_giant2"),
            "{err}"
        );
    }

    #[test]
    fn backbones_follow_build_model() {
        for (arch, dims) in [
            ("vit_tiny", (192, 12, 3)),
            ("vit_small", (384, 12, 6)),
            ("vit_base", (768, 12, 12)),
            ("vit_large", (1024, 24, 16)),
            ("vit_giant2", (1536, 40, 24)),
        ] {
            let cfg = with(&[&format!("student.arch={arch}")]).unwrap();
            let vit = cfg.student_vit().unwrap();
            assert_eq!((vit.embed_dim, vit.depth, vit.num_heads), dims, "{arch}");
            assert_eq!(
                (vit.mlp_ratio, vit.ffn, vit.patch_size, vit.img_size),
                (4.0, FfnKind::Mlp, 16, 224)
            );
        }
        let cfg = with(&[
            "student.ffn_layer=swiglu",
            "student.layerscale=0",
            "student.num_register_tokens=4",
            "student.interpolate_antialias=true",
            "student.interpolate_offset=0.0",
            "student.ffn_bias=false",
            "student.drop_path_uniform=false",
            "crops.global_crops_size=112",
        ])
        .unwrap();
        let (s, t) = (cfg.student_vit().unwrap(), cfg.teacher_vit().unwrap());
        assert_eq!(
            (s.ffn, s.layer_scale_init, s.num_register_tokens, s.ffn_bias),
            (FfnKind::Swiglu, None, 4, false)
        );
        assert_eq!(
            s.interpolation,
            PosEmbedInterpolation {
                offset: 0.0,
                antialias: true
            }
        );
        assert_eq!(
            (s.img_size, s.drop_path_rate, s.drop_path_uniform),
            (112, 0.3, false)
        );
        assert_eq!(
            t,
            VitConfig {
                drop_path_rate: 0.0,
                drop_path_uniform: false,
                ..s
            }
        );
        assert!(matches!(
            with(&["student.arch=vit_huge"]).unwrap().student_vit(),
            Err(Error::InvalidConfig { ref key, .. }) if key == "student.arch"
        ));
    }

    #[test]
    fn heads_losses_augmentation_and_masking_follow_ssl_meta_arch() {
        let cfg = with(&[
            "dino.head_n_prototypes=1024",
            "dino.head_hidden_dim=64",
            "dino.head_bottleneck_dim=32",
            "dino.head_nlayers=2",
            "ibot.head_n_prototypes=512",
            "dino.loss_weight=0.5",
            "ibot.loss_weight=2",
            "dino.koleo_loss_weight=0",
        ])
        .unwrap();
        let head = cfg.dino_head(192);
        assert_eq!(
            head,
            DinoHeadConfig {
                in_dim: 192,
                out_dim: 1024,
                use_bn: false,
                nlayers: 2,
                hidden_dim: 64,
                bottleneck_dim: 32,
                mlp_bias: true
            }
        );
        assert_eq!(cfg.ibot_head(192), None);
        let loss = cfg.loss();
        assert_eq!((loss.dino.out_dim, loss.ibot.out_dim), (1024, 1024));
        assert_eq!(
            (
                loss.dino_loss_weight,
                loss.ibot_loss_weight,
                loss.koleo_loss_weight
            ),
            (0.5, 2.0, 0.0)
        );
        assert_eq!(
            (loss.dino.student_temp, loss.dino.center_momentum),
            (0.1, 0.9)
        );
        assert_eq!(loss.target_mode, TargetMode::Centering);
        loss.validate().unwrap();
        let sep = with(&[
            "ibot.separate_head=true",
            "ibot.head_n_prototypes=512",
            "ibot.loss_weight=0",
        ])
        .unwrap();
        assert_eq!(sep.ibot_head(192), None, "no iBOT head when iBOT is off");
        let sep = with(&["ibot.separate_head=true", "ibot.head_n_prototypes=512"]).unwrap();
        assert_eq!(sep.loss().ibot.out_dim, 512);

        let cfg = with(&[
            "crops.global_crops_scale=[0.4, 1.0]",
            "crops.local_crops_scale=[0.1, 0.4]",
            "crops.local_crops_number=3",
            "crops.local_crops_size=48",
            "ibot.mask_ratio_min_max=[0.2, 0.3]",
            "ibot.mask_sample_probability=0.25",
        ])
        .unwrap();
        cfg.validate().unwrap();
        let aug = cfg.augmentation().unwrap();
        let expected = CropsConfig {
            global_crops_scale: (0.4, 1.0),
            local_crops_number: 3,
            local_crops_scale: (0.1, 0.4),
            global_crops_size: 224,
            local_crops_size: 48,
        };
        assert_eq!(
            aug,
            DataAugmentationDino::new(expected, BlurProbabilities::RELEASED).unwrap()
        );
        let m = cfg.masking();
        assert_eq!((m.mask_ratio, m.mask_probability), ((0.2, 0.3), 0.25));
        assert_eq!(m.generator, MaskingGenerator::for_training(224, 16));
        assert_eq!(
            (m.generator.height, m.generator.max_num_patches),
            (14, 98.0)
        );
    }

    #[test]
    fn schedules_lengths_and_learning_rate() {
        let cfg = with(&[
            "optim.epochs=4",
            "train.OFFICIAL_EPOCH_LENGTH=25",
            "train.batch_size_per_gpu=16",
        ])
        .unwrap();
        assert_eq!((cfg.max_iter(), cfg.checkpoint_period()), (100, 75));
        assert_eq!(cfg.lr(4), 0.004 * (64f64 / 1024.0).sqrt());
        let mut scaled = cfg.clone();
        scaled.apply_scaling_rules(4);
        assert_eq!(scaled.optim.lr, cfg.lr(4));
        assert_eq!(
            scaled.lr(4),
            cfg.lr(4),
            "optim.lr is overwritten, never read"
        );
    }

    #[test]
    fn distillation_section_is_validated() {
        let on = [
            "distillation.enabled=true",
            "distillation.teacher_model=dinov2_vitg14",
            "student.drop_path_rate=0",
        ];
        let cfg = with(&on).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.masking().mask_probability, 0.0, "nothing is masked");
        let text = cfg.to_yaml();
        assert!(text.contains("teacher_model: dinov2_vitg14"), "{text}");
        assert_eq!(
            TrainConfig::from_yaml_str(&text, "config.yaml").unwrap(),
            cfg
        );
        // the masking keys are not used, so masking off is no error
        let mut off = on.to_vec();
        off.extend([
            "ibot.mask_sample_probability=0",
            "ibot.mask_ratio_min_max=[0, 0]",
        ]);
        with(&off).unwrap().validate().unwrap();
        // a teacher is required, and drop path is off in the recipe
        for (overrides, key) in [
            (
                &["distillation.enabled=true", "student.drop_path_rate=0"][..],
                "distillation.teacher_model",
            ),
            (
                &["distillation.enabled=true", "distillation.teacher_model= "],
                "distillation.teacher_model",
            ),
            (
                &[
                    "distillation.enabled=true",
                    "distillation.teacher_model=t.pth",
                ],
                "student.drop_path_rate",
            ),
        ] {
            let err = with(overrides).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(key), "{overrides:?}: {err}");
            assert_eq!(invalid_key(Err::<(), _>(err)), key);
        }
        // a disabled section is not checked
        with(&["distillation.teacher_model="])
            .unwrap()
            .validate()
            .unwrap();
        assert!(matches!(
            with(&["distillation.teacher=x"]),
            Err(Error::UnknownKey { suggestion: Some(ref s), .. }) if s.starts_with("distillation.teacher_")
        ));
    }
}
