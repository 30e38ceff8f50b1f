//! Multi-head self-attention over packed sequences (block-diagonal attention).
//!
//! Tokens of several images, possibly of different lengths (2 global crops of 257 tokens and 8 local
//! crops of 50, say), are stored one after the other as rows of a `[rows, 3·D]` qkv matrix. A
//! [`SeqLayout`] says where each image's rows are; every image attends only to itself. A uniform batch
//! `[B, T]` is the special case of `B` segments of length `T`. This is what xformers' `BlockDiagonalMask`
//! does in the official code, and what flash-attn's varlen kernels do on CUDA (`cu_seqlens` are the
//! segment offsets): [`AttentionBackend`] is the seam where such a kernel plugs in.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{slice_f32, with_f32, SyncPtr};
use dinov2_kernels::sgemm::{
    gemm_packed, gemm_packed_raw, Output, PackedB, Parallelism, RawOutput, TileMap, MR, NR,
};

use super::softmax::{online_softmax_block, softmax_rows};

/// Where each sequence sits in a packed token matrix.
///
/// ```
/// use dinov2_model::SeqLayout;
/// let layout = SeqLayout::from_lengths(&[257, 257, 50]); // 2 global crops and a local one
/// assert_eq!(layout.segments(), &[(0, 257), (257, 257), (514, 50)]);
/// assert_eq!(layout.total_rows(), 564);
/// assert_eq!(layout.uniform_len(), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeqLayout {
    /// `(first row, number of rows)` of each sequence, in order, contiguous and non-overlapping.
    segments: Vec<(usize, usize)>,
}

impl SeqLayout {
    /// `batch` sequences of `len` tokens each.
    ///
    /// ```
    /// let layout = dinov2_model::SeqLayout::uniform(3, 4);
    /// assert_eq!(layout.segments(), &[(0, 4), (4, 4), (8, 4)]);
    /// ```
    pub fn uniform(batch: usize, len: usize) -> Self {
        SeqLayout {
            segments: (0..batch).map(|b| (b * len, len)).collect(),
        }
    }

    /// Sequences of the given lengths, packed in order.
    ///
    /// ```
    /// use dinov2_model::SeqLayout;
    /// assert_eq!(SeqLayout::from_lengths(&[2, 3]).segments(), &[(0, 2), (2, 3)]);
    /// assert_eq!(SeqLayout::from_lengths(&[4, 4]), SeqLayout::uniform(2, 4));
    /// ```
    pub fn from_lengths(lengths: &[usize]) -> Self {
        let mut off = 0;
        let segments = lengths
            .iter()
            .map(|&l| {
                let s = (off, l);
                off += l;
                s
            })
            .collect();
        SeqLayout { segments }
    }

    /// The `(first row, len)` pairs.
    ///
    /// ```
    /// let layout = dinov2_model::SeqLayout::from_lengths(&[5, 2]);
    /// let (start, len) = layout.segments()[1];
    /// assert_eq!((start, len), (5, 2));
    /// ```
    pub fn segments(&self) -> &[(usize, usize)] {
        &self.segments
    }

    /// Total number of rows.
    ///
    /// ```
    /// assert_eq!(dinov2_model::SeqLayout::from_lengths(&[5, 2]).total_rows(), 7);
    /// assert_eq!(dinov2_model::SeqLayout::from_lengths(&[]).total_rows(), 0);
    /// ```
    pub fn total_rows(&self) -> usize {
        self.segments.last().map(|&(o, l)| o + l).unwrap_or(0)
    }

    /// `Some(len)` when every sequence has the same length.
    ///
    /// ```
    /// use dinov2_model::SeqLayout;
    /// assert_eq!(SeqLayout::uniform(8, 50).uniform_len(), Some(50));
    /// assert_eq!(SeqLayout::from_lengths(&[50, 257]).uniform_len(), None);
    /// assert_eq!(SeqLayout::from_lengths(&[]).uniform_len(), None);
    /// ```
    pub fn uniform_len(&self) -> Option<usize> {
        let first = self.segments.first()?.1;
        self.segments
            .iter()
            .all(|&(_, l)| l == first)
            .then_some(first)
    }

