//! Softmax over the last dimension.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{exp_sum, fast_exp, max_lanes, rows_per_chunk, simd_kernel, slice_f32, sum_lanes};

/// Softmax over the last dimension, differentiable on every device (unlike `candle_nn::ops::softmax_last_dim`).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use dinov2_model::ops::softmax_last_dim;
/// # fn main() -> candle_core::Result<()> {
/// let x = Var::new(&[[0f32, 3f32.ln()]], &Device::Cpu)?;
/// let p = softmax_last_dim(x.as_tensor())?;
/// let v = p.to_vec2::<f32>()?;
/// assert!((v[0][0] - 0.25).abs() < 1e-6 && (v[0][1] - 0.75).abs() < 1e-6);
/// // Differentiable: the sum of the probabilities is constant, so its gradient is zero.
/// let grads = p.sum_all()?.backward()?;
/// let g = grads.get(&x).unwrap().to_vec2::<f32>()?;
/// assert!(g[0].iter().all(|v| v.abs() < 1e-6));
/// # Ok(()) }
/// ```
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if super::use_cpu_kernel(x) || super::use_cuda_kernel(x) {
        x.contiguous()?.apply_op1(SoftmaxOp)
    } else {
        softmax_last_dim_generic(x)
    }
}

/// [`softmax_last_dim`] from primitive ops.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{softmax_last_dim, softmax_last_dim_generic};
/// # fn main() -> candle_core::Result<()> {
/// let x = (Tensor::arange(0f32, 24., &Device::Cpu)? * 0.3)?.sin()?.reshape((4, 6))?;
/// let diff = (softmax_last_dim(&x)? - softmax_last_dim_generic(&x)?)?.abs()?.flatten_all()?.max(0)?;
/// assert!(diff.to_scalar::<f32>()? < 1e-6);
/// # Ok(()) }
/// ```
pub fn softmax_last_dim_generic(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

simd_kernel! {
    /// In-place softmax of each `d`-wide row of `rows`.
    pub(crate) fn softmax_rows(rows: &mut [f32], d: usize) {
        for row in rows.chunks_exact_mut(d) {
            let max = max_lanes(row);
            for v in row.iter_mut() {
                *v = fast_exp(*v - max);
            }
            let inv = 1.0 / sum_lanes(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_kernel! {
    /// One key block of an online softmax (as in flash attention), over the `d`-wide rows of `rows` (the
    /// raw scores `q · kᵀ` of a block of keys): with the running maximum `max[r]` and sum `sum[r]` of each
    /// row over the earlier blocks (ignored when `first`), writes `rows = exp(scale · (rows − m))` for the new
    /// maximum `m`, sets `correction[r] = exp(scale · (max_old − m))` (the factor by which what was summed so
    /// far must be scaled), and updates `max` and `sum`. `scale > 0`.
    pub(crate) fn online_softmax_block(
        rows: &mut [f32],
        d: usize,
        scale: f32,
        first: bool,
        max: &mut [f32],
        sum: &mut [f32],
        correction: &mut [f32],
    ) {
        let state = max.iter_mut().zip(sum.iter_mut()).zip(correction.iter_mut());
        for (row, ((max, sum), corr)) in rows.chunks_exact_mut(d).zip(state) {
            let block_max = max_lanes(row);
            let m = if first { block_max } else { max.max(block_max) };
            let s = exp_sum(row, m, scale);
            if first {
                *sum = s;
                *corr = 1.0;
            } else {
                *corr = fast_exp((*max - m) * scale);
                *sum = *sum * *corr + s;
            }
            *max = m;
        }
    }
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "dinov2-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(s, l)?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = x.to_vec();
        let chunk = rows_per_chunk(out.len() / d) * d;
        out.par_chunks_mut(chunk.max(1))
            .for_each(|c| softmax_rows(c, d));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax_fwd(s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if super::use_cuda_kernel(y) {
            return Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGradOp)?));
        }
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

/// The softmax backward on CUDA, `y · (g − Σ g·y)` with the row sums in f32 (one kernel, no temporaries).
struct SoftmaxGradOp;

impl candle_core::CustomOp2 for SoftmaxGradOp {
    fn name(&self) -> &'static str {
        "dinov2-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("dinov2-softmax-grad runs on CUDA only (the CPU backward is composed)")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        ly: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::softmax_bwd(y, ly, g, lg)
    }
}
