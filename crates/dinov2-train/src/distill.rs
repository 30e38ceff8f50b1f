//! Distillation, the paper's recipe for its ViT-S/B/L (§5 of arXiv 2304.07193; the official repository has no
//! code for it): the standard DINOv2 training loop, except that
//!
//! * the teacher is a pretrained model of any size, **frozen**: its backbone and heads give the DINO and iBOT
//!   targets (centering or Sinkhorn-Knopp and the teacher-temperature schedule as in pretraining) and are never
//!   updated;
//! * the student (smaller, new heads that output the teacher's number of prototypes) learns with the DINO + iBOT
//!   \+ KoLeo losses against those targets, **without masking** (iBOT on every patch token of the two global
//!   crops) and **without stochastic depth**;
//! * a spare **EMA of the student**, on the teacher-momentum schedule of pretraining, is kept and is the model
//!   released at the end ([`STUDENT_EMA_FILE`]).
//!
//! The machinery is that of pretraining: [`SslMetaArch`] with a frozen teacher set
//! ([`SslMetaArch::set_frozen_teacher`]; its EMA copy then holds the student EMA, saved in checkpoints as the
//! teacher is), the same [`Trainer`](crate::trainer::Trainer), checkpoints and exact resume. A run is a
//! [`TrainConfig`] with `distillation.enabled` (see [`crate::config::DistillationSection`]) given to
//! [`crate::run::run`], which builds the networks with [`build_arch`].
//!
//! **Teacher heads.** The teacher's DINO/iBOT heads are loaded with it when its weights hold them: a
//! `dinov2 train` checkpoint or output directory, an official training checkpoint (`teacher_checkpoint.pth`), or
//! any file with `dino_head.*` (and `ibot_head.*`) tensors next to the backbone. The released official weights
//! are backbones only (the ViT-g heads were never published), so for them the heads are built from the official
//! initialisation with a fixed seed and frozen: the targets are then a fixed random projection of the teacher's
//! features, a deviation from the paper that [`TeacherInfo`]'s log line states.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use dinov2_loss::{DinoHead, DinoHeadConfig, StateDict};
use dinov2_model::hub::{resolve_weights, HubOptions};
use dinov2_model::weights::{load_weights_with, LoadOptions};
use dinov2_model::{DinoVisionTransformer, VitConfig};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::meta_arch::{SslMetaArch, Submodules};

/// The exported student EMA of a distillation run (official key names, its `VitConfig` in the metadata: what
/// `dinov2 embed --model` and [`dinov2_model::load_model`] read). Pretraining writes
/// [`TEACHER_FILE`](crate::run::TEACHER_FILE) instead.
pub const STUDENT_EMA_FILE: &str = "student_ema.safetensors";

/// Mixed into `train.seed` for the seed of teacher heads built from scratch.
const HEAD_SEED_TAG: u64 = 0x0074_6561_6368_6572; // "teacher"

/// Where the frozen teacher's heads come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TeacherHeads {
    /// Saved with the teacher's weights (`dino_head.*`, `ibot_head.*`).
    Loaded,
    /// The weights hold none: built with the official initialisation from this seed, then frozen (the targets
    /// are a fixed random projection of the teacher's features).
    Seeded {
        /// The seed ([`dinov2_model::init::seeded`]).
        seed: u64,
    },
}

