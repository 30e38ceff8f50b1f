//! Teacher targets, shared by the DINO and iBOT losses: the EMA centre with the official lazy update,
//! Sinkhorn-Knopp, and the all-reduce of their global-batch statistics ([`TeacherTransform`]).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::{check_temp, softmax_last_nograd, stat_dtype};
use crate::reduce::{all_reduce_sum, Communicator, SingleProcess};

/// The EMA centre with the official *lazy* update.
///
/// An update (made by [`crate::DinoLoss::update_center`] / [`crate::IbotPatchLoss::update_center`]) computes
/// and all-reduces the batch statistic immediately but only stores it; it is folded into the centre
/// (`c ← m·c + (1-m)·mean`) at the start of the next [`Center::softmax_centered`] call, or by
/// [`Center::apply_pending`]. So the targets of step `i` use the centre after step `i-1`'s update, exactly as
/// in `DINOLoss`/`iBOTPatchLoss` (DINO v1 semantics).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::Center;
/// let mut c = Center::zeros(&[1, 3], 0.9, &Device::Cpu)?;
/// // restore a checkpoint's `dino_loss.center` buffer
/// c.set(Tensor::new(&[[0.5f32, 0.0, -0.5]], &Device::Cpu)?)?;
/// // centred targets at temperature 1: softmax(t - c)
/// let t = Tensor::new(&[[0.5f32, 0.0, -0.5]], &Device::Cpu)?;
/// let p = c.softmax_centered(&t, 1.0)?.to_vec2::<f32>()?;
/// assert!(p[0].iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-6));
/// assert!(!c.has_pending());
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Center {
    center: Tensor,
    momentum: f64,
    pending: Option<Tensor>,
}

