//! Transformer building blocks with the official parameter names and semantics
//! (`dinov2/layers/{patch_embed,attention,mlp,swiglu_ffn,layer_scale,block}.py`).
//!
//! Every layer is built from a [`VarBuilder`] positioned at its official module path (`vb.pp("blocks").pp(3)`
//! for block 3) and implements candle's [`Module`] (inference). The
//! names each `new` asks its builder for are the only place the official parameter names are written; the
//! init hints are the official initialisation (see [`crate::init`]). Training forwards (stochastic depth)
//! take the caller's generator explicitly ([`Block::forward_packed`]): candle's blanket
//! [`ModuleT`](candle_core::ModuleT)
//! implementation of a [`Module`] type is its eval forward.
//!
//! Blocks work on packed `[rows, D]` token matrices: a [`Packing`] says which rows form one image (the
//! [`Module`] implementations take the usual `[B, T, D]` batch).
//!
//! A custom ViT, block by block (random weights from a `VarMap`; any `VarBuilder` works):
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use dinov2_model::layers::{Block, LayerNorm, PatchEmbed};
//! use dinov2_model::VitConfig;
//! # fn main() -> dinov2_model::Result<()> {
//! let mut cfg = VitConfig::vit_small();
//! (cfg.embed_dim, cfg.num_heads) = (32, 2);
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let patch_embed = PatchEmbed::new(&cfg, vb.pp("patch_embed"))?;
//! let blocks = (0..2)
//!     .map(|i| Block::new(&cfg, 0.0, vb.pp("blocks").pp(i)))
//!     .collect::<dinov2_model::Result<Vec<_>>>()?;
//! let norm = LayerNorm::new(cfg.embed_dim, cfg.layer_norm_eps, vb.pp("norm"))?;
//!
//! let image = Tensor::zeros((1, 3, 28, 42), DType::F32, &Device::Cpu)?;
//! let mut x = patch_embed.forward(&image)?; // [1, 6, 32]: a 2 x 3 patch grid
//! for block in &blocks {
//!     x = block.forward(&x)?;
//! }
//! let x = norm.forward(&x)?;
//! assert_eq!(x.dims(), &[1, 6, 32]);
//! assert!(varmap.data().lock().unwrap().contains_key("blocks.1.mlp.fc2.weight"));
//! # Ok(()) }
//! ```

use std::sync::Arc;

