//! LayerNorm over the last dimension, with weight and bias.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{rows_per_chunk, simd_kernel, slice_f32, sum_lanes};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension (biased variance, as PyTorch).
///
/// Differentiable with respect to all three inputs on every device; f32 CPU tensors use a fused kernel.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use dinov2_model::ops::layer_norm;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Var::new(&[[1f32, 2., 3.]], &dev)?;
/// let (w, b) = (Tensor::ones(3, DType::F32, &dev)?, Tensor::zeros(3, DType::F32, &dev)?);
/// let y = layer_norm(x.as_tensor(), &w, &b, 0.0)?;
/// let v = y.to_vec2::<f32>()?; // (x - 2) / sqrt(2/3)
/// assert!((v[0][0] + 1.2247449).abs() < 1e-6 && v[0][1].abs() < 1e-6 && (v[0][2] - 1.2247449).abs() < 1e-6);
/// // A backward pass (candle-nn's fused LayerNorm has none): the normalised row sums to zero whatever x.
/// let g = y.sum_all()?.backward()?.get(&x).unwrap().to_vec2::<f32>()?;
/// assert!(g[0].iter().all(|v| v.abs() < 1e-5));
/// # Ok(()) }
/// ```
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::use_cpu_kernel(x) && super::use_cpu_kernel(weight) && super::use_cpu_kernel(bias) {
        let x = x.contiguous()?;
        x.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps },
        )
    } else if matches!(x.dtype(), DType::BF16 | DType::F16) {
        // Statistics in f32, as PyTorch's layer norm does for half-precision inputs.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        layer_norm_generic(&f(x)?, &f(weight)?, &f(bias)?, eps)?.to_dtype(x.dtype())
    } else {
        let (w, b) = (super::cast_like(weight, x)?, super::cast_like(bias, x)?);
        layer_norm_generic(x, &w, &b, eps)
    }
}

/// [`layer_norm`] composed of primitive candle ops (the reference and the non-CPU path).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{layer_norm, layer_norm_generic};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = (Tensor::arange(0f32, 32., &dev)? * 0.7)?.sin()?.reshape((4, 8))?;
/// let (w, b) = ((Tensor::arange(0f32, 8., &dev)? * 0.1)?, Tensor::ones(8, candle_core::DType::F32, &dev)?);
/// let diff = (layer_norm(&x, &w, &b, 1e-6)? - layer_norm_generic(&x, &w, &b, 1e-6)?)?.abs()?.flatten_all()?.max(0)?;
/// assert!(diff.to_scalar::<f32>()? < 1e-5);
/// # Ok(()) }
/// ```
pub fn layer_norm_generic(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xhat.broadcast_mul(weight)?.broadcast_add(bias)
}

simd_kernel! {
    /// Normalises each row of `x` (rows of `w.len()` values) into `out`.
    fn layer_norm_rows(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        let d = w.len();
        let mut centered = vec![0f32; d];
        for (orow, xrow) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            let mean = sum_lanes(xrow) / d as f32;
            for (c, &v) in centered.iter_mut().zip(xrow) {
                *c = v - mean;
            }
            let mut sq = [0f32; 8];
            let chunks = centered.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().map(|c| c * c).sum();
            for ch in chunks {
                for i in 0..8 {
                    sq[i] += ch[i] * ch[i];
                }
            }
            let var = (((sq[0] + sq[4]) + (sq[1] + sq[5])) + ((sq[2] + sq[6]) + (sq[3] + sq[7])) + tail) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                orow[i] = centered[i] * rstd * w[i] + b[i];
            }
        }
    }
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "dinov2-layer-norm"
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
        let d = l1.dims().last().copied().unwrap_or(1);
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer_norm: weight/bias of {}/{} elements for rows of {d}",
                w.len(),
                b.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        let eps = self.eps as f32;
        let rows = x.len() / d.max(1);
        let chunk = rows_per_chunk(rows) * d;
        out.par_chunks_mut(chunk.max(1))
            .zip(x.par_chunks(chunk.max(1)))
            .for_each(|(o, xs)| layer_norm_rows(o, xs, w, b, eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let rstd = (var + self.eps)?.sqrt()?.recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let gw = g.broadcast_mul(w)?;
        let m1 = gw.mean_keepdim(D::Minus1)?;
        let m2 = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)?;
        let d = x.dim(D::Minus1)?;
        let g2 = g.reshape(((), d))?;
        let dw = (g2.clone() * xhat.reshape(((), d))?)?.sum(0)?;
        let db = g2.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
