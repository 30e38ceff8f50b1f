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
/// `t` and `s` must have the same shape `[..., K]`; the result has shape `[...]` and `s`'s compute dtype
/// (f32 unless `s` is f64; half-precision logits are upcast as in the official fp32 cross-entropy).
pub fn soft_cross_entropy(t: &Tensor, s: &Tensor, temp: f64) -> Result<Tensor> {
    if t.dims() != s.dims() {
        return Err(Error::Input(format!(
            "teacher {:?} and student {:?} shapes differ",
            t.dims(),
            s.dims()
        )));
    }
    let dt = stat_dtype(s.dtype());
    let s = s.to_dtype(dt)?;
    let t = t.to_dtype(dt)?.detach();
    let k = last_dim(&s, "student logits")?;
    if k == 0 {
        return Err(Error::Input("logits with zero prototypes".into()));
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
/// CPU kernel).
pub fn soft_cross_entropy_composed(t: &Tensor, s: &Tensor, temp: f64) -> Result<Tensor> {
    let dt = stat_dtype(s.dtype());
    let lsm = log_softmax_last(&(s.to_dtype(dt)? / temp)?)?;
    Ok((t.to_dtype(dt)?.detach() * lsm)?.sum(D::Minus1)?)
}

pub(crate) fn check_temp(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{name} must be finite and > 0, got {v}"
        )))
    }
}

pub(crate) fn last_dim(t: &Tensor, what: &str) -> Result<usize> {
    t.dims()
        .last()
        .copied()
        .ok_or_else(|| Error::Input(format!("{what} must have at least one dimension")))
}
