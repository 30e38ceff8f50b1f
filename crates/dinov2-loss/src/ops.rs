//! Differentiable building blocks shared by the head and the losses.
//!
//! Only candle ops that have a backward pass are used on gradient paths (see `candle-notes.md` §3:
//! `candle_nn::ops::softmax_last_dim` and the `LayerNorm` fast path record no gradient). The
//! non-differentiable fused softmax is used only for teacher targets, which never need gradients.

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// The dtype in which targets and statistics are computed: f64 stays f64, anything else becomes f32
/// (the official centre buffer is f32, so teacher targets are promoted to f32).
pub(crate) fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `F.normalize(x, p=2, dim=-1, eps)`: `x / max(‖x‖₂, eps)`, differentiable.
///
/// Computed as `x / sqrt(max(Σx², eps²))`, which has the same value and the same gradient as PyTorch's
/// (where the norm is below `eps` only the direct `x / eps` path carries gradient) and never produces the
/// `0 · ∞` NaN that differentiating `sqrt` at a zero row would. For f16/bf16 inputs the norm is computed in
/// f32 (eps² underflows in half precision) and cast back.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu)?;
/// let y = dinov2_loss::ops::l2_normalize(&x, 1e-12)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[0.6, 0.8], [0.0, 0.0]]); // a zero row stays zero
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let xs = if matches!(dt, DType::F16 | DType::BF16) {
        x.to_dtype(DType::F32)?
    } else {
        x.clone()
    };
    let denom = xs
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .maximum(eps * eps)?
        .sqrt()?
        .to_dtype(dt)?;
    Ok(x.broadcast_div(&denom)?)
}

/// `log_softmax(x, dim=-1)`, differentiable. The max used for stability is detached: log-softmax is
/// invariant to it, so this only saves backward work.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0f64, 0.0, 0.0, 0.0]], &Device::Cpu)?;
/// let y = dinov2_loss::ops::log_softmax_last(&x)?.to_vec2::<f64>()?;
/// assert!(y[0].iter().all(|v| (v + 4f64.ln()).abs() < 1e-15)); // log(1/4)
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}

/// `softmax(x, dim=-1)` without gradient (targets only).
pub(crate) fn softmax_last_nograd(x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    match x.dtype() {
        DType::F32 | DType::F64 => Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?),
        _ => Ok(candle_nn::ops::softmax(&x, D::Minus1)?),
    }
}

/// Per-row `Σ_k t_k · log_softmax(s / temp)_k` (the official `lossfunc`), differentiable in `s`.
///
/// `t` and `s` must have the same shape `[..., K]` (K ≥ 1); the result has shape `[...]` and `s`'s compute
/// dtype (f32 unless `s` is f64; half-precision logits are upcast as in the official fp32 cross-entropy).
/// On the CPU in f32/f64 this is one fused kernel (forward and backward); elsewhere
/// [`soft_cross_entropy_composed`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// // a one-hot target and uniform student logits: Σ_k t_k log(1/K) = -ln 4
/// let t = Tensor::new(&[[1f32, 0.0, 0.0, 0.0]], &Device::Cpu)?;
/// let s = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let ce = dinov2_loss::ops::soft_cross_entropy(&t, &s, 0.1)?.to_vec1::<f32>()?;
/// assert!((ce[0] + 4f32.ln()).abs() < 1e-6);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn soft_cross_entropy(t: &Tensor, s: &Tensor, temp: f64) -> Result<Tensor> {
    if t.dims() != s.dims() {
        return Err(Error::shape(
            "teacher targets",
            format!("{:?} (the student logits' shape)", s.dims()),
            t.dims(),
        ));
    }
    check_temp("temp", temp)?;
    let dt = stat_dtype(s.dtype());
    let s = s.to_dtype(dt)?;
    let t = t.to_dtype(dt)?.detach();
    let k = s.dims().last().copied().unwrap_or(0);
    if k == 0 {
        return Err(Error::shape("student logits", "[..., K ≥ 1]", s.dims()));
    }
    if crate::fused::fused_ok(&s) {
        let rows = s.elem_count() / k;
        let out_dims = &s.dims()[..s.rank() - 1];
        let ce = crate::fused::soft_ce_rows(&s.reshape((rows, k))?, &t.reshape((rows, k))?, temp)?;
        return Ok(ce.reshape(out_dims)?);
    }
    soft_cross_entropy_composed(&t, &s, temp)
}

/// [`soft_cross_entropy`] from primitive candle ops only (any device/dtype; the reference for the fused
/// CPU kernel). No shape checks.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let t = Tensor::new(&[[0.25f64, 0.75]], &Device::Cpu)?;
/// let s = Tensor::new(&[[0.3f64, -0.1]], &Device::Cpu)?;
/// let fused = dinov2_loss::ops::soft_cross_entropy(&t, &s, 0.1)?.to_vec1::<f64>()?;
/// let composed = dinov2_loss::ops::soft_cross_entropy_composed(&t, &s, 0.1)?.to_vec1::<f64>()?;
/// assert!((fused[0] - composed[0]).abs() < 1e-14);
/// # Ok::<(), dinov2_loss::Error>(())
/// ```
pub fn soft_cross_entropy_composed(t: &Tensor, s: &Tensor, temp: f64) -> Result<Tensor> {
    let dt = stat_dtype(s.dtype());
    let lsm = log_softmax_last(&(s.to_dtype(dt)? / temp)?)?;
    Ok((t.to_dtype(dt)?.detach() * lsm)?.sum(D::Minus1)?)
}

/// Whether `v` is a usable temperature (or momentum-like positive scale).
pub(crate) fn finite_positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// A temperature argument: finite and > 0.
pub(crate) fn check_temp(name: &'static str, value: f64) -> Result<()> {
    if finite_positive(value) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            name,
            value,
            reason: "must be finite and > 0",
        })
    }
}
