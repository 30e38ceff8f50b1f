//! The self-distillation meta-architecture (`train/ssl_meta_arch.py: SSLMetaArch`): a student (backbone,
//! DINO head, optional separate iBOT head) on `Var`s, an EMA teacher of the same structure, and one
//! `forward_backward` step that returns the loss terms and the student's gradients.
//!
//! With a frozen teacher ([`SslMetaArch::set_frozen_teacher`], the distillation recipe of [`crate::distill`])
//! the targets come from that teacher instead, nothing is masked (iBOT on every patch of the global crops), and
//! the EMA copy is the spare EMA of the student that the paper releases.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dinov2_loss::{
    DinoHead, DinoHeadConfig, DinoV2Loss, DinoV2LossConfig, LossTerms, PackedStudentOutputs,
    PatchMasks, StudentOutputs, TeacherOutputs,
};
use dinov2_model::rand::RngCore;
use dinov2_model::{DinoVisionTransformer, StateDict, VitConfig};

use crate::error::{Error, Result};

/// The submodule names, in the official order (`student.backbone`, `student.dino_head`,
/// `student.ibot_head`).
pub const SUBMODULES: [&str; 3] = ["backbone", "dino_head", "ibot_head"];

/// What [`SslMetaArch`] is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct SslMetaArchConfig {
    /// The student backbone (with its drop-path rate); the teacher is the same without drop path.
    pub student: VitConfig,
    /// The DINO head (also the iBOT head when `ibot_head` is `None`: the official shared head).
    pub dino_head: DinoHeadConfig,
    /// A separate iBOT head (`ibot.separate_head: true`).
    pub ibot_head: Option<DinoHeadConfig>,
    /// The loss terms, weights and target mode.
    pub loss: DinoV2LossConfig,
}

impl SslMetaArchConfig {
    /// The teacher backbone: the student's without stochastic depth.
    pub fn teacher(&self) -> VitConfig {
        VitConfig {
            drop_path_rate: 0.0,
            ..self.student.clone()
        }
    }
}

/// One network of the pair: backbone and heads.
#[derive(Debug)]
pub struct Submodules {
    /// The ViT.
    pub backbone: DinoVisionTransformer,
    /// The DINO head.
    pub dino_head: DinoHead,
    /// The separate iBOT head, if any.
    pub ibot_head: Option<DinoHead>,
}

impl Submodules {
    /// The number of prototypes of the patch (iBOT) logits: the separate iBOT head's, else the DINO head's.
    pub fn patch_prototypes(&self) -> usize {
        self.ibot_head
            .as_ref()
            .unwrap_or(&self.dino_head)
            .config()
            .out_dim
    }

    fn build(cfg: &SslMetaArchConfig, vit: &VitConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            backbone: DinoVisionTransformer::new(vit, vb.pp("backbone"))?,
            dino_head: DinoHead::new(&cfg.dino_head, vb.pp("dino_head"))?,
            ibot_head: cfg
                .ibot_head
                .as_ref()
                .map(|h| DinoHead::new(h, vb.pp("ibot_head")))
                .transpose()?,
        })
    }

    fn detached(&self) -> Self {
        Self {
            backbone: self.backbone.detached(),
            dino_head: self.dino_head.detached(),
            ibot_head: self.ibot_head.as_ref().map(DinoHead::detached),
        }
    }
}

/// The inputs of one step on the device (what `collate_data_and_cast` hands `forward_backward`).
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// `[2B, 3, G, G]` global crops, crop-major.
    pub global_crops: Tensor,
    /// `[n_local·B, 3, L, L]` local crops, crop-major (`None` without local crops).
    pub local_crops: Option<Tensor>,
    /// `[2B, N]` u8 iBOT masks of the global crops.
    pub masks: Tensor,
    /// `[M]` u32 flat indices of the masked patches in `masks` (row-major).
    pub mask_indices: Tensor,
}

