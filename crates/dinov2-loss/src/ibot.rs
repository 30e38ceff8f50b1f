//! `iBOTPatchLoss` (`dinov2/loss/ibot_patch_loss.py`): the masked-patch self-distillation loss.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::centering::{Center, TeacherTransform};
use crate::dino::DinoLossConfig;
use crate::error::{Error, Result};
use crate::ops::soft_cross_entropy;
use crate::reduce::Communicator;

/// Options of [`IbotPatchLoss`] (`iBOTPatchLoss.__init__`): the same as the DINO loss's, with `out_dim` =
/// `ibot.head_n_prototypes` (65536; the DINO head's K with the official shared head). [`Default`] is the
/// official configuration.
///
/// ```
/// use dinov2_loss::{Error, IbotLossConfig};
/// let cfg = IbotLossConfig::default();
/// assert_eq!((cfg.out_dim, cfg.student_temp, cfg.center_momentum), (65536, 0.1, 0.9));
/// let err = IbotLossConfig { student_temp: -1.0, ..IbotLossConfig::new(8) }.validate().unwrap_err();
/// assert!(matches!(err, Error::InvalidConfig { field: "student_temp", value, .. } if value == -1.0));
/// ```
pub type IbotLossConfig = DinoLossConfig;

/// The masks of the global crops as the official collate produces them: `collated_masks`, and optionally
/// `masks_weight` and `n_masked_patches`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{masks_weight, PatchMasks};
/// let masks = Tensor::new(&[[0u8, 1, 1, 0], [0, 0, 0, 0]], &Device::Cpu)?;
/// let weights = masks_weight(&masks)?;
/// let m = PatchMasks::new(&masks).with_weights(&weights).with_n_masked_patches(2);
/// assert_eq!(m.n_masked_patches, Some(2));
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PatchMasks<'a> {
    /// `[n_images, N]` masks of the global crops, masked or not (any numeric dtype, non-zero = masked). Only
    /// the row count (the number of global crops) is used when `weights` is given.
    pub masks: &'a Tensor,
    /// `[M]` per-masked-patch weights (`1 / masked count of its image`, see [`masks_weight`]); derived from
    /// `masks` when `None`.
    pub weights: Option<&'a Tensor>,
    /// Number of rows of the masked-patch logits that are real patches (the official padded buffer has
    /// more); all rows when `None`.
    pub n_masked_patches: Option<usize>,
}

impl<'a> PatchMasks<'a> {
    /// Masks only: weights derived from them, every masked-patch row used.
    ///
    /// ```
    /// let masks = candle_core::Tensor::new(&[[1u8, 0]], &candle_core::Device::Cpu)?;
    /// let m = dinov2_loss::PatchMasks::new(&masks);
    /// assert!(m.weights.is_none() && m.n_masked_patches.is_none());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn new(masks: &'a Tensor) -> Self {
        Self {
            masks,
            weights: None,
            n_masked_patches: None,
        }
    }

    /// With the collate's `masks_weight`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let masks = Tensor::new(&[[1u8, 0]], &Device::Cpu)?;
    /// let w = Tensor::new(&[1f32], &Device::Cpu)?;
    /// assert!(dinov2_loss::PatchMasks::new(&masks).with_weights(&w).weights.is_some());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn with_weights(self, weights: &'a Tensor) -> Self {
        Self {
            weights: Some(weights),
            ..self
        }
    }

    /// With the collate's `n_masked_patches` (rows past it are padding).
    ///
    /// ```
    /// let masks = candle_core::Tensor::new(&[[1u8, 0]], &candle_core::Device::Cpu)?;
    /// assert_eq!(dinov2_loss::PatchMasks::new(&masks).with_n_masked_patches(1).n_masked_patches, Some(1));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn with_n_masked_patches(self, n: usize) -> Self {
        Self {
            n_masked_patches: Some(n),
            ..self
        }
    }

    /// `Σ_j w_j · ce_j` over the first `n_masked_patches` rows of the per-patch cross-entropies `ce` (`[M']`),
    /// and the number of images (global crops) to divide by.
    pub(crate) fn weighted_sum(&self, ce: &Tensor) -> Result<(Tensor, usize)> {
        let n_images = self.masks.dims().first().copied().unwrap_or(0);
        if n_images == 0 || self.masks.rank() != 2 {
            return Err(Error::shape(
                "masks",
                "[n_images > 0, N]",
                self.masks.dims(),
            ));
        }
        let rows = ce.dim(0)?;
        let ce = match self.n_masked_patches {
            Some(n) if n > rows => {
                return Err(Error::shape(
                    "masked-patch logits",
                    format!("at least n_masked_patches = {n} rows"),
                    &[rows],
                ))
            }
            Some(n) if n < rows => ce.narrow(0, 0, n)?,
            _ => ce.clone(),
        };
        let w = match self.weights {
            Some(w) => Cow::Borrowed(w),
            None => Cow::Owned(masks_weight(self.masks)?),
        };
        if w.dims() != ce.dims() {
            return Err(Error::shape(
                "masks_weight",
                format!("{:?} (one weight per masked patch)", ce.dims()),
                w.dims(),
            ));
        }
        let w = w.to_dtype(ce.dtype())?;
        let weighted = (ce * w)?.sum_all()?;
        Ok((weighted, n_images))
    }
}

