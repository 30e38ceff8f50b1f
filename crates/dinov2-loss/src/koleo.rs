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
/// use dinov2_loss::KoLeoLoss;
/// let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [-1.0, 0.1]], &Device::Cpu).unwrap();
/// let loss = KoLeoLoss::default().forward(&x).unwrap();
/// assert!(loss.to_scalar::<f32>().unwrap().is_finite());
/// assert!(KoLeoLoss::default().forward(&x.narrow(0, 0, 1).unwrap()).is_err());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KoLeoLoss {
    eps: f64,
}

impl Default for KoLeoLoss {
    fn default() -> Self {
        Self { eps: 1e-8 }
    }
}

impl KoLeoLoss {
    /// KoLeo with a custom eps (normalisation, pairwise-distance and log eps; official 1e-8).
    pub fn with_eps(eps: f64) -> Self {
        Self { eps }
    }

    /// Index of each row's nearest neighbour (largest dot product, diagonal excluded), no gradient.
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
    /// (f32, or f64 for f64 input). Errors if `n < 2`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _) = x
            .dims2()
            .map_err(|_| Error::Input(format!("KoLeo expects [n, D], got {:?}", x.dims())))?;
        if n < 2 {
            return Err(Error::DegenerateBatch(format!(
                "KoLeo needs at least 2 samples per chunk to find a nearest neighbour, got {n}"
            )));
        }
        let x = x.to_dtype(stat_dtype(x.dtype()))?;
        let xn = l2_normalize(&x, self.eps)?;
        let idx = self.nearest_neighbours(&xn)?;
        let nb = xn.index_select(&idx, 0)?;
        let d = ((xn - nb)? + self.eps)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        Ok(((d + self.eps)?.log()?.mean_all()?).neg()?)
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
            Err(Error::DegenerateBatch(_))
        ));
        let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            KoLeoLoss::default().forward(&x),
            Err(Error::Input(_))
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
        assert!((v - expected).abs() < 1e-12, "{v} vs {expected}");
    }
}