impl StepBatch {
    /// The batch of the data loader, on `device`.
    ///
    /// ```
    /// use dinov2_data::{collate, rand::SeedableRng, rand_chacha::ChaCha8Rng, CropsConfig, DataAugmentationDino, MaskCollate};
    /// let crops = CropsConfig { global_crops_size: 28, local_crops_size: 14, local_crops_number: 2, ..Default::default() };
    /// let aug = DataAugmentationDino::new(crops, Default::default())?;
    /// let mut rng = ChaCha8Rng::seed_from_u64(0);
    /// let img = dinov2_data::image::RgbImage::from_pixel(40, 40, dinov2_data::image::Rgb([10, 200, 30]));
    /// let samples = vec![aug.apply(&img, &mut rng), aug.apply(&img, &mut rng)];
    /// let batch = collate(&samples, vec![0, 1], vec![None, None], &MaskCollate::official(28, 14), &mut rng);
    /// let step = dinov2_train::meta_arch::StepBatch::from_batch(&batch, &candle_core::Device::Cpu)?;
    /// assert_eq!(step.global_crops.dims(), &[4, 3, 28, 28]);
    /// assert_eq!(step.local_crops.unwrap().dims(), &[4, 3, 14, 14]);
    /// assert_eq!(step.masks.dims(), &[4, 4]);
    /// assert_eq!(step.mask_indices.dim(0)?, batch.masks.n_masked_patches);
    /// # Ok::<(), dinov2_train::Error>(())
    /// ```
    pub fn from_batch(batch: &dinov2_data::Batch, device: &Device) -> Result<Self> {
        let global_crops = Tensor::from_slice(&batch.global_crops, &batch.global_shape, device)?;
        let local_crops = (batch.local_shape[0] > 0)
            .then(|| Tensor::from_slice(&batch.local_crops, &batch.local_shape, device))
            .transpose()?;
        let m = &batch.masks;
        let masks: Vec<u8> = m.masks.iter().map(|&b| u8::from(b)).collect();
        let masks = Tensor::from_vec(masks, (m.n_crops, m.n_tokens), device)?;
        let idx: Vec<u32> = m.mask_indices.iter().map(|&i| i as u32).collect();
        let n = idx.len();
        let mask_indices = Tensor::from_vec(idx, n, device)?;
        Ok(Self {
            global_crops,
            local_crops,
            masks,
            mask_indices,
        })
    }
}

/// The loss terms of one step as numbers (see [`LossTerms`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossValues {
    /// DINO loss of the local crops.
    pub dino_local: Option<f64>,
    /// DINO loss of the global crops.
    pub dino_global: Option<f64>,
    /// KoLeo (weighted).
    pub koleo: Option<f64>,
    /// iBOT.
    pub ibot: Option<f64>,
    /// The total that was back-propagated.
    pub total: f64,
}

impl LossValues {
    fn from_terms(t: &LossTerms) -> Result<Self> {
        let v = |t: &Option<Tensor>| -> Result<Option<f64>> {
            t.as_ref()
                .map(|t| Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)))
                .transpose()
        };
        Ok(Self {
            dino_local: v(&t.dino_local)?,
            dino_global: v(&t.dino_global)?,
            koleo: v(&t.koleo)?,
            ibot: v(&t.ibot)?,
            total: f64::from(t.total.to_dtype(DType::F32)?.to_scalar::<f32>()?),
        })
    }

    /// The terms as the official `loss_dict` logs them: `dino_local_crops_loss`, `dino_global_crops_loss`,
    /// `koleo_loss` and `ibot_loss` (these two halved, an official quirk kept for comparable logs).
    ///
    /// ```
    /// let v = dinov2_train::meta_arch::LossValues { koleo: Some(0.2), ibot: Some(4.0), total: 4.2, ..Default::default() };
    /// assert_eq!(v.official_log(), vec![("koleo_loss", 0.1), ("ibot_loss", 2.0)]);
    /// ```
    pub fn official_log(&self) -> Vec<(&'static str, f64)> {
        [
            ("dino_local_crops_loss", self.dino_local, 1.0),
            ("dino_global_crops_loss", self.dino_global, 1.0),
            ("koleo_loss", self.koleo, 0.5),
            ("ibot_loss", self.ibot, 0.5),
        ]
        .into_iter()
        .filter_map(|(k, v, s)| v.map(|v| (k, v * s)))
        .collect()
    }

    /// Whether every term is finite.
    pub fn is_finite(&self) -> bool {
        self.total.is_finite()
            && [self.dino_local, self.dino_global, self.koleo, self.ibot]
                .iter()
                .flatten()
                .all(|v| v.is_finite())
    }
}