use candle_core::{Module, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rand::RngCore;

use crate::config::{FfnKind, VitConfig};
use crate::error::{Error, Result};
use crate::init::{ONES, TRUNC_NORMAL_002, ZEROS};
use crate::ops::{self, AttentionBackend, DefaultAttention, SeqLayout};

/// The attention kernel a layer holds.
pub(crate) type SharedBackend = Arc<dyn AttentionBackend>;

/// A linear layer `y = x Wᵀ + b` (`weight` `[out, in]`, `bias` `[out]`).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> dinov2_model::Result<()> {
/// let vm = VarMap::new();
/// let fc = dinov2_model::layers::Linear::new(4, 3, true, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let y = fc.forward(&Tensor::ones((2, 4), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[2, 3]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `in_dim → out_dim` from `vb` (`weight`, and `bias` when `bias` is set), initialised as the official
    /// `init_weights_vit_timm` (trunc-normal 0.02 weight, zero bias).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// use dinov2_model::layers::Linear;
    /// # fn main() -> dinov2_model::Result<()> {
    /// let vm = VarMap::new();
    /// let fc = Linear::new(16, 8, false, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
    /// assert_eq!(fc.weight().dims(), &[8, 16]);
    /// assert!(fc.bias().is_none());
    /// assert_eq!(vm.all_vars().len(), 1); // `weight` only
    /// # Ok(()) }
    /// ```
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", TRUNC_NORMAL_002)?;
        let bias = bias
            .then(|| vb.get_with_hints(out_dim, "bias", ZEROS))
            .transpose()?;
        Ok(Linear { weight, bias })
    }

    /// From tensors: `weight` `[out, in]`, `bias` `[out]`.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let dev = Device::Cpu;
    /// let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev)?;
    /// let fc = dinov2_model::layers::Linear::from_tensors(w, Some(Tensor::new(&[0f32, 0., 10.], &dev)?));
    /// let y = fc.forward(&Tensor::new(&[[1f32, 2.]], &dev)?)?;
    /// assert_eq!(y.to_vec2::<f32>()?, [[1.0, 2.0, 13.0]]);
    /// # Ok(()) }
    /// ```
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// The weight `[out, in]`.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = dinov2_model::VitConfig::vit_small();
    /// # cfg.depth = 1;
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = dinov2_model::DinoVisionTransformer::from_state_dict(
    /// #     &cfg, &sd, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// let qkv = model.blocks()[0].attn().qkv();
    /// assert_eq!(qkv.weight().dims(), &[3 * 384, 384]); // queries, keys, values stacked
    /// # Ok(()) }
    /// ```
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = dinov2_model::VitConfig::vit_small();
    /// (cfg.depth, cfg.proj_bias) = (1, false);
    /// let vm = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let attn = dinov2_model::layers::Attention::new(&cfg, vb)?;
    /// assert!(attn.proj().bias().is_none());
    /// assert_eq!(attn.qkv().bias().unwrap().dims(), &[3 * 384]);
    /// # Ok(()) }
    /// ```
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn detached(&self) -> Self {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm with affine parameters (`weight`, `bias`) over the last dimension, on a differentiable fused
/// kernel (candle-nn's fused LayerNorm has no backward).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> dinov2_model::Result<()> {
/// let vm = VarMap::new();
/// let ln = dinov2_model::layers::LayerNorm::new(3, 1e-6, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// let y = ln.forward(&Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu)?)?;
/// assert!((y.to_vec2::<f32>()?[0][2] - 1.2247).abs() < 1e-3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A `dim`-wide LayerNorm from `vb` (`weight` ones, `bias` zeros at initialisation).
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_model::{layers::LayerNorm, StateDict};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = StateDict::new();
    /// sd.insert("norm.weight", Tensor::new(&[2f32, 2.], &Device::Cpu)?);
    /// sd.insert("norm.bias", Tensor::new(&[0f32, 1.], &Device::Cpu)?);
    /// let ln = LayerNorm::new(2, 1e-6, sd.var_builder(DType::F32, &Device::Cpu).pp("norm"))?;
    /// let y = ln.forward(&Tensor::new(&[[3f32, 5.]], &Device::Cpu)?)?.to_vec2::<f32>()?;
    /// // (x - 4) / 1 · 2 + bias
    /// assert!((y[0][0] + 2.0).abs() < 1e-5 && (y[0][1] - 3.0).abs() < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", ONES)?,
            bias: vb.get_with_hints(dim, "bias", ZEROS)?,
            eps,
        })
    }

    pub(crate) fn detached(&self) -> Self {
        LayerNorm {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// LayerScale: a learned per-channel scale `gamma` (official `ls1` / `ls2`).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> dinov2_model::Result<()> {
/// let vm = VarMap::new();
/// let ls = dinov2_model::layers::LayerScale::new(2, 0.5, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
/// assert_eq!(ls.forward(&Tensor::new(&[[2f32, 4.]], &Device::Cpu)?)?.to_vec2::<f32>()?, [[1.0, 2.0]]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LayerScale {
    gamma: Tensor,
}

impl LayerScale {
    /// A `dim`-wide LayerScale from `vb` (`gamma`, initialised to `init_value`; the official models use
    /// [`VitConfig::layer_scale_init`]).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// # fn main() -> dinov2_model::Result<()> {
    /// let vm = VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let ls = dinov2_model::layers::LayerScale::new(3, 1e-5, vb.pp("ls1"))?;
    /// assert!(vm.data().lock().unwrap().contains_key("ls1.gamma"));
    /// assert_eq!(ls.gamma().to_vec1::<f32>()?, [1e-5; 3]);
    /// # Ok(()) }
    /// ```
    pub fn new(dim: usize, init_value: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerScale {
            gamma: vb.get_with_hints(dim, "gamma", Init::Const(init_value))?,
        })
    }

    /// The scale `[D]`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = dinov2_model::StateDict::new();
    /// sd.insert("gamma", Tensor::new(&[0.5f32, 2.], &Device::Cpu)?);
    /// let ls = dinov2_model::layers::LayerScale::new(2, 1.0, sd.var_builder(DType::F32, &Device::Cpu))?;
    /// assert_eq!(ls.gamma().to_vec1::<f32>()?, [0.5, 2.0]); // the builder's value, not the init hint
    /// # Ok(()) }
    /// ```
    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }
}

impl Module for LayerScale {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&ops::cast_like(&self.gamma, x)?)
    }
}

