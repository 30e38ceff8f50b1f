//! `iBOTPatchLoss` (`dinov2/loss/ibot_patch_loss.py`): the masked-patch self-distillation loss.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use crate::centering::{sinkhorn_knopp, Center};
use crate::error::{Error, Result};
use crate::ops::{check_temp, soft_cross_entropy, stat_dtype};
use crate::reduce::{Reducer, SingleProcess};

/// The iBOT patch loss with its teacher centre (`[1, 1, K]`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{masks_weight, IbotPatchLoss};
/// let (k, dev) = (8, Device::Cpu);
/// // two global crops of 4 patches; the first has patches 1 and 2 masked, the second none
/// let masks = Tensor::new(&[[0u8, 1, 1, 0], [0, 0, 0, 0]], &dev).unwrap();
/// let weights = masks_weight(&masks).unwrap(); // [1/2, 1/2]
/// let mut loss = IbotPatchLoss::new(k, &dev).unwrap();
/// let teacher = Tensor::randn(0f32, 1.0, (2, k), &dev).unwrap();
/// let student = Tensor::randn(0f32, 1.0, (2, k), &dev).unwrap();
/// let targets = loss.softmax_center_teacher(&teacher, 0.07).unwrap();
/// loss.update_center(&teacher).unwrap();
/// let value = loss.forward_masked(&student, &targets, &masks, None, Some(&weights)).unwrap();
/// assert!(value.to_scalar::<f32>().unwrap() > 0.0);
/// ```
#[derive(Clone)]
pub struct IbotPatchLoss {
    student_temp: f64,
    center: Center,
    reducer: Arc<dyn Reducer>,
}

impl std::fmt::Debug for IbotPatchLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IbotPatchLoss")
            .field("student_temp", &self.student_temp)
            .field("center", &self.center)
            .field("world_size", &self.reducer.world_size())
            .finish()
    }
}

