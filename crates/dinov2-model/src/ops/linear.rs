//! Affine map `x · Wᵀ + b` over the last dimension, with the bias (and optionally GELU) fused into the GEMM pass.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{slice_f32, SyncPtr};
use super::gelu::{gelu_in_place, PAR_CHUNK};

/// `x · weightᵀ + bias` for `x` of shape `[.., in]`, `weight` `[out, in]`, `bias` `[out]`.
///
/// Differentiable on every device. On the CPU in f32 the bias is written before the GEMM accumulates into it
/// (one pass over the output instead of two).
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[[1f32, 2.]]], &dev)?; // [1, 1, 2]: any leading dimensions
/// let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
/// let b = Tensor::new(&[0f32, 0., 10.], &dev)?;
/// let y = dinov2_model::ops::linear(&x, &w, Some(&b))?;
/// assert_eq!(y.to_vec3::<f32>()?, [[[1.0, 2.0, 13.0]]]);
/// assert_eq!(dinov2_model::ops::linear(&x, &w, None)?.to_vec3::<f32>()?, [[[1.0, 2.0, 3.0]]]);
/// # Ok(()) }
/// ```
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b)
            if super::use_cpu_kernel(x)
                && super::use_cpu_kernel(weight)
                && super::use_cpu_kernel(b) =>
        {
            x.contiguous()?.apply_op3(
                &weight.contiguous()?,
                &b.contiguous()?,
                LinearOp { gelu: false },
            )
        }
        _ => linear_generic(x, weight, bias),
    }
}

/// `gelu(x · weightᵀ + bias)` without gradient tracking: the inference fast path of the MLP's first layer.
pub(crate) fn linear_gelu_inference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &LinearOp { gelu: true },
    )
}

/// `residual + x · weightᵀ + bias` without gradient tracking: the GEMM accumulates straight into a copy
/// of the residual stream (inference fast path; LayerScale is folded into `weight` and `bias` by the caller).
pub(crate) fn linear_residual_inference(
    residual: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<Arc<Vec<f32>>>,
) -> Result<Tensor> {
    residual.contiguous()?.apply_op3_no_bwd(
        &x.contiguous()?,
        &weight.contiguous()?,
        &ResidualLinearOp { bias },
    )
}

struct ResidualLinearOp {
    bias: Option<Arc<Vec<f32>>>,
}

impl CustomOp3 for ResidualLinearOp {
    fn name(&self) -> &'static str {
        "dinov2-residual-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let residual = slice_f32(s1, l1)?;
        let x = slice_f32(s2, l2)?;
        let w = slice_f32(s3, l3)?;
        let (n, k) = l3.shape().dims2()?;
        let m = residual.len().checked_div(n).unwrap_or(0);
        if residual.len() != m * n
            || x.len() != m * k
            || self.bias.as_ref().is_some_and(|b| b.len() != n)
        {
            candle_core::bail!(
                "residual linear: residual {:?}, input {:?}, weight {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut out = residual.to_vec();
        if let Some(b) = &self.bias {
            out.par_chunks_mut(n.max(1) * 64).for_each(|c| {
                c.chunks_exact_mut(n)
                    .for_each(|r| r.iter_mut().zip(b.iter()).for_each(|(o, &v)| *o += v))
            });
        }
        if m > 0 && n > 0 && k > 0 {
            // SAFETY: the destination holds m·n values; x is [m, k] and w is [n, k], both contiguous.
            unsafe { gemm_accumulate(m, n, k, out.as_mut_ptr(), x, w) };
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// [`linear`] from primitive ops.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{linear, linear_generic};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = (Tensor::arange(0f32, 24., &dev)? * 0.3)?.sin()?.reshape((2, 3, 4))?;
/// let w = (Tensor::arange(0f32, 20., &dev)? * 0.2)?.cos()?.reshape((5, 4))?;
/// let b = Tensor::arange(0f32, 5., &dev)?;
/// let diff = (linear(&x, &w, Some(&b))? - linear_generic(&x, &w, Some(&b))?)?.abs()?.flatten_all()?.max(0)?;
/// assert!(diff.to_scalar::<f32>()? < 1e-5);
/// # Ok(()) }
/// ```
pub fn linear_generic(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `dst[m, n] += x[m, k] · w[n, k]ᵀ` (row-major), on the rayon pool.
///
/// # Safety
/// `dst` must be valid for `m · n` writes; `x` and `w` must hold `m · k` and `n · k` values.
unsafe fn gemm_accumulate(m: usize, n: usize, k: usize, dst: *mut f32, x: &[f32], w: &[f32]) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        true,
        x.as_ptr(),
        1,
        k as isize,
        w.as_ptr(),
        k as isize,
        1,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
    )
}

struct LinearOp {
    gelu: bool,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "dinov2-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(s1, l1)?;
        let w = slice_f32(s2, l2)?;
        let b = slice_f32(s3, l3)?;
        let k = l1.dims().last().copied().unwrap_or(0);
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 || b.len() != n {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, bias {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let m = x.len().checked_div(k).unwrap_or(0);
        // Every row starts as the bias (written once, no zero-fill), then the GEMM accumulates into it.
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        if n > 0 {
            out.spare_capacity_mut()[..m * n]
                .par_chunks_mut(n * 64)
                .for_each(|c| {
                    c.chunks_exact_mut(n).for_each(|r| {
                        r.iter_mut().zip(b).for_each(|(d, &v)| {
                            d.write(v);
                        })
                    })
                });
        }
        // SAFETY: the m·n elements were all written just above.
        unsafe { out.set_len(m * n) };
        if m > 0 && n > 0 && k > 0 {
            let dst = SyncPtr(out.as_mut_ptr());
            // SAFETY: the destination holds m·n values; x is [m, k] and w is [n, k], both contiguous.
            unsafe { gemm_accumulate(m, n, k, dst.get(), x, w) };
        }
        if self.gelu {
            out.par_chunks_mut(PAR_CHUNK).for_each(gelu_in_place);
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let k = w.dim(1)?;
        let n = w.dim(0)?;
        let g2 = g.reshape(((), n))?;
        let x2 = x.reshape(((), k))?;
        let dx = g2.matmul(w)?.reshape(x.shape())?;
        let dw = g2.t()?.matmul(&x2)?;
        let db = g2.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