/// Non-overlapping `p × p` patches projected to D (official `patch_embed.proj`, a stride-p convolution
/// computed as patchify + GEMM). [`Module::forward`] maps `[B, C, H, W]` to tokens `[B, h·w, D]`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use dinov2_model::{layers::PatchEmbed, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// cfg.embed_dim = 32;
/// let vm = candle_nn::VarMap::new();
/// let pe = PatchEmbed::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
/// let tokens = pe.forward(&Tensor::zeros((2, 3, 28, 56), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(tokens.dims(), &[2, 8, 32]); // a 2 x 4 grid of 14-pixel patches
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    /// From `vb` at `patch_embed`: `proj.weight` `[D, C, p, p]` and `proj.bias` `[D]` (PyTorch's default
    /// convolution init, U(±1/√(C·p²))).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_model::{layers::PatchEmbed, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let cfg = VitConfig::vit_small();
    /// let vm = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// PatchEmbed::new(&cfg, vb.pp("patch_embed"))?;
    /// let data = vm.data().lock().unwrap();
    /// assert_eq!(data["patch_embed.proj.weight"].dims(), &[384, 3, 14, 14]);
    /// let bound = 1.0 / (3.0f32 * 14.0 * 14.0).sqrt();
    /// assert!(data["patch_embed.proj.bias"].as_tensor().abs()?.max_all()?.to_scalar::<f32>()? <= bound);
    /// # Ok(()) }
    /// ```
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c, p) = (cfg.embed_dim, cfg.in_chans, cfg.patch_size);
        let bound = 1.0 / ((c * p * p) as f64).sqrt();
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let vb = vb.pp("proj");
        Ok(PatchEmbed {
            weight: vb.get_with_hints((d, c, p, p), "weight", init)?,
            bias: vb.get_with_hints(d, "bias", init)?,
            patch: p,
        })
    }

    /// `[B, C, H, W]` → `[B, h·w, D]` tokens in row-major patch order, and the grid `(h, w)`. An input whose
    /// sides are not positive multiples of the patch size is [`Error::InputNotMultipleOfPatch`], another
    /// channel count [`Error::ChannelMismatch`].
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{layers::PatchEmbed, Error, StateDict, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let dev = Device::Cpu;
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.embed_dim = 2;
    /// let mut sd = StateDict::new(); // a projection that sums each patch, plus bias 1
    /// sd.insert("proj.weight", Tensor::ones((2, 3, 14, 14), DType::F32, &dev)?);
    /// sd.insert("proj.bias", Tensor::ones(2, DType::F32, &dev)?);
    /// let pe = PatchEmbed::new(&cfg, sd.var_builder(DType::F32, &dev))?;
    /// let (tokens, grid) = pe.forward_grid(&Tensor::ones((1, 3, 28, 42), DType::F32, &dev)?)?;
    /// assert_eq!(grid, (2, 3));
    /// assert_eq!(tokens.to_vec3::<f32>()?[0][5], [589.0, 589.0]); // 3 · 14 · 14 ones + 1
    /// let odd = Tensor::ones((1, 3, 30, 28), DType::F32, &dev)?;
    /// assert!(matches!(pe.forward_grid(&odd), Err(Error::InputNotMultipleOfPatch { height: 30, .. })));
    /// # Ok(()) }
    /// ```
    pub fn forward_grid(&self, x: &Tensor) -> Result<(Tensor, (usize, usize))> {
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
            return Err(Error::ChannelMismatch {
                expected: expected_c,
                actual: c,
            });
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

    pub(crate) fn detached(&self) -> Self {
        PatchEmbed {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            patch: self.patch,
        }
    }
}

impl Module for PatchEmbed {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_grid(x)
            .map(|(t, _)| t)
            .map_err(Error::into_candle)
    }
}

/// Multi-head self-attention (`qkv`, `proj`) on a pluggable kernel ([`AttentionBackend`]).
/// [`Module::forward`] maps `[B, T, D]` to `[B, T, D]`.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use dinov2_model::{layers::Attention, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads) = (32, 2);
/// let vm = candle_nn::VarMap::new();
/// let attn = Attention::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
/// let x = Tensor::ones((2, 5, 32), DType::F32, &Device::Cpu)?;
/// assert_eq!(attn.forward(&x)?.dims(), &[2, 5, 32]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
    backend: SharedBackend,
}