    /// Cumulative offsets `[0, l0, l0+l1, ...]`, as flash-attn varlen's `cu_seqlens`.
    ///
    /// ```
    /// assert_eq!(dinov2_model::SeqLayout::from_lengths(&[3, 5, 2]).cu_seqlens(), [0, 3, 8, 10]);
    /// ```
    pub fn cu_seqlens(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.segments.len() + 1);
        v.push(0);
        v.extend(self.segments.iter().map(|&(o, l)| (o + l) as u32));
        v
    }
}

/// A self-attention kernel over packed sequences.
///
/// `qkv` is `[rows, 3·D]` with, per row, all heads' queries, then keys, then values (the official
/// `qkv` Linear layout); the result is `[rows, D]` with heads concatenated. Implementations must be
/// differentiable with respect to `qkv` when it tracks gradients.
///
/// A backend that counts its calls and delegates to [`GenericAttention`], plugged into a model:
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::ops::{AttentionBackend, GenericAttention, SeqLayout};
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
///
/// #[derive(Debug, Default)]
/// struct Counting(AtomicUsize);
///
/// impl AttentionBackend for Counting {
///     fn attention(
///         &self,
///         qkv: &Tensor,
///         layout: &SeqLayout,
///         num_heads: usize,
///         scale: f64,
///     ) -> candle_core::Result<Tensor> {
///         self.0.fetch_add(1, Ordering::Relaxed);
///         GenericAttention.attention(qkv, layout, num_heads, scale)
///     }
/// }
///
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 3, 28);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let mut model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
/// let counter = Arc::new(Counting::default());
/// model.set_attention_backend(counter.clone());
/// model.forward_features(&Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu)?, None)?;
/// assert_eq!(counter.0.load(Ordering::Relaxed), 3); // once per block
/// # Ok(()) }
/// ```
pub trait AttentionBackend: Send + Sync + std::fmt::Debug {
    /// Computes `softmax(q·kᵀ·scale)·v` within each segment of `layout`.
    fn attention(
        &self,
        qkv: &Tensor,
        layout: &SeqLayout,
        num_heads: usize,
        scale: f64,
    ) -> Result<Tensor>;
}

/// Fused CPU kernel (f32): reads q, k, v in place from the qkv matrix, one GEMM pair per (sequence, head),
/// with a fused backward. Falls back to [`GenericAttention`] for other devices and dtypes. The default
/// backend of every [`Attention`](crate::layers::Attention) layer.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{AttentionBackend, CpuFusedAttention, GenericAttention, SeqLayout};
/// # fn main() -> candle_core::Result<()> {
/// // 7 rows of qkv for 2 heads of width 4 (3 · 8 columns), as sequences of 3 and 4 tokens.
/// let qkv = (Tensor::arange(0f32, 7. * 24., &Device::Cpu)? * 0.1)?.sin()?.reshape((7, 24))?;
/// let layout = SeqLayout::from_lengths(&[3, 4]);
/// let fused = CpuFusedAttention.attention(&qkv, &layout, 2, 0.5)?;
/// let generic = GenericAttention.attention(&qkv, &layout, 2, 0.5)?;
/// assert_eq!(fused.dims(), &[7, 8]);
/// assert!((fused - generic)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuFusedAttention;

/// The default backend of every [`Attention`](crate::layers::Attention) layer: picks by the tensor's device
/// and dtype. [`CpuFusedAttention`] for f32 on the CPU; with the `flash-attn` feature, flash-attn 2's varlen
/// kernels (`FlashAttention`) for bf16/f16 on CUDA at head dimension 64 (every DINOv2 backbone); otherwise
/// [`GenericAttention`] (on CUDA: one dense batched attention per run of equal-length crops, through cuBLAS
/// and a softmax kernel with a backward).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{AttentionBackend, DefaultAttention, GenericAttention, SeqLayout};
/// # fn main() -> candle_core::Result<()> {
/// let qkv = (Tensor::arange(0f32, 7. * 24., &Device::Cpu)? * 0.1)?.sin()?.reshape((7, 24))?;
/// let layout = SeqLayout::from_lengths(&[3, 4]);
/// let a = DefaultAttention.attention(&qkv, &layout, 2, 0.5)?;
/// let b = GenericAttention.attention(&qkv, &layout, 2, 0.5)?;
/// assert!((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultAttention;

impl AttentionBackend for DefaultAttention {
    fn attention(
        &self,
        qkv: &Tensor,
        layout: &SeqLayout,
        num_heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        #[cfg(feature = "flash-attn")]
        if super::flash::FlashAttention::applies(qkv, num_heads) {
            return super::flash::FlashAttention.attention(qkv, layout, num_heads, scale);
        }
        CpuFusedAttention.attention(qkv, layout, num_heads, scale)
    }
}

