//! The DINOv2 loss combination of `SSLMetaArch.forward_backward` as one reusable piece.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::dino::{DinoLoss, DinoLossConfig};
use crate::error::{Error, Result};
use crate::ibot::{IbotLossConfig, IbotPatchLoss, PatchMasks};
use crate::koleo::{KoLeoLoss, KoLeoLossConfig};
use crate::reduce::Communicator;

/// How teacher logits become targets (`train.centering`).
///
/// ```
/// use dinov2_loss::TargetMode;
/// assert_eq!(TargetMode::default(), TargetMode::Centering);
/// let vitg = TargetMode::SinkhornKnopp { n_iterations: 3 };
/// assert_ne!(vitg, TargetMode::Centering);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TargetMode {
    /// `"centering"`: EMA centering and a sharpened softmax (default config).
    #[default]
    Centering,
    /// `"sinkhorn_knopp"`: Sinkhorn-Knopp with the given number of iterations (the ViT-L/g configs, 3).
    SinkhornKnopp {
        /// Number of normalisation rounds (official 3).
        n_iterations: usize,
    },
}

/// The options of [`DinoV2Loss`]; [`Default`] is the official default configuration (`ssl_default_config.yaml`:
/// 65536 prototypes for both losses, weights 1 / 0.1 / 1, centering).
///
/// ```
/// use dinov2_loss::{DinoV2LossConfig, TargetMode};
/// let cfg = DinoV2LossConfig::default();
/// assert_eq!((cfg.dino.out_dim, cfg.ibot.out_dim), (65536, 65536));
/// assert_eq!((cfg.dino_loss_weight, cfg.koleo_loss_weight, cfg.ibot_loss_weight), (1.0, 0.1, 1.0));
/// // a ViT-g/14 run: 131072 prototypes, Sinkhorn-Knopp
/// let vitg = DinoV2LossConfig {
///     target_mode: TargetMode::SinkhornKnopp { n_iterations: 3 },
///     ..DinoV2LossConfig::new(131072, 131072)
/// };
/// assert_eq!(vitg.dino.student_temp, 0.1);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DinoV2LossConfig {
    /// The DINO loss (`dino.head_n_prototypes`; the temperature and momentum `SSLMetaArch` leaves at their
    /// defaults).
    pub dino: DinoLossConfig,
    /// The iBOT loss (`ibot.head_n_prototypes`; the same K as DINO with the official shared head).
    pub ibot: IbotLossConfig,
    /// The KoLeo regulariser.
    pub koleo: KoLeoLossConfig,
    /// `dino.loss_weight` (1.0); 0 switches the global-crop DINO term and KoLeo off, as official.
    pub dino_loss_weight: f64,
    /// `dino.koleo_loss_weight` (0.1); 0 switches KoLeo off.
    pub koleo_loss_weight: f64,
    /// `ibot.loss_weight` (1.0); 0 switches iBOT off, as official.
    pub ibot_loss_weight: f64,
    /// `train.centering`.
    pub target_mode: TargetMode,
}

impl Default for DinoV2LossConfig {
    fn default() -> Self {
        Self {
            dino: DinoLossConfig::default(),
            ibot: IbotLossConfig::default(),
            koleo: KoLeoLossConfig::default(),
            dino_loss_weight: 1.0,
            koleo_loss_weight: 0.1,
            ibot_loss_weight: 1.0,
            target_mode: TargetMode::Centering,
        }
    }
}

impl DinoV2LossConfig {
    /// The official configuration with `dino_out_dim` DINO and `ibot_out_dim` iBOT prototypes.
    ///
    /// ```
    /// let cfg = dinov2_loss::DinoV2LossConfig::new(1024, 512);
    /// assert_eq!((cfg.dino.out_dim, cfg.ibot.out_dim), (1024, 512));
    /// ```
    pub fn new(dino_out_dim: usize, ibot_out_dim: usize) -> Self {
        Self {
            dino: DinoLossConfig::new(dino_out_dim),
            ibot: IbotLossConfig::new(ibot_out_dim),
            ..Self::default()
        }
    }

    /// Checks every field ([`Error::InvalidConfig`] names the first bad one; iBOT's options only when it
    /// is on).
    ///
    /// ```
    /// use dinov2_loss::{DinoV2LossConfig, Error};
    /// let cfg = DinoV2LossConfig { koleo_loss_weight: -0.1, ..DinoV2LossConfig::new(8, 8) };
    /// assert!(matches!(cfg.validate(), Err(Error::InvalidConfig { field: "koleo_loss_weight", .. })));
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.dino.validate()?;
        if self.ibot_on() {
            self.ibot.validate()?;
        }
        for (field, value) in [
            ("dino_loss_weight", self.dino_loss_weight),
            ("koleo_loss_weight", self.koleo_loss_weight),
            ("ibot_loss_weight", self.ibot_loss_weight),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::InvalidConfig {
                    field,
                    value,
                    reason: "a loss weight must be finite and >= 0",
                });
            }
        }
        Ok(())
    }

    fn ibot_on(&self) -> bool {
        self.ibot_loss_weight > 0.0
    }
}

