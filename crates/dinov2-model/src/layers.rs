//! Transformer building blocks with the official parameter names and semantics
//! (`dinov2/layers/{patch_embed,attention,mlp,swiglu_ffn,layer_scale,block}.py`).
//!
//! Token tensors are packed `[rows, D]` matrices; a [`SeqLayout`] tells attention which rows form one image.

use std::sync::{Arc, OnceLock};

use candle_core::{Tensor, D};

use crate::config::{FfnKind, VitConfig};
use crate::error::{Error, Result};
use crate::ops::{self, AttentionBackend, SeqLayout};
use crate::state_dict::StateDict;

/// Fetches `prefix.name` with the expected shape.
pub(crate) fn param(sd: &StateDict, key: &str, shape: &[usize]) -> Result<Tensor> {
    Ok(sd.get_shaped(key, shape)?.clone())
}

/// A linear layer `y = x Wᵀ + b` (weights `[out, in]`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        sd: &StateDict,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Linear {
            weight: param(sd, &format!("{prefix}.weight"), &[out, inp])?,
            bias: if bias {
                Some(param(sd, &format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }
    /// Applies the layer to `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(x, &self.weight, self.bias.as_ref())?)
    }
    pub(crate) fn named(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.clone()));
        }
    }
}

/// LayerNorm with affine parameters (differentiable fused kernel).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(sd: &StateDict, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: param(sd, &format!("{prefix}.weight"), &[dim])?,
            bias: param(sd, &format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
    pub(crate) fn named(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

/// Non-overlapping `p × p` patches projected to D (a stride-p convolution, computed as patchify + GEMM).
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) patch: usize,
}

impl PatchEmbed {
    pub(crate) fn load(sd: &StateDict, cfg: &VitConfig) -> Result<Self> {
        let (d, c, p) = (cfg.embed_dim, cfg.in_chans, cfg.patch_size);
        Ok(PatchEmbed {
            weight: param(sd, "patch_embed.proj.weight", &[d, c, p, p])?,
            bias: param(sd, "patch_embed.proj.bias", &[d])?,
            patch: p,
        })
    }

    /// `[B, C, H, W]` → `[B, h·w, D]` tokens in row-major patch order, and the grid `(h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let (b, c, hp, wp) = x.dims4()?;
        let p = self.patch;
        if hp % p != 0 || wp % p != 0 || hp == 0 || wp == 0 {
            return Err(Error::InputNotMultipleOfPatch {
                height: hp,
                width: wp,
                patch: p,
            });
        }
        let (expected_c, d) = (self.weight.dim(1)?, self.weight.dim(0)?);
        if c != expected_c {
            return Err(Error::invalid(format!(
                "input has {c} channels, the model expects {expected_c}"
            )));
        }
        let (h, w) = (hp / p, wp / p);
        let patches = x
            .reshape((b, c, h, p, w, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * h * w, c * p * p))?;
        let weight = self.weight.reshape((d, c * p * p))?;
        let t = ops::linear(&patches, &weight, Some(&self.bias))?;
        Ok((t.reshape((b, h * w, d))?, (h, w)))
    }
}

/// Multi-head self-attention (`attn.qkv`, `attn.proj`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) num_heads: usize,
    pub(crate) scale: f64,
}

impl Attention {
    pub(crate) fn load(sd: &StateDict, prefix: &str, cfg: &VitConfig) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Attention {
            qkv: Linear::load(sd, &format!("{prefix}.qkv"), 3 * d, d, cfg.qkv_bias)?,
            proj: Linear::load(sd, &format!("{prefix}.proj"), d, d, cfg.proj_bias)?,
            num_heads: cfg.num_heads,
            scale: 1.0 / (cfg.head_dim() as f64).sqrt(),
        })
    }

    /// `[rows, D]` → `[rows, D]`, attending within each segment of `layout`.
    pub fn forward(
        &self,
        x: &Tensor,
        layout: &SeqLayout,
        backend: &dyn AttentionBackend,
    ) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let o = backend.attention(&qkv, layout, self.num_heads, self.scale)?;
        self.proj.forward(&o)
    }

    /// Attention probabilities `[B, heads, T, T]` for a uniform batch of `batch` sequences.
    pub fn probabilities(&self, x: &Tensor, batch: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        Ok(ops::attention_probs(
            &qkv,
            batch,
            self.num_heads,
            self.scale,
        )?)
    }
}

