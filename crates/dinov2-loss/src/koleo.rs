//! `KoLeoLoss` (`dinov2/loss/koleo_loss.py`): the Kozachenko-Leonenko differential-entropy regulariser.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::ops::{l2_normalize, stat_dtype};

/// KoLeo: `-mean_i log(‖x̂_i - x̂_{nn(i)} + eps‖₂ + eps)` over L2-normalised rows `x̂` (eps 1e-8), where
/// `nn(i)` is the row with the largest cosine similarity to row `i` other than `i` itself.
///
/// The neighbour search has no gradient (argmax); the distance is differentiable in both `x̂_i` and its
/// neighbour, as in PyTorch. A batch of one row has no neighbour: that is an [`Error::DegenerateBatch`]
/// rather than the official NaN/inf (dinov2 issue #314).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_loss::{Error, KoLeoLoss};
/// let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [-1.0, 0.1]], &Device::Cpu)?;
/// let loss = KoLeoLoss::default().forward(&x)?;
/// assert!(loss.to_scalar::<f32>()?.is_finite());
/// let one_row = KoLeoLoss::default().forward(&x.narrow(0, 0, 1)?).unwrap_err();
/// assert!(matches!(one_row, Error::DegenerateBatch { rows: 1, needed: 2, .. }));
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct KoLeoLoss {
    cfg: KoLeoLossConfig,
}

/// Options of [`KoLeoLoss`]; [`Default`] is the official `KoLeoLoss`.
///
/// ```
/// assert_eq!(dinov2_loss::KoLeoLossConfig::default().eps, 1e-8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KoLeoLossConfig {
    /// The eps of the L2 normalisation, of the pairwise distance and of the log (official 1e-8).
    pub eps: f64,
}

impl Default for KoLeoLossConfig {
    fn default() -> Self {
        Self { eps: 1e-8 }
    }
}

impl KoLeoLoss {
    /// KoLeo with the options `cfg` (`eps` finite and ≥ 0).
    ///
    /// ```
    /// use dinov2_loss::{KoLeoLoss, KoLeoLossConfig};
    /// let loss = KoLeoLoss::new(KoLeoLossConfig { eps: 1e-6 })?;
    /// assert_eq!(loss.config().eps, 1e-6);
    /// assert!(KoLeoLoss::new(KoLeoLossConfig { eps: f64::NAN }).is_err());
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn new(cfg: KoLeoLossConfig) -> Result<Self> {
        if !(cfg.eps.is_finite() && cfg.eps >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "eps",
                value: cfg.eps,
                reason: "must be finite and >= 0",
            });
        }
        Ok(Self { cfg })
    }

    /// The options.
    ///
    /// ```
    /// assert_eq!(dinov2_loss::KoLeoLoss::default().config().eps, 1e-8);
    /// ```
    pub fn config(&self) -> &KoLeoLossConfig {
        &self.cfg
    }

    /// Index of each row's nearest neighbour (largest dot product, diagonal excluded), no gradient.
    /// `x_normalized` is `[n, D]`, usually L2-normalised rows.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let x = Tensor::new(&[[1f32, 0.0], [0.8, 0.6], [0.0, 1.0]], &Device::Cpu)?;
    /// let nn = dinov2_loss::KoLeoLoss::default().nearest_neighbours(&x)?;
    /// assert_eq!(nn.to_vec1::<u32>()?, [1, 0, 1]);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn nearest_neighbours(&self, x_normalized: &Tensor) -> Result<Tensor> {
        let x = x_normalized.detach();
        let n = x.dim(0)?;
        let dots = x.matmul(&x.t()?)?;
        let eye = Tensor::eye(n, DType::U8, x.device())?;
        let minus_one = Tensor::full(-1f32, (n, n), x.device())?.to_dtype(dots.dtype())?;
        let dots = eye.where_cond(&minus_one, &dots)?;
        Ok(dots.argmax(D::Minus1)?)
    }

    /// The loss for `x` `[n, D]` (backbone CLS tokens of one global-crop chunk), a differentiable scalar
    /// (f32, or f64 for f64 input). [`Error::DegenerateBatch`] if `n < 2` (no neighbour to find).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// // two orthogonal unit vectors: distance √2 (eps aside), loss −ln √2
    /// let x = Tensor::new(&[[1f64, 0.0], [0.0, 1.0]], &Device::Cpu)?;
    /// let v = dinov2_loss::KoLeoLoss::default().forward(&x)?.to_scalar::<f64>()?;
    /// assert!((v + 2f64.sqrt().ln()).abs() < 1e-7);
    /// # Ok::<(), dinov2_loss::Error>(())
    /// ```
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = match *x.dims() {
            [n, _] => n,
            _ => return Err(Error::shape("x", "[n, D]", x.dims())),
        };
        if n < 2 {
            return Err(Error::DegenerateBatch {
                what: "KoLeo (a nearest neighbour per sample)",
                rows: n,
                needed: 2,
            });
        }
        let eps = self.cfg.eps;
        let x = x.to_dtype(stat_dtype(x.dtype()))?;
        let xn = l2_normalize(&x, eps)?;
        let idx = self.nearest_neighbours(&xn)?;
        let nb = xn.index_select(&idx, 0)?;
        let d = ((xn - nb)? + eps)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        Ok(((d + eps)?.log()?.mean_all()?).neg()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn batch_of_one_is_a_clear_error() {
        let x = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            KoLeoLoss::default().forward(&x),
            Err(Error::DegenerateBatch { rows: 1, .. })
        ));
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            KoLeoLoss::default().forward(&x),
            Err(Error::InputShape { input: "x", .. })
        ));
    }

    #[test]
    fn definition_on_a_hand_made_batch() {
        // unit vectors at 0°, 90°, 180°+small: neighbours and distances computed by hand
        let a = 0.1f64;
        let x = Tensor::new(
            &[[2.0f64, 0.0], [0.0, 3.0], [-a.cos(), -a.sin()]],
            &Device::Cpu,
        )
        .unwrap();
        let nn: Vec<u32> = KoLeoLoss::default()
            .nearest_neighbours(&l2_normalize(&x, 1e-8).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        // row 0 (1,0): dots 0 with row 1, -cos(a) with row 2 → row 1; row 1: 0 vs -sin(a) → row 0;
        // row 2: -cos(a) vs -sin(a) → row 1
        assert_eq!(nn, vec![1, 0, 1]);
        let p = [[1.0, 0.0], [0.0, 1.0], [-a.cos(), -a.sin()]];
        let dist = |i: usize, j: usize| {
            ((p[i][0] - p[j][0] + 1e-8f64).powi(2) + (p[i][1] - p[j][1] + 1e-8).powi(2)).sqrt()
        };
        let expected =
            -((dist(0, 1) + 1e-8).ln() + (dist(1, 0) + 1e-8).ln() + (dist(2, 1) + 1e-8).ln()) / 3.0;
        let v = KoLeoLoss::default()
            .forward(&x)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // both sides: ~30 f64 roundings on O(1) values (distances ~1, their logs), no cancellation
        let tol = 2.0 * crate::testutil::sum_error(32, crate::testutil::U64);
        assert!((v - expected).abs() <= tol, "{v} vs {expected}");
    }
}
