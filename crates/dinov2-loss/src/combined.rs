//! The DINOv2 loss combination of `SSLMetaArch.forward_backward` as one reusable piece.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::dino::DinoLoss;
use crate::error::{Error, Result};
use crate::ibot::IbotPatchLoss;
use crate::koleo::KoLeoLoss;
use crate::reduce::Reducer;

/// How teacher logits become targets (`train.centering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Centering {
    /// EMA centering + sharpened softmax (default config).
    Centering,
    /// Sinkhorn-Knopp with the given number of iterations (3 in vitl14/vitg14 configs).
    SinkhornKnopp {
        /// Number of normalisation rounds (official 3).
        n_iterations: usize,
    },
}

/// Weights and options of the combination (official defaults via [`Default`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoV2LossConfig {
    /// `dino.loss_weight` (1.0).
    pub dino_loss_weight: f64,
    /// `dino.koleo_loss_weight` (0.1).
    pub koleo_loss_weight: f64,
    /// `ibot.loss_weight` (1.0).
    pub ibot_loss_weight: f64,
    /// Student temperature of both losses (0.1).
    pub student_temp: f64,
    /// Centre EMA momentum of both losses (0.9).
    pub center_momentum: f64,
    /// Target construction.
    pub centering: Centering,
}

impl Default for DinoV2LossConfig {
    fn default() -> Self {
        Self {
            dino_loss_weight: 1.0,
            koleo_loss_weight: 0.1,
            ibot_loss_weight: 1.0,
            student_temp: 0.1,
            center_momentum: 0.9,
            centering: Centering::Centering,
        }
    }
}

/// Teacher targets for one step, from [`DinoV2Loss::teacher_targets`].
#[derive(Debug, Clone)]
pub struct TeacherTargets {
    /// `[2B, K]` DINO targets in the official swapped order (rows of global crop 2, then crop 1), so row
    /// `i` is the target of student global row `i` from the *other* view.
    pub dino: Tensor,
    /// `[M, K_ibot]` iBOT targets of the masked patches, if iBOT is on.
    pub ibot: Option<Tensor>,
}

/// Student-side inputs of one step.
#[derive(Debug, Clone, Copy)]
pub struct StudentOutputs<'a> {
    /// `[2B, K]` head outputs of the global-crop CLS tokens (crop 1 rows, then crop 2 rows).
    pub global_cls_logits: &'a Tensor,
    /// `[n_local·B, K]` head outputs of the local-crop CLS tokens (crop-major), if any local crops.
    pub local_cls_logits: Option<&'a Tensor>,
    /// `[M, K_ibot]` head outputs of the masked global-crop patch tokens (iBOT).
    pub masked_patch_logits: Option<&'a Tensor>,
    /// `[2B, D]` backbone CLS tokens (`x_norm_clstoken`) of the global crops (KoLeo).
    pub global_cls_tokens: Option<&'a Tensor>,
}