/// The iBOT patch loss with its teacher centre (`[1, 1, K]`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{IbotLossConfig, IbotPatchLoss, PatchMasks};
/// let dev = Device::Cpu;
/// // two global crops of 4 patches; the first has patches 1 and 2 masked, the second none
/// let masks = Tensor::new(&[[0u8, 1, 1, 0], [0, 0, 0, 0]], &dev)?;
/// let mut loss = IbotPatchLoss::new(IbotLossConfig::new(3), &dev)?;
/// let teacher = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev)?; // masked patches' logits
/// let student = Tensor::new(&[[0.5f32, 0.0, 0.0], [0.0, 0.0, 0.5]], &dev)?;
/// let targets = loss.softmax_center_teacher(&teacher, 0.07)?;
/// loss.update_center(&teacher)?;
/// let value = loss.forward_masked(&student, &targets, &PatchMasks::new(&masks))?;
/// assert!(value.to_scalar::<f32>()? > 0.0);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct IbotPatchLoss {
    cfg: IbotLossConfig,
    teacher: TeacherTransform,
}

/// `masks_weight` as built by the official collate: for every masked patch (row-major over `masks [n, N]`),
/// `1 / max(1, number of masked patches of its image)`. Returns an f32 vector of length `Σ masks`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let masks = Tensor::new(&[[0u8, 1, 1, 0], [0, 0, 0, 1]], &Device::Cpu)?;
/// assert_eq!(dinov2_loss::masks_weight(&masks)?.to_vec1::<f32>()?, [0.5, 0.5, 1.0]);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn masks_weight(masks: &Tensor) -> Result<Tensor> {
    if masks.rank() != 2 {
        return Err(Error::shape("masks", "[n_images, N]", masks.dims()));
    }
    let m = masks.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut w = Vec::new();
    for row in &m {
        let count = row.iter().filter(|&&v| v != 0.0).count();
        let wi = 1.0 / (count.max(1) as f32);
        w.extend(row.iter().filter(|&&v| v != 0.0).map(|_| wi));
    }
    let len = w.len();
    Ok(Tensor::from_vec(w, len, masks.device())?)
}

/// Flat indices (into `masks.flatten()`) of the masked patches, as the official `mask_indices_list`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let masks = Tensor::new(&[[0u8, 1, 1, 0], [0, 0, 0, 1]], &Device::Cpu)?;
/// assert_eq!(dinov2_loss::mask_indices(&masks)?.to_vec1::<u32>()?, [1, 2, 7]);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn mask_indices(masks: &Tensor) -> Result<Tensor> {
    let m = masks
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let idx: Vec<u32> = m
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0.0)
        .map(|(i, _)| i as u32)
        .collect();
    let len = idx.len();
    Ok(Tensor::from_vec(idx, len, masks.device())?)
}