impl Attention {
    /// From `vb` at `attn`: `qkv` (`D → 3D`) and `proj` (`D → D`), with the configuration's biases, on the
    /// default kernel ([`DefaultAttention`](crate::ops::DefaultAttention): the fused CPU kernel, flash-attn on CUDA
    /// with the `flash-attn` feature, candle ops otherwise).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_model::{layers::Attention, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.embed_dim, cfg.num_heads, cfg.qkv_bias) = (32, 2, false);
    /// let vm = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// Attention::new(&cfg, vb.pp("blocks.0.attn"))?;
    /// let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    /// names.sort();
    /// assert_eq!(names, ["blocks.0.attn.proj.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight"]);
    /// # Ok(()) }
    /// ```
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Attention {
            qkv: Linear::new(d, 3 * d, cfg.qkv_bias, vb.pp("qkv"))?,
            proj: Linear::new(d, d, cfg.proj_bias, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
            scale: 1.0 / (cfg.head_dim() as f64).sqrt(),
            backend: Arc::new(DefaultAttention),
        })
    }

    /// Replaces the attention kernel (a CUDA varlen kernel, say).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_model::{layers::Attention, ops::GenericAttention, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// let mut attn = Attention::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
    /// let x = (Tensor::arange(0f32, 320., &Device::Cpu)? * 0.05)?.sin()?.reshape((2, 5, 32))?;
    /// let fused = attn.forward(&x)?;
    /// attn.set_backend(Arc::new(GenericAttention)); // candle ops instead of the fused CPU kernel
    /// let generic = attn.forward(&x)?;
    /// assert!((fused - generic)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn set_backend(&mut self, backend: Arc<dyn AttentionBackend>) {
        self.backend = backend;
    }

    /// The fused `qkv` projection (`[3·D, D]`: all heads' queries, then keys, then values).
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = dinov2_model::VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let attn = dinov2_model::layers::Attention::new(&cfg, vb)?;
    /// assert_eq!(attn.qkv().weight().dims(), &[96, 32]);
    /// # Ok(()) }
    /// ```
    pub fn qkv(&self) -> &Linear {
        &self.qkv
    }

    /// The output projection (`[D, D]`).
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = dinov2_model::VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let attn = dinov2_model::layers::Attention::new(&cfg, vb)?;
    /// assert_eq!(attn.proj().weight().dims(), &[32, 32]);
    /// # Ok(()) }
    /// ```
    pub fn proj(&self) -> &Linear {
        &self.proj
    }

    /// `[rows, D]` → `[rows, D]`, attending within each segment of `layout`: sequences of different lengths
    /// in one call, each attending only to itself.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{layers::Attention, SeqLayout, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// let attn = Attention::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
    /// let rows = (Tensor::arange(0f32, 8. * 32., &Device::Cpu)? * 0.05)?.sin()?.reshape((8, 32))?;
    /// let packed = attn.forward_packed(&rows, &SeqLayout::from_lengths(&[3, 5]))?;
    /// let second = attn.forward_packed(&rows.narrow(0, 3, 5)?, &SeqLayout::uniform(1, 5))?;
    /// let diff = (packed.narrow(0, 3, 5)? - second)?.abs()?.max_all()?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5); // the second sequence never sees the first
    /// # Ok(()) }
    /// ```
    pub fn forward_packed(&self, x: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        let o = self.attend(&self.qkv.forward(x)?, layout)?;
        Ok(self.proj.forward(&o)?)
    }

    fn attend(&self, qkv: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        Ok(self
            .backend
            .attention(qkv, layout, self.num_heads, self.scale)?)
    }

    /// Attention probabilities `[B, heads, T, T]` for a uniform batch of `batch` sequences in `x` `[B·T, D]`
    /// (the input of the attention layer, i.e. after `norm1` in a block).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, D};
    /// use dinov2_model::{layers::Attention, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// let attn = Attention::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
    /// let x = (Tensor::arange(0f32, 10. * 32., &Device::Cpu)? * 0.05)?.sin()?.reshape((10, 32))?;
    /// let p = attn.probabilities(&x, 2)?; // two sequences of 5 tokens
    /// assert_eq!(p.dims(), &[2, 2, 5, 5]);
    /// let sums = p.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
    /// assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    /// # Ok(()) }
    /// ```
    pub fn probabilities(&self, x: &Tensor, batch: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        Ok(ops::attention_probs(
            &qkv,
            batch,
            self.num_heads,
            self.scale,
        )?)
    }

    fn detached(&self) -> Self {
        Attention {
            qkv: self.qkv.detached(),
            proj: self.proj.detached(),
            backend: self.backend.clone(),
            ..*self
        }
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        on_rows(x, |rows, layout| self.forward_packed(rows, layout))
    }
}

/// Applies a packed-rows function to a `[B, T, D]` batch.
fn on_rows(
    x: &Tensor,
    f: impl FnOnce(&Tensor, &SeqLayout) -> Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let rows = x.reshape((b * t, d))?;
    f(&rows, &SeqLayout::uniform(b, t))
        .and_then(|y| Ok(y.reshape((b, t, d))?))
        .map_err(Error::into_candle)
}

/// Feed-forward network: `Mlp` (`fc1` → exact GELU → `fc2`) or packed `SwiGLU` (`w12` → silu(x1)·x2 → `w3`).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use dinov2_model::{layers::Ffn, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// cfg.embed_dim = 32;
/// let vm = candle_nn::VarMap::new();
/// let ffn = Ffn::new(&cfg, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
/// assert!(matches!(&ffn, Ffn::Mlp { fc1, .. } if fc1.weight().dims() == [128, 32]));
/// let x = Tensor::ones((2, 5, 32), DType::F32, &Device::Cpu)?;
/// assert_eq!(ffn.forward(&x)?.dims(), &[2, 5, 32]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Ffn {
    /// `mlp.fc1`, `mlp.fc2`.
    Mlp {
        /// `D → hidden`.
        fc1: Linear,
        /// `hidden → D`.
        fc2: Linear,
    },
    /// `mlp.w12` (packed gate and value), `mlp.w3`.
    Swiglu {
        /// `D → 2·hidden` (gate rows first).
        w12: Linear,
        /// `hidden → D`.
        w3: Linear,
        /// The hidden width.
        hidden: usize,
    },
}