/// The result of [`SslMetaArch::forward_backward`].
#[derive(Debug)]
pub struct StepOutput {
    /// The loss terms.
    pub losses: LossValues,
    /// Gradients of the total loss for every student parameter that took part.
    pub grads: GradStore,
}

/// Student and EMA teacher with the DINOv2 losses (see the [module docs](self)).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig};
/// use dinov2_model::rand::{rngs::StdRng, SeedableRng};
/// use dinov2_train::meta_arch::{SslMetaArch, SslMetaArchConfig, StepBatch};
/// let mut vit = dinov2_model::VitConfig::vit_small();
/// (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) = (32, 2, 2, 28);
/// let cfg = SslMetaArchConfig {
///     student: vit,
///     dino_head: DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 16, ..DinoHeadConfig::new(32, 64) },
///     ibot_head: None,
///     loss: DinoV2LossConfig::new(64, 64),
/// };
/// let dev = Device::Cpu;
/// let mut arch = SslMetaArch::new(cfg, 0, &dev)?;
/// let image = |n: usize, s: usize, phase: f64| -> candle_core::Result<Tensor> {
///     Tensor::arange(0f32, (n * 3 * s * s) as f32, &dev)?.affine(0.01, phase)?.sin()?.reshape((n, 3, s, s))
/// };
/// let batch = StepBatch {
///     global_crops: image(4, 28, 0.0)?, // B = 2 images, 2 global crops each
///     local_crops: Some(image(4, 14, 1.0)?),
///     masks: Tensor::new(&[[1u8, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], &dev)?,
///     mask_indices: Tensor::new(&[0u32, 1, 13], &dev)?,
/// };
/// let out = arch.forward_backward(&batch, 0.04, &mut StdRng::seed_from_u64(0))?;
/// assert!(out.losses.is_finite() && out.losses.ibot.is_some());
/// let (name, var) = &arch.student_parameters()[0];
/// assert!(out.grads.get(var.as_tensor()).is_some(), "{name} has a gradient");
/// # Ok::<(), dinov2_train::Error>(())
/// ```
pub struct SslMetaArch {
    cfg: SslMetaArchConfig,
    student: Submodules,
    teacher: Submodules,
    student_vars: VarMap,
    teacher_vars: VarMap,
    /// Distillation: the frozen teacher that gives the targets (`teacher` is then the student's EMA).
    frozen_teacher: Option<Submodules>,
    loss: DinoV2Loss,
    device: Device,
}

impl SslMetaArch {
    /// A fresh run: the student with the official initialisation (deterministic in `seed`, see
    /// [`dinov2_model::init::seeded`]), the teacher an exact copy of it.
    pub fn new(cfg: SslMetaArchConfig, seed: u64, device: &Device) -> Result<Self> {
        let student_vars = VarMap::new();
        let vb = dinov2_model::init::seeded(&student_vars, seed, DType::F32, device);
        let student = Submodules::build(&cfg, &cfg.student, vb)?;
        let teacher_vars = copy_var_map(&student_vars)?;
        Self::assemble(cfg, student, student_vars, teacher_vars, device)
    }

    /// From saved states (keys `backbone.…`, `dino_head.…`, `ibot_head.…`, official names): the student, and
    /// the teacher (a copy of the student when `None`). Every parameter must be present with its shape.
    pub fn from_state_dicts(
        cfg: SslMetaArchConfig,
        student: &StateDict,
        teacher: Option<&StateDict>,
        device: &Device,
    ) -> Result<Self> {
        let student_vars = VarMap::new();
        student.to_var_map(&student_vars, "", DType::F32, device)?;
        let vb = VarBuilder::from_varmap(&student_vars, DType::F32, device);
        let s = Submodules::build(&cfg, &cfg.student, vb)?;
        let teacher_vars = match teacher {
            Some(t) => {
                let vm = VarMap::new();
                t.to_var_map(&vm, "", DType::F32, device)?;
                vm
            }
            None => copy_var_map(&student_vars)?,
        };
        let arch = Self::assemble(cfg, s, student_vars, teacher_vars, device)?;
        let n = |vm: &VarMap| vm.data().lock().map(|d| d.len()).unwrap_or(0);
        if n(&arch.student_vars) != n(&arch.teacher_vars) {
            return Err(Error::InvalidArgument {
                name: "teacher",
                reason: format!(
                    "{} teacher tensors for {} student parameters: the state dicts are of different models",
                    n(&arch.teacher_vars),
                    n(&arch.student_vars)
                ),
            });
        }
        Ok(arch)
    }

