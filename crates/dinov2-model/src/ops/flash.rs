//! Packed attention on flash-attn 2's varlen kernels (feature `flash-attn`): the segments of a [`SeqLayout`]
//! are flash-attn's `cu_seqlens`, so 2 global and 8 local crops run as one launch, with no padding and no
//! T² score matrix. Training runs dinov2-flash-attn's forward (keeping the log-sum-exp) and its flash backward;
//! with `flash-attn-candle`, forwards that record no gradient (inference, the EMA teacher) run candle-flash-attn's
//! `flash_attn_varlen` instead.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

use super::attention::{check_qkv, AttentionBackend, GenericAttention, SeqLayout};

/// flash-attn 2 varlen attention for bf16/f16 qkv on CUDA with head dimension 64; other inputs fall back to
/// [`GenericAttention`]. q, k and v are read as strided views of the qkv matrix (no copy).
///
/// ```no_run
/// use std::sync::Arc;
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::ops::{AttentionBackend, FlashAttention, SeqLayout};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::new_cuda(0)?;
/// // 2 crops of 261 tokens and 8 of 54 (ViT-S/14 with registers), 6 heads of 64.
/// let layout = SeqLayout::from_lengths(&[&[261; 2][..], &[54; 8][..]].concat());
/// let qkv = Tensor::randn(0f32, 1., (layout.total_rows(), 3 * 384), &dev)?.to_dtype(DType::BF16)?;
/// let out = FlashAttention.attention(&qkv, &layout, 6, 0.125)?;
/// assert_eq!(out.dims(), &[layout.total_rows(), 384]);
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct FlashAttention;

impl FlashAttention {
    /// Whether the flash kernels take this qkv: CUDA, bf16 or f16, head dimension 64.
    pub fn applies(qkv: &Tensor, num_heads: usize) -> bool {
        qkv.device().is_cuda()
            && matches!(qkv.dtype(), DType::BF16 | DType::F16)
            && num_heads > 0
            && qkv.dims().len() == 2
            && qkv.dims()[1] == 3 * num_heads * 64
    }
}

impl AttentionBackend for FlashAttention {
    fn attention(
        &self,
        qkv: &Tensor,
        layout: &SeqLayout,
        num_heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        if !Self::applies(qkv, num_heads) {
            return GenericAttention.attention(qkv, layout, num_heads, scale);
        }
        check_qkv(qkv, layout, num_heads)?;
        let rows = qkv.dim(0)?;
        if rows == 0 {
            return Tensor::zeros((0, num_heads * 64), qkv.dtype(), qkv.device());
        }
        let x = qkv.reshape((rows, 3, num_heads, 64))?;
        let part = |i: usize| x.narrow(1, i, 1).and_then(|t| t.squeeze(1));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let cu = cu_seqlens_on(layout, qkv.device())?;
        let max_len = layout.segments().iter().map(|&(_, l)| l).max().unwrap_or(0);
        #[cfg(feature = "flash-attn-candle")]
        if !qkv.track_op() {
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let out = candle_flash_attn::flash_attn_varlen(
                &q,
                &k,
                &v,
                &cu,
                &cu,
                max_len,
                max_len,
                scale as f32,
                false,
            )?;
            return out.reshape((rows, num_heads * 64));
        }
        let out = dinov2_flash_attn::flash_attn_varlen(&q, &k, &v, &cu, max_len, scale as f32)?;
        out.reshape((rows, num_heads * 64))
    }
}

/// Device copies of recent layouts' `cu_seqlens`. Every block of a forward attends over the same layout, and a
/// training run repeats a handful of them (teacher, student, the drop-path subsets), so each is uploaded once
/// instead of once per layer (a host-to-device copy from pageable memory on every call).
static CU_SEQLENS: Mutex<Vec<(SeqLayout, Device, Tensor)>> = Mutex::new(Vec::new());
/// How many layouts [`CU_SEQLENS`] keeps (the oldest goes first).
const CU_SEQLENS_KEPT: usize = 64;

fn cu_seqlens_on(layout: &SeqLayout, device: &Device) -> Result<Tensor> {
    let mut cache = CU_SEQLENS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, t)) = cache
        .iter()
        .find(|(l, d, _)| l == layout && d.same_device(device))
    {
        return Ok(t.clone());
    }
    let cu = layout.cu_seqlens();
    let n = cu.len();
    let t = Tensor::from_vec(cu, n, device)?;
    if cache.len() == CU_SEQLENS_KEPT {
        cache.remove(0);
    }
    cache.push((layout.clone(), device.clone(), t.clone()));
    Ok(t)
}