/// Teacher head outputs of one step, the input of [`DinoV2Loss::teacher_targets`] (see its example).
#[derive(Debug, Clone, Copy)]
pub struct TeacherOutputs<'a> {
    /// `[2B, K]` teacher head outputs of the global CLS tokens in natural order (crop 1 rows, then crop 2
    /// rows); swapped to (crop 2; crop 1) as official.
    pub cls_logits: &'a Tensor,
    /// `[M, K_ibot]` teacher head outputs of this rank's masked patches (required when iBOT is on).
    pub masked_patch_logits: Option<&'a Tensor>,
}

/// Teacher targets for one step, from [`DinoV2Loss::teacher_targets`] (see its example).
#[derive(Debug, Clone)]
pub struct TeacherTargets {
    /// `[2B, K]` DINO targets in the official swapped order (rows of global crop 2, then crop 1), so row
    /// `i` is the target of student global row `i` from the *other* view.
    pub dino: Tensor,
    /// `[M, K_ibot]` iBOT targets of the masked patches, if iBOT is on.
    pub ibot: Option<Tensor>,
}

/// Student-side inputs of one step for [`DinoV2Loss::forward`] (one head call per block of rows; see its
/// example).
#[derive(Debug, Clone, Copy)]
pub struct StudentOutputs<'a> {
    /// `[2B, K]` head outputs of the global-crop CLS tokens (crop 1 rows, then crop 2 rows).
    pub global_cls_logits: &'a Tensor,
    /// `[n_local·B, K]` head outputs of the local-crop CLS tokens (crop-major), if any local crops.
    pub local_cls_logits: Option<&'a Tensor>,
    /// `[M, K_ibot]` head outputs of the masked global-crop patch tokens (required when iBOT is on).
    pub masked_patch_logits: Option<&'a Tensor>,
    /// `[2B, D]` backbone CLS tokens (`x_norm_clstoken`) of the global crops (required when KoLeo is on).
    pub global_cls_tokens: Option<&'a Tensor>,
    /// The masks of the `2B` global crops (required when iBOT is on).
    pub masks: Option<PatchMasks<'a>>,
}

/// Student-side inputs of one step for [`DinoV2Loss::forward_packed`]: the output of one shared-head call
/// (see the [`DinoV2Loss`] example).
#[derive(Debug, Clone, Copy)]
pub struct PackedStudentOutputs<'a> {
    /// `[n_local·B + 2B + M, K]` head outputs: the local CLS rows first (crop-major), then the `2B` global
    /// CLS rows, then the `M` masked-patch rows (only if iBOT is on; its targets must have the same K).
    pub logits: &'a Tensor,
    /// Number of local crops per image (`crops.local_crops_number`, 8).
    pub n_local_crops: usize,
    /// `[2B, D]` backbone CLS tokens of the global crops (required when KoLeo is on).
    pub global_cls_tokens: Option<&'a Tensor>,
    /// The masks of the `2B` global crops (required when iBOT is on).
    pub masks: Option<PatchMasks<'a>>,
}

/// Every term of the DINOv2 loss and their weighted total (all scalars).
///
/// Values are the ones the official code adds to its `loss_accumulator`; note that the official *logs*
/// show `ibot` and `koleo` divided by 2. Returned by [`DinoV2Loss::forward`] and
/// [`DinoV2Loss::forward_packed`] (see their examples).
#[derive(Debug, Clone)]
pub struct LossTerms {
    /// `DINOLoss(local chunks × teacher chunks) / (n_global_terms + n_local_terms)`.
    pub dino_local: Option<Tensor>,
    /// `DINOLoss([global], [swapped teacher]) · 2 / (n_global_terms + n_local_terms)`.
    pub dino_global: Option<Tensor>,
    /// `koleo_loss_weight · Σ_{2 global chunks} KoLeo(chunk)` (already weighted).
    pub koleo: Option<Tensor>,
    /// `forward_masked(...) · 2 · ½` (unweighted).
    pub ibot: Option<Tensor>,
    /// `w_dino·(dino_local + dino_global) + koleo + w_ibot·ibot`.
    pub total: Tensor,
}

