//! Seeded inputs for the tests (unit tests include this module; the integration tests include the same
//! file through `tests/common`): every test draws its data from a [`SeededRng`], never from candle's
//! unseeded `Tensor::randn` or `rand::rng()`, so a test sees the same numbers on every run, thread count
//! and CPU.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Unit roundoff of f16 (2⁻¹¹).
pub const U16: f64 = 4.882_812_5e-4;
/// Unit roundoff of f32 (2⁻²⁴).
pub const U32: f64 = 5.960_464_477_539_063e-8;
/// Unit roundoff of f64 (2⁻⁵³).
pub const U64: f64 = 1.110_223_024_625_156_5e-16;

/// Relative error that a sum of `n` terms (or a chain of `n` roundings) reaches with probability at least
/// 1 − 2·exp(−λ²/2) (λ = 6: 1 − 3·10⁻⁸), in a format with unit roundoff `u`: `λ·√n·u` (the probabilistic
/// bound of Higham & Mary, SIAM J. Sci. Comput. 2019; the worst case `n·u` is never approached by rounding
/// errors of mixed sign). Two implementations that sum in different orders differ by at most twice this.
pub fn sum_error(n: usize, u: f64) -> f64 {
    6.0 * (n.max(1) as f64).sqrt() * u
}

/// A seeded generator of test tensors.
pub struct SeededRng(StdRng);

impl SeededRng {
    /// A generator whose stream depends on `seed` only.
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    /// `shape` values drawn from N(mean, std²), in `dtype`, on the CPU.
    pub fn normal(&mut self, shape: &[usize], mean: f64, std: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut self.0);
                mean + std * z
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("a CPU tensor from a vector")
    }

    /// Rows of probabilities: the softmax of N(0, 1) logits over the last dim, in `dtype`.
    pub fn softmax_rows(&mut self, shape: &[usize], dtype: DType) -> Tensor {
        let x = self.normal(shape, 0.0, 1.0, DType::F64);
        candle_nn::ops::softmax(&x, candle_core::D::Minus1)
            .and_then(|t| t.to_dtype(dtype))
            .expect("softmax of a CPU tensor")
    }
}