impl Ffn {
    /// From `vb` at `mlp`, of the configuration's kind, hidden width ([`VitConfig::ffn_hidden_dim`]) and bias.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_model::{layers::Ffn, FfnKind, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.embed_dim, cfg.ffn) = (32, FfnKind::Swiglu);
    /// let vm = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// match Ffn::new(&cfg, vb.pp("mlp"))? {
    ///     // hidden: int(128 · 2/3) = 85, rounded up to a multiple of 8
    ///     Ffn::Swiglu { w12, hidden, .. } => assert_eq!((w12.weight().dims(), hidden), (&[176, 32][..], 88)),
    ///     _ => unreachable!("a SwiGLU configuration"),
    /// }
    /// assert!(vm.data().lock().unwrap().contains_key("mlp.w3.weight"));
    /// # Ok(()) }
    /// ```
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, h, bias) = (cfg.embed_dim, cfg.ffn_hidden_dim(), cfg.ffn_bias);
        Ok(match cfg.ffn {
            FfnKind::Mlp => Ffn::Mlp {
                fc1: Linear::new(d, h, bias, vb.pp("fc1"))?,
                fc2: Linear::new(h, d, bias, vb.pp("fc2"))?,
            },
            FfnKind::Swiglu => Ffn::Swiglu {
                w12: Linear::new(d, 2 * h, bias, vb.pp("w12"))?,
                w3: Linear::new(h, d, bias, vb.pp("w3"))?,
                hidden: h,
            },
        })
    }

    /// The hidden activations (before the output layer).
    fn hidden(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Ffn::Mlp { fc1, .. } => ops::gelu_erf(&fc1.forward(x)?),
            Ffn::Swiglu { w12, hidden, .. } => swiglu(&w12.forward(x)?, *hidden),
        }
    }

    /// The input layer (`fc1` or the packed `w12`).
    fn input(&self) -> &Linear {
        match self {
            Ffn::Mlp { fc1, .. } => fc1,
            Ffn::Swiglu { w12, .. } => w12,
        }
    }

    /// The output layer (`fc2` or `w3`).
    fn output(&self) -> &Linear {
        match self {
            Ffn::Mlp { fc2, .. } => fc2,
            Ffn::Swiglu { w3, .. } => w3,
        }
    }

    fn detached(&self) -> Self {
        match self {
            Ffn::Mlp { fc1, fc2 } => Ffn::Mlp {
                fc1: fc1.detached(),
                fc2: fc2.detached(),
            },
            Ffn::Swiglu { w12, w3, hidden } => Ffn::Swiglu {
                w12: w12.detached(),
                w3: w3.detached(),
                hidden: *hidden,
            },
        }
    }
}

fn swiglu(h: &Tensor, hidden: usize) -> candle_core::Result<Tensor> {
    h.narrow(D::Minus1, 0, hidden)?.silu()? * h.narrow(D::Minus1, hidden, hidden)?
}

impl Module for Ffn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.output().forward(&self.hidden(x)?)
    }
}

/// How images are packed into rows: groups of `batch` images of `tokens` tokens each, in order.
///
/// ```
/// use dinov2_model::Packing;
/// // A list forward: 2 global crops of 5 tokens, then 3 local crops of 2 tokens.
/// let packing = Packing { groups: vec![(2, 5), (3, 2)], is_list: true };
/// let layout = packing.layout();
/// assert_eq!(layout.total_rows(), 16);
/// assert_eq!(layout.segments(), &[(0, 5), (5, 5), (10, 2), (12, 2), (14, 2)]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packing {
    /// `(batch, tokens per image)` of each group.
    pub groups: Vec<(usize, usize)>,
    /// Whether this came from a list-of-crops call (the official nested forward: drop path always
    /// uses the batch-subset form).
    pub is_list: bool,
}

impl Packing {
    /// One uniform group of `batch` images of `tokens` tokens.
    ///
    /// ```
    /// use dinov2_model::Packing;
    /// assert_eq!(Packing::uniform(4, 257), Packing { groups: vec![(4, 257)], is_list: false });
    /// ```
    pub fn uniform(batch: usize, tokens: usize) -> Self {
        Packing {
            groups: vec![(batch, tokens)],
            is_list: false,
        }
    }

    /// One attention segment per image.
    ///
    /// ```
    /// use dinov2_model::{Packing, SeqLayout};
    /// assert_eq!(Packing::uniform(3, 50).layout(), SeqLayout::uniform(3, 50));
    /// assert_eq!(Packing::uniform(3, 50).layout().uniform_len(), Some(50));
    /// ```
    pub fn layout(&self) -> SeqLayout {
        let lengths: Vec<usize> = self
            .groups
            .iter()
            .flat_map(|&(b, t)| std::iter::repeat_n(t, b))
            .collect();
        SeqLayout::from_lengths(&lengths)
    }
}