/// Attention from primitive candle ops (batched matmuls and a differentiable softmax); works on every device.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use dinov2_model::ops::{AttentionBackend, GenericAttention, SeqLayout};
/// # fn main() -> candle_core::Result<()> {
/// let qkv = Tensor::zeros((4, 6), candle_core::DType::F32, &Device::Cpu)?;
/// // The rows must match the layout and the width must be 3 x heads x head width.
/// assert!(GenericAttention.attention(&qkv, &SeqLayout::uniform(1, 5), 1, 1.0).is_err());
/// assert!(GenericAttention.attention(&qkv, &SeqLayout::uniform(2, 2), 4, 1.0).is_err());
/// assert_eq!(GenericAttention.attention(&qkv, &SeqLayout::uniform(2, 2), 2, 1.0)?.dims(), &[4, 2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct GenericAttention;

impl AttentionBackend for CpuFusedAttention {
    fn attention(
        &self,
        qkv: &Tensor,
        layout: &SeqLayout,
        num_heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        if super::use_cpu_kernel(qkv) {
            check_qkv(qkv, layout, num_heads)?;
            qkv.contiguous()?.apply_op1(AttentionOp {
                layout: Arc::new(layout.clone()),
                num_heads,
                scale: scale as f32,
            })
        } else {
            GenericAttention.attention(qkv, layout, num_heads, scale)
        }
    }
}

impl AttentionBackend for GenericAttention {
    fn attention(
        &self,
        qkv: &Tensor,
        layout: &SeqLayout,
        num_heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        attention_generic(qkv, layout, num_heads, scale)
    }
}

/// Packed attention on the default backend ([`DefaultAttention`]: the fused CPU kernel for f32 on the CPU,
/// flash-attn on CUDA with the `flash-attn` feature, candle ops otherwise).
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// # let dev = Device::Cpu;
/// // One head of width 2, so qkv rows are [q0 q1 k0 k1 v0 v1]; q = k = 0 makes every weight equal.
/// let v = Tensor::arange(0f32, 10., &dev)?.reshape((5, 2))?;
/// let qkv = Tensor::cat(&[&Tensor::zeros((5, 4), DType::F32, &dev)?, &v], 1)?;
/// let out = dinov2_model::ops::attention(&qkv, &dinov2_model::SeqLayout::from_lengths(&[2, 3]), 1, 1.0)?;
/// // Each row is the mean of its own sequence's values.
/// let expected = Tensor::new(&[[1f32, 2.], [1., 2.], [6., 7.], [6., 7.], [6., 7.]], &dev)?;
/// assert!((out - expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-5);
/// # Ok(()) }
/// ```
pub fn attention(qkv: &Tensor, layout: &SeqLayout, num_heads: usize, scale: f64) -> Result<Tensor> {
    DefaultAttention.attention(qkv, layout, num_heads, scale)
}

pub(super) fn check_qkv(qkv: &Tensor, layout: &SeqLayout, num_heads: usize) -> Result<()> {
    let (rows, three_d) = qkv.dims2()?;
    if rows != layout.total_rows() {
        bail!(
            "attention: qkv has {rows} rows but the layout covers {}",
            layout.total_rows()
        );
    }
    if num_heads == 0 || three_d % (3 * num_heads) != 0 {
        bail!("attention: qkv width {three_d} is not 3 x heads ({num_heads}) x head_dim");
    }
    Ok(())
}