/// Every term of the DINOv2 loss and their weighted total (all scalars).
///
/// Values are the ones the official code adds to its `loss_accumulator`; note that the official *logs*
/// show `ibot` and `koleo` divided by 2.
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
/// use candle_core::{DType, Device, Tensor, Var};
/// use candle_nn::{VarBuilder, VarMap};
/// use dinov2_loss::{mask_indices, DinoHead, DinoHeadConfig, DinoV2Loss, DinoV2LossConfig};
///
/// let dev = Device::Cpu;
/// let (d, k, b, n_local, n_patches) = (16, 64, 2, 2, 4);
/// let cfg = DinoHeadConfig { hidden_dim: 32, bottleneck_dim: 8, ..DinoHeadConfig::new(d, k) };
/// let varmap = VarMap::new();
/// let student = DinoHead::init(&cfg, &varmap, "dino_head", 0, DType::F32, &dev).unwrap();
/// let teacher = DinoHead::new(&cfg, VarBuilder::from_tensors(
///     DinoHead::init_tensors(&cfg, 1, DType::F32, &dev).unwrap(), DType::F32, &dev)).unwrap();
/// let mut loss = DinoV2Loss::new(DinoV2LossConfig::default(), k, Some(k), &dev).unwrap();
///
/// // backbone outputs (CLS tokens of 2 global + n_local local crops, global patch tokens) and masks
/// let masks = Tensor::new(&[[1u8, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], &dev).unwrap();
/// let idx = mask_indices(&masks).unwrap();
/// let t_cls = Tensor::randn(0f32, 1.0, (2 * b, d), &dev).unwrap();
/// let t_patch = Tensor::randn(0f32, 1.0, (2 * b * n_patches, d), &dev).unwrap();
/// let g_cls = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2 * b, d), &dev).unwrap()).unwrap();
/// let l_cls = Tensor::randn(0f32, 1.0, (n_local * b, d), &dev).unwrap();
/// let g_patch = Tensor::randn(0f32, 1.0, (2 * b * n_patches, d), &dev).unwrap();
///
/// // teacher: targets (centering, lazy centre update)
/// let t_out = teacher.forward(&Tensor::cat(&[t_cls, t_patch.index_select(&idx, 0).unwrap()], 0).unwrap()).unwrap();
/// let m = idx.dim(0).unwrap();
/// let targets = loss
///     .teacher_targets(&t_out.narrow(0, 0, 2 * b).unwrap(), Some(&t_out.narrow(0, 2 * b, m).unwrap()), 0.04)
///     .unwrap();
/// // student: one packed head call (local CLS, global CLS, masked patches), then every loss term
/// let s_in = Tensor::cat(&[&l_cls, g_cls.as_tensor(), &g_patch.index_select(&idx, 0).unwrap()], 0).unwrap();
/// let s_out = student.forward_t(&s_in, true).unwrap();
/// let terms = loss
///     .forward_packed(&s_out, n_local, &targets, Some(g_cls.as_tensor()), Some(&masks), None)
///     .unwrap();
/// let grads = terms.total.backward().unwrap();
/// assert!(grads.get(g_cls.as_tensor()).is_some());
/// assert_eq!(varmap.all_vars().iter().filter(|v| grads.get(v.as_tensor()).is_some()).count(), 8);
/// ```
#[derive(Debug, Clone)]
pub struct DinoV2Loss {
    cfg: DinoV2LossConfig,
    dino: DinoLoss,
    ibot: Option<IbotPatchLoss>,
    koleo: KoLeoLoss,
}

const N_GLOBAL: usize = 2;

impl DinoV2Loss {
    /// A combination for a DINO head with `dino_out_dim` prototypes and, if `ibot_out_dim` is set, iBOT
    /// targets with that many prototypes (the same K with a shared head).
    pub fn new(
        cfg: DinoV2LossConfig,
        dino_out_dim: usize,
        ibot_out_dim: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let dino =
            DinoLoss::with_params(dino_out_dim, cfg.student_temp, cfg.center_momentum, device)?;
        let ibot = match ibot_out_dim {
            Some(k) if cfg.ibot_loss_weight > 0.0 => Some(IbotPatchLoss::with_params(
                k,
                cfg.student_temp,
                cfg.center_momentum,
                device,
            )?),
            _ => None,
        };
        Ok(Self {
            cfg,
            dino,
            ibot,
            koleo: KoLeoLoss::default(),
        })
    }

    /// Uses `reducer` for every global-batch statistic.
    pub fn with_reducer(mut self, reducer: Arc<dyn Reducer>) -> Self {
        self.dino = self.dino.with_reducer(reducer.clone());
        self.ibot = self.ibot.map(|l| l.with_reducer(reducer));
        self
    }

    /// The configuration.
    pub fn config(&self) -> &DinoV2LossConfig {
        &self.cfg
    }

    /// The DINO loss (and its centre).
    pub fn dino_loss(&self) -> &DinoLoss {
        &self.dino
    }

    /// Mutable DINO loss (to restore its centre).
    pub fn dino_loss_mut(&mut self) -> &mut DinoLoss {
        &mut self.dino
    }

    /// The iBOT loss, if on.
    pub fn ibot_loss(&self) -> Option<&IbotPatchLoss> {
        self.ibot.as_ref()
    }

