//! Exact (erf) GELU, `x * Φ(x)`, as `torch.nn.GELU()` (not the tanh approximation).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{fast_erf, simd_kernel, slice_f32};

/// Exact GELU. f32 CPU tensors use a fused, vectorised kernel with PyTorch's CPU `erf` approximation
/// (|error| < 1.5e-7); other devices use candle's `gelu_erf`. Differentiable everywhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::use_cpu_kernel(x) {
        x.contiguous()?.apply_op1(GeluOp)
    } else {
        gelu_erf_generic(x)
    }
}

/// candle's own erf GELU (reference and non-CPU path).
pub fn gelu_erf_generic(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

#[inline(always)]
pub(crate) fn gelu_scalar(v: f32) -> f32 {
    0.5 * v * (1.0 + fast_erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

simd_kernel! {
    /// In-place GELU over a slice.
    pub(crate) fn gelu_in_place(xs: &mut [f32]) {
        for v in xs.iter_mut() {
            *v = gelu_scalar(*v);
        }
    }
}

pub(crate) const PAR_CHUNK: usize = 1 << 14;

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "dinov2-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = slice_f32(s, l)?.to_vec();
        out.par_chunks_mut(PAR_CHUNK).for_each(gelu_in_place);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // d/dx [x Φ(x)] = Φ(x) + x φ(x)
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
        let dx = (cdf? + (x * pdf?)?)?;
        Ok(Some((g * dx)?))
    }
}
