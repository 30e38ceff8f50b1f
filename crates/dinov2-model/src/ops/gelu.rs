//! Exact (erf) GELU, `x * Φ(x)`, as `torch.nn.GELU()` (not the tanh approximation).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{fast_erf, simd_kernel, slice_f32};

/// Exact GELU. f32 CPU tensors use a fused, vectorised kernel with PyTorch's CPU `erf` approximation
/// (|error| < 1.5e-7); other devices use candle's `gelu_erf`. Differentiable everywhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let y = dinov2_model::ops::gelu_erf(&Tensor::new(&[-1f32, 0., 1.], &Device::Cpu)?)?.to_vec1::<f32>()?;
/// // x · Φ(x): Φ(1) = 0.8413447
/// assert!((y[0] + 0.1586553).abs() < 1e-6 && y[1] == 0.0 && (y[2] - 0.8413447).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if super::use_cpu_kernel(x) {
        x.contiguous()?.apply_op1(GeluOp)
    } else {
        gelu_erf_generic(x)
    }
}

/// candle's own erf GELU (reference and non-CPU path).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{gelu_erf, gelu_erf_generic};
/// # fn main() -> candle_core::Result<()> {
/// let x = (Tensor::arange(-40f32, 40., &Device::Cpu)? * 0.1)?;
/// let diff = (gelu_erf(&x)? - gelu_erf_generic(&x)?)?.abs()?.max(0)?.to_scalar::<f32>()?;
/// assert!(diff < 1e-6);
/// # Ok(()) }
/// ```
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
