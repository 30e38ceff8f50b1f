//! Teacher target transforms shared by the DINO and iBOT losses: EMA centering with the official lazy
//! update, and Sinkhorn-Knopp.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::ops::{check_temp, last_dim, softmax_last_nograd, stat_dtype};
use crate::reduce::Reducer;

/// The EMA centre with the official *lazy* update.
///
/// `update` computes (and all-reduces) the batch statistic immediately but only stores it; it is folded
/// into the centre (`c ← m·c + (1-m)·mean`) at the start of the next [`Center::softmax_centered`] call, or by
/// [`Center::apply_pending`]. So the targets of step `i` use the centre after step `i-1`'s update, exactly as
/// in `DINOLoss`/`iBOTPatchLoss` (DINO v1 semantics).
#[derive(Debug, Clone)]
pub struct Center {
    center: Tensor,
    momentum: f64,
    pending: Option<Tensor>,
}

impl Center {
    /// A zero centre of shape `shape` (f32), with EMA momentum `momentum` (official 0.9).
    pub fn zeros(shape: &[usize], momentum: f64, device: &Device) -> Result<Self> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(Error::Config(format!(
                "center momentum must be in [0, 1], got {momentum}"
            )));
        }
        Ok(Self {
            center: Tensor::zeros(shape, DType::F32, device)?,
            momentum,
            pending: None,
        })
    }

    /// The current centre (without any pending update).
    pub fn tensor(&self) -> &Tensor {
        &self.center
    }

    /// Replaces the centre (e.g. from a checkpoint's `dino_loss.center` buffer) and drops any pending update.
    pub fn set(&mut self, center: Tensor) -> Result<()> {
        if center.dims() != self.center.dims() {
            return Err(Error::Input(format!(
                "centre shape {:?} expected, got {:?}",
                self.center.dims(),
                center.dims()
            )));
        }
        self.center = center.detach().to_dtype(DType::F32)?;
        self.pending = None;
        Ok(())
    }

    /// Whether an update is waiting to be applied.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Stores the global batch statistic `mean` (already divided by the global count) for the next step.
    pub(crate) fn set_pending(&mut self, mean: Tensor) -> Result<()> {
        let mean = mean.to_dtype(DType::F32)?.reshape(self.center.shape())?;
        self.pending = Some(mean);
        Ok(())
    }

    /// Folds a pending update into the centre: `c ← m·c + (1-m)·mean`.
    pub fn apply_pending(&mut self) -> Result<()> {
        if let Some(mean) = self.pending.take() {
            self.center = ((&self.center * self.momentum)? + (mean * (1.0 - self.momentum))?)?;
        }
        Ok(())
    }

    /// Applies any pending update, then returns `softmax((t - c) / temp)` over the last dim (no gradient;
    /// f32, or f64 for f64 input).
    pub fn softmax_centered(&mut self, t: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        check_temp("teacher_temp", teacher_temp)?;
        self.apply_pending()?;
        let k = last_dim(t, "teacher output")?;
        if k != last_dim(&self.center, "centre")? {
            return Err(Error::Input(format!(
                "teacher output has {k} prototypes, the centre {:?}",
                self.center.dims()
            )));
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
pub fn sinkhorn_knopp(
    t: &Tensor,
    teacher_temp: f64,
    n_iterations: usize,
    b_global: f64,
    reducer: &Arc<dyn Reducer>,
) -> Result<Tensor> {
    check_temp("teacher_temp", teacher_temp)?;
    if t.rank() != 2 {
        return Err(Error::Input(format!(
            "Sinkhorn-Knopp expects [B, K] logits, got {:?}",
            t.dims()
        )));
    }
    if !(b_global.is_finite() && b_global > 0.0) {
        return Err(Error::Input(format!(
            "Sinkhorn-Knopp needs a positive global sample count, got {b_global}"
        )));
    }
    let k = t.dim(1)? as f64;
    let dt = stat_dtype(t.dtype());
    // Work on Qᵀ ([B, K]): the paper's row sums (per prototype) are sums over dim 0 here.
    let mut q = (t.detach().to_dtype(dt)? / teacher_temp)?.exp()?;
    let sum_q = reducer.all_reduce_sum(&q.sum_all()?)?;
    q = q.broadcast_div(&sum_q)?;
    for _ in 0..n_iterations {
        let per_proto = reducer.all_reduce_sum(&q.sum_keepdim(0)?)?;
        q = (q.broadcast_div(&per_proto)? / k)?;
        let per_sample = q.sum_keepdim(1)?;
        q = (q.broadcast_div(&per_sample)? / b_global)?;
    }
    Ok((q * b_global)?)
}