/// How to load a frozen teacher.
#[derive(Debug, Clone)]
pub struct TeacherOptions {
    /// A weights file or directory in any layout `dinov2_model::load_model` reads, an official name, a Hub id,
    /// or a `dinov2 train` output directory (its latest checkpoint) or checkpoint directory (`model_XXXXXXX`).
    pub model: String,
    /// The teacher's architecture, when its weights do not give it. For a `dinov2 train` directory the run's
    /// exported model (its metadata) or `config.yaml` gives it when this is `None`.
    pub config: Option<VitConfig>,
    /// For `.pth` files: the entry holding the state dict (`teacher`, `student`, `model`); for a `dinov2 train`
    /// checkpoint, `student` selects the student instead of the teacher.
    pub checkpoint_key: Option<String>,
    /// The DINO head built when the weights hold no heads (its `in_dim` is replaced by the teacher's width).
    pub dino_head: DinoHeadConfig,
    /// The separate iBOT head built when the weights hold no heads (`None`: iBOT targets from the DINO head).
    pub ibot_head: Option<DinoHeadConfig>,
    /// The seed of heads built from scratch.
    pub head_seed: u64,
    /// How Hub ids and official names are downloaded.
    pub hub: HubOptions,
}

impl TeacherOptions {
    /// The options of a configuration's `distillation` section: `teacher_model`, `teacher_config` (a `VitConfig`
    /// JSON file, read here), `teacher_checkpoint_key`, heads from the `dino` and `ibot` sections, a seed derived
    /// from `train.seed`, the Hub settings of the environment.
    ///
    /// Errors: [`Error::Io`] (unreadable `teacher_config`), [`Error::InvalidConfig`] (not a `VitConfig`).
    ///
    /// ```
    /// use dinov2_train::{distill::TeacherOptions, TrainConfig};
    /// let cfg = TrainConfig::load(None, &[
    ///     "distillation.enabled=true", "distillation.teacher_model=dinov2_vitg14", "student.drop_path_rate=0",
    ///     "dino.head_n_prototypes=131072",
    /// ])?;
    /// let opts = TeacherOptions::from_config(&cfg)?;
    /// assert_eq!((opts.model.as_str(), opts.dino_head.out_dim), ("dinov2_vitg14", 131072));
    /// assert!(opts.config.is_none() && opts.checkpoint_key.is_none() && opts.ibot_head.is_none());
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn from_config(cfg: &TrainConfig) -> Result<Self> {
        let d = &cfg.distillation;
        let non_empty = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        let config = match non_empty(&d.teacher_config) {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                let vit: VitConfig = serde_json::from_str(&text).map_err(|e| {
                    Error::invalid(
                        "distillation.teacher_config",
                        &p,
                        format!("is not a VitConfig JSON file: {e}"),
                    )
                })?;
                Some(vit)
            }
        };
        let d_model = 0; // replaced by the teacher's width
        Ok(Self {
            model: d.teacher_model.trim().to_string(),
            config,
            checkpoint_key: non_empty(&d.teacher_checkpoint_key),
            dino_head: cfg.dino_head(d_model),
            ibot_head: cfg.ibot_head(d_model),
            head_seed: dinov2_data::sampler::mix_seed(&[cfg.train.seed, HEAD_SEED_TAG]),
            hub: HubOptions::from_env(),
        })
    }
}

/// What was loaded as the teacher (its [`Display`](fmt::Display) is the run's log line).
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherInfo {
    /// The teacher as given.
    pub spec: String,
    /// The file or directory its weights were read from.
    pub path: PathBuf,
    /// Its backbone (without stochastic depth).
    pub config: VitConfig,
    /// Where its heads come from.
    pub heads: TeacherHeads,
    /// Prototypes of its DINO head.
    pub dino_prototypes: usize,
    /// Prototypes of its separate iBOT head, if it has one.
    pub ibot_prototypes: Option<usize>,
}

impl fmt::Display for TeacherInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        write!(f, "distillation teacher {}", self.spec)?;
        if Path::new(&self.spec) != self.path {
            write!(f, " ({})", self.path.display())?;
        }
        write!(
            f,
            ": frozen ViT, {} wide, {} blocks, patch {}; DINO head {} prototypes",
            c.embed_dim, c.depth, c.patch_size, self.dino_prototypes
        )?;
        if let Some(k) = self.ibot_prototypes {
            write!(f, ", iBOT head {k} prototypes")?;
        }
        match self.heads {
            TeacherHeads::Loaded => write!(f, "; heads loaded with the weights"),
            TeacherHeads::Seeded { seed } => write!(
                f,
                "; the weights hold no DINO/iBOT heads: heads built from seed {seed} and frozen, so the targets \
                 are a fixed random projection of the teacher's features (a deviation from the paper, whose \
                 ViT-g heads were never released)"
            ),
        }
    }
}