/// Feed-forward network: `Mlp` (fc1 → GELU → fc2) or packed `SwiGLU` (w12 → silu(x1)·x2 → w3).
#[derive(Debug, Clone)]
pub enum Ffn {
    /// `mlp.fc1`, `mlp.fc2`.
    Mlp { fc1: Linear, fc2: Linear },
    /// `mlp.w12` (packed gate and value), `mlp.w3`.
    Swiglu {
        w12: Linear,
        w3: Linear,
        hidden: usize,
    },
}

impl Ffn {
    pub(crate) fn load(sd: &StateDict, prefix: &str, cfg: &VitConfig) -> Result<Self> {
        let (d, h, bias) = (cfg.embed_dim, cfg.ffn_hidden_dim(), cfg.ffn_bias);
        Ok(match cfg.ffn {
            FfnKind::Mlp => Ffn::Mlp {
                fc1: Linear::load(sd, &format!("{prefix}.fc1"), h, d, bias)?,
                fc2: Linear::load(sd, &format!("{prefix}.fc2"), d, h, bias)?,
            },
            FfnKind::Swiglu => Ffn::Swiglu {
                w12: Linear::load(sd, &format!("{prefix}.w12"), 2 * h, d, bias)?,
                w3: Linear::load(sd, &format!("{prefix}.w3"), d, h, bias)?,
                hidden: h,
            },
        })
    }

    /// Applies the FFN row-wise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Ffn::Mlp { fc1, fc2 } => {
                // The untracked CPU inference path (bias + GELU fused into the GEMM) is `Block::forward_inference`.
                let h = ops::gelu_erf(&fc1.forward(x)?)?;
                fc2.forward(&h)
            }
            Ffn::Swiglu { w12, w3, hidden } => {
                let h = w12.forward(x)?;
                let x1 = h.narrow(D::Minus1, 0, *hidden)?;
                let x2 = h.narrow(D::Minus1, *hidden, *hidden)?;
                w3.forward(&(x1.silu()? * x2)?)
            }
        }
    }

    pub(crate) fn named(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        match self {
            Ffn::Mlp { fc1, fc2 } => {
                fc1.named(&format!("{prefix}.fc1"), out);
                fc2.named(&format!("{prefix}.fc2"), out);
            }
            Ffn::Swiglu { w12, w3, .. } => {
                w12.named(&format!("{prefix}.w12"), out);
                w3.named(&format!("{prefix}.w3"), out);
            }
        }
    }
}

/// How images are packed into rows: groups of `batch` images of `tokens` tokens each, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    /// `(batch, tokens per image)` of each group.
    pub groups: Vec<(usize, usize)>,
    /// Whether this came from a list-of-crops call (the official nested forward: drop path always
    /// uses the batch-subset form).
    pub is_list: bool,
}

impl Packing {
    /// One attention segment per image.
    pub fn layout(&self) -> SeqLayout {
        let lengths: Vec<usize> = self
            .groups
            .iter()
            .flat_map(|&(b, t)| std::iter::repeat_n(t, b))
            .collect();
        SeqLayout::from_lengths(&lengths)
    }
}

/// Training-time randomness handed to blocks.
pub(crate) struct TrainContext<'a> {
    pub rng: &'a mut dyn rand::RngCore,
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pub(crate) norm1: LayerNorm,
    pub(crate) attn: Attention,
    pub(crate) ls1: Option<Tensor>,
    pub(crate) norm2: LayerNorm,
    pub(crate) mlp: Ffn,
    pub(crate) ls2: Option<Tensor>,
    pub(crate) drop_path: f64,
    /// Inference-only weights with LayerScale folded in (computed on first inference use).
    pub(crate) folded: OnceLock<FoldedOutputs>,
}