    /// Mutable iBOT loss (to restore its centre).
    pub fn ibot_loss_mut(&mut self) -> Option<&mut IbotPatchLoss> {
        self.ibot.as_mut()
    }

    /// Teacher targets for one step (no gradient), updating the centres as official.
    ///
    /// * `teacher_cls_logits`: `[2B, K]` teacher head outputs of the global CLS tokens in natural order
    ///   (crop 1 rows, then crop 2 rows); they are swapped to (crop 2; crop 1) first, as official;
    /// * `teacher_masked_logits`: `[M, K_ibot]` teacher head outputs of this rank's masked patches
    ///   (required when iBOT is on).
    pub fn teacher_targets(
        &mut self,
        teacher_cls_logits: &Tensor,
        teacher_masked_logits: Option<&Tensor>,
        teacher_temp: f64,
    ) -> Result<TeacherTargets> {
        let (two_b, _) = teacher_cls_logits.dims2()?;
        if two_b == 0 || two_b % N_GLOBAL != 0 {
            return Err(Error::Input(format!(
                "teacher CLS logits must have 2B > 0 rows, got {two_b}"
            )));
        }
        let b = two_b / N_GLOBAL;
        let swapped = Tensor::cat(
            &[
                teacher_cls_logits.narrow(0, b, b)?,
                teacher_cls_logits.narrow(0, 0, b)?,
            ],
            0,
        )?
        .detach();
        let masked = match (&self.ibot, teacher_masked_logits) {
            (Some(_), Some(m)) => Some(m.detach()),
            (Some(_), None) => {
                return Err(Error::Input(
                    "iBOT is on: teacher masked-patch logits are required".into(),
                ))
            }
            (None, _) => None,
        };
        match self.cfg.centering {
            Centering::Centering => {
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
            Centering::SinkhornKnopp { n_iterations } => {
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

    /// [`Self::forward`] for the packed student output of one shared-head call, as `SSLMetaArch` runs it:
    /// `logits` is `[n_local·B + 2B + M, K]` with the local CLS rows first (crop-major), then the 2B
    /// global CLS rows, then the M masked-patch rows (only if iBOT is on; its targets must have the same K).
    ///
    /// Same values and gradients as [`Self::forward`] on the three row blocks, but one fused
    /// cross-entropy over all rows and no narrow/cat nodes on the `[rows, K]` gradient path, which is much
    /// cheaper in candle's backward at K = 65536.
    pub fn forward_packed(
        &self,
        logits: &Tensor,
        n_local: usize,
        targets: &TeacherTargets,
        global_cls_tokens: Option<&Tensor>,
        masks: Option<&Tensor>,
        masks_weight: Option<&Tensor>,
    ) -> Result<LossTerms> {
        let (rows, k) = logits.dims2()?;
        let (two_b, kt) = targets.dino.dims2()?;
        if kt != k || two_b == 0 || two_b % N_GLOBAL != 0 {
            return Err(Error::Input(format!(
                "teacher targets {:?} do not match packed logits [_, {k}]",
                targets.dino.dims()
            )));
        }
        let b = two_b / N_GLOBAL;
        let nl = n_local * b;
        let m = match (&self.ibot, &targets.ibot) {
            (Some(_), Some(t)) => {
                if t.dim(1)? != k {
                    return Err(Error::Input(
                        "forward_packed needs iBOT targets with the DINO head's K (shared head)"
                            .into(),
                    ));
                }
                t.dim(0)?
            }
            (Some(_), None) => {
                return Err(Error::Input("iBOT is on: iBOT targets are missing".into()))
            }
            (None, _) => 0,
        };
        if rows != nl + two_b + m {
            return Err(Error::Input(format!(
                "packed logits have {rows} rows, expected {nl} local + {two_b} global + {m} masked"
            )));
        }
        let dt = crate::ops::stat_dtype(logits.dtype());
        let t_dino = targets.dino.to_dtype(dt)?;
        // every local chunk is paired with both teacher chunks: Σ_t CE(t, s) = CE(Σ_t t, s)
        let t_pair = (t_dino.narrow(0, 0, b)? + t_dino.narrow(0, b, b)?)?;
        let mut parts: Vec<Tensor> = vec![t_pair; n_local];
        parts.push(t_dino);
        if let Some(t) = &targets.ibot {
            if m > 0 {
                parts.push(t.to_dtype(dt)?);
            }
        }
        let t_all = Tensor::cat(&parts, 0)?;
        let ce = crate::ops::soft_cross_entropy(&t_all, logits, self.dino.student_temp())?;

        let n_global_terms = (N_GLOBAL - 1) * N_GLOBAL;
        let n_local_terms = (n_local * N_GLOBAL).max(1);
        let denom = (n_global_terms + n_local_terms) as f64;
        let mut total: Option<Tensor> = None;
        let mut add = |t: &Tensor, w: f64| -> Result<()> {
            let t = (t * w)?;
            total = Some(match total.take() {
                None => t,
                Some(a) => (a + t)?,
            });
            Ok(())
        };
        let mut dino_local = None;
        if n_local > 0 {
            // Σ_chunks −mean_rows(CE) / denom
            let v = (ce.narrow(0, 0, nl)?.sum_all()? * (-1.0 / (b as f64 * denom)))?;
            add(&v, self.cfg.dino_loss_weight)?;
            dino_local = Some(v);
        }
        let mut dino_global = None;
        let mut koleo = None;
        if self.cfg.dino_loss_weight > 0.0 {
            let v = (ce.narrow(0, nl, two_b)?.mean_all()? * (-2.0 / denom))?;
            add(&v, self.cfg.dino_loss_weight)?;
            dino_global = Some(v);
            if self.cfg.koleo_loss_weight > 0.0 {
                let x = global_cls_tokens.ok_or_else(|| {
                    Error::Input("KoLeo is on: student global CLS tokens are required".into())
                })?;
                if x.dims2()?.0 != two_b {
                    return Err(Error::Input(format!(
                        "global CLS tokens {:?}, expected {two_b} rows",
                        x.dims()
                    )));
                }
                let k1 = self.koleo.forward(&x.narrow(0, 0, b)?)?;
                let k2 = self.koleo.forward(&x.narrow(0, b, b)?)?;
                let v = ((k1 + k2)? * self.cfg.koleo_loss_weight)?;
                add(&v, 1.0)?;
                koleo = Some(v);
            }
        }
        let mut ibot = None;
        if self.ibot.is_some() {
            let masks =
                masks.ok_or_else(|| Error::Input("iBOT is on: masks are required".into()))?;
            let n_images = masks.dims().first().copied().unwrap_or(0);
            if n_images == 0 {
                return Err(Error::Input("masks must be [n_images > 0, N]".into()));
            }
            let owned;
            let w = match masks_weight {
                Some(w) => w,
                None => {
                    owned = crate::ibot::masks_weight(masks)?;
                    &owned
                }
            };
            if w.dims() != [m] {
                return Err(Error::Input(format!(
                    "masks_weight {:?} does not match the {m} masked-patch rows",
                    w.dims()
                )));
            }
            let weighted = (ce.narrow(0, nl + two_b, m)? * w.to_dtype(dt)?)?.sum_all()?;
            // forward_masked · loss_scales (2) · ibot_loss_scale (1 / n_global_crops)
            let v = (weighted * (-2.0 / (n_images as f64 * N_GLOBAL as f64)))?;
            add(&v, self.cfg.ibot_loss_weight)?;
            ibot = Some(v);
        }
        let total = total.ok_or_else(|| Error::Config("every loss term is disabled".into()))?;
        Ok(LossTerms {
            dino_local,
            dino_global,
            koleo,
            ibot,
            total,
        })
    }

    /// All loss terms for one step.
    ///
    /// `masks` is the `[2B, N]` mask of the global crops (only its row count matters when `masks_weight`
    /// is given), `masks_weight` the `[M]` per-patch weights of the collate (computed from `masks` if
    /// `None`). KoLeo needs `B ≥ 2` rows per global chunk: with `B = 1` this returns
    /// [`Error::DegenerateBatch`] unless `koleo_loss_weight` is 0.
    pub fn forward(
        &self,
        student: &StudentOutputs<'_>,
        targets: &TeacherTargets,
        masks: Option<&Tensor>,
        masks_weight: Option<&Tensor>,
    ) -> Result<LossTerms> {
        let (two_b, _) = student.global_cls_logits.dims2()?;
        if targets.dino.dims() != student.global_cls_logits.dims() || two_b % N_GLOBAL != 0 {
            return Err(Error::Input(format!(
                "student global logits {:?} and teacher targets {:?} must both be [2B, K]",
                student.global_cls_logits.dims(),
                targets.dino.dims()
            )));
        }
        let b = two_b / N_GLOBAL;
        let n_local = match student.local_cls_logits {
            Some(l) => {
                let rows = l.dim(0)?;
                if b == 0 || rows % b != 0 {
                    return Err(Error::Input(format!(
                        "local logits have {rows} rows, not a multiple of B = {b}"
                    )));
                }
                rows / b
            }
            None => 0,
        };
        let n_global_terms = (N_GLOBAL - 1) * N_GLOBAL;
        let n_local_terms = (n_local * N_GLOBAL).max(1);
        let denom = (n_global_terms + n_local_terms) as f64;
        let teacher_chunks = [targets.dino.narrow(0, 0, b)?, targets.dino.narrow(0, b, b)?];

        let mut total: Option<Tensor> = None;
        let mut add = |t: &Tensor, w: f64| -> Result<()> {
            let t = (t * w)?;
            total = Some(match total.take() {
                None => t,
                Some(a) => (a + t)?,
            });
            Ok(())
        };

        let mut dino_local = None;
        if let (Some(l), true) = (student.local_cls_logits, n_local > 0) {
            let chunks = (0..n_local)
                .map(|i| l.narrow(0, i * b, b))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let v = (self.dino.forward(&chunks, &teacher_chunks)? / denom)?;
            add(&v, self.cfg.dino_loss_weight)?;
            dino_local = Some(v);
        }

        let mut dino_global = None;
        let mut koleo = None;
        if self.cfg.dino_loss_weight > 0.0 {
            let v = (self.dino.forward(
                std::slice::from_ref(student.global_cls_logits),
                std::slice::from_ref(&targets.dino),
            )? * (2.0 / denom))?;
            add(&v, self.cfg.dino_loss_weight)?;
            dino_global = Some(v);
            if self.cfg.koleo_loss_weight > 0.0 {
                let x = student.global_cls_tokens.ok_or_else(|| {
                    Error::Input("KoLeo is on: student global CLS tokens are required".into())
                })?;
                let (rows, _) = x.dims2()?;
                if rows != two_b {
                    return Err(Error::Input(format!(
                        "global CLS tokens have {rows} rows, expected {two_b}"
                    )));
                }
                let k1 = self.koleo.forward(&x.narrow(0, 0, b)?)?;
                let k2 = self.koleo.forward(&x.narrow(0, b, b)?)?;
                let v = ((k1 + k2)? * self.cfg.koleo_loss_weight)?;
                add(&v, 1.0)?;
                koleo = Some(v);
            }
        }

        let mut ibot = None;
        if let Some(loss) = &self.ibot {
            let s = student.masked_patch_logits.ok_or_else(|| {
                Error::Input("iBOT is on: student masked-patch logits are required".into())
            })?;
            let t = targets
                .ibot
                .as_ref()
                .ok_or_else(|| Error::Input("iBOT is on: iBOT targets are missing".into()))?;
            let masks =
                masks.ok_or_else(|| Error::Input("iBOT is on: masks are required".into()))?;
            let v = loss.forward_masked(s, t, masks, None, masks_weight)?;
            // `loss_scales (2) × ibot_loss_scale (1 / n_global_crops)`
            let v = (v * (2.0 / N_GLOBAL as f64))?;
            add(&v, self.cfg.ibot_loss_weight)?;
            ibot = Some(v);
        }

        let total = total.ok_or_else(|| Error::Config("every loss term is disabled".into()))?;
        Ok(LossTerms {
            dino_local,
            dino_global,
            koleo,
            ibot,
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn zeros(r: usize, c: usize) -> Tensor {
        Tensor::zeros((r, c), DType::F64, &Device::Cpu).unwrap()
    }

    /// With uniform student and teacher predictions every cross-entropy is ln K, so the terms reduce to
    /// the closed forms of the official normalisation: dino_local = 16/18·ln K, dino_global = 2/18·ln K
    /// (2 + 8 crops), ibot = (#masked images / #global crops)·ln K.
    #[test]
    fn uniform_predictions_give_the_closed_forms() {
        let (k, b, m) = (1000usize, 2usize, 3usize);
        let mut loss = DinoV2Loss::new(
            DinoV2LossConfig {
                koleo_loss_weight: 0.0,
                ..Default::default()
            },
            k,
            Some(k),
            &Device::Cpu,
        )
        .unwrap();
        let targets = loss
            .teacher_targets(&zeros(2 * b, k), Some(&zeros(m, k)), 0.04)
            .unwrap();
        let masks = Tensor::new(
            &[[1u8, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]],
            &Device::Cpu,
        )
        .unwrap();
        let (g, l, p) = (zeros(2 * b, k), zeros(8 * b, k), zeros(m, k));
        let terms = loss
            .forward(
                &StudentOutputs {
                    global_cls_logits: &g,
                    local_cls_logits: Some(&l),
                    masked_patch_logits: Some(&p),
                    global_cls_tokens: None,
                },
                &targets,
                Some(&masks),
                None,
            )
            .unwrap();
        let ln_k = (k as f64).ln();
        let v = |t: &Option<Tensor>| t.as_ref().unwrap().to_scalar::<f64>().unwrap();
        assert!((v(&terms.dino_local) - 16.0 / 18.0 * ln_k).abs() < 1e-9);
        assert!((v(&terms.dino_global) - 2.0 / 18.0 * ln_k).abs() < 1e-9);
        assert!((v(&terms.ibot) - 2.0 / 4.0 * ln_k).abs() < 1e-9);
        assert!(terms.koleo.is_none());
        let total = terms.total.to_scalar::<f64>().unwrap();
        assert!((total - (1.0 + 0.5) * ln_k).abs() < 1e-9);
    }

    #[test]
    fn batch_of_one_koleo_is_an_error_unless_disabled() {
        let k = 8;
        let run = |koleo_loss_weight: f64| {
            let mut loss = DinoV2Loss::new(
                DinoV2LossConfig {
                    koleo_loss_weight,
                    ..Default::default()
                },
                k,
                None,
                &Device::Cpu,
            )
            .unwrap();
            let targets = loss.teacher_targets(&zeros(2, k), None, 0.04).unwrap();
            let (g, cls) = (zeros(2, k), zeros(2, 4));
            loss.forward(
                &StudentOutputs {
                    global_cls_logits: &g,
                    local_cls_logits: None,
                    masked_patch_logits: None,
                    global_cls_tokens: Some(&cls),
                },
                &targets,
                None,
                None,
            )
        };
        assert!(matches!(run(0.1), Err(Error::DegenerateBatch(_))));
        let terms = run(0.0).unwrap();
        // no local crops: the official denominator is 2 + max(0, 1) = 3
        let v = terms.dino_global.unwrap().to_scalar::<f64>().unwrap();
        assert!((v - 2.0 / 3.0 * (k as f64).ln()).abs() < 1e-9);
    }

    #[test]
    fn missing_inputs_are_errors() {
        let mut loss = DinoV2Loss::new(Default::default(), 8, Some(8), &Device::Cpu).unwrap();
        assert!(matches!(
            loss.teacher_targets(&zeros(4, 8), None, 0.04),
            Err(Error::Input(_))
        ));
        assert!(loss
            .teacher_targets(&zeros(3, 8), Some(&zeros(2, 8)), 0.04)
            .is_err());
        assert!(loss
            .teacher_targets(&zeros(4, 8), Some(&zeros(2, 8)), 0.0)
            .is_err());
    }
}