/// Splits `[rows, 3D]` rows of one uniform group into q, k, v of shape `[B, heads, T, hd]`.
fn split_heads(qkv: &Tensor, b: usize, t: usize, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let hd = qkv.dim(1)? / (3 * heads);
    let x = qkv
        .reshape((b, t, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    Ok((
        x.get(0)?.contiguous()?,
        x.get(1)?.contiguous()?,
        x.get(2)?.contiguous()?,
    ))
}

/// Attention probabilities `[B, heads, T, T]` of a uniform batch (`qkv` `[B·T, 3D]`), differentiable.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let qkv = Tensor::zeros((2 * 4, 3 * 8), DType::F32, &Device::Cpu)?; // 2 sequences of 4 tokens, D = 8
/// let p = dinov2_model::ops::attention_probs(&qkv, 2, 2, 0.5)?;
/// assert_eq!(p.dims(), &[2, 2, 4, 4]);
/// assert!(p.flatten_all()?.to_vec1::<f32>()?.iter().all(|w| (w - 0.25).abs() < 1e-6)); // q = k = 0: uniform
/// assert!(dinov2_model::ops::attention_probs(&qkv, 3, 2, 0.5).is_err()); // 8 rows are not 3 sequences
/// # Ok(()) }
/// ```
pub fn attention_probs(qkv: &Tensor, batch: usize, num_heads: usize, scale: f64) -> Result<Tensor> {
    let rows = qkv.dim(0)?;
    if batch == 0 || rows % batch != 0 {
        bail!("attention_probs: {rows} rows do not split into {batch} sequences");
    }
    let (q, k, _) = split_heads(qkv, batch, rows / batch, num_heads)?;
    let s = (q.matmul(&k.t()?)? * scale)?;
    super::softmax_last_dim(&s)
}

/// Reference attention from primitive ops: each run of equal-length segments is one batched matmul.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// # let dev = Device::Cpu;
/// // One head of width 2, so qkv rows are [q0 q1 k0 k1 v0 v1]; q = k = 0 makes every weight equal.
/// let v = Tensor::arange(0f32, 10., &dev)?.reshape((5, 2))?;
/// let qkv = Tensor::cat(&[&Tensor::zeros((5, 4), DType::F32, &dev)?, &v], 1)?;
/// let layout = dinov2_model::SeqLayout::from_lengths(&[2, 3]);
/// let out = dinov2_model::ops::attention_generic(&qkv, &layout, 1, 1.0)?;
/// let fused = dinov2_model::ops::attention(&qkv, &layout, 1, 1.0)?;
/// assert!((out - fused)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-6);
/// # Ok(()) }
/// ```
pub fn attention_generic(
    qkv: &Tensor,
    layout: &SeqLayout,
    num_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    check_qkv(qkv, layout, num_heads)?;
    let d = qkv.dim(1)? / 3;
    let mut outs = Vec::new();
    let segs = layout.segments();
    let mut i = 0;
    while i < segs.len() {
        let (start, len) = segs[i];
        let mut j = i + 1;
        while j < segs.len() && segs[j].1 == len {
            j += 1;
        }
        let b = j - i;
        let part = qkv.narrow(0, start, b * len)?;
        let (q, k, v) = split_heads(&part, b, len, num_heads)?;
        let p = if super::use_cuda_kernel(&q) {
            // CUDA: the scale on q (T·hd values, not T²), cuBLAS batched GEMMs, and the softmax kernel with
            // its f32 reductions and fused backward (the composed softmax keeps ~4 T² tensors per layer).
            let s = (q * scale)?.matmul(&k.t()?)?;
            super::softmax::softmax_last_dim(&s)?
        } else {
            let s = (q.matmul(&k.t()?)? * scale)?;
            super::softmax::softmax_last_dim_generic(&s)?
        };
        let o = p.matmul(&v)?; // [b, heads, len, hd]
        outs.push(o.transpose(1, 2)?.reshape((b * len, d))?);
        i = j;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 0)
    }
}

struct AttentionOp {
    layout: Arc<SeqLayout>,
    num_heads: usize,
    scale: f32,
}

/// Single-threaded GEMM on raw strided pointers: `dst = (read ? dst : 0) + beta · lhs · rhs`.
///
/// # Safety
/// Every pointer/stride pair must address valid memory for the given m, n, k.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_st(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    read: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        read,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl AttentionOp {
    /// `(segment start, segment length, head)` for every head of every segment, longest segments first.
    fn items(&self) -> Vec<(usize, usize, usize)> {
        let mut items = Vec::with_capacity(self.layout.segments().len() * self.num_heads);
        for &(start, len) in self.layout.segments() {
            for h in 0..self.num_heads {
                items.push((start, len, h));
            }
        }
        // Longest sequences first so the pool balances.
        items.sort_by_key(|item| std::cmp::Reverse(item.1));
        items
    }

    /// Forward work items `(segment start, segment length, head, first query, queries)`: one per (segment,
    /// head), whose keys and values are packed once, split into query ranges only when there are fewer than
    /// four items per thread.
    fn forward_items(&self) -> Vec<(usize, usize, usize, usize, usize)> {
        let items = self.items();
        let want = 4 * rayon::current_num_threads().max(1);
        let splits = want.div_ceil(items.len().max(1));
        let mut out = Vec::new();
        for (start, len, h) in items {
            let parts = splits.min(len.div_ceil(32)).max(1);
            let part = len.div_ceil(parts); // equal-sized ranges
            let mut q0 = 0;
            while q0 < len {
                let qn = part.min(len - q0);
                out.push((start, len, h, q0, qn));
                q0 += qn;
            }
        }
        out
    }
}