/// One pre-norm transformer block (`norm1`, `attn`, `ls1`, `norm2`, `mlp`, `ls2`) with stochastic depth.
///
/// [`Module::forward`] is the eval forward of a `[B, T, D]` batch (and so is candle's blanket
/// [`ModuleT`](candle_core::ModuleT) implementation, whatever its flag); the training forward, with stochastic depth, is
/// [`Block::forward_packed`] with the caller's generator (reproducible, checkpointable).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use dinov2_model::{layers::Block, Packing, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads) = (32, 2);
/// let vm = candle_nn::VarMap::new();
/// let block = Block::new(&cfg, 0.0, dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu))?;
/// let x = (Tensor::arange(0f32, 320., &Device::Cpu)? * 0.05)?.sin()?.reshape((2, 5, 32))?;
/// let y = block.forward(&x)?; // `[B, T, D]`
/// let rows = block.forward_packed(&x.reshape((10, 32))?, &Packing::uniform(2, 5), None)?;
/// assert!((y.reshape((10, 32))? - rows)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    ls1: Option<LayerScale>,
    norm2: LayerNorm,
    mlp: Ffn,
    ls2: Option<LayerScale>,
    drop_path: f64,
}

/// A block's linear layers packed for the CPU GEMM kernel (`dinov2_kernels`), with LayerScale folded into
/// `proj` and the FFN output layer: `γ ⊙ (x Wᵀ + b) = x (γ ⊙ W)ᵀ + γ ⊙ b`.
#[derive(Debug, Clone)]
pub(crate) struct PackedBlock {
    qkv: ops::PackedLinear,
    proj: ops::PackedLinear,
    /// `fc1` (GELU fused) or the packed SwiGLU `w12`.
    ffn_in: ops::PackedLinear,
    ffn_out: ops::PackedLinear,
}

fn fold(lin: &Linear, ls: Option<&LayerScale>) -> Result<ops::PackedLinear> {
    Ok(match ls {
        Some(ls) => ops::PackedLinear::new(
            &lin.weight.broadcast_mul(&ls.gamma.unsqueeze(1)?)?,
            lin.bias
                .as_ref()
                .map(|b| b * &ls.gamma)
                .transpose()?
                .as_ref(),
        )?,
        None => ops::PackedLinear::new(&lin.weight, lin.bias.as_ref())?,
    })
}

impl Block {
    /// From `vb` at `blocks.{i}`, with stochastic-depth rate `drop_path` (see
    /// [`VitConfig::drop_path_rate_of_block`]).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_model::{layers::Block, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.embed_dim, cfg.num_heads, cfg.layer_scale_init) = (32, 2, None); // no ls1 / ls2
    /// let vm = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// Block::new(&cfg, cfg.drop_path_rate_of_block(3), vb.pp("blocks").pp(3))?;
    /// let data = vm.data().lock().unwrap();
    /// assert_eq!(data.len(), 12); // norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2: weight and bias each
    /// assert!(data.contains_key("blocks.3.mlp.fc1.bias") && !data.contains_key("blocks.3.ls1.gamma"));
    /// # Ok(()) }
    /// ```
    pub fn new(cfg: &VitConfig, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let ls = |name: &str| -> Result<Option<LayerScale>> {
            cfg.layer_scale_init
                .map(|v| LayerScale::new(d, v, vb.pp(name)))
                .transpose()
        };
        Ok(Block {
            norm1: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm1"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ls1: ls("ls1")?,
            norm2: LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm2"))?,
            mlp: Ffn::new(cfg, vb.pp("mlp"))?,
            ls2: ls("ls2")?,
            drop_path,
        })
    }

    /// The attention layer.
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = dinov2_model::VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let block = dinov2_model::layers::Block::new(&cfg, 0.0, vb)?;
    /// let x = Tensor::ones((2 * 5, 32), DType::F32, &Device::Cpu)?;
    /// // What the block's attention sees: its input after `norm1`.
    /// let p = block.attn().probabilities(&block.norm1().forward(&x)?, 2)?;
    /// assert_eq!(p.dims(), &[2, 2, 5, 5]); // [B, heads, T, T]
    /// # Ok(()) }
    /// ```
    pub fn attn(&self) -> &Attention {
        &self.attn
    }

    /// The first LayerNorm (before attention).
    ///
    /// ```
    /// use candle_core::{DType, Device, Module, Tensor};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = dinov2_model::VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let block = dinov2_model::layers::Block::new(&cfg, 0.0, vb)?;
    /// let x = (Tensor::arange(0f32, 32., &Device::Cpu)? * 0.1)?.reshape((1, 32))?;
    /// let mean = block.norm1().forward(&x)?.mean_all()?.to_scalar::<f32>()?;
    /// assert!(mean.abs() < 1e-5); // initialised as the identity affine map: zero-mean rows
    /// # Ok(()) }
    /// ```
    pub fn norm1(&self) -> &LayerNorm {
        &self.norm1
    }

