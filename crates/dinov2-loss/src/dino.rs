//! `DINOLoss` (`dinov2/loss/dino_clstoken_loss.py`): the image-level (CLS token) self-distillation loss.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::centering::{Center, TeacherTransform};
use crate::error::{Error, Result};
use crate::ops::{finite_positive, soft_cross_entropy, stat_dtype};
use crate::reduce::Communicator;

/// Options of [`DinoLoss`] (`DINOLoss.__init__`), and of [`crate::IbotPatchLoss`] as
/// [`crate::IbotLossConfig`]; [`Default`] is the official configuration.
///
/// ```
/// use dinov2_loss::DinoLossConfig;
/// let cfg = DinoLossConfig::default();
/// assert_eq!((cfg.out_dim, cfg.student_temp, cfg.center_momentum), (65536, 0.1, 0.9));
/// let small = DinoLossConfig { student_temp: 0.2, ..DinoLossConfig::new(1024) };
/// assert_eq!(small.out_dim, 1024);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DinoLossConfig {
    /// Number of prototypes K (`dino.head_n_prototypes`, or `ibot.head_n_prototypes` for iBOT: 65536;
    /// 131072 for ViT-L/g).
    pub out_dim: usize,
    /// Student temperature (0.1).
    pub student_temp: f64,
    /// Centre EMA momentum, in `[0, 1]` (0.9).
    pub center_momentum: f64,
}

impl Default for DinoLossConfig {
    fn default() -> Self {
        Self {
            out_dim: 65536,
            student_temp: 0.1,
            center_momentum: 0.9,
        }
    }
}

impl DinoLossConfig {
    /// The official options for `out_dim` prototypes.
    ///
    /// ```
    /// assert_eq!(dinov2_loss::DinoLossConfig::new(8).student_temp, 0.1);
    /// ```
    pub fn new(out_dim: usize) -> Self {
        Self {
            out_dim,
            ..Self::default()
        }
    }

    /// Checks every field ([`Error::InvalidConfig`] names the first bad one).
    ///
    /// ```
    /// use dinov2_loss::{DinoLossConfig, Error};
    /// assert!(DinoLossConfig::new(8).validate().is_ok());
    /// let err = DinoLossConfig::new(0).validate().unwrap_err();
    /// assert!(matches!(err, Error::InvalidConfig { field: "out_dim", .. }));
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.out_dim == 0 {
            return Err(Error::InvalidConfig {
                field: "out_dim",
                value: 0.0,
                reason: "must be > 0",
            });
        }
        if !finite_positive(self.student_temp) {
            return Err(Error::InvalidConfig {
                field: "student_temp",
                value: self.student_temp,
                reason: "must be finite and > 0",
            });
        }
        if !(0.0..=1.0).contains(&self.center_momentum) {
            return Err(Error::InvalidConfig {
                field: "center_momentum",
                value: self.center_momentum,
                reason: "must be in [0, 1]",
            });
        }
        Ok(())
    }
}

/// The DINO cross-entropy loss with its teacher centre (`[1, K]`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{DinoLoss, DinoLossConfig};
/// let dev = Device::Cpu;
/// let mut loss = DinoLoss::new(DinoLossConfig::new(4), &dev)?;
/// let teacher = Tensor::new(&[[1f32, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], &dev)?;
/// let student = Tensor::new(&[[0.5f32, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]], &dev)?;
/// let targets = loss.softmax_center_teacher(&teacher, 0.04)?; // sharpened, nearly one-hot
/// loss.update_center(&teacher)?; // applied lazily, at the next step's targets
/// let value = loss.forward(&[student], &[targets])?;
/// assert!(value.to_scalar::<f32>()? > 0.0);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct DinoLoss {
    cfg: DinoLossConfig,
    teacher: TeacherTransform,
}

impl DinoLoss {
    /// A loss for `cfg.out_dim` prototypes with a zero centre, single process ([`Self::with_communicator`] for
    /// data-parallel training).
    ///
    /// ```
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let loss = DinoLoss::new(DinoLossConfig::new(16), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.center().tensor().dims(), &[1, 16]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn new(cfg: DinoLossConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let teacher = TeacherTransform::new(&[1, cfg.out_dim], cfg.center_momentum, device)?;
        Ok(Self { cfg, teacher })
    }

    /// Uses `comm` for the centre update and Sinkhorn-Knopp (default: [`crate::SingleProcess`]).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use dinov2_loss::{DinoLoss, DinoLossConfig, SingleProcess};
    /// let loss = DinoLoss::new(DinoLossConfig::new(4), &candle_core::Device::Cpu)?
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
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let loss = DinoLoss::new(DinoLossConfig::new(4), &candle_core::Device::Cpu)?;
    /// assert_eq!(loss.config().student_temp, 0.1);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn config(&self) -> &DinoLossConfig {
        &self.cfg
    }