/// The DINOv2 SSL objective: DINO (2 global + n local crops, cross-view pairs only), iBOT on masked
/// patches, KoLeo on the student's global CLS tokens, with the official weights and normalisations.
///
/// One step: [`Self::teacher_targets`] (teacher logits → targets, centre bookkeeping), then
/// [`Self::forward`] or [`Self::forward_packed`] (student logits → [`LossTerms`]; call `backward` on
/// `total`).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor, Var};
/// use candle_nn::VarMap;
/// use dinov2_loss::{
///     mask_indices, DinoHead, DinoHeadConfig, DinoV2Loss, DinoV2LossConfig, PackedStudentOutputs,
///     PatchMasks, TeacherOutputs,
/// };
///
/// let dev = Device::Cpu;
/// let (d, k, b, n_local, n_patches) = (16, 64, 2, 2, 4);
/// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(d, k) };
/// // a trainable student head (official init, seeded) and a teacher copied from it
/// let varmap = VarMap::new();
/// let vb = dinov2_model::init::seeded(&varmap, 0, DType::F32, &dev);
/// let student = DinoHead::new(&cfg, vb.pp("dino_head"))?;
/// let teacher = DinoHead::from_state_dict(&cfg, &student.state_dict()?, "", &dev, DType::F32)?;
/// let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(k, k), &dev)?;
///
/// // backbone outputs (CLS tokens of 2 global + n_local local crops, global patch tokens) and masks
/// let tokens = |rows: usize, phase: f64| -> candle_core::Result<Tensor> {
///     Tensor::arange(0f32, (rows * d) as f32, &dev)?.reshape((rows, d))?.affine(0.37, phase)?.sin()
/// };
/// let masks = Tensor::new(&[[1u8, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], &dev)?;
/// let idx = mask_indices(&masks)?;
/// let (t_cls, t_patch) = (tokens(2 * b, 0.0)?, tokens(2 * b * n_patches, 1.0)?);
/// let g_cls = Var::from_tensor(&tokens(2 * b, 0.1)?)?;
/// let (l_cls, g_patch) = (tokens(n_local * b, 2.0)?, tokens(2 * b * n_patches, 1.1)?);
///
/// // teacher: one head call (global CLS, masked patches), targets (centering, lazy centre update)
/// let t_out = teacher.forward(&Tensor::cat(&[t_cls, t_patch.index_select(&idx, 0)?], 0)?)?;
/// let m = idx.dim(0)?;
/// let targets = loss.teacher_targets(
///     &TeacherOutputs {
///         cls_logits: &t_out.narrow(0, 0, 2 * b)?,
///         masked_patch_logits: Some(&t_out.narrow(0, 2 * b, m)?),
///     },
///     0.04,
/// )?;
/// // student: one packed head call (local CLS, global CLS, masked patches), then every loss term
/// let s_in = Tensor::cat(&[&l_cls, g_cls.as_tensor(), &g_patch.index_select(&idx, 0)?], 0)?;
/// let s_out = student.forward_train(&s_in)?;
/// let terms = loss.forward_packed(
///     &PackedStudentOutputs {
///         logits: &s_out,
///         n_local_crops: n_local,
///         global_cls_tokens: Some(g_cls.as_tensor()),
///         masks: Some(PatchMasks::new(&masks)),
///     },
///     &targets,
/// )?;
/// let grads = terms.total.backward()?;
/// assert!(grads.get(g_cls.as_tensor()).is_some());
/// assert_eq!(varmap.all_vars().iter().filter(|v| grads.get(v.as_tensor()).is_some()).count(), 8);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DinoV2Loss {
    cfg: DinoV2LossConfig,
    dino: DinoLoss,
    ibot: Option<IbotPatchLoss>,
    koleo: KoLeoLoss,
}

const N_GLOBAL: usize = 2;

/// The official DINO normalisation `n_global_terms + n_local_terms` (cross-view pairs only).
fn dino_denominator(n_local: usize) -> f64 {
    let n_global_terms = (N_GLOBAL - 1) * N_GLOBAL;
    let n_local_terms = (n_local * N_GLOBAL).max(1);
    (n_global_terms + n_local_terms) as f64
}

/// The weighted sum of the terms present.
#[derive(Default)]
struct Total(Option<Tensor>);

impl Total {
    fn add(&mut self, t: &Tensor, w: f64) -> Result<()> {
        let t = (t * w)?;
        self.0 = Some(match self.0.take() {
            None => t,
            Some(a) => (a + t)?,
        });
        Ok(())
    }
}

/// `B` from the `2B` rows of the global crops.
fn half_batch(two_b: usize, input: &'static str, dims: &[usize]) -> Result<usize> {
    if two_b == 0 || two_b % N_GLOBAL != 0 {
        return Err(Error::shape(
            input,
            "[2B > 0, K] (both global crops of B images)",
            dims,
        ));
    }
    Ok(two_b / N_GLOBAL)
}