impl IbotPatchLoss {
    /// A loss for `cfg.out_dim` prototypes with a zero centre, single process ([`Self::with_communicator`] for
    /// data-parallel training).
    ///
    /// ```
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(16), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.center().tensor().dims(), &[1, 1, 16]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn new(cfg: IbotLossConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let teacher = TeacherTransform::new(&[1, 1, cfg.out_dim], cfg.center_momentum, device)?;
        Ok(Self { cfg, teacher })
    }

    /// Uses `comm` for the centre update and Sinkhorn-Knopp (default: [`crate::SingleProcess`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss, SingleProcess};
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(4), &candle_core::Device::Cpu)?
    ///     .with_communicator(Arc::new(SingleProcess));
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn with_communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.teacher.comm = comm;
        self
    }

    /// The configuration.
    ///
    /// ```
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(4), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.config().out_dim, 4);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn config(&self) -> &IbotLossConfig {
        &self.cfg
    }

    /// The centre state (`[1, 1, K]`, f32).
    ///
    /// ```
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(4), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.center().momentum(), 0.9);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn center(&self) -> &Center {
        &self.teacher.center
    }

    /// Mutable centre state (to restore it from a checkpoint).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let mut loss = IbotPatchLoss::new(IbotLossConfig::new(4), &Device::Cpu)?;
    /// loss.center_mut().set(Tensor::ones((1, 1, 4), DType::F32, &Device::Cpu)?)?;
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn center_mut(&mut self) -> &mut Center {
        &mut self.teacher.center
    }

    /// Applies any pending centre update, then returns `softmax((t - center) / teacher_temp)` (no gradient).
    /// `t` is `[M, K]` or `[1, M, K]`; the result has the same shape.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let mut loss = IbotPatchLoss::new(IbotLossConfig::new(2), &Device::Cpu)?;
    /// let p = loss.softmax_center_teacher(&Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?, 0.07)?;
    /// assert_eq!(p.dims(), &[3, 2]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn softmax_center_teacher(&mut self, t: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        let out = self.teacher.center.softmax_centered(t, teacher_temp)?;
        Ok(out.reshape(t.shape())?)
    }

    /// Records the centre update for masked-patch teacher logits `t`: `[n, M, K]` (official, `n` = 1) or
    /// `[M, K]` (read as `[1, M, K]`). The statistic is `Σ_n mean_M(t) / (n × world_size)` after an
    /// all-reduce, i.e. the average over ranks of each rank's mean over its own masked patches; it is applied
    /// lazily at the next [`Self::softmax_center_teacher`].
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let mut loss = IbotPatchLoss::new(IbotLossConfig::new(2), &Device::Cpu)?;
    /// loss.update_center(&Tensor::ones((5, 2), DType::F32, &Device::Cpu)?)?;
    /// assert!(loss.center().has_pending());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn update_center(&mut self, t: &Tensor) -> Result<()> {
        let k = self.teacher.k();
        let (n, m) = match *t.dims() {
            [m, kk] if kk == k => (1, m),
            [n, m, kk] if kk == k => (n, m),
            _ => {
                return Err(Error::shape(
                    "masked-patch teacher logits",
                    format!("[M, {k}] or [n, M, {k}]"),
                    t.dims(),
                ))
            }
        };
        if n == 0 || m == 0 {
            return Err(Error::shape(
                "masked-patch teacher logits",
                format!("at least one masked patch: [M > 0, {k}]"),
                t.dims(),
            ));
        }
        // Σ_n mean_M(t_n) = column sum over all n·M rows / M
        self.teacher.update_center(&t.reshape((n * m, k))?, m, n)
    }

    /// Sinkhorn-Knopp targets for this rank's `[M, K]` masked-patch teacher logits. `n_masked_patches` is
    /// this rank's count; the global count (the `B` of the algorithm) is its all-reduced sum, as official.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(2), &Device::Cpu)?;
    /// let q = loss.sinkhorn_knopp_teacher(&Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?, 0.05, 3, 3)?;
    /// assert_eq!(q.to_vec2::<f32>()?[2], [0.5, 0.5]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn sinkhorn_knopp_teacher(
        &self,
        t: &Tensor,
        teacher_temp: f64,
        n_masked_patches: usize,
        n_iterations: usize,
    ) -> Result<Tensor> {
        let b = self
            .teacher
            .all_reduce_count(n_masked_patches, t.device())?;
        self.teacher
            .sinkhorn_knopp(t, teacher_temp, n_iterations, b)
    }

    /// The official `forward_masked`: `-Σ_j w_j · Σ_k t_jk log_softmax(s_j / τ)_k / n_images`.
    ///
    /// `s`, `t`: `[M', K]` student logits / teacher targets of the masked patches (`M' ≥ M`, see
    /// [`PatchMasks::n_masked_patches`]); `masks`: the global crops' masks (`n_images` is their row count),
    /// with the per-patch weights or not.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss, PatchMasks};
    /// let dev = Device::Cpu;
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(4), &dev)?;
    /// let masks = Tensor::new(&[[1u8, 1], [0, 0]], &dev)?; // 2 masked patches in image 0
    /// // 3 rows: 2 masked patches and 1 padding row
    /// let (s, t) = (Tensor::zeros((3, 4), DType::F32, &dev)?, Tensor::full(0.25f32, (3, 4), &dev)?);
    /// let v = loss.forward_masked(&s, &t, &PatchMasks::new(&masks).with_n_masked_patches(2))?;
    /// // weights 1/2 each: (½ + ½)·ln 4 / 2 images
    /// assert!((v.to_scalar::<f32>()? - 4f32.ln() / 2.0).abs() < 1e-6);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn forward_masked(&self, s: &Tensor, t: &Tensor, masks: &PatchMasks<'_>) -> Result<Tensor> {
        let ce = soft_cross_entropy(t, s, self.cfg.student_temp)?;
        let (weighted, n_images) = masks.weighted_sum(&ce)?;
        Ok((weighted.neg()? / n_images as f64)?)
    }

    /// The official dense `forward`: `s`, `t` `[B, N, K]`, `masks` `[B, N]`; per image the masked mean of
    /// the cross-entropy (count clamped to ≥ 1), then minus the mean over images.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{IbotLossConfig, IbotPatchLoss};
    /// let dev = Device::Cpu;
    /// let loss = IbotPatchLoss::new(IbotLossConfig::new(4), &dev)?;
    /// let masks = Tensor::new(&[[1u8, 0, 1]], &dev)?;
    /// let (s, t) = (Tensor::zeros((1, 3, 4), DType::F32, &dev)?, Tensor::full(0.25f32, (1, 3, 4), &dev)?);
    /// let v = loss.forward(&s, &t, &masks)?.to_scalar::<f32>()?;
    /// assert!((v - 4f32.ln()).abs() < 1e-6);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn forward(&self, s: &Tensor, t: &Tensor, masks: &Tensor) -> Result<Tensor> {
        let ce = soft_cross_entropy(t, s, self.cfg.student_temp)?; // [B, N]
        if ce.dims() != masks.dims() {
            return Err(Error::shape(
                "masks",
                format!("{:?} (the patch grid [B, N] of the logits)", ce.dims()),
                masks.dims(),
            ));
        }
        let m = masks.ne(0u8)?.to_dtype(ce.dtype())?;
        let num = (ce * &m)?.sum(D::Minus1)?;
        let den = m.sum(D::Minus1)?.maximum(1.0)?;
        Ok((num / den)?.mean_all()?.neg()?)
    }
}