/// Per-thread buffers of the forward: one block of a head's keys (packed as `Kᵀ`) and values, a block of
/// scores, and the online-softmax state of the item's queries.
#[derive(Default)]
struct ForwardScratch {
    keys: PackedB,
    values: PackedB,
    scores: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    correction: Vec<f32>,
}

/// Keys per block of the forward: all of them up to 384 (a 224 px image's 257 in one block, an exact
/// softmax), else equal blocks of about 256 rounded up to whole panels of the GEMM (16 columns), so that a
/// block's packed keys and values (64 KiB each at head dimension 64) and its scores stay in L2.
fn key_block(len: usize) -> usize {
    if len <= 384 {
        len.max(1)
    } else {
        len.div_ceil(len.div_ceil(256)).next_multiple_of(NR)
    }
}

/// Queries per block of the forward: whole micro-tiles (6 rows), a score block of at most 144 × 256.
const QUERY_BLOCK: usize = 24 * MR;

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "dinov2-packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = slice_f32(s, l)?;
        let (rows, three_d) = l.shape().dims2()?;
        let d = three_d / 3;
        if self.layout.total_rows() != rows || self.num_heads == 0 || d % self.num_heads != 0 {
            candle_core::bail!(
                "attention: layout covers {} rows for a [{rows}, {three_d}] qkv with {} heads",
                self.layout.total_rows(),
                self.num_heads
            );
        }
        let hd = d / self.num_heads;
        // Not zero-filled: the (segment, head) GEMMs below write every element (they never read `dst`), and
        // the length is set only after they have run.
        let mut out: Vec<f32> = Vec::with_capacity(rows * d);
        let dst = SyncPtr(out.as_mut_ptr());
        let scale = self.scale;
        let wrap = candle_core::Error::wrap;
        self.forward_items().into_par_iter().try_for_each_init(
            ForwardScratch::default,
            |s: &mut ForwardScratch, (start, t, h, q0, qn)| -> Result<()> {
                let head = start * three_d + h * hd;
                s.max.resize(qn, 0.0);
                s.sum.resize(qn, 0.0);
                s.correction.resize(qn, 0.0);
                let kb = key_block(t);
                let key_blocks = t.div_ceil(kb);
                for (bi, k0) in (0..t).step_by(kb).enumerate() {
                    let kn = kb.min(t - k0);
                    let (first, last) = (bi == 0, bi + 1 == key_blocks);
                    // Kᵀ (hd × kn): B[p][j] = K[k0 + j][p]; V (kn × hd).
                    let kv = head + k0 * three_d;
                    s.keys
                        .repack_strided(&qkv[kv + d..], hd, kn, 1, three_d)
                        .map_err(wrap)?;
                    s.values
                        .repack_strided(&qkv[kv + 2 * d..], kn, hd, three_d, 1)
                        .map_err(wrap)?;
                    for b0 in (q0..q0 + qn).step_by(QUERY_BLOCK) {
                        let bn = QUERY_BLOCK.min(q0 + qn - b0);
                        let state = b0 - q0..b0 - q0 + bn;
                        s.scores.resize(bn * kn, 0.0);
                        let scores = Output {
                            data: &mut s.scores,
                            ld: kn,
                            accumulate: false,
                            bias: None,
                        };
                        let q = &qkv[head + b0 * three_d..];
                        gemm_packed(q, bn, three_d, &s.keys, scores, None, Parallelism::None)
                            .map_err(wrap)?;
                        online_softmax_block(
                            &mut s.scores,
                            kn,
                            scale,
                            first,
                            &mut s.max[state.clone()],
                            &mut s.sum[state.clone()],
                            &mut s.correction[state.clone()],
                        );
                        // SAFETY (of the offset): inside the [rows, D] output.
                        let o_ptr = unsafe { dst.get().add((start + b0) * d + h * hd) };
                        if !first {
                            for (r, &c) in s.correction[state.clone()].iter().enumerate() {
                                // SAFETY: this item's own rows and head columns, written by the first block.
                                let o =
                                    unsafe { std::slice::from_raw_parts_mut(o_ptr.add(r * d), hd) };
                                o.iter_mut().for_each(|v| *v *= c);
                            }
                        }
                        let sums = &s.sum[state];
                        let normalise = |r: usize, _: usize, o: &mut [f32]| {
                            let inv = 1.0 / sums[r];
                            o.iter_mut().for_each(|v| *v *= inv)
                        };
                        let o = RawOutput {
                            ptr: o_ptr,
                            ld: d,
                            accumulate: !first,
                            bias: None,
                        };
                        let map: Option<TileMap> = if last { Some(&normalise) } else { None };
                        // SAFETY: this (segment, head, query range) alone writes these rows' head columns.
                        unsafe {
                            gemm_packed_raw(&s.scores, bn, kn, &s.values, o, map, Parallelism::None)
                        }
                        .map_err(wrap)?;
                    }
                }
                Ok(())
            },
        )?;
        // SAFETY: the query blocks cover every row of every segment, the segments cover all `rows` rows, and
        // every head's columns are written, so all rows·d values were written by the GEMMs above.
        unsafe { out.set_len(rows * d) };
        Ok((CpuStorage::F32(out), Shape::from((rows, d))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, three_d) = qkv.dims2()?;
        let d = three_d / 3;
        let hd = d / self.num_heads;
        let scale = self.scale;
        let mut dqkv = vec![0f32; rows * three_d];
        let dst = SyncPtr(dqkv.as_mut_ptr());
        with_f32(qkv, |x| {
            with_f32(grad, |g| {
                let xs = x.as_ptr() as usize;
                let gs = g.as_ptr() as usize;
                self.items().into_par_iter().for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(p, dp): &mut (Vec<f32>, Vec<f32>), (start, t, h)| {
                        p.resize(t * t, 0.0);
                        dp.resize(t * t, 0.0);
                        // SAFETY: as in the forward; each item writes its own head's columns of its own rows.
                        unsafe {
                            let base = xs as *const f32;
                            let q = base.add(start * three_d + h * hd);
                            let k = base.add(start * three_d + d + h * hd);
                            let v = base.add(start * three_d + 2 * d + h * hd);
                            let go = (gs as *const f32).add(start * d + h * hd);
                            let dq = dst.get().add(start * three_d + h * hd);
                            let dk = dst.get().add(start * three_d + d + h * hd);
                            let dv = dst.get().add(start * three_d + 2 * d + h * hd);
                            // P = softmax(scale q kᵀ)
                            gemm_st(
                                t,
                                t,
                                hd,
                                p.as_mut_ptr(),
                                t,
                                1,
                                false,
                                q,
                                three_d,
                                1,
                                k,
                                1,
                                three_d,
                                scale,
                            );
                            softmax_rows(p, t);
                            // dV = Pᵀ dO
                            gemm_st(
                                t,
                                hd,
                                t,
                                dv,
                                three_d,
                                1,
                                false,
                                p.as_ptr(),
                                1,
                                t,
                                go,
                                d,
                                1,
                                1.0,
                            );
                            // dP = dO Vᵀ
                            gemm_st(
                                t,
                                t,
                                hd,
                                dp.as_mut_ptr(),
                                t,
                                1,
                                false,
                                go,
                                d,
                                1,
                                v,
                                1,
                                three_d,
                                1.0,
                            );
                            // dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
                            for (prow, dprow) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                                let dot: f32 =
                                    prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                                for (pv, dv) in prow.iter().zip(dprow.iter_mut()) {
                                    *dv = pv * (*dv - dot) * scale;
                                }
                            }
                            // dQ = dS K ; dK = dSᵀ Q
                            gemm_st(
                                t,
                                hd,
                                t,
                                dq,
                                three_d,
                                1,
                                false,
                                dp.as_ptr(),
                                t,
                                1,
                                k,
                                three_d,
                                1,
                                1.0,
                            );
                            gemm_st(
                                t,
                                hd,
                                t,
                                dk,
                                three_d,
                                1,
                                false,
                                dp.as_ptr(),
                                1,
                                t,
                                q,
                                three_d,
                                1,
                                1.0,
                            );
                        }
                    },
                );
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dqkv, (rows, three_d), qkv.device())?))
    }
}