impl DinoV2Loss {
    /// The combination for `cfg` (validated), single process.
    ///
    /// ```
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig};
    /// let loss = DinoV2Loss::new(DinoV2LossConfig::new(64, 64), &candle_core::Device::Cpu)?;
    /// assert!(loss.ibot_loss().is_some());
    /// let no_ibot = DinoV2LossConfig { ibot_loss_weight: 0.0, ..DinoV2LossConfig::new(64, 64) };
    /// assert!(DinoV2Loss::new(no_ibot, &candle_core::Device::Cpu)?.ibot_loss().is_none());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn new(cfg: DinoV2LossConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let dino = DinoLoss::new(cfg.dino.clone(), device)?;
        let ibot = cfg
            .ibot_on()
            .then(|| IbotPatchLoss::new(cfg.ibot.clone(), device))
            .transpose()?;
        let koleo = KoLeoLoss::new(cfg.koleo)?;
        Ok(Self {
            cfg,
            dino,
            ibot,
            koleo,
        })
    }

    /// Uses `comm` for every global-batch statistic.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig, SingleProcess};
    /// let loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 8), &candle_core::Device::Cpu)?
    ///     .with_communicator(Arc::new(SingleProcess));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn with_communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.dino = self.dino.with_communicator(comm.clone());
        self.ibot = self.ibot.map(|l| l.with_communicator(comm));
        self
    }

    /// The configuration.
    ///
    /// ```
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig};
    /// let loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 8), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.config().koleo_loss_weight, 0.1);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn config(&self) -> &DinoV2LossConfig {
        &self.cfg
    }

    /// The DINO loss (and its centre).
    ///
    /// ```
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig};
    /// let loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 8), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.dino_loss().center().tensor().dims(), &[1, 8]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn dino_loss(&self) -> &DinoLoss {
        &self.dino
    }

    /// Mutable DINO loss (to restore its centre).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig};
    /// let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 8), &Device::Cpu)?;
    /// loss.dino_loss_mut().center_mut().set(Tensor::zeros((1, 8), DType::F32, &Device::Cpu)?)?;
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn dino_loss_mut(&mut self) -> &mut DinoLoss {
        &mut self.dino
    }

    /// The iBOT loss, if on.
    ///
    /// ```
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig};
    /// let loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 4), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.ibot_loss().unwrap().center().tensor().dims(), &[1, 1, 4]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn ibot_loss(&self) -> Option<&IbotPatchLoss> {
        self.ibot.as_ref()
    }

    /// Mutable iBOT loss (to restore its centre).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig};
    /// let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 4), &Device::Cpu)?;
    /// let centre = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu)?;
    /// loss.ibot_loss_mut().unwrap().center_mut().set(centre)?;
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn ibot_loss_mut(&mut self) -> Option<&mut IbotPatchLoss> {
        self.ibot.as_mut()
    }

    /// Teacher targets for one step (no gradient), updating the centres as official: the global CLS rows
    /// are swapped to (crop 2; crop 1), then centred (or Sinkhorn-Knopp, see [`TargetMode`]) for DINO, and
    /// the masked-patch rows likewise for iBOT when it is on.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig, TeacherOutputs};
    /// let dev = Device::Cpu;
    /// let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(4, 4), &dev)?;
    /// let cls = Tensor::new(&[[1f32, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], &dev)?; // B = 1
    /// let masked = Tensor::zeros((3, 4), DType::F32, &dev)?;
    /// let t = loss.teacher_targets(
    ///     &TeacherOutputs { cls_logits: &cls, masked_patch_logits: Some(&masked) },
    ///     0.04,
    /// )?;
    /// let dino = t.dino.to_vec2::<f32>()?;
    /// assert!(dino[0][1] > 0.99 && dino[1][0] > 0.99); // swapped views
    /// assert_eq!(t.ibot.unwrap().dims(), &[3, 4]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn teacher_targets(
        &mut self,
        teacher: &TeacherOutputs<'_>,
        teacher_temp: f64,
    ) -> Result<TeacherTargets> {
        let cls = teacher.cls_logits;
        let two_b = match *cls.dims() {
            [two_b, _] => two_b,
            _ => 0,
        };
        let b = half_batch(two_b, "teacher cls_logits", cls.dims())?;
        let swapped = Tensor::cat(&[cls.narrow(0, b, b)?, cls.narrow(0, 0, b)?], 0)?.detach();
        let masked = match (&self.ibot, teacher.masked_patch_logits) {
            // No masked patch in this step (possible with small patch grids): no iBOT target and no centre
            // update (the official code would average zero rows into a NaN centre).
            (Some(_), Some(m)) if m.dims().first() == Some(&0) => {
                let dino = match self.cfg.target_mode {
                    TargetMode::Centering => {
                        let t = self.dino.softmax_center_teacher(&swapped, teacher_temp)?;
                        self.dino.update_center(&swapped)?;
                        t
                    }
                    TargetMode::SinkhornKnopp { n_iterations } => {
                        self.dino
                            .sinkhorn_knopp_teacher(&swapped, teacher_temp, n_iterations)?
                    }
                };
                return Ok(TeacherTargets {
                    dino,
                    ibot: Some(m.detach()),
                });
            }
            (Some(_), Some(m)) => Some(m.detach()),
            (Some(_), None) => {
                return Err(Error::MissingInput {
                    input: "masked_patch_logits",
                    reason: "iBOT is on (ibot_loss_weight > 0): the teacher's masked-patch logits are needed",
                })
            }
            (None, _) => None,
        };
        match self.cfg.target_mode {
            TargetMode::Centering => {
                let dino = self.dino.softmax_center_teacher(&swapped, teacher_temp)?;
                self.dino.update_center(&swapped)?;
                let ibot = match (self.ibot.as_mut(), masked) {
                    (Some(loss), Some(m)) => {
                        let m3 = m.unsqueeze(0)?;
                        let t = loss.softmax_center_teacher(&m3, teacher_temp)?.squeeze(0)?;
                        loss.update_center(&m3)?;
                        Some(t)
                    }
                    _ => None,
                };
                Ok(TeacherTargets { dino, ibot })
            }
            TargetMode::SinkhornKnopp { n_iterations } => {
                let dino =
                    self.dino
                        .sinkhorn_knopp_teacher(&swapped, teacher_temp, n_iterations)?;
                let ibot = match (self.ibot.as_ref(), masked) {
                    (Some(loss), Some(m)) => {
                        let n = m.dim(0)?;
                        Some(loss.sinkhorn_knopp_teacher(&m, teacher_temp, n, n_iterations)?)
                    }
                    _ => None,
                };
                Ok(TeacherTargets { dino, ibot })
            }
        }
    }

    /// The KoLeo term of the two global chunks of `tokens` (`[2B, D]`), weighted; `None` when off.
    fn koleo_term(&self, tokens: Option<&Tensor>, b: usize) -> Result<Option<Tensor>> {
        if self.cfg.koleo_loss_weight <= 0.0 {
            return Ok(None);
        }
        let x = tokens.ok_or(Error::MissingInput {
            input: "global_cls_tokens",
            reason:
                "KoLeo is on (koleo_loss_weight > 0): the student's global CLS tokens are needed",
        })?;
        if x.rank() != 2 || x.dim(0)? != N_GLOBAL * b {
            return Err(Error::shape(
                "global_cls_tokens",
                format!("[{}, D] (the 2B global crops)", N_GLOBAL * b),
                x.dims(),
            ));
        }
        let k1 = self.koleo.forward(&x.narrow(0, 0, b)?)?;
        let k2 = self.koleo.forward(&x.narrow(0, b, b)?)?;
        Ok(Some(((k1 + k2)? * self.cfg.koleo_loss_weight)?))
    }

    /// The masks, required when iBOT is on.
    fn masks<'a>(masks: Option<&'a PatchMasks<'a>>) -> Result<&'a PatchMasks<'a>> {
        masks.ok_or(Error::MissingInput {
            input: "masks",
            reason: "iBOT is on (ibot_loss_weight > 0): the global crops' masks are needed",
        })
    }

    /// The iBOT targets, required when iBOT is on.
    fn ibot_targets(targets: &TeacherTargets) -> Result<&Tensor> {
        targets.ibot.as_ref().ok_or(Error::MissingInput {
            input: "targets.ibot",
            reason: "iBOT is on (ibot_loss_weight > 0): build the targets with this loss's teacher_targets",
        })
    }

    /// [`Self::forward`] for the packed student output of one shared-head call, as `SSLMetaArch` runs it
    /// (see [`PackedStudentOutputs`]).
    ///
    /// Same values and gradients as [`Self::forward`] on the three row blocks, but one fused
    /// cross-entropy over all rows and no narrow/cat nodes on the `[rows, K]` gradient path, which is much
    /// cheaper in candle's backward at K = 65536. See the [type-level example](Self).
    pub fn forward_packed(
        &self,
        student: &PackedStudentOutputs<'_>,
        targets: &TeacherTargets,
    ) -> Result<LossTerms> {
        let logits = student.logits;
        let (rows, k) = match *logits.dims() {
            [rows, k] => (rows, k),
            _ => return Err(Error::shape("logits", "[rows, K]", logits.dims())),
        };
        let (two_b, kt) = targets.dino.dims2()?;
        if kt != k {
            return Err(Error::shape(
                "targets.dino",
                format!("[2B, {k}] (the logits' K)"),
                targets.dino.dims(),
            ));
        }
        let b = half_batch(two_b, "targets.dino", targets.dino.dims())?;
        let n_local = student.n_local_crops;
        let nl = n_local * b;
        let m = match self.ibot {
            Some(_) => {
                let t = Self::ibot_targets(targets)?;
                if t.dim(1)? != k {
                    return Err(Error::shape(
                        "targets.ibot",
                        format!("[M, {k}] (packing needs one head: the DINO K)"),
                        t.dims(),
                    ));
                }
                t.dim(0)?
            }
            None => 0,
        };
        if rows != nl + two_b + m {
            return Err(Error::shape(
                "logits",
                format!(
                    "[{nl} local + {two_b} global + {m} masked = {}, {k}]",
                    nl + two_b + m
                ),
                logits.dims(),
            ));
        }
        let dt = crate::ops::stat_dtype(logits.dtype());
        let t_dino = targets.dino.to_dtype(dt)?;
        // every local chunk is paired with both teacher chunks: Σ_t CE(t, s) = CE(Σ_t t, s)
        let t_pair = (t_dino.narrow(0, 0, b)? + t_dino.narrow(0, b, b)?)?;
        let mut parts: Vec<Tensor> = vec![t_pair; n_local];
        parts.push(t_dino);
        if let (Some(t), true) = (&targets.ibot, m > 0) {
            parts.push(t.to_dtype(dt)?);
        }
        let t_all = Tensor::cat(&parts, 0)?;
        let ce = crate::ops::soft_cross_entropy(&t_all, logits, self.cfg.dino.student_temp)?;

        let denom = dino_denominator(n_local);
        let mut total = Total::default();
        let mut dino_local = None;
        if n_local > 0 {
            // Σ_chunks −mean_rows(CE) / denom
            let v = (ce.narrow(0, 0, nl)?.sum_all()? * (-1.0 / (b as f64 * denom)))?;
            total.add(&v, self.cfg.dino_loss_weight)?;
            dino_local = Some(v);
        }
        let (mut dino_global, mut koleo) = (None, None);
        if self.cfg.dino_loss_weight > 0.0 {
            let v = (ce.narrow(0, nl, two_b)?.mean_all()? * (-2.0 / denom))?;
            total.add(&v, self.cfg.dino_loss_weight)?;
            dino_global = Some(v);
            koleo = self.koleo_term(student.global_cls_tokens, b)?;
            if let Some(v) = &koleo {
                total.add(v, 1.0)?;
            }
        }
        let mut ibot = None;
        if self.ibot.is_some() {
            let masks = Self::masks(student.masks.as_ref())?;
            let (weighted, n_images) = masks.weighted_sum(&ce.narrow(0, nl + two_b, m)?)?;
            // forward_masked · loss_scales (2) · ibot_loss_scale (1 / n_global_crops)
            let v = (weighted * (-2.0 / (n_images as f64 * N_GLOBAL as f64)))?;
            total.add(&v, self.cfg.ibot_loss_weight)?;
            ibot = Some(v);
        }
        Ok(LossTerms {
            dino_local,
            dino_global,
            koleo,
            ibot,
            total: total.0.ok_or(Error::NoLossTerm)?,
        })
    }

    /// All loss terms for one step, from separate head outputs per row block (see [`StudentOutputs`]).
    ///
    /// KoLeo needs `B ≥ 2` rows per global chunk: with `B = 1` this returns [`Error::DegenerateBatch`]
    /// unless `koleo_loss_weight` is 0.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoV2Loss, DinoV2LossConfig, StudentOutputs, TeacherOutputs};
    /// let dev = Device::Cpu;
    /// let cfg = DinoV2LossConfig { ibot_loss_weight: 0.0, koleo_loss_weight: 0.0, ..DinoV2LossConfig::new(4, 4) };
    /// let mut loss = DinoV2Loss::new(cfg, &dev)?;
    /// let zeros = Tensor::zeros((2, 4), DType::F32, &dev)?; // B = 1, uniform predictions
    /// let targets = loss.teacher_targets(&TeacherOutputs { cls_logits: &zeros, masked_patch_logits: None }, 0.04)?;
    /// let terms = loss.forward(
    ///     &StudentOutputs {
    ///         global_cls_logits: &zeros,
    ///         local_cls_logits: None,
    ///         masked_patch_logits: None,
    ///         global_cls_tokens: None,
    ///         masks: None,
    ///     },
    ///     &targets,
    /// )?;
    /// // no local crops: the official denominator is 2 + max(0, 1) = 3, the global term 2/3 · ln K
    /// let v = terms.total.to_scalar::<f32>()?;
    /// assert!((v - 2.0 / 3.0 * 4f32.ln()).abs() < 1e-6);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn forward(
        &self,
        student: &StudentOutputs<'_>,
        targets: &TeacherTargets,
    ) -> Result<LossTerms> {
        let global = student.global_cls_logits;
        if targets.dino.dims() != global.dims() {
            return Err(Error::shape(
                "global_cls_logits",
                format!("{:?} (the DINO targets' shape)", targets.dino.dims()),
                global.dims(),
            ));
        }
        let b = half_batch(
            global.dims().first().copied().unwrap_or(0),
            "global_cls_logits",
            global.dims(),
        )?;
        let n_local = match student.local_cls_logits {
            Some(l) => {
                let rows = l.dims().first().copied().unwrap_or(0);
                if rows % b != 0 {
                    return Err(Error::shape(
                        "local_cls_logits",
                        format!("[n_local·{b}, K] (a multiple of B = {b} rows)"),
                        l.dims(),
                    ));
                }
                rows / b
            }
            None => 0,
        };
        let denom = dino_denominator(n_local);
        let teacher_chunks = [targets.dino.narrow(0, 0, b)?, targets.dino.narrow(0, b, b)?];

        let mut total = Total::default();
        let mut dino_local = None;
        if let (Some(l), true) = (student.local_cls_logits, n_local > 0) {
            let chunks = (0..n_local)
                .map(|i| l.narrow(0, i * b, b))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let v = (self.dino.forward(&chunks, &teacher_chunks)? / denom)?;
            total.add(&v, self.cfg.dino_loss_weight)?;
            dino_local = Some(v);
        }

        let (mut dino_global, mut koleo) = (None, None);
        if self.cfg.dino_loss_weight > 0.0 {
            let v = (self.dino.forward(
                std::slice::from_ref(global),
                std::slice::from_ref(&targets.dino),
            )? * (2.0 / denom))?;
            total.add(&v, self.cfg.dino_loss_weight)?;
            dino_global = Some(v);
            koleo = self.koleo_term(student.global_cls_tokens, b)?;
            if let Some(v) = &koleo {
                total.add(v, 1.0)?;
            }
        }

        let mut ibot = None;
        if let Some(loss) = &self.ibot {
            let s = student.masked_patch_logits.ok_or(Error::MissingInput {
                input: "masked_patch_logits",
                reason: "iBOT is on (ibot_loss_weight > 0): the student's masked-patch logits are needed",
            })?;
            let t = Self::ibot_targets(targets)?;
            let masks = Self::masks(student.masks.as_ref())?;
            let v = if t.dims().first() == Some(&0) {
                // no masked patch in this step: the term is an empty sum
                (s.sum_all()? * 0.0)?
            } else {
                loss.forward_masked(s, t, masks)?
            };
            // `loss_scales (2) × ibot_loss_scale (1 / n_global_crops)`
            let v = (v * (2.0 / N_GLOBAL as f64))?;
            total.add(&v, self.cfg.ibot_loss_weight)?;
            ibot = Some(v);
        }

        Ok(LossTerms {
            dino_local,
            dino_global,
            koleo,
            ibot,
            total: total.0.ok_or(Error::NoLossTerm)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{sum_error, U64};
    use candle_core::DType;

    fn zeros(r: usize, c: usize) -> Tensor {
        Tensor::zeros((r, c), DType::F64, &Device::Cpu).unwrap()
    }

    fn no_students(global: &Tensor) -> StudentOutputs<'_> {
        StudentOutputs {
            global_cls_logits: global,
            local_cls_logits: None,
            masked_patch_logits: None,
            global_cls_tokens: None,
            masks: None,
        }
    }

    /// With uniform student and teacher predictions every cross-entropy is ln K, so the terms reduce to
    /// the closed forms of the official normalisation: dino_local = 16/18·ln K, dino_global = 2/18·ln K
    /// (2 + 8 crops), ibot = (#masked images / #global crops)·ln K. Each is a handful (≤ 4) of chained f64
    /// sums of at most K terms of size ≤ ln K, so within `4·sum_error(K, U64)·ln K`.
    #[test]
    fn uniform_predictions_give_the_closed_forms() {
        let (k, b, m) = (1000usize, 2usize, 3usize);
        let cfg = DinoV2LossConfig {
            koleo_loss_weight: 0.0,
            ..DinoV2LossConfig::new(k, k)
        };
        let mut loss = DinoV2Loss::new(cfg, &Device::Cpu).unwrap();
        let (t_cls, t_masked) = (zeros(2 * b, k), zeros(m, k));
        let teacher = TeacherOutputs {
            cls_logits: &t_cls,
            masked_patch_logits: Some(&t_masked),
        };
        let targets = loss.teacher_targets(&teacher, 0.04).unwrap();
        let masks = Tensor::new(
            &[[1u8, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let (g, l, p) = (zeros(2 * b, k), zeros(8 * b, k), zeros(m, k));
        let student = StudentOutputs {
            local_cls_logits: Some(&l),
            masked_patch_logits: Some(&p),
            masks: Some(PatchMasks::new(&masks)),
            ..no_students(&g)
        };
        let terms = loss.forward(&student, &targets).unwrap();
        let ln_k = (k as f64).ln();
        let v = |t: &Option<Tensor>| t.as_ref().unwrap().to_scalar::<f64>().unwrap();
        let tol = 4.0 * sum_error(k, U64) * ln_k;
        assert!((v(&terms.dino_local) - 16.0 / 18.0 * ln_k).abs() < tol);
        assert!((v(&terms.dino_global) - 2.0 / 18.0 * ln_k).abs() < tol);
        assert!((v(&terms.ibot) - 2.0 / 4.0 * ln_k).abs() < tol);
        assert!(terms.koleo.is_none());
        let total = terms.total.to_scalar::<f64>().unwrap();
        assert!((total - (1.0 + 0.5) * ln_k).abs() < tol);
    }

    #[test]
    fn batch_of_one_koleo_is_an_error_unless_disabled() {
        let k = 8;
        let run = |koleo_loss_weight: f64| {
            let cfg = DinoV2LossConfig {
                koleo_loss_weight,
                ibot_loss_weight: 0.0,
                ..DinoV2LossConfig::new(k, k)
            };
            let mut loss = DinoV2Loss::new(cfg, &Device::Cpu).unwrap();
            let t_cls = zeros(2, k);
            let teacher = TeacherOutputs {
                cls_logits: &t_cls,
                masked_patch_logits: None,
            };
            let targets = loss.teacher_targets(&teacher, 0.04).unwrap();
            let (g, cls) = (zeros(2, k), zeros(2, 4));
            let student = StudentOutputs {
                global_cls_tokens: Some(&cls),
                ..no_students(&g)
            };
            loss.forward(&student, &targets)
        };
        assert!(matches!(
            run(0.1),
            Err(Error::DegenerateBatch {
                rows: 1,
                needed: 2,
                ..
            })
        ));
        let terms = run(0.0).unwrap();
        // no local crops: the official denominator is 2 + max(0, 1) = 3
        let v = terms.dino_global.unwrap().to_scalar::<f64>().unwrap();
        let ln_k = (k as f64).ln();
        assert!((v - 2.0 / 3.0 * ln_k).abs() <= 4.0 * sum_error(k, U64) * ln_k);
    }

    #[test]
    fn missing_inputs_are_errors() {
        let mut loss = DinoV2Loss::new(DinoV2LossConfig::new(8, 8), &Device::Cpu).unwrap();
        let (four, three, two) = (zeros(4, 8), zeros(3, 8), zeros(2, 8));
        let teacher = |cls, masked| TeacherOutputs {
            cls_logits: cls,
            masked_patch_logits: masked,
        };
        assert!(matches!(
            loss.teacher_targets(&teacher(&four, None), 0.04),
            Err(Error::MissingInput {
                input: "masked_patch_logits",
                ..
            })
        ));
        assert!(matches!(
            loss.teacher_targets(&teacher(&three, Some(&two)), 0.04),
            Err(Error::InputShape { ref actual, .. }) if actual == &[3, 8]
        ));
        assert!(matches!(
            loss.teacher_targets(&teacher(&four, Some(&two)), 0.0),
            Err(Error::InvalidArgument {
                name: "teacher_temp",
                ..
            })
        ));
        let targets = loss
            .teacher_targets(&teacher(&four, Some(&two)), 0.04)
            .unwrap();
        let packed = zeros(4 + 2, 8);
        let student = PackedStudentOutputs {
            logits: &packed,
            n_local_crops: 0,
            global_cls_tokens: None,
            masks: None,
        };
        assert!(matches!(
            loss.forward_packed(&student, &targets),
            Err(Error::MissingInput {
                input: "global_cls_tokens",
                ..
            })
        ));
        let short = zeros(5, 8);
        assert!(matches!(
            loss.forward_packed(
                &PackedStudentOutputs {
                    logits: &short,
                    ..student
                },
                &targets
            ),
            Err(Error::InputShape {
                input: "logits",
                ..
            })
        ));
        let bad = DinoV2LossConfig {
            dino_loss_weight: f64::NAN,
            ..DinoV2LossConfig::new(8, 8)
        };
        assert!(matches!(
            DinoV2Loss::new(bad, &Device::Cpu),
            Err(Error::InvalidConfig {
                field: "dino_loss_weight",
                ..
            })
        ));
    }
}