/// `proj` and the FFN output layer with LayerScale folded in: `γ ⊙ (x Wᵀ + b) = x (γ ⊙ W)ᵀ + γ ⊙ b`.
#[derive(Debug, Clone)]
pub(crate) struct FoldedOutputs {
    proj_w: Tensor,
    proj_b: Option<Arc<Vec<f32>>>,
    out_w: Tensor,
    out_b: Option<Arc<Vec<f32>>>,
}

fn fold(lin: &Linear, gamma: Option<&Tensor>) -> Result<(Tensor, Option<Arc<Vec<f32>>>)> {
    let (w, b) = match gamma {
        Some(g) => (
            lin.weight.broadcast_mul(&g.unsqueeze(1)?)?,
            lin.bias.as_ref().map(|b| b * g).transpose()?,
        ),
        None => (lin.weight.clone(), lin.bias.clone()),
    };
    let b = b.map(|b| b.to_vec1::<f32>().map(Arc::new)).transpose()?;
    Ok((w.contiguous()?, b))
}

impl Block {
    pub(crate) fn load(sd: &StateDict, i: usize, cfg: &VitConfig) -> Result<Self> {
        let p = format!("blocks.{i}");
        let d = cfg.embed_dim;
        let ls = |n: &str| -> Result<Option<Tensor>> {
            cfg.layer_scale_init
                .map(|_| param(sd, &format!("{p}.{n}.gamma"), &[d]))
                .transpose()
        };
        Ok(Block {
            norm1: LayerNorm::load(sd, &format!("{p}.norm1"), d, cfg.layer_norm_eps)?,
            attn: Attention::load(sd, &format!("{p}.attn"), cfg)?,
            ls1: ls("ls1")?,
            norm2: LayerNorm::load(sd, &format!("{p}.norm2"), d, cfg.layer_norm_eps)?,
            mlp: Ffn::load(sd, &format!("{p}.mlp"), cfg)?,
            ls2: ls("ls2")?,
            drop_path: cfg.drop_path_rate_of_block(i),
            folded: OnceLock::new(),
        })
    }

    fn attn_branch(
        &self,
        x: &Tensor,
        layout: &SeqLayout,
        be: &dyn AttentionBackend,
    ) -> Result<Tensor> {
        self.attn.forward(&self.norm1.forward(x)?, layout, be)
    }

    fn ffn_branch(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp.forward(&self.norm2.forward(x)?)
    }

