//! Fused CPU kernels with backward passes, and their generic (any device) equivalents.
//!
//! candle-nn's fused `LayerNorm` fast path and `softmax_last_dim` drop gradients (see
//! `docs/architecture.md`). Every op here is differentiable: the CPU f32 path is a `CustomOp` whose
//! `bwd` is implemented, and every other device/dtype takes a composition of differentiable candle ops.
//! Tests check that both paths agree and that gradients match finite differences.

mod attention;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "flash-attn")]
mod flash;
mod gelu;
mod layer_norm;
mod linear;
mod softmax;

pub use attention::{
    attention, attention_generic, attention_probs, AttentionBackend, CpuFusedAttention,
    DefaultAttention, GenericAttention, SeqLayout,
};
#[cfg(feature = "flash-attn")]
pub use flash::FlashAttention;
pub use gelu::{gelu_erf, gelu_erf_generic};
pub use layer_norm::{layer_norm, layer_norm_generic};
pub(crate) use linear::PackedLinear;
pub use linear::{linear, linear_generic};
pub use softmax::{softmax_last_dim, softmax_last_dim_generic};

pub(crate) use cpu::slice_f32 as cpu_slice;

use candle_core::{DType, Device, Tensor};

/// Whether this crate's CUDA kernels apply to this tensor (f32, bf16 or f16 on a CUDA device, feature `cuda`).
pub(crate) fn use_cuda_kernel(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `t` in the dtype of `like` (the weights of a layer follow its activations: f32 master weights compute in
/// bf16 when the input is bf16, and the cast's backward returns f32 gradients).
pub(crate) fn cast_like(t: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == like.dtype() {
        Ok(t.clone())
    } else {
        t.to_dtype(like.dtype())
    }
}

/// Whether the fused CPU kernels apply to this tensor (f32 on the CPU).
pub(crate) fn use_cpu_kernel(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}