impl Center {
    /// A zero centre of shape `shape` (f32), with EMA momentum `momentum` in `[0, 1]` (official 0.9).
    ///
    /// ```
    /// let c = dinov2_loss::Center::zeros(&[1, 1, 4], 0.9, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.tensor().dims(), &[1, 1, 4]);
    /// assert!(dinov2_loss::Center::zeros(&[1, 4], 1.5, &candle_core::Device::Cpu).is_err());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn zeros(shape: &[usize], momentum: f64, device: &Device) -> Result<Self> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(Error::InvalidConfig {
                field: "center_momentum",
                value: momentum,
                reason: "must be in [0, 1]",
            });
        }
        Ok(Self {
            center: Tensor::zeros(shape, DType::F32, device)?,
            momentum,
            pending: None,
        })
    }

    /// The current centre (without any pending update).
    ///
    /// ```
    /// let c = dinov2_loss::Center::zeros(&[1, 2], 0.9, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.tensor().to_vec2::<f32>()?, [[0.0, 0.0]]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn tensor(&self) -> &Tensor {
        &self.center
    }

    /// The EMA momentum.
    ///
    /// ```
    /// assert_eq!(dinov2_loss::Center::zeros(&[1, 2], 0.9, &candle_core::Device::Cpu)?.momentum(), 0.9);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Replaces the centre (e.g. from a checkpoint's `dino_loss.center` buffer) and drops any pending update.
    /// The shape must be the centre's.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut c = dinov2_loss::Center::zeros(&[1, 2], 0.9, &Device::Cpu)?;
    /// c.set(Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?)?;
    /// assert_eq!(c.tensor().to_vec2::<f32>()?, [[1.0, 2.0]]);
    /// assert!(c.set(Tensor::new(&[1f32, 2.0], &Device::Cpu)?).is_err()); // [2] is not [1, 2]
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn set(&mut self, center: Tensor) -> Result<()> {
        if center.dims() != self.center.dims() {
            return Err(Error::shape(
                "centre",
                format!("{:?}", self.center.dims()),
                center.dims(),
            ));
        }
        self.center = center.detach().to_dtype(DType::F32)?;
        self.pending = None;
        Ok(())
    }

    /// Whether an update is waiting to be applied.
    ///
    /// ```
    /// assert!(!dinov2_loss::Center::zeros(&[1, 2], 0.9, &candle_core::Device::Cpu)?.has_pending());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Stores the global batch statistic `mean` (already divided by the global count) for the next step.
    fn set_pending(&mut self, mean: Tensor) -> Result<()> {
        let mean = mean.to_dtype(DType::F32)?.reshape(self.center.shape())?;
        self.pending = Some(mean);
        Ok(())
    }

    /// Folds a pending update into the centre: `c ← m·c + (1-m)·mean` (nothing if none is pending).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let mut loss = DinoLoss::new(DinoLossConfig::new(2), &Device::Cpu)?;
    /// loss.update_center(&Tensor::new(&[[1f32, 3.0]], &Device::Cpu)?)?;
    /// loss.center_mut().apply_pending()?;
    /// let c = loss.center().tensor().to_vec2::<f32>()?; // 0.9·0 + 0.1·[1, 3]
    /// assert!((c[0][0] - 0.1).abs() < 1e-7 && (c[0][1] - 0.3).abs() < 1e-7);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn apply_pending(&mut self) -> Result<()> {
        if let Some(mean) = self.pending.take() {
            self.center = ((&self.center * self.momentum)? + (mean * (1.0 - self.momentum))?)?;
        }
        Ok(())
    }

    /// Applies any pending update, then returns `softmax((t - c) / temp)` over the last dim (no gradient;
    /// f32, or f64 for f64 input). `t` is `[..., K]` with the centre's K.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let mut c = dinov2_loss::Center::zeros(&[1, 2], 0.9, &Device::Cpu)?;
    /// let p = c.softmax_centered(&Tensor::new(&[[0f32, 0.0]], &Device::Cpu)?, 0.04)?;
    /// assert_eq!(p.to_vec2::<f32>()?, [[0.5, 0.5]]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn softmax_centered(&mut self, t: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        check_temp("teacher_temp", teacher_temp)?;
        self.apply_pending()?;
        let k = self.center.dims().last().copied().unwrap_or(0);
        if t.dims().last() != Some(&k) {
            return Err(Error::shape(
                "teacher logits",
                format!("[..., {k}]"),
                t.dims(),
            ));
        }
        let dt = stat_dtype(t.dtype());
        let t = t.detach().to_dtype(dt)?;
        let c = self.center.to_dtype(dt)?;
        if crate::fused::fused_ok(&t) {
            let rows = t.elem_count() / k;
            let out = crate::fused::centered_softmax(&t.reshape((rows, k))?, &c, teacher_temp)?;
            return Ok(out.reshape(t.shape())?);
        }
        softmax_last_nograd(&(t.broadcast_sub(&c)? / teacher_temp)?)
    }
}

/// Sinkhorn-Knopp teacher targets, as the official `sinkhorn_knopp_teacher` (no gradient).
///
/// `t` is this rank's `[B_local, K]` teacher logits and `b_global` the number of samples over all ranks.
/// `Q = exp(t / temp)` (no max-subtraction, as official: logits beyond ~88·temp overflow f32), normalised to
/// total 1 over the global batch, then `n_iterations` times: prototype sums (all-reduced) to `1/K`, then
/// sample sums (local) to `1/B`. Returns `[B_local, K]` with rows summing to 1. Computed in f32 (f64 for
/// f64 input).
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{sinkhorn_knopp, Communicator, SingleProcess};
/// let t = Tensor::new(&[[0.1f32, 0.0, 0.3], [0.2, -0.1, 0.0]], &Device::Cpu)?;
/// let comm: Arc<dyn Communicator> = Arc::new(SingleProcess);
/// let q = sinkhorn_knopp(&t, 0.05, 3, 2.0, &comm)?.to_vec2::<f32>()?;
/// for row in &q {
///     assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5); // each sample's targets sum to 1
/// }
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn sinkhorn_knopp(
    t: &Tensor,
    teacher_temp: f64,
    n_iterations: usize,
    b_global: f64,
    comm: &Arc<dyn Communicator>,
) -> Result<Tensor> {
    check_temp("teacher_temp", teacher_temp)?;
    if t.rank() != 2 {
        return Err(Error::shape("teacher logits", "[B, K]", t.dims()));
    }
    if !(b_global.is_finite() && b_global > 0.0) {
        return Err(Error::InvalidArgument {
            name: "b_global",
            value: b_global,
            reason: "the global sample count must be > 0",
        });
    }
    let k = t.dim(1)? as f64;
    let dt = stat_dtype(t.dtype());
    // Work on Qᵀ ([B, K]): the paper's row sums (per prototype) are sums over dim 0 here.
    let mut q = (t.detach().to_dtype(dt)? / teacher_temp)?.exp()?;
    let sum_q = all_reduce_sum(comm.as_ref(), &q.sum_all()?)?;
    q = q.broadcast_div(&sum_q)?;
    for _ in 0..n_iterations {
        let per_proto = all_reduce_sum(comm.as_ref(), &q.sum_keepdim(0)?)?;
        q = (q.broadcast_div(&per_proto)? / k)?;
        let per_sample = q.sum_keepdim(1)?;
        q = (q.broadcast_div(&per_sample)? / b_global)?;
    }
    Ok((q * b_global)?)
}