    /// The centre state (`[1, K]`, f32).
    ///
    /// ```
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let loss = DinoLoss::new(DinoLossConfig::new(4), &candle_core::Device::Cpu)?;
    /// assert!(!loss.center().has_pending());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn center(&self) -> &Center {
        &self.teacher.center
    }

    /// Mutable centre state (to restore it from a checkpoint).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let mut loss = DinoLoss::new(DinoLossConfig::new(4), &Device::Cpu)?;
    /// loss.center_mut().set(Tensor::ones((1, 4), DType::F32, &Device::Cpu)?)?;
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn center_mut(&mut self) -> &mut Center {
        &mut self.teacher.center
    }

    /// Applies any pending centre update, then returns `softmax((t - center) / teacher_temp)` (no gradient).
    /// `t` is `[..., K]`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let mut loss = DinoLoss::new(DinoLossConfig::new(4), &Device::Cpu)?;
    /// let p = loss.softmax_center_teacher(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?, 0.04)?;
    /// assert_eq!(p.to_vec2::<f32>()?[1], [0.25; 4]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn softmax_center_teacher(&mut self, t: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        self.teacher.center.softmax_centered(t, teacher_temp)
    }

    /// Records the centre update for teacher logits `t` (`[N, K]`; leading dims are flattened into rows):
    /// the row sum is all-reduced now and divided by `N × world_size`; the EMA is applied lazily at the next
    /// [`Self::softmax_center_teacher`].
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let mut loss = DinoLoss::new(DinoLossConfig::new(4), &Device::Cpu)?;
    /// loss.update_center(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?)?;
    /// assert!(loss.center().has_pending());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn update_center(&mut self, t: &Tensor) -> Result<()> {
        let k = self.teacher.k();
        let n = t.elem_count() / k.max(1);
        if t.rank() == 0 || t.dims()[t.rank() - 1] != k || n == 0 {
            return Err(Error::shape(
                "teacher logits",
                format!("[N > 0, {k}]"),
                t.dims(),
            ));
        }
        self.teacher.update_center(&t.reshape((n, k))?, 1, n)
    }

    /// Sinkhorn-Knopp targets for this rank's `[B, K]` teacher logits (global batch `B × world_size`).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let loss = DinoLoss::new(DinoLossConfig::new(4), &Device::Cpu)?;
    /// let q = loss.sinkhorn_knopp_teacher(&Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?, 0.05, 3)?;
    /// assert_eq!(q.to_vec2::<f32>()?[0], [0.25; 4]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn sinkhorn_knopp_teacher(
        &self,
        t: &Tensor,
        teacher_temp: f64,
        n_iterations: usize,
    ) -> Result<Tensor> {
        let b = t.dims().first().copied().unwrap_or(0);
        let b_global = (b * self.teacher.comm.world_size()) as f64;
        self.teacher
            .sinkhorn_knopp(t, teacher_temp, n_iterations, b_global)
    }

    /// `-Σ_s Σ_t mean_rows(Σ_k t_k · log_softmax(s / student_temp)_k)` over all (student, teacher) chunk pairs.
    ///
    /// Every chunk is `[B, K]` (teachers are targets, detached). Returns a scalar, differentiable in the
    /// students. Half-precision student logits are computed in f32.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_loss::{DinoLoss, DinoLossConfig};
    /// let loss = DinoLoss::new(DinoLossConfig::new(4), &Device::Cpu)?;
    /// let uniform = Tensor::full(0.25f32, (2, 4), &Device::Cpu)?;
    /// let s = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
    /// // one student chunk against two teacher chunks: 2 · ln 4
    /// let v = loss.forward(&[s], &[uniform.clone(), uniform])?.to_scalar::<f32>()?;
    /// assert!((v - 2.0 * 4f32.ln()).abs() < 1e-5);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn forward(&self, students: &[Tensor], teachers: &[Tensor]) -> Result<Tensor> {
        let first = students.first().ok_or(Error::MissingInput {
            input: "students",
            reason: "at least one student chunk is needed",
        })?;
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
        let tsum = tsum.ok_or(Error::MissingInput {
            input: "teachers",
            reason: "at least one teacher chunk is needed",
        })?;
        let mut total: Option<Tensor> = None;
        for s in students {
            if tsum.dims() != s.dims() {
                return Err(Error::shape(
                    "student chunk",
                    format!("{:?} (the teacher chunks' shape)", tsum.dims()),
                    s.dims(),
                ));
            }
            let term = soft_cross_entropy(&tsum, s, self.cfg.student_temp)?.mean_all()?;
            total = Some(match total {
                None => term.neg()?,
                Some(acc) => (acc - term)?,
            });
        }
        // `students` is not empty, so there is a term
        total.ok_or(Error::NoLossTerm)
    }
}