/// `masks_weight` as built by the official collate: for every masked patch (row-major over `masks [n, N]`),
/// `1 / max(1, number of masked patches of its image)`. Returns an f32 vector of length `Σ masks`.
pub fn masks_weight(masks: &Tensor) -> Result<Tensor> {
    masks.dims2()?;
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
    /// Official defaults: student temperature 0.1, centre momentum 0.9, single process.
    pub fn new(patch_out_dim: usize, device: &Device) -> Result<Self> {
        Self::with_params(patch_out_dim, 0.1, 0.9, device)
    }

    /// Explicit student temperature and centre momentum.
    pub fn with_params(
        patch_out_dim: usize,
        student_temp: f64,
        center_momentum: f64,
        device: &Device,
    ) -> Result<Self> {
        if patch_out_dim == 0 {
            return Err(Error::Config("patch_out_dim must be > 0".into()));
        }
        check_temp("student_temp", student_temp)?;
        Ok(Self {
            student_temp,
            center: Center::zeros(&[1, 1, patch_out_dim], center_momentum, device)?,
            reducer: Arc::new(SingleProcess),
        })
    }

    /// Uses `reducer` for the centre update and Sinkhorn-Knopp (default: [`SingleProcess`]).
    pub fn with_reducer(mut self, reducer: Arc<dyn Reducer>) -> Self {
        self.reducer = reducer;
        self
    }

    /// The student temperature.
    pub fn student_temp(&self) -> f64 {
        self.student_temp
    }

    /// The centre state (`[1, 1, K]`, f32).
    pub fn center(&self) -> &Center {
        &self.center
    }

    /// Mutable centre state (to restore it from a checkpoint).
    pub fn center_mut(&mut self) -> &mut Center {
        &mut self.center
    }

    /// Applies any pending centre update, then returns `softmax((t - center) / teacher_temp)` (no gradient).
    /// `t` is `[M, K]` or `[1, M, K]`; the result has the same shape.
    pub fn softmax_center_teacher(&mut self, t: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        let out = self.center.softmax_centered(t, teacher_temp)?;
        Ok(out.reshape(t.shape())?)
    }

    /// Records the centre update for masked-patch teacher logits `t`: `[n, M, K]` (official, `n` = 1) or
    /// `[M, K]` (read as `[1, M, K]`). The statistic is `Σ_n mean_M(t) / (n × world_size)` after an
    /// all-reduce, i.e. the average over ranks of each rank's mean over its own masked patches; it is applied
    /// lazily at the next [`Self::softmax_center_teacher`].
    pub fn update_center(&mut self, t: &Tensor) -> Result<()> {
        let t = t.detach().to_dtype(stat_dtype(t.dtype()))?;
        let t = match t.rank() {
            2 => t.unsqueeze(0)?,
            3 => t,
            _ => {
                return Err(Error::Input(format!(
                    "update_center expects [M, K] or [n, M, K], got {:?}",
                    t.dims()
                )))
            }
        };
        let (n, m, _) = t.dims3()?;
        if n == 0 || m == 0 {
            return Err(Error::Input(
                "update_center needs at least one masked patch".into(),
            ));
        }
        // Σ_n mean_M(t_n) = column sum over all n·M rows / M
        let (_, _, k) = t.dims3()?;
        let rows = t.reshape((n * m, k))?;
        let sum = if crate::fused::fused_ok(&rows) {
            (crate::fused::col_sum(&rows)? / m as f64)?
        } else {
            t.mean(1)?.sum_keepdim(0)?
        };
        let sum = self.reducer.all_reduce_sum(&sum)?;
        let mean = (sum / (n * self.reducer.world_size()) as f64)?;
        self.center.set_pending(mean)
    }

    /// Sinkhorn-Knopp targets for this rank's `[M, K]` masked-patch teacher logits. `n_masked_patches` is
    /// this rank's count; the global count (the `B` of the algorithm) is its all-reduced sum, as official.
    pub fn sinkhorn_knopp_teacher(
        &self,
        t: &Tensor,
        teacher_temp: f64,
        n_masked_patches: usize,
        n_iterations: usize,
    ) -> Result<Tensor> {
        let local = Tensor::new(&[n_masked_patches as f64], t.device())?;
        let b = self
            .reducer
            .all_reduce_sum(&local)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let b = b.first().copied().unwrap_or(0.0);
        sinkhorn_knopp(t, teacher_temp, n_iterations, b, &self.reducer)
    }

    /// The official `forward_masked`: `-Σ_j w_j · Σ_k t_jk log_softmax(s_j / τ)_k / n_images`.
    ///
    /// * `s`, `t`: `[M', K]` student logits / teacher targets of the masked patches (`M' ≥ M`);
    /// * `masks`: `[n_images, N]` (any numeric dtype, non-zero = masked); only its first dim (the number of
    ///   global crops, masked or not) is used when `masks_weight` is given;
    /// * `n_masked_patches`: if set, only the first `M` rows are used (the official padded buffer);
    /// * `masks_weight`: `[M]` per-patch weights (`1/masked count of its image`); computed from `masks` if
    ///   `None`, see [`masks_weight`].
    pub fn forward_masked(
        &self,
        s: &Tensor,
        t: &Tensor,
        masks: &Tensor,
        n_masked_patches: Option<usize>,
        masks_weight: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n_images = masks.dims().first().copied().unwrap_or(0);
        if n_images == 0 {
            return Err(Error::Input("masks must be [n_images > 0, N]".into()));
        }
        let mut loss = soft_cross_entropy(t, s, self.student_temp)?;
        let owned;
        let w = match masks_weight {
            Some(w) => w,
            None => {
                owned = self::masks_weight(masks)?;
                &owned
            }
        };
        if let Some(n) = n_masked_patches {
            if n > loss.dim(0)? {
                return Err(Error::Input(format!(
                    "n_masked_patches {n} exceeds the {} rows given",
                    loss.dim(0)?
                )));
            }
            loss = loss.narrow(0, 0, n)?;
        }
        if w.dims() != loss.dims() {
            return Err(Error::Input(format!(
                "masks_weight {:?} does not match the {:?} masked-patch losses",
                w.dims(),
                loss.dims()
            )));
        }
        let weighted = (loss * w.to_dtype(stat_dtype(s.dtype()))?)?.sum_all()?;
        Ok((weighted.neg()? / n_images as f64)?)
    }

    /// The official dense `forward`: `s`, `t` `[B, N, K]`, `masks` `[B, N]`; per image the masked mean of
    /// the cross-entropy (count clamped to ≥ 1), then minus the mean over images.
    pub fn forward(&self, s: &Tensor, t: &Tensor, masks: &Tensor) -> Result<Tensor> {
        let ce = soft_cross_entropy(t, s, self.student_temp)?; // [B, N]
        if ce.dims() != masks.dims() {
            return Err(Error::Input(format!(
                "masks {:?} do not match the patch grid {:?}",
                masks.dims(),
                ce.dims()
            )));
        }
        let m = masks.ne(0u8)?.to_dtype(ce.dtype())?;
        let num = (ce * &m)?.sum(D::Minus1)?;
        let den = m.sum(D::Minus1)?.maximum(1.0)?;
        Ok((num / den)?.mean_all()?.neg()?)
    }
}