    /// Replaces the attention kernel.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use candle_core::{DType, Device, Module, Tensor};
    /// use dinov2_model::ops::GenericAttention;
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = dinov2_model::VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let mut block = dinov2_model::layers::Block::new(&cfg, 0.0, vb)?;
    /// let x = (Tensor::arange(0f32, 320., &Device::Cpu)? * 0.05)?.sin()?.reshape((2, 5, 32))?;
    /// let before = block.forward(&x)?;
    /// block.set_attention_backend(Arc::new(GenericAttention));
    /// assert!((before - block.forward(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn set_attention_backend(&mut self, backend: Arc<dyn AttentionBackend>) {
        self.attn.set_backend(backend);
    }

    /// Whether any weight tracks gradients (a `Var`).
    fn tracks(&self) -> bool {
        self.attn.qkv.weight.track_op()
    }

    fn attn_branch(&self, x: &Tensor, layout: &SeqLayout) -> Result<Tensor> {
        self.attn.forward_packed(&self.norm1.forward(x)?, layout)
    }

    fn ffn_branch(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.mlp.forward(&self.norm2.forward(x)?)?)
    }

    /// `x + ls(branch(x))` over packed rows `[rows, D]`: in eval mode when `drop_path_rng` is `None`, with
    /// stochastic depth drawn from it otherwise (both official forms: per-sample at rates ≤ 0.1, batch
    /// subsets above 0.1 and for list inputs).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{layers::Block, rand::{rngs::StdRng, SeedableRng}, Packing, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads) = (32, 2);
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let block = Block::new(&cfg, 0.5, vb)?; // drop-path rate 0.5
    /// let x = (Tensor::arange(0f32, 4. * 5. * 32., &Device::Cpu)? * 0.05)?.sin()?.reshape((20, 32))?;
    /// let packing = Packing::uniform(4, 5);
    /// let train = |seed| -> dinov2_model::Result<Vec<Vec<f32>>> {
    ///     let mut rng = StdRng::seed_from_u64(seed);
    ///     Ok(block.forward_packed(&x, &packing, Some(&mut rng))?.to_vec2()?)
    /// };
    /// assert_eq!(train(3)?, train(3)?); // reproducible from the generator
    /// // Above rate 0.1, a subset of 2 of the 4 images runs each branch (residual scaled by 4 / 2).
    /// assert_ne!(train(3)?, block.forward_packed(&x, &packing, None)?.to_vec2::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_packed(
        &self,
        x: &Tensor,
        packing: &Packing,
        drop_path_rng: Option<&mut dyn RngCore>,
    ) -> Result<Tensor> {
        self.forward_rows(x, packing, &packing.layout(), drop_path_rng, None)
    }

    /// [`Self::forward_packed`] with the model's folded inference weights when it has them.
    /// `layout` is `packing.layout()`, computed once by the caller for all blocks.
    pub(crate) fn forward_rows(
        &self,
        x: &Tensor,
        packing: &Packing,
        layout: &SeqLayout,
        drop_path_rng: Option<&mut dyn RngCore>,
        folded: Option<&PackedBlock>,
    ) -> Result<Tensor> {
        match drop_path_rng {
            Some(rng) if self.drop_path > 0.0 => {
                let r = self.drop_path;
                let attn = |x: &Tensor, l: &SeqLayout| self.attn_branch(x, l);
                let ffn = |x: &Tensor, _: &SeqLayout| self.ffn_branch(x);
                let (ls1, ls2) = (self.ls1.as_ref(), self.ls2.as_ref());
                if packing.is_list || r > 0.1 {
                    let x = drop_add_residual_subset(x, packing, r, &attn, ls1, rng)?;
                    drop_add_residual_subset(&x, packing, r, &ffn, ls2, rng)
                } else {
                    let y = scale(&attn(x, layout)?, ls1)?;
                    let x = (x + drop_path_per_sample(&y, packing, r, rng)?)?;
                    let y = scale(&ffn(&x, layout)?, ls2)?;
                    Ok((&x + drop_path_per_sample(&y, packing, r, rng)?)?)
                }
            }
            _ if ops::use_cpu_kernel(x) && !x.track_op() && !self.tracks() => match folded {
                Some(f) => self.forward_inference(x, layout, f),
                None => self.forward_inference(x, layout, &self.fold()?),
            },
            _ => {
                let x = (x + scale(&self.attn_branch(x, layout)?, self.ls1.as_ref())?)?;
                Ok((&x + scale(&self.ffn_branch(&x)?, self.ls2.as_ref())?)?)
            }
        }
    }

    /// The linear layers packed for the CPU kernels, LayerScale folded into the output layers, from the
    /// current weights.
    pub(crate) fn fold(&self) -> Result<PackedBlock> {
        Ok(PackedBlock {
            qkv: fold(&self.attn.qkv, None)?,
            proj: fold(&self.attn.proj, self.ls1.as_ref())?,
            ffn_in: fold(self.mlp.input(), None)?,
            ffn_out: fold(self.mlp.output(), self.ls2.as_ref())?,
        })
    }

    /// Inference on CPU f32 without gradient tracking, on packed weights: LayerScale folded into the output
    /// projections, whose GEMMs accumulate straight into the residual stream; GELU fused into `fc1`'s GEMM.
    fn forward_inference(&self, x: &Tensor, layout: &SeqLayout, f: &PackedBlock) -> Result<Tensor> {
        let qkv = f.qkv.forward(&self.norm1.forward(x)?, false)?;
        let o = self.attn.attend(&qkv, layout)?;
        let x = f.proj.forward_residual(x, &o)?;
        let h = self.norm2.forward(&x)?;
        let hidden = match &self.mlp {
            Ffn::Mlp { .. } => f.ffn_in.forward(&h, true)?,
            Ffn::Swiglu { hidden, .. } => swiglu(&f.ffn_in.forward(&h, false)?, *hidden)?,
        };
        Ok(f.ffn_out.forward_residual(&x, &hidden)?)
    }

    /// The block with every weight detached (sharing storage): forwards record no gradient graph.
    pub(crate) fn detached(&self) -> Self {
        let ls = |l: &Option<LayerScale>| {
            l.as_ref().map(|l| LayerScale {
                gamma: l.gamma.detach(),
            })
        };
        Block {
            norm1: self.norm1.detached(),
            attn: self.attn.detached(),
            ls1: ls(&self.ls1),
            norm2: self.norm2.detached(),
            mlp: self.mlp.detached(),
            ls2: ls(&self.ls2),
            drop_path: self.drop_path,
        }
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        on_rows(x, |rows, _| {
            self.forward_packed(rows, &Packing::uniform(b, t), None)
        })
    }
}