/// A loaded teacher: constant backbone and heads (no `Var`, nothing an optimiser or EMA can reach).
#[derive(Debug)]
pub struct FrozenTeacher {
    /// The backbone and heads.
    pub networks: Submodules,
    /// What was loaded.
    pub info: TeacherInfo,
}

impl FrozenTeacher {
    /// Loads the teacher of `opts` on `device` in f32 (see the [module docs](self) for where the heads come
    /// from).
    ///
    /// Errors: [`Error::Teacher`] naming the teacher and what went wrong (not found, not a DINOv2 backbone, heads
    /// that do not match the backbone, ...).
    ///
    /// A bare backbone gets heads built from the seed:
    ///
    /// ```
    /// use candle_core::Device;
    /// use dinov2_loss::DinoHeadConfig;
    /// use dinov2_train::distill::{FrozenTeacher, TeacherHeads, TeacherOptions};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut vit = dinov2_model::VitConfig::vit_small();
    /// (vit.embed_dim, vit.num_heads, vit.depth, vit.patch_size, vit.img_size) = (48, 3, 2, 8, 32);
    /// let dir = tempfile::tempdir()?;
    /// let file = dir.path().join("teacher.safetensors");
    /// let sd = dinov2_model::init::init_state_dict(&vit, 0)?;
    /// dinov2_model::weights::save_safetensors_with_config(&sd, &vit, &file)?;
    /// let opts = TeacherOptions {
    ///     model: file.display().to_string(),
    ///     config: None,
    ///     checkpoint_key: None,
    ///     dino_head: DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 16, ..DinoHeadConfig::new(0, 64) },
    ///     ibot_head: None,
    ///     head_seed: 3,
    ///     hub: dinov2_model::hub::HubOptions { offline: true, ..dinov2_model::hub::HubOptions::from_env() },
    /// };
    /// let teacher = FrozenTeacher::load(&opts, &Device::Cpu)?;
    /// assert_eq!(teacher.info.heads, TeacherHeads::Seeded { seed: 3 });
    /// assert_eq!(teacher.networks.dino_head.config().in_dim, 48); // the teacher's width
    /// assert!(teacher.networks.backbone.is_fused()); // constants
    /// assert!(teacher.info.to_string().contains("fixed random projection"));
    /// # Ok(()) }
    /// ```
    pub fn load(opts: &TeacherOptions, device: &Device) -> Result<Self> {
        let fail = |reason: String| Error::Teacher {
            spec: opts.model.clone(),
            reason,
        };
        let (path, config) = locate(opts).map_err(|e| fail(e.to_string()))?;
        let load = LoadOptions {
            config,
            checkpoint_key: opts.checkpoint_key.clone(),
        };
        let w = load_weights_with(&path, &load).map_err(|e| fail(e.to_string()))?;
        let vit = VitConfig {
            drop_path_rate: 0.0,
            drop_path_uniform: false,
            ..w.config
        };
        let backbone =
            DinoVisionTransformer::from_state_dict(&vit, &w.state_dict, device, DType::F32)
                .map_err(|e| fail(e.to_string()))?;
        let (dino_head, ibot_head, heads) =
            heads(&w.extra, opts, vit.embed_dim, device).map_err(|e| fail(e.to_string()))?;
        let info = TeacherInfo {
            spec: opts.model.clone(),
            path,
            dino_prototypes: dino_head.config().out_dim,
            ibot_prototypes: ibot_head.as_ref().map(|h| h.config().out_dim),
            config: vit,
            heads,
        };
        Ok(Self {
            networks: Submodules {
                backbone,
                dino_head,
                ibot_head,
            },
            info,
        })
    }
}

