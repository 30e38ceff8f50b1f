//! `DINOLoss` (`dinov2/loss/dino_clstoken_loss.py`): the image-level (CLS token) self-distillation loss.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::centering::{sinkhorn_knopp, Center};
use crate::error::{Error, Result};
use crate::ops::{check_temp, soft_cross_entropy, stat_dtype};
use crate::reduce::{Reducer, SingleProcess};

/// The DINO cross-entropy loss with its teacher centre.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::DinoLoss;
/// let k = 8;
/// let mut loss = DinoLoss::new(k, &Device::Cpu).unwrap();
/// let teacher = Tensor::randn(0f32, 1.0, (4, k), &Device::Cpu).unwrap();
/// let student = Tensor::randn(0f32, 1.0, (4, k), &Device::Cpu).unwrap();
/// let targets = loss.softmax_center_teacher(&teacher, 0.04).unwrap();
/// loss.update_center(&teacher).unwrap();
/// let value = loss.forward(&[student], &[targets]).unwrap();
/// assert!(value.to_scalar::<f32>().unwrap() > 0.0);
/// ```
#[derive(Clone)]
pub struct DinoLoss {
    student_temp: f64,
    center: Center,
    reducer: Arc<dyn Reducer>,
}

impl std::fmt::Debug for DinoLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DinoLoss")
            .field("student_temp", &self.student_temp)
            .field("center", &self.center)
            .field("world_size", &self.reducer.world_size())
            .finish()
    }
}

impl DinoLoss {
    /// Official defaults: student temperature 0.1, centre momentum 0.9, centre `[1, out_dim]` of zeros,
    /// single process.
    pub fn new(out_dim: usize, device: &Device) -> Result<Self> {
        Self::with_params(out_dim, 0.1, 0.9, device)
    }

    /// Explicit student temperature and centre momentum.
    pub fn with_params(
        out_dim: usize,
        student_temp: f64,
        center_momentum: f64,
        device: &Device,
    ) -> Result<Self> {
        if out_dim == 0 {
            return Err(Error::Config("out_dim must be > 0".into()));
        }
        check_temp("student_temp", student_temp)?;
        Ok(Self {
            student_temp,
            center: Center::zeros(&[1, out_dim], center_momentum, device)?,
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

    /// The centre state (`[1, K]`, f32).
    pub fn center(&self) -> &Center {
        &self.center
    }

    /// Mutable centre state (to restore it from a checkpoint).
    pub fn center_mut(&mut self) -> &mut Center {
        &mut self.center
    }

    /// Applies any pending centre update, then returns `softmax((t - center) / teacher_temp)` (no gradient).
    /// `t` is `[..., K]`.
    pub fn softmax_center_teacher(&mut self, t: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        self.center.softmax_centered(t, teacher_temp)
    }

    /// Records the centre update for teacher logits `t` (`[N, K]`; leading dims are flattened into rows):
    /// the row sum is all-reduced now and divided by `N × world_size`; the EMA is applied lazily at the next
    /// [`Self::softmax_center_teacher`].
    pub fn update_center(&mut self, t: &Tensor) -> Result<()> {
        let k = self.center.tensor().dim(1)?;
        let t = t.detach().to_dtype(stat_dtype(t.dtype()))?;
        let n = t.elem_count() / k;
        if t.rank() == 0 || t.dims()[t.rank() - 1] != k || n == 0 {
            return Err(Error::Input(format!(
                "update_center expects [N>0, {k}] teacher logits, got {:?}",
                t.dims()
            )));
        }
        let t = t.reshape((n, k))?;
        let sum = if crate::fused::fused_ok(&t) {
            crate::fused::col_sum(&t)?
        } else {
            t.sum_keepdim(0)?
        };
        let sum = self.reducer.all_reduce_sum(&sum)?;
        let mean = (sum / (n * self.reducer.world_size()) as f64)?;
        self.center.set_pending(mean)
    }

    /// Sinkhorn-Knopp targets for this rank's `[B, K]` teacher logits (global batch `B × world_size`).
    pub fn sinkhorn_knopp_teacher(
        &self,
        t: &Tensor,
        teacher_temp: f64,
        n_iterations: usize,
    ) -> Result<Tensor> {
        let b = t.dims().first().copied().unwrap_or(0);
        sinkhorn_knopp(
            t,
            teacher_temp,
            n_iterations,
            (b * self.reducer.world_size()) as f64,
            &self.reducer,
        )
    }

    /// `-Σ_s Σ_t mean_rows(Σ_k t_k · log_softmax(s / student_temp)_k)` over all (student, teacher) chunk pairs.
    ///
    /// Every chunk is `[B, K]` (teachers are targets, detached). Returns a scalar, differentiable in the
    /// students. Half-precision student logits are computed in f32.
    pub fn forward(&self, students: &[Tensor], teachers: &[Tensor]) -> Result<Tensor> {
        let first = students
            .first()
            .ok_or_else(|| Error::Input("no student chunk".into()))?;
        if teachers.is_empty() {
            return Err(Error::Input("no teacher chunk".into()));
        }
        let dt = stat_dtype(first.dtype());
        // Σ_t mean_rows(Σ_k t_k·lsm_k) = mean_rows(Σ_k (Σ_t t)_k·lsm_k): sum the (detached) targets once.
        let mut tsum: Option<Tensor> = None;
        for t in teachers {
            let t = t.detach().to_dtype(dt)?;
            tsum = Some(match tsum {
                None => t,
                Some(acc) => (acc + t)?,
            });
        }
        let tsum = tsum.ok_or_else(|| Error::Input("no teacher chunk".into()))?;
        let mut total: Option<Tensor> = None;
        for s in students {
            if tsum.dims() != s.dims() {
                return Err(Error::Input(format!(
                    "teacher chunks {:?} and student chunk {:?} differ",
                    tsum.dims(),
                    s.dims()
                )));
            }
            let term = soft_cross_entropy(&tsum, s, self.student_temp)?.mean_all()?;
            total = Some(match total {
                None => term.neg()?,
                Some(acc) => (acc - term)?,
            });
        }
        total.ok_or_else(|| Error::Input("no loss term".into()))
    }
}