    fn assemble(
        cfg: SslMetaArchConfig,
        student: Submodules,
        student_vars: VarMap,
        teacher_vars: VarMap,
        device: &Device,
    ) -> Result<Self> {
        let n_student = student_vars.data().lock().map(|d| d.len()).unwrap_or(0);
        let vb = VarBuilder::from_varmap(&teacher_vars, DType::F32, device);
        let teacher = Submodules::build(&cfg, &cfg.teacher(), vb)?.detached();
        let n_teacher = teacher_vars.data().lock().map(|d| d.len()).unwrap_or(0);
        if n_teacher != n_student {
            return Err(Error::InvalidArgument {
                name: "teacher",
                reason: format!("the teacher has {n_teacher} parameters, the student {n_student}"),
            });
        }
        let loss = DinoV2Loss::new(cfg.loss.clone(), device)?;
        Ok(Self {
            cfg,
            student,
            teacher,
            student_vars,
            teacher_vars,
            frozen_teacher: None,
            loss,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SslMetaArchConfig {
        &self.cfg
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The student (its forwards record gradients).
    pub fn student(&self) -> &Submodules {
        &self.student
    }

    /// The EMA of the student (detached views of its `Var`s: no graph): the teacher in pretraining; with a
    /// [frozen teacher](Self::set_frozen_teacher), the spare student EMA that distillation exports.
    pub fn teacher(&self) -> &Submodules {
        &self.teacher
    }

    /// The frozen teacher of a distillation run, if one is set.
    pub fn frozen_teacher(&self) -> Option<&Submodules> {
        self.frozen_teacher.as_ref()
    }

    /// Turns the run into distillation (the paper's recipe, see [`crate::distill`]): `teacher` gives the targets
    /// from now on and is never updated; no patch is masked and the iBOT loss covers every patch of the global
    /// crops (the batch's masks are ignored); the EMA copy ([`Self::teacher`], updated by
    /// [`Self::update_teacher`]) becomes the spare EMA of the student.
    ///
    /// Its heads must feed the losses: the DINO head's prototypes those of the DINO loss
    /// (`dino.head_n_prototypes`), the patch logits' (its iBOT head, else its DINO head) those of the iBOT loss,
    /// and with iBOT on, its patch size the student's (patch tokens are paired one to one). Its backbone width
    /// may differ from the student's. Errors: [`Error::InvalidArgument`] naming what does not fit.
    pub fn set_frozen_teacher(&mut self, teacher: Submodules) -> Result<()> {
        let bad = |reason: String| Error::InvalidArgument {
            name: "teacher",
            reason,
        };
        let width = teacher.backbone.embed_dim();
        for (what, head) in [
            ("DINO", Some(&teacher.dino_head)),
            ("iBOT", teacher.ibot_head.as_ref()),
        ] {
            if let Some(h) = head.filter(|h| h.config().in_dim != width) {
                return Err(bad(format!(
                    "its {what} head takes {} features, its backbone gives {width}",
                    h.config().in_dim
                )));
            }
        }
        let k = teacher.dino_head.config().out_dim;
        if k != self.cfg.loss.dino.out_dim {
            return Err(bad(format!(
                "its DINO head has {k} prototypes, the student's {}: the student heads must output the \
                 teacher's (set dino.head_n_prototypes={k})",
                self.cfg.loss.dino.out_dim
            )));
        }
        if self.cfg.loss.ibot_loss_weight > 0.0 {
            let k = teacher.patch_prototypes();
            if k != self.cfg.loss.ibot.out_dim {
                let key = if self.cfg.ibot_head.is_some() {
                    "ibot.head_n_prototypes"
                } else {
                    "dino.head_n_prototypes (iBOT shares the DINO head)"
                };
                return Err(bad(format!(
                    "its patch (iBOT) logits have {k} prototypes, the student's {}: set {key} to {k}, \
                     or ibot.loss_weight=0",
                    self.cfg.loss.ibot.out_dim
                )));
            }
            let (pt, ps) = (
                teacher.backbone.config().patch_size,
                self.cfg.student.patch_size,
            );
            if pt != ps {
                return Err(bad(format!(
                    "its patch size is {pt}, the student's {ps}: iBOT pairs their patch tokens one to one \
                     (set student.patch_size={pt}, or ibot.loss_weight=0)"
                )));
            }
        }
        self.frozen_teacher = Some(teacher);
        Ok(())
    }

    /// The losses with their centres.
    pub fn loss(&self) -> &DinoV2Loss {
        &self.loss
    }

    /// Mutable access to the losses (to restore centres from a checkpoint).
    pub fn loss_mut(&mut self) -> &mut DinoV2Loss {
        &mut self.loss
    }

    /// The student's parameters sorted by name (`backbone.…`, `dino_head.…`, `ibot_head.…`).
    pub fn student_parameters(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.student_vars)
    }

    /// The teacher's parameters sorted by name.
    pub fn teacher_parameters(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.teacher_vars)
    }

    /// The submodule a parameter name belongs to (`backbone`, `dino_head` or `ibot_head`).
    pub fn submodule_of(name: &str) -> &str {
        name.split('.').next().unwrap_or(name)
    }

    /// `forward_backward(images, teacher_temp)`: teacher targets from the global crops (no graph; centres
    /// updated), the student's packed forward over masked global + local crops (stochastic depth from
    /// `drop_path_rng`), every loss term, and the gradients of their sum.
    pub fn forward_backward(
        &mut self,
        batch: &StepBatch,
        teacher_temp: f64,
        drop_path_rng: &mut dyn RngCore,
    ) -> Result<StepOutput> {
        let (two_b, n_tokens) = batch.masks.dims2()?;
        if batch.global_crops.dim(0)? != two_b || two_b % 2 != 0 || two_b == 0 {
            return Err(Error::InvalidArgument {
                name: "batch",
                reason: format!(
                    "{} global crops and {} mask rows: expected 2B of each",
                    batch.global_crops.dim(0)?,
                    two_b
                ),
            });
        }
        let b = two_b / 2;
        let n_local_crops = match &batch.local_crops {
            Some(l) => l.dim(0)? / b,
            None => 0,
        };
        let ibot_on = self.cfg.loss.ibot_loss_weight > 0.0;
        // distillation: no masking, iBOT on every patch of the global crops
        let distill = self.frozen_teacher.is_some();
        let (all_masks, all_indices);
        let (masks, idx) = if distill {
            all_masks = Tensor::ones((two_b, n_tokens), DType::U8, &self.device)?;
            all_indices = Tensor::arange(0u32, (two_b * n_tokens) as u32, &self.device)?;
            (&all_masks, &all_indices)
        } else {
            (&batch.masks, &batch.mask_indices)
        };
        let targets_from = self.frozen_teacher.as_ref().unwrap_or(&self.teacher);
        // Backbones may compute in bf16/f16 (`set_compute_dtype`); heads and losses run in f32.
        let f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?) };
        let gather = |tokens: &Tensor| -> Result<Tensor> {
            let d = tokens.dim(2)?;
            f32(&tokens
                .reshape((two_b * n_tokens, d))?
                .index_select(idx, 0)?)
        };

        // 1. teacher: global crops only, no masks, no graph
        let t_out = targets_from
            .backbone
            .forward_features(&batch.global_crops, None)?;
        let t_cls = &f32(&t_out.x_norm_clstoken)?;
        let (t_cls_logits, t_patch_logits) = if !ibot_on {
            (targets_from.dino_head.forward(t_cls)?, None)
        } else {
            let t_patches = gather(&t_out.x_norm_patchtokens)?;
            match &targets_from.ibot_head {
                Some(ibot) => (
                    targets_from.dino_head.forward(t_cls)?,
                    Some(ibot.forward(&t_patches)?),
                ),
                None => {
                    let m = t_patches.dim(0)?;
                    let out = targets_from
                        .dino_head
                        .forward(&Tensor::cat(&[t_cls, &t_patches], 0)?)?;
                    (out.narrow(0, 0, two_b)?, Some(out.narrow(0, two_b, m)?))
                }
            }
        };
        let targets = self.loss.teacher_targets(
            &TeacherOutputs {
                cls_logits: &t_cls_logits,
                masked_patch_logits: t_patch_logits.as_ref(),
            },
            teacher_temp,
        )?;

        // 2. student: masked globals (unmasked in distillation) + locals, one packed forward
        let mut crops = vec![batch.global_crops.clone()];
        let mut crop_masks = vec![(!distill).then(|| masks.clone())];
        if let Some(l) = &batch.local_crops {
            crops.push(l.clone());
            crop_masks.push(None);
        }
        let s_out = self.student.backbone.forward_features_list_t(
            &crops,
            &crop_masks,
            Some(drop_path_rng),
        )?;
        let g_cls = &f32(&s_out[0].x_norm_clstoken)?;
        let l_cls = s_out.get(1).map(|f| f32(&f.x_norm_clstoken)).transpose()?;
        let l_cls = l_cls.as_ref();
        let patch_masks = PatchMasks::new(masks);
        let terms = match (&self.student.ibot_head, ibot_on) {
            (None, _) => {
                // 3-4. one shared-head call over [local CLS; global CLS; masked patches]
                let mut rows: Vec<Tensor> = l_cls.into_iter().cloned().collect();
                rows.push(g_cls.clone());
                if ibot_on {
                    rows.push(gather(&s_out[0].x_norm_patchtokens)?);
                }
                let logits = self
                    .student
                    .dino_head
                    .forward_train(&Tensor::cat(&rows, 0)?)?;
                self.loss.forward_packed(
                    &PackedStudentOutputs {
                        logits: &logits,
                        n_local_crops,
                        global_cls_tokens: Some(g_cls),
                        masks: ibot_on.then_some(patch_masks),
                    },
                    &targets,
                )?
            }
            (Some(ibot), _) => {
                let n_l = l_cls.map(|l| l.dim(0)).transpose()?.unwrap_or(0);
                let cls_in = match l_cls {
                    Some(l) => Tensor::cat(&[l, g_cls], 0)?,
                    None => g_cls.clone(),
                };
                let cls_logits = self.student.dino_head.forward_train(&cls_in)?;
                let local = (n_l > 0)
                    .then(|| cls_logits.narrow(0, 0, n_l))
                    .transpose()?;
                let global = cls_logits.narrow(0, n_l, two_b)?;
                let patch_logits = if ibot_on {
                    Some(ibot.forward_train(&gather(&s_out[0].x_norm_patchtokens)?)?)
                } else {
                    None
                };
                self.loss.forward(
                    &StudentOutputs {
                        global_cls_logits: &global,
                        local_cls_logits: local.as_ref(),
                        masked_patch_logits: patch_logits.as_ref(),
                        global_cls_tokens: Some(g_cls),
                        masks: ibot_on.then_some(patch_masks),
                    },
                    &targets,
                )?
            }
        };
        let losses = LossValues::from_terms(&terms)?;
        let grads = terms.total.backward()?;
        Ok(StepOutput { losses, grads })
    }