    /// `x + ls(branch(x))` in eval mode, or with stochastic depth in training.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        packing: &Packing,
        be: &dyn AttentionBackend,
        train: Option<&mut TrainContext<'_>>,
    ) -> Result<Tensor> {
        let layout = packing.layout();
        match train {
            Some(ctx) if self.drop_path > 0.0 => {
                let r = self.drop_path;
                let attn = |x: &Tensor, l: &SeqLayout| self.attn_branch(x, l, be);
                let ffn = |x: &Tensor, _: &SeqLayout| self.ffn_branch(x);
                if packing.is_list || r > 0.1 {
                    let x = drop_add_residual_subset(x, packing, r, &attn, self.ls1.as_ref(), ctx)?;
                    drop_add_residual_subset(&x, packing, r, &ffn, self.ls2.as_ref(), ctx)
                } else {
                    let y = scale(&attn(x, &layout)?, self.ls1.as_ref())?;
                    let x = (x + drop_path_per_sample(&y, packing, r, ctx)?)?;
                    let y = scale(&ffn(&x, &layout)?, self.ls2.as_ref())?;
                    Ok((&x + drop_path_per_sample(&y, packing, r, ctx)?)?)
                }
            }
            _ if ops::use_cpu_kernel(x) && !x.track_op() && !self.attn.qkv.weight.track_op() => {
                self.forward_inference(x, &layout, be)
            }
            _ => {
                let x = (x + scale(&self.attn_branch(x, &layout, be)?, self.ls1.as_ref())?)?;
                Ok((&x + scale(&self.ffn_branch(&x)?, self.ls2.as_ref())?)?)
            }
        }
    }

    /// Inference on CPU f32 without gradient tracking: LayerScale folded into the output projections, whose
    /// GEMMs accumulate straight into the residual stream.
    fn forward_inference(
        &self,
        x: &Tensor,
        layout: &SeqLayout,
        be: &dyn AttentionBackend,
    ) -> Result<Tensor> {
        let f = match self.folded.get() {
            Some(f) => f,
            None => {
                let (proj_w, proj_b) = fold(&self.attn.proj, self.ls1.as_ref())?;
                let out = match &self.mlp {
                    Ffn::Mlp { fc2, .. } => fc2,
                    Ffn::Swiglu { w3, .. } => w3,
                };
                let (out_w, out_b) = fold(out, self.ls2.as_ref())?;
                let _ = self.folded.set(FoldedOutputs {
                    proj_w,
                    proj_b,
                    out_w,
                    out_b,
                });
                self.folded
                    .get()
                    .ok_or_else(|| Error::invalid("folded weights unavailable"))?
            }
        };
        let qkv = self.attn.qkv.forward(&self.norm1.forward(x)?)?;
        let o = be.attention(&qkv, layout, self.attn.num_heads, self.attn.scale)?;
        let x = ops::linear_residual_inference(x, &o, &f.proj_w, f.proj_b.clone())?;
        let h = self.norm2.forward(&x)?;
        let hidden = match &self.mlp {
            Ffn::Mlp { fc1, .. } => match &fc1.bias {
                Some(b) => ops::linear_gelu_inference(&h, &fc1.weight, b)?,
                None => ops::gelu_erf(&fc1.forward(&h)?)?,
            },
            Ffn::Swiglu { w12, hidden, .. } => {
                let g = w12.forward(&h)?;
                (g.narrow(D::Minus1, 0, *hidden)?.silu()?
                    * g.narrow(D::Minus1, *hidden, *hidden)?)?
            }
        };
        Ok(ops::linear_residual_inference(
            &x,
            &hidden,
            &f.out_w,
            f.out_b.clone(),
        )?)
    }

    pub(crate) fn named(&self, i: usize, out: &mut Vec<(String, Tensor)>) {
        let p = format!("blocks.{i}");
        self.norm1.named(&format!("{p}.norm1"), out);
        self.attn.qkv.named(&format!("{p}.attn.qkv"), out);
        self.attn.proj.named(&format!("{p}.attn.proj"), out);
        if let Some(g) = &self.ls1 {
            out.push((format!("{p}.ls1.gamma"), g.clone()));
        }
        self.norm2.named(&format!("{p}.norm2"), out);
        self.mlp.named(&format!("{p}.mlp"), out);
        if let Some(g) = &self.ls2 {
            out.push((format!("{p}.ls2.gamma"), g.clone()));
        }
    }
}

fn scale(y: &Tensor, gamma: Option<&Tensor>) -> Result<Tensor> {
    Ok(match gamma {
        Some(g) => y.broadcast_mul(g)?,
        None => y.clone(),
    })
}

/// Classic DropPath (0 < rate ≤ 0.1): each image's branch is kept with probability `1 - rate`, scaled by `1 / (1 - rate)`.
fn drop_path_per_sample(
    y: &Tensor,
    packing: &Packing,
    rate: f64,
    ctx: &mut TrainContext<'_>,
) -> Result<Tensor> {
    use rand::Rng;
    let keep = 1.0 - rate;
    let mut scale_rows = Vec::with_capacity(y.dim(0)?);
    for &(b, t) in &packing.groups {
        for _ in 0..b {
            let kept = ctx.rng.random_bool(keep);
            let s = if kept { (1.0 / keep) as f32 } else { 0.0 };
            scale_rows.extend(std::iter::repeat_n(s, t));
        }
    }
    let n = scale_rows.len();
    let s = Tensor::from_vec(scale_rows, (n, 1), y.device())?.to_dtype(y.dtype())?;
    Ok(y.broadcast_mul(&s)?)
}