/// The networks of a distillation run: the student as [`crate::run::build_arch`] builds it for pretraining
/// (official init seeded by `train.seed`, `student.pretrained_weights` if set; its EMA a copy of it) with the
/// frozen teacher of the `distillation` section set ([`SslMetaArch::set_frozen_teacher`]), and what was loaded.
///
/// Errors: those of [`TeacherOptions::from_config`] and [`FrozenTeacher::load`]; [`Error::Teacher`] when the
/// teacher does not fit the student (prototypes, patch size), naming the key to change.
///
/// ```
/// use candle_core::{DType, Device};
/// use dinov2_loss::{DinoHead, DinoHeadConfig};
/// use dinov2_train::{distill, TrainConfig};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // a teacher file with its DINO head (64 prototypes) next to the backbone
/// let mut vit = dinov2_model::VitConfig::vit_small();
/// (vit.embed_dim, vit.num_heads, vit.depth, vit.patch_size, vit.img_size) = (48, 3, 2, 8, 16);
/// let mut sd = dinov2_model::init::init_state_dict(&vit, 0)?;
/// let head_cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 16, ..DinoHeadConfig::new(48, 64) };
/// let vb = dinov2_model::init::seeded(&candle_nn::VarMap::new(), 0, DType::F32, &Device::Cpu);
/// for (k, t) in DinoHead::new(&head_cfg, vb)?.state_dict()?.iter() {
///     sd.insert(format!("dino_head.{k}"), t.clone());
/// }
/// let dir = tempfile::tempdir()?;
/// let file = dir.path().join("teacher.safetensors");
/// dinov2_model::weights::save_safetensors_with_config(&sd, &vit, &file)?;
/// let cfg = TrainConfig::load(None, &[
///     "distillation.enabled=true".to_string(), format!("distillation.teacher_model={}", file.display()),
///     "student.arch=vit_tiny".into(), "student.patch_size=8".into(), "student.drop_path_rate=0".into(),
///     "crops.global_crops_size=16".into(), "crops.local_crops_size=8".into(),
///     "dino.head_n_prototypes=64".into(), "dino.head_hidden_dim=32".into(), "dino.head_bottleneck_dim=16".into(),
/// ])?;
/// let (arch, info) = distill::build_arch(&cfg, &Device::Cpu)?;
/// assert_eq!(arch.frozen_teacher().unwrap().backbone.embed_dim(), 48);
/// assert_eq!(arch.teacher().backbone.embed_dim(), 192); // the student's EMA
/// assert_eq!((info.heads, info.dino_prototypes), (distill::TeacherHeads::Loaded, 64));
/// // a student whose heads do not output the teacher's prototypes is refused
/// let mut other = cfg.clone();
/// other.apply_overrides(&["dino.head_n_prototypes=65"])?;
/// let err = distill::build_arch(&other, &Device::Cpu).unwrap_err();
/// assert!(err.to_string().contains("dino.head_n_prototypes=64"), "{err}");
/// # Ok(()) }
/// ```
pub fn build_arch(cfg: &TrainConfig, device: &Device) -> Result<(SslMetaArch, TeacherInfo)> {
    let opts = TeacherOptions::from_config(cfg)?;
    let mut arch = crate::run::build_arch(cfg, device)?;
    let teacher = FrozenTeacher::load(&opts, device)?;
    arch.set_frozen_teacher(teacher.networks)
        .map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => Error::Teacher {
                spec: opts.model.clone(),
                reason,
            },
            e => e,
        })?;
    Ok((arch, teacher.info))
}