    /// Mixed precision: the student's and teacher's backbones compute in `dtype` (bf16 or f16 on CUDA, say)
    /// on f32 master weights, which receive f32 gradients; heads, losses and the optimizer stay in f32.
    /// `None` computes everything in the weights' dtype (f32), as by default.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig};
    /// use dinov2_train::meta_arch::{SslMetaArch, SslMetaArchConfig};
    /// # fn main() -> dinov2_train::Result<()> {
    /// let mut vit = dinov2_model::VitConfig::vit_small();
    /// (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) = (32, 1, 2, 28);
    /// let cfg = SslMetaArchConfig {
    ///     student: vit,
    ///     dino_head: DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 16, ..DinoHeadConfig::new(32, 64) },
    ///     ibot_head: None,
    ///     loss: DinoV2LossConfig::new(64, 64),
    /// };
    /// let mut arch = SslMetaArch::new(cfg, 0, &Device::Cpu)?;
    /// arch.set_compute_dtype(Some(DType::BF16));
    /// assert_eq!(arch.student().backbone.compute_dtype(), DType::BF16);
    /// assert_eq!(arch.teacher().backbone.compute_dtype(), DType::BF16);
    /// # Ok(()) }
    /// ```
    pub fn set_compute_dtype(&mut self, dtype: Option<DType>) {
        self.student.backbone.set_compute_dtype(dtype);
        self.teacher.backbone.set_compute_dtype(dtype);
        if let Some(t) = &mut self.frozen_teacher {
            t.backbone.set_compute_dtype(dtype);
        }
    }

