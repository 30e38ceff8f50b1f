//! Affine map `x · Wᵀ + b` over the last dimension, with the bias (and optionally GELU) fused into the GEMM pass.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use dinov2_kernels::sgemm::{gemm_packed, gemm_packed_new, Output, PackedB, Parallelism, TileMap};

use super::cpu::slice_f32;
use super::gelu::gelu_in_place;

/// `x · weightᵀ + bias` for `x` of shape `[.., in]`, `weight` `[out, in]`, `bias` `[out]`.
///
/// Differentiable on every device. On the CPU in f32 the forward runs on `dinov2_kernels`' GEMM (the weight
/// packed for the call), the bias added in its tiles (one pass over the output).
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
            x.contiguous()?
                .apply_op3(&weight.contiguous()?, &b.contiguous()?, LinearOp)
        }
        _ => {
            // Weights follow the activations' dtype (f32 master weights, bf16 compute).
            let bias = bias.map(|b| super::cast_like(b, x)).transpose()?;
            linear_generic(x, &super::cast_like(weight, x)?, bias.as_ref())
        }
    }
}

/// A linear layer's weight packed once into the GEMM micro-kernel's layout (`dinov2_kernels::PackedB`), with
/// its bias: the inference form of `qkv`, `proj`, `fc1` and `fc2` (LayerScale folded into the output layers
/// by the caller). Forwards record no gradient.
#[derive(Debug, Clone)]
pub(crate) struct PackedLinear {
    weight: Arc<PackedB>,
    bias: Option<Arc<Vec<f32>>>,
}

impl PackedLinear {
    /// From an f32 CPU `weight` `[out, in]` and `bias` `[out]`.
    pub(crate) fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let weight = PackedB::from_weight(&w, n, k).map_err(candle_core::Error::wrap)?;
        let bias = bias.map(|b| b.to_vec1::<f32>().map(Arc::new)).transpose()?;
        Ok(PackedLinear {
            weight: Arc::new(weight),
            bias,
        })
    }

    /// `x · Wᵀ + b` over the last dimension, then GELU when `gelu` is set (fused into the GEMM's tiles).
    pub(crate) fn forward(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&PackedLinearOp {
            lin: self.clone(),
            gelu,
        })
    }

    /// `residual + x · Wᵀ + b`: the GEMM accumulates straight into a copy of the residual stream.
    pub(crate) fn forward_residual(&self, residual: &Tensor, x: &Tensor) -> Result<Tensor> {
        residual
            .contiguous()?
            .apply_op2_no_bwd(&x.contiguous()?, &ResidualOp { lin: self.clone() })
    }

    /// `out` (`m` rows of `n`) `+= x · Wᵀ + b`.
    fn accumulate(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let output = Output {
            data: out,
            ld: self.weight.n(),
            accumulate: true,
            bias: self.bias.as_deref().map(Vec::as_slice),
        };
        gemm_packed(
            x,
            m,
            self.weight.k(),
            &self.weight,
            output,
            None,
            Parallelism::Rayon,
        )
        .map_err(candle_core::Error::wrap)
    }

    fn rows(&self, x: &[f32], dims: &[usize]) -> Result<usize> {
        let k = self.weight.k();
        match dims.last() {
            Some(&last) if last == k => Ok(x.len().checked_div(k).unwrap_or(0)),
            _ => {
                candle_core::bail!("linear: input {dims:?} does not end in the weight's {k} inputs")
            }
        }
    }
}

/// `x · Wᵀ [+ b]` for the `m` rows of `x` (`dims`, ending in `W`'s inputs), then GELU when asked (in the
/// GEMM's tiles): a new `[.., n]` output.
fn affine(
    x: &[f32],
    m: usize,
    dims: &[usize],
    w: &PackedB,
    bias: Option<&[f32]>,
    gelu: bool,
) -> Result<(CpuStorage, Shape)> {
    let gelu_map = |_row: usize, _col: usize, t: &mut [f32]| gelu_in_place(t);
    let map: Option<TileMap> = if gelu { Some(&gelu_map) } else { None };
    let out = gemm_packed_new(x, m, w.k(), w, bias, map, Parallelism::Rayon)
        .map_err(candle_core::Error::wrap)?;
    let mut dims = dims.to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.n();
    }
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

struct PackedLinearOp {
    lin: PackedLinear,
    gelu: bool,
}

impl CustomOp1 for PackedLinearOp {
    fn name(&self) -> &'static str {
        "dinov2-packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(s, l)?;
        let m = self.lin.rows(x, l.dims())?;
        let bias = self.lin.bias.as_deref().map(Vec::as_slice);
        affine(x, m, l.dims(), &self.lin.weight, bias, self.gelu)
    }
}

struct ResidualOp {
    lin: PackedLinear,
}

impl CustomOp2 for ResidualOp {
    fn name(&self) -> &'static str {
        "dinov2-packed-residual-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let residual = slice_f32(s1, l1)?;
        let x = slice_f32(s2, l2)?;
        let m = self.lin.rows(x, l2.dims())?;
        if residual.len() != m * self.lin.weight.n() {
            candle_core::bail!(
                "residual linear: residual {:?} and input {:?} do not fit a weight of {} outputs",
                l1.dims(),
                l2.dims(),
                self.lin.weight.n()
            );
        }
        let mut out = residual.to_vec();
        self.lin.accumulate(x, m, &mut out)?;
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

struct LinearOp;

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
        // The weight is packed for this one product (as a GEMM library does on every call); inference models
        // pack theirs once instead (`PackedLinear`). The output is written once, the bias in the GEMM's tiles.
        let packed = PackedB::from_weight(w, n, k).map_err(candle_core::Error::wrap)?;
        affine(x, m, l1.dims(), &packed, Some(b), false)
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
