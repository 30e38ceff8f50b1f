//! flash-attn 2 varlen attention for head dimension 64, as a differentiable candle op.
//!
//! A minimal binding of flash-attention 2's sm80 kernels (which also run on sm90, H100/H200): the **non-causal,
//! variable-length forward**, keeping the softmax log-sum-exp, and the matching **backward** (dq, dk, dv), in bf16
//! and f16, for a head dimension of exactly 64. Dropout, ALiBi, softcapping, local windows and head dims other than
//! 64 are compiled out. This is what DINOv2's packed crops need: the tokens of all crops of a batch concatenated
//! along one axis, attention block-diagonal over the segments given by `cu_seqlens`.
//!
//! Everything is behind the crate's `cuda` feature; without it the crate is empty, so a CPU-only workspace build
//! needs no CUDA toolkit. With it, the build script compiles five CUDA files with nvcc for the GPU given by
//! `CUDA_COMPUTE_CAP` (default 90) and needs `CUDA_HOME` and `DINOV2_CUTLASS_DIR` (`tools/build_cuda.sh` sets
//! up both from PyPI wheels). The kernels come from candle-flash-attn 0.11.1 (forward) and upstream
//! flash-attention 2.8.4 (backward); `kernels/NOTICE.md` lists the files and their licences.
//!
//! ```no_run
//! # #[cfg(feature = "cuda")]
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{DType, Device, Tensor};
//! let dev = Device::new_cuda(0)?;
//! // Two segments of 257 and 50 tokens, 6 heads of dimension 64.
//! let total = 257 + 50;
//! let q = Tensor::randn(0f32, 1., (total, 6, 64), &dev)?.to_dtype(DType::BF16)?;
//! let (k, v) = (q.clone(), q.clone());
//! let cu_seqlens = Tensor::new(&[0u32, 257, 307], &dev)?;
//! let out = dinov2_flash_attn::flash_attn_varlen(&q, &k, &v, &cu_seqlens, 257, 0.125)?;
//! assert_eq!(out.dims(), &[total, 6, 64]);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "cuda"))]
//! # fn main() {}
//! ```

#[cfg(feature = "cuda")]
mod ffi;
#[cfg(feature = "cuda")]
mod varlen;

#[cfg(feature = "cuda")]
pub use varlen::flash_attn_varlen;

#[cfg(all(test, feature = "cuda"))]
mod tests;