    /// `update_teacher(m)`: the EMA of every student parameter into the teacher (the student EMA in
    /// distillation; a frozen teacher is never touched).
    pub fn update_teacher(&self, momentum: f64) -> Result<()> {
        let pairs: Vec<(Var, Var)> = self
            .teacher_parameters()
            .into_iter()
            .zip(self.student_parameters())
            .map(|((_, t), (_, s))| (t, s))
            .collect();
        crate::ema::update_teacher(&pairs, momentum)
    }
}

impl std::fmt::Debug for SslMetaArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SslMetaArch")
            .field("cfg", &self.cfg)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> = vm
        .data()
        .lock()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A deep copy of every `Var` (the teacher's initial state).
fn copy_var_map(vm: &VarMap) -> Result<VarMap> {
    let out = VarMap::new();
    let copies = sorted_vars(vm)
        .into_iter()
        .map(|(k, v)| Ok((k, Var::from_tensor(&v.as_tensor().detach().copy()?)?)))
        .collect::<Result<Vec<_>>>()?;
    out.data()
        .lock()
        .map_err(|_| Error::InvalidArgument {
            name: "varmap",
            reason: "its lock is poisoned".into(),
        })?
        .extend(copies);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dinov2_loss::{DinoHeadConfig, DinoV2LossConfig};
    use dinov2_model::rand::{rngs::StdRng, SeedableRng};

    fn tiny() -> SslMetaArchConfig {
        let mut vit = dinov2_model::VitConfig::vit_small();
        (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) = (32, 2, 2, 28);
        vit.layer_scale_init = Some(0.1);
        SslMetaArchConfig {
            student: vit,
            dino_head: DinoHeadConfig {
                hidden_dim: 32,
                bottleneck_dim: 16,
                ..DinoHeadConfig::new(32, 64)
            },
            ibot_head: None,
            loss: DinoV2LossConfig::new(64, 64),
        }
    }

    fn batch(dev: &Device) -> StepBatch {
        let image = |n: usize, s: usize, phase: f64| {
            Tensor::arange(0f32, (n * 3 * s * s) as f32, dev)
                .unwrap()
                .affine(0.01, phase)
                .unwrap()
                .sin()
                .unwrap()
                .reshape((n, 3, s, s))
                .unwrap()
        };
        StepBatch {
            global_crops: image(4, 28, 0.0),
            local_crops: Some(image(4, 14, 1.0)),
            masks: Tensor::new(
                &[[1u8, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]],
                dev,
            )
            .unwrap(),
            mask_indices: Tensor::new(&[0u32, 1, 13], dev).unwrap(),
        }
    }

    /// bf16 backbones on f32 master weights: the same losses and gradients as f32 up to bf16 rounding, the
    /// gradients in f32 for every student parameter.
    #[test]
    fn mixed_precision_step_tracks_the_f32_step() {
        let dev = Device::Cpu;
        let run = |compute: Option<DType>| {
            let mut arch = SslMetaArch::new(tiny(), 0, &dev).unwrap();
            arch.set_compute_dtype(compute);
            let out = arch
                .forward_backward(&batch(&dev), 0.04, &mut StdRng::seed_from_u64(0))
                .unwrap();
            let grads: Vec<(String, Tensor)> = arch
                .student_parameters()
                .into_iter()
                .filter_map(|(k, v)| out.grads.get(v.as_tensor()).map(|g| (k, g.clone())))
                .collect();
            (out.losses, grads)
        };
        let (l32, g32) = run(None);
        let (l16, g16) = run(Some(DType::BF16));
        assert!(l16.is_finite());
        assert!(
            (l16.total - l32.total).abs() <= 2e-2 * l32.total.abs(),
            "{} vs {}",
            l16.total,
            l32.total
        );
        assert_eq!(g16.len(), g32.len());
        assert!(g32.len() > 10);
        let l2 = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for ((k, a), (k2, b)) in g16.iter().zip(&g32) {
            assert_eq!(k, k2);
            assert_eq!(a.dtype(), DType::F32, "{k}");
            // bf16 keeps 8 significant bits: a few percent of each gradient's norm through 2 blocks and the head
            let e = l2(&(a - b).unwrap()) / l2(b).max(1e-12);
            assert!(e < 0.1, "{k}: relative L2 error {e}");
        }
    }
}