/// Batch-subset stochastic depth (`drop_add_residual_stochastic_depth[_list]`): per group, a random subset
/// of `max(int(B·(1-r)), 1)` images computes the branch; its residual is added back scaled by `B / subset`.
fn drop_add_residual_subset(
    x: &Tensor,
    packing: &Packing,
    rate: f64,
    branch: &dyn Fn(&Tensor, &SeqLayout) -> Result<Tensor>,
    gamma: Option<&Tensor>,
    ctx: &mut TrainContext<'_>,
) -> Result<Tensor> {
    use rand::seq::SliceRandom;
    let mut rows = Vec::new();
    let mut row_scale = Vec::new();
    let mut sub_groups = Vec::new();
    let mut offset = 0usize;
    for &(b, t) in &packing.groups {
        let subset = ((b as f64 * (1.0 - rate)) as usize).max(1).min(b);
        let mut perm: Vec<usize> = (0..b).collect();
        perm.shuffle(ctx.rng);
        let factor = b as f32 / subset as f32;
        for &img in &perm[..subset] {
            let start = offset + img * t;
            rows.extend((start..start + t).map(|r| r as u32));
            row_scale.extend(std::iter::repeat_n(factor, t));
        }
        sub_groups.push((subset, t));
        offset += b * t;
    }
    let dev = x.device();
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, dev)?;
    let x_sub = x.index_select(&idx, 0)?;
    let sub = Packing {
        groups: sub_groups,
        is_list: packing.is_list,
    };
    let y = scale(&branch(&x_sub, &sub.layout())?, gamma)?;
    let s = Tensor::from_vec(row_scale, (n, 1), dev)?.to_dtype(y.dtype())?;
    Ok(x.index_add(&idx, &y.broadcast_mul(&s)?, 0)?)
}

/// The attention kernel a model holds, shared by its blocks.
pub(crate) type SharedBackend = Arc<dyn AttentionBackend>;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn batch_subset_drop_path_keeps_the_official_count_and_scale() {
        // Groups of 5 images x 3 tokens and 2 images x 4 tokens (a list forward), rate 0.4:
        // subsets of max(int(5*0.6), 1) = 3 and max(int(2*0.6), 1) = 1 images, scaled by 5/3 and 2.
        let packing = Packing {
            groups: vec![(5, 3), (2, 4)],
            is_list: true,
        };
        let x = Tensor::ones((5 * 3 + 2 * 4, 2), DType::F32, &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut ctx = TrainContext { rng: &mut rng };
        let identity = |x: &Tensor, l: &SeqLayout| -> Result<Tensor> {
            assert_eq!(l.total_rows(), x.dim(0)?);
            Ok(x.clone())
        };
        let out = drop_add_residual_subset(&x, &packing, 0.4, &identity, None, &mut ctx).unwrap();
        let v = values(&out);
        let first: Vec<f32> = v[..30].to_vec();
        let second: Vec<f32> = v[30..].to_vec();
        let hit = |vals: &[f32], scaled: f32| {
            vals.iter()
                .filter(|&&a| (a - (1.0 + scaled)).abs() < 1e-6)
                .count()
        };
        assert_eq!(
            hit(&first, 5.0 / 3.0),
            3 * 3 * 2,
            "3 images of 3 tokens x 2 channels got the branch"
        );
        assert_eq!(first.iter().filter(|&&a| a == 1.0).count(), 2 * 3 * 2);
        assert_eq!(hit(&second, 2.0), 4 * 2);
        assert_eq!(second.iter().filter(|&&a| a == 1.0).count(), 4 * 2);
    }

    #[test]
    fn per_sample_drop_path_keeps_with_probability_one_minus_rate() {
        let packing = Packing {
            groups: vec![(1000, 2)],
            is_list: false,
        };
        let y = Tensor::ones((2000, 1), DType::F32, &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut ctx = TrainContext { rng: &mut rng };
        let v = values(&drop_path_per_sample(&y, &packing, 0.1, &mut ctx).unwrap());
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.9).abs() < 1e-6));
        assert!(v.chunks(2).all(|c| c[0] == c[1]), "one draw per image");
        let kept = v.iter().filter(|&&a| a > 0.0).count() as f64 / 2000.0;
        assert!((kept - 0.9).abs() < 0.03, "kept fraction {kept}");
    }
}