/// The weights path of `opts.model` and the configuration to load it with: a `dinov2 train` output directory
/// resolves to its latest checkpoint, and a checkpoint's architecture comes from its run (see [`run_config`])
/// unless given.
fn locate(opts: &TeacherOptions) -> Result<(PathBuf, Option<VitConfig>)> {
    let given = Path::new(&opts.model);
    let checkpoints = given.join(crate::run::CHECKPOINT_DIR);
    let (path, run_dir) = if checkpoints.is_dir() {
        let latest = crate::checkpoint::latest(&checkpoints)?.ok_or_else(|| {
            Error::checkpoint(&checkpoints, "no complete checkpoint in this run directory")
        })?;
        (latest, Some(given.to_path_buf()))
    } else if crate::checkpoint::is_checkpoint(given) {
        let run = given.parent().and_then(Path::parent).map(Path::to_path_buf);
        (given.to_path_buf(), run)
    } else {
        (resolve_weights(&opts.model, &opts.hub)?, None)
    };
    let config = match (&opts.config, run_dir) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(run)) => run_config(&run)?,
        (None, None) => None,
    };
    Ok((path, config))
}

/// The backbone of the run in `dir`: the configuration stored in its exported model (`teacher.safetensors`, or
/// `student_ema.safetensors` after a distillation; the checkpoints' backbones have its shape), else its
/// `config.yaml`; `None` when it has neither.
fn run_config(dir: &Path) -> Result<Option<VitConfig>> {
    for name in [crate::run::TEACHER_FILE, STUDENT_EMA_FILE] {
        let file = dir.join(name);
        if file.is_file() {
            if let Some(cfg) = dinov2_model::weights::stored_config(&file)? {
                return Ok(Some(cfg));
            }
        }
    }
    let file = dir.join(crate::run::CONFIG_FILE);
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let cfg = TrainConfig::from_yaml_str(&text, &file.display().to_string()).map_err(|e| {
        Error::checkpoint(
            dir,
            format!("cannot read the run's architecture ({e}); give distillation.teacher_config"),
        )
    })?;
    Ok(Some(cfg.teacher_vit()?))
}

/// The teacher's heads: from its extra tensors when it has them, else built from the seed; constants.
fn heads(
    extra: &StateDict,
    opts: &TeacherOptions,
    width: usize,
    device: &Device,
) -> Result<(DinoHead, Option<DinoHead>, TeacherHeads)> {
    let loaded = |prefix: &str| -> Result<Option<DinoHead>> {
        head_config(extra, prefix)?
            .map(|c| {
                Ok(DinoHead::from_state_dict(
                    &c,
                    extra,
                    prefix,
                    device,
                    DType::F32,
                )?)
            })
            .transpose()
    };
    let (dino, ibot) = (loaded("dino_head")?, loaded("ibot_head")?);
    match (dino, ibot) {
        (Some(d), i) => Ok((d, i, TeacherHeads::Loaded)),
        (None, Some(_)) => Err(Error::InvalidArgument {
            name: "teacher",
            reason: "the weights hold an iBOT head (ibot_head.*) but no DINO head (dino_head.*)"
                .into(),
        }),
        (None, None) => {
            let seed = opts.head_seed;
            let varmap = VarMap::new();
            let vb = dinov2_model::init::seeded(&varmap, seed, DType::F32, device);
            let build = |c: &DinoHeadConfig, name: &str| -> Result<DinoHead> {
                let c = DinoHeadConfig {
                    in_dim: width,
                    ..c.clone()
                };
                let h = DinoHead::new(&c, vb.pp(name))?;
                // a constant copy: nothing can ever update it
                Ok(DinoHead::from_state_dict(
                    &c,
                    &h.state_dict()?,
                    "",
                    device,
                    DType::F32,
                )?)
            };
            let dino = build(&opts.dino_head, "dino_head")?;
            let ibot = opts
                .ibot_head
                .as_ref()
                .map(|c| build(c, "ibot_head"))
                .transpose()?;
            Ok((dino, ibot, TeacherHeads::Seeded { seed }))
        }
    }
}