/// What turns teacher logits into targets, shared by [`crate::DinoLoss`] and [`crate::IbotPatchLoss`]: the
/// EMA centre and the [`Communicator`] through which its statistic and Sinkhorn-Knopp's sums are all-reduced.
#[derive(Clone)]
pub(crate) struct TeacherTransform {
    pub(crate) center: Center,
    pub(crate) comm: Arc<dyn Communicator>,
}

impl std::fmt::Debug for TeacherTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeacherTransform")
            .field("center", &self.center)
            .field("world_size", &self.comm.world_size())
            .finish()
    }
}

impl TeacherTransform {
    /// A zero centre of `shape` (last dim K) and a single-process communicator.
    pub(crate) fn new(shape: &[usize], momentum: f64, device: &Device) -> Result<Self> {
        Ok(Self {
            center: Center::zeros(shape, momentum, device)?,
            comm: Arc::new(SingleProcess),
        })
    }

    /// Number of prototypes K.
    pub(crate) fn k(&self) -> usize {
        self.center.tensor().dims().last().copied().unwrap_or(0)
    }

    /// Records the centre statistic of this rank's `rows` (`[R, K]` teacher logits, R ≥ 1): the column sum
    /// divided by `per_rank_divisor`, all-reduced, divided by `count × world_size`; applied lazily.
    pub(crate) fn update_center(
        &mut self,
        rows: &Tensor,
        per_rank_divisor: usize,
        count: usize,
    ) -> Result<()> {
        let rows = rows.detach().to_dtype(stat_dtype(rows.dtype()))?;
        let mut sum = if crate::fused::fused_ok(&rows) {
            crate::fused::col_sum(&rows)?
        } else {
            rows.sum_keepdim(0)?
        };
        if per_rank_divisor != 1 {
            sum = (sum / per_rank_divisor as f64)?;
        }
        let sum = all_reduce_sum(self.comm.as_ref(), &sum)?;
        let mean = (sum / (count * self.comm.world_size()) as f64)?;
        self.center.set_pending(mean)
    }

    /// Sinkhorn-Knopp targets of this rank's `[B, K]` logits over a global batch of `b_global` samples.
    pub(crate) fn sinkhorn_knopp(
        &self,
        t: &Tensor,
        teacher_temp: f64,
        n_iterations: usize,
        b_global: f64,
    ) -> Result<Tensor> {
        sinkhorn_knopp(t, teacher_temp, n_iterations, b_global, &self.comm)
    }

    /// The sum over ranks of a per-rank count.
    pub(crate) fn all_reduce_count(&self, n: usize, device: &Device) -> Result<f64> {
        let local = Tensor::new(&[n as f64], device)?;
        let total = all_reduce_sum(self.comm.as_ref(), &local)?;
        let total = total
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(total.first().copied().unwrap_or(0.0))
    }
}