fn scale(y: &Tensor, ls: Option<&LayerScale>) -> Result<Tensor> {
    Ok(match ls {
        Some(ls) => ls.forward(y)?,
        None => y.clone(),
    })
}

/// Classic DropPath (0 < rate ≤ 0.1): each image's branch is kept with probability `1 - rate`, scaled by `1 / (1 - rate)`.
fn drop_path_per_sample(
    y: &Tensor,
    packing: &Packing,
    rate: f64,
    rng: &mut dyn RngCore,
) -> Result<Tensor> {
    use rand::Rng;
    let keep = 1.0 - rate;
    let mut scale_rows = Vec::with_capacity(y.dim(0)?);
    for &(b, t) in &packing.groups {
        for _ in 0..b {
            let kept = rng.random_bool(keep);
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
    ls: Option<&LayerScale>,
    rng: &mut dyn RngCore,
) -> Result<Tensor> {
    use rand::seq::SliceRandom;
    let mut rows = Vec::new();
    let mut row_scale = Vec::new();
    let mut sub_groups = Vec::new();
    let mut offset = 0usize;
    for &(b, t) in &packing.groups {
        let subset = ((b as f64 * (1.0 - rate)) as usize).max(1).min(b);
        let mut perm: Vec<usize> = (0..b).collect();
        perm.shuffle(rng);
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
    let y = scale(&branch(&x_sub, &sub.layout())?, ls)?;
    let s = Tensor::from_vec(row_scale, (n, 1), dev)?.to_dtype(y.dtype())?;
    Ok(x.index_add(&idx, &y.broadcast_mul(&s)?, 0)?)
}

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
        let identity = |x: &Tensor, l: &SeqLayout| -> Result<Tensor> {
            assert_eq!(l.total_rows(), x.dim(0)?);
            Ok(x.clone())
        };
        let out = drop_add_residual_subset(&x, &packing, 0.4, &identity, None, &mut rng).unwrap();
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
        let packing = Packing::uniform(1000, 2);
        let y = Tensor::ones((2000, 1), DType::F32, &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let v = values(&drop_path_per_sample(&y, &packing, 0.1, &mut rng).unwrap());
        assert!(v.iter().all(|&a| a == 0.0 || (a - 1.0 / 0.9).abs() < 1e-6));
        assert!(v.chunks(2).all(|c| c[0] == c[1]), "one draw per image");
        // Seeded: the kept count is a fixed number; 3 sigma of Binomial(1000, 0.9) is 28.5 images.
        let kept = v.iter().filter(|&&a| a > 0.0).count() as f64 / 2000.0;
        assert!((kept - 0.9).abs() < 0.03, "kept fraction {kept}");
    }
}