/// The configuration of the head under `prefix` in `sd`, read off its tensor shapes (`None` without any tensor
/// under `prefix`). The head is strictly checked against it when built.
fn head_config(sd: &StateDict, prefix: &str) -> Result<Option<DinoHeadConfig>> {
    let p = format!("{prefix}.");
    if !sd.keys().any(|k| k.starts_with(&p)) {
        return Ok(None);
    }
    let bad = |reason: String| Error::InvalidArgument {
        name: "teacher",
        reason: format!("its `{prefix}` tensors are not a DINO head: {reason}"),
    };
    // the MLP's Linear weights (2-D; BatchNorm weights are 1-D), in nn.Sequential order
    let mut linears: Vec<(usize, &[usize])> = Vec::new();
    let mut use_bn = false;
    for (k, t) in sd.iter() {
        let Some(rest) = k.strip_prefix(&p).and_then(|r| r.strip_prefix("mlp.")) else {
            continue;
        };
        let (index, name) = match rest.split_once('.') {
            Some((i, name)) => match i.parse::<usize>() {
                Ok(i) => (i, name),
                Err(_) => continue,
            },
            None => (0, rest), // a one-layer head: `mlp.weight`
        };
        if name == "weight" {
            match t.dims() {
                d @ [_, _] => linears.push((index, d)),
                _ => use_bn = true,
            }
        }
    }
    linears.sort_by_key(|(i, _)| *i);
    let (Some((_, first)), Some((_, last))) = (linears.first(), linears.last()) else {
        return Err(bad("no MLP weight (mlp.0.weight or mlp.weight)".into()));
    };
    let last_v = [
        "last_layer.weight_v",
        "last_layer.parametrizations.weight.original1",
    ]
    .iter()
    .find_map(|n| sd.get(&format!("{p}{n}")))
    .ok_or_else(|| bad("no last_layer.weight_v".into()))?;
    let [k, _] = last_v.dims() else {
        return Err(bad(format!(
            "last_layer.weight_v has shape {:?}",
            last_v.dims()
        )));
    };
    let first_bias = if linears.len() == 1 && sd.contains(&format!("{p}mlp.weight")) {
        format!("{p}mlp.bias")
    } else {
        format!("{p}mlp.{}.bias", linears[0].0)
    };
    Ok(Some(DinoHeadConfig {
        in_dim: first[1],
        out_dim: *k,
        use_bn,
        nlayers: linears.len(),
        hidden_dim: if linears.len() > 1 { first[0] } else { 1 },
        bottleneck_dim: last[0],
        mlp_bias: sd.contains(&first_bias),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn head_configs_are_read_off_the_shapes() {
        for cfg in [
            DinoHeadConfig {
                hidden_dim: 24,
                bottleneck_dim: 8,
                ..DinoHeadConfig::new(16, 40)
            },
            DinoHeadConfig {
                nlayers: 1,
                hidden_dim: 1,
                bottleneck_dim: 8,
                ..DinoHeadConfig::new(16, 40)
            },
            DinoHeadConfig {
                nlayers: 2,
                use_bn: true,
                mlp_bias: false,
                hidden_dim: 12,
                bottleneck_dim: 6,
                ..DinoHeadConfig::new(10, 30)
            },
        ] {
            let varmap = VarMap::new();
            let vb = dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu);
            let head = DinoHead::new(&cfg, vb.pp("ibot_head")).unwrap();
            let mut sd = StateDict::new();
            for (k, t) in head.state_dict().unwrap().iter() {
                sd.insert(format!("ibot_head.{k}"), t.clone());
            }
            sd.insert("dino_loss.center", t_zeros());
            assert_eq!(head_config(&sd, "ibot_head").unwrap(), Some(cfg.clone()));
            assert_eq!(head_config(&sd, "dino_head").unwrap(), None);
        }
    }

    fn t_zeros() -> candle_core::Tensor {
        candle_core::Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap()
    }

    /// A 48-wide, 1-block teacher (patch 14) with a seeded shared head of 64 prototypes, and a trainer over
    /// the 32-wide student of the trainer tests (same heads' prototypes) distilling from it.
    fn distilling_trainer() -> crate::trainer::Trainer {
        use crate::meta_arch::SslMetaArchConfig;
        use crate::trainer::{tests::tiny_trainer, OptimSettings};
        let reference = tiny_trainer(5, false);
        let mut vit = VitConfig::vit_small();
        (vit.embed_dim, vit.num_heads, vit.depth, vit.img_size) = (48, 3, 1, 28);
        let sd = dinov2_model::init::init_state_dict(&vit, 9).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.safetensors");
        dinov2_model::weights::save_safetensors_with_config(&sd, &vit, &file).unwrap();
        let mut student_cfg: SslMetaArchConfig = reference.arch().config().clone();
        student_cfg.student.drop_path_rate = 0.0;
        let opts = TeacherOptions {
            model: file.display().to_string(),
            config: None,
            checkpoint_key: None,
            dino_head: student_cfg.dino_head.clone(),
            ibot_head: None,
            head_seed: 1,
            hub: HubOptions::from_env(),
        };
        let teacher = FrozenTeacher::load(&opts, &Device::Cpu).unwrap();
        let mut arch = SslMetaArch::new(student_cfg, 5, &Device::Cpu).unwrap();
        arch.set_frozen_teacher(teacher.networks).unwrap();
        let settings: OptimSettings = crate::trainer::tests::tiny_settings();
        crate::trainer::Trainer::new(arch, &settings, 5).unwrap()
    }

    fn bits(sd: &StateDict) -> Vec<(String, Vec<u32>)> {
        sd.iter()
            .map(|(k, t)| {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (k.clone(), v.into_iter().map(f32::to_bits).collect())
            })
            .collect()
    }

    fn teacher_state(t: &crate::trainer::Trainer) -> Vec<(String, Vec<u32>)> {
        let n = t.arch().frozen_teacher().unwrap();
        let mut v = bits(&n.backbone.state_dict().unwrap());
        v.extend(bits(&n.dino_head.state_dict().unwrap()));
        v
    }

    fn params(p: Vec<(String, candle_core::Var)>) -> Vec<(String, Vec<u32>)> {
        let sd: StateDict = p
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        bits(&sd)
    }

    #[test]
    fn the_frozen_teacher_never_changes_and_the_student_ema_follows_the_student() {
        use crate::trainer::tests::batch;
        let mut t = distilling_trainer();
        let teacher = teacher_state(&t);
        let ema0 = params(t.arch().teacher_parameters());
        for i in 0..3 {
            let r = t.step(&batch(i)).unwrap();
            assert!(r.losses.is_finite() && r.losses.ibot.is_some());
        }
        assert!(teacher == teacher_state(&t), "the frozen teacher changed");
        let (ema, student) = (
            params(t.arch().teacher_parameters()),
            params(t.arch().student_parameters()),
        );
        assert!(ema != ema0, "the student EMA is updated");
        assert!(ema != student, "and is an average, not a copy");
    }

    #[test]
    fn distillation_masks_nothing_and_ignores_the_batch_masks() {
        use crate::trainer::tests::batch;
        let (mut a, mut b) = (distilling_trainer(), distilling_trainer());
        let with_masks = batch(1);
        let mut without = with_masks.clone();
        without.masks = without.masks.zeros_like().unwrap();
        without.mask_indices = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
        let (ra, rb) = (a.step(&with_masks).unwrap(), b.step(&without).unwrap());
        assert_eq!(ra.losses, rb.losses);
        assert!(ra.losses.ibot.unwrap() > 0.0, "iBOT on every patch");
    }
}
