//! [`DinoVisionTransformer`]: the DINOv2 backbone (`dinov2/models/vision_transformer.py`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::RngCore;

use crate::config::VitConfig;
use crate::error::{Error, Result};
use crate::init::{NORMAL_1E6, TRUNC_NORMAL_002, ZEROS};
use crate::layers::{Block, LayerNorm, PackedBlock, Packing, PatchEmbed};
use crate::ops::{self, AttentionBackend};
use crate::params::{meta_build, Recorder};
use crate::pos_embed::{interpolate_pos_embed, ResamplerCache};
use crate::state_dict::StateDict;

/// Outputs of [`DinoVisionTransformer::forward_features`], named as the official dict.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small().with_registers(4);
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28);
/// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
/// let f = model.forward_features(&Tensor::zeros((2, 3, 28, 42), DType::F32, &Device::Cpu)?, None)?;
/// assert_eq!(f.grid, (2, 3));
/// assert_eq!(f.x_norm_clstoken.dims(), &[2, 32]);
/// assert_eq!(f.x_norm_regtokens.dims(), &[2, 4, 32]);
/// assert_eq!(f.x_norm_patchtokens.dims(), &[2, 6, 32]);
/// assert_eq!(f.x_prenorm.dims(), &[2, 1 + 4 + 6, 32]);
/// assert!(f.masks.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Features {
    /// Normalised class token `[B, D]`.
    pub x_norm_clstoken: Tensor,
    /// Normalised register tokens `[B, R, D]` (`R = 0`: an empty tensor).
    pub x_norm_regtokens: Tensor,
    /// Normalised patch tokens `[B, N, D]`, row-major over the patch grid.
    pub x_norm_patchtokens: Tensor,
    /// Last block's output before the final norm `[B, 1 + R + N, D]`.
    pub x_prenorm: Tensor,
    /// The boolean patch masks that were applied, if any (`[B, N]`, u8).
    pub masks: Option<Tensor>,
    /// Patch grid `(h, w)`.
    pub grid: (usize, usize),
}

/// Which blocks [`DinoVisionTransformer::get_intermediate_layers`] returns.
///
/// ```
/// use dinov2_model::{BlockSelection, IntermediateOptions};
/// # use candle_core::{DType, Device, Tensor};
/// # fn main() -> dinov2_model::Result<()> {
/// # let mut cfg = dinov2_model::VitConfig::vit_small();
/// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 3, 28);
/// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
/// # let model = dinov2_model::DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
/// # let x = Tensor::zeros((1, 3, 28, 28), DType::F32, &Device::Cpu)?;
/// let blocks = |which| -> dinov2_model::Result<Vec<usize>> {
///     let outs = model.get_intermediate_layers(&x, &which, IntermediateOptions::default())?;
///     Ok(outs.iter().map(|o| o.block).collect())
/// };
/// assert_eq!(blocks(BlockSelection::Last(2))?, [1, 2]); // of a 3-block model
/// assert_eq!(blocks(BlockSelection::Indices(vec![2, 0]))?, [0, 2]); // in block order
/// assert!(blocks(BlockSelection::Indices(vec![3])).is_err()); // past the depth
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockSelection {
    /// The last `n` blocks (official `n: int`).
    Last(usize),
    /// These 0-based block indices (official `n: Sequence`); outputs come in block order.
    Indices(Vec<usize>),
}

/// Options of [`DinoVisionTransformer::get_intermediate_layers`] (official defaults: all false but `norm`).
///
/// ```
/// use dinov2_model::IntermediateOptions;
/// let opts = IntermediateOptions { reshape: true, ..Default::default() };
/// assert!(opts.norm && !opts.return_class_token);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntermediateOptions {
    /// Patch tokens as `[B, D, h, w]` instead of `[B, N, D]`.
    pub reshape: bool,
    /// Also return the class token `[B, D]`.
    pub return_class_token: bool,
    /// Pass each output through the final LayerNorm.
    pub norm: bool,
}

impl Default for IntermediateOptions {
    fn default() -> Self {
        IntermediateOptions {
            reshape: false,
            return_class_token: false,
            norm: true,
        }
    }
}

/// One block's output from [`DinoVisionTransformer::get_intermediate_layers`] (registers are dropped, as official).
#[derive(Debug, Clone)]
pub struct IntermediateOutput {
    /// Block index.
    pub block: usize,
    /// Patch tokens `[B, N, D]` or `[B, D, h, w]`.
    pub patch_tokens: Tensor,
    /// Class token `[B, D]` when requested.
    pub class_token: Option<Tensor>,
}

/// The DINOv2 vision transformer.
///
/// Built like any candle model, from a [`VarBuilder`] over official names ([`DinoVisionTransformer::new`]);
/// [`from_state_dict`](Self::from_state_dict) and [`crate::load_model`] build inference models from
/// checkpoints, strictly checked and fused. The parameters are whatever the builder hands out: constants
/// from a checkpoint, or `Var`s in a [`candle_nn::VarMap`] for training ([`crate::init::seeded`]).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::VarMap;
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) = (32, 2, 2, 56); // tiny for the example
/// let varmap = VarMap::new();
/// let model = DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
/// let x = Tensor::zeros((2, 3, 42, 70), DType::F32, &Device::Cpu)?; // any multiple of 14
/// let f = model.forward_features(&x, None)?;
/// assert_eq!(f.x_norm_patchtokens.dims(), &[2, 15, 32]); // 3 x 5 patches
/// assert_eq!(model.forward(&x)?.dims(), &[2, 32]); // `Module`: the normalised class token
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DinoVisionTransformer {
    cfg: VitConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    register_tokens: Option<Tensor>,
    mask_token: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    /// Every parameter under its official name, in the order the build asked for them.
    params: Vec<(String, Tensor)>,
    /// Resampling taps per grid size: a function of shapes only, never stale.
    resamplers: Arc<ResamplerCache>,
    /// Inference fusions ([`Self::fuse_for_inference`]); only ever set on immutable weights.
    fused: Option<Arc<Fused>>,
    /// Whether the weights can change in place (`Var`s, or a detached view of them).
    mutable: bool,
    /// The activations' dtype when it differs from the weights' ([`Self::set_compute_dtype`]).
    compute_dtype: Option<DType>,
}

/// What [`DinoVisionTransformer::fuse_for_inference`] precomputes from immutable weights.
#[derive(Debug)]
struct Fused {
    /// Per block, the linear layers packed for the CPU GEMM with LayerScale folded into the output layers (for
    /// the CPU f32 kernels; `None` for other devices and dtypes, whose forwards do not use them).
    folded: Option<Vec<PackedBlock>>,
    /// Interpolated position tables per `(h, w, square input)`.
    pos: Mutex<HashMap<(usize, usize, bool), Tensor>>,
}

impl DinoVisionTransformer {
    /// Builds the backbone from `vb` at the model's root: `cls_token`, `pos_embed`, `register_tokens`,
    /// `mask_token`, `patch_embed.*`, `blocks.{i}.*`, `norm.*` (the official names), with the official
    /// initialisation as init hints (see [`crate::init`]).
    ///
    /// The model is not fused (see [`Self::fuse_for_inference`]); a checkpoint with unexpected keys is not
    /// detected here (see [`Self::check_state_dict`]).
    ///
    /// A model inside a larger one takes a prefixed builder:
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small().with_registers(4);
    /// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28);
    /// let varmap = VarMap::new();
    /// let vb = dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu);
    /// let student = DinoVisionTransformer::new(&cfg, vb.pp("student").pp("backbone"))?;
    /// assert!(varmap.data().lock().unwrap().contains_key("student.backbone.register_tokens"));
    /// assert_eq!(student.named_parameters()[0].0, "cls_token"); // names relative to the backbone
    /// assert!(!student.is_fused());
    /// # Ok(()) }
    /// ```
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (vb, seen) = Recorder::wrap(vb);
        let (d, r) = (cfg.embed_dim, cfg.num_register_tokens);
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", NORMAL_1E6)?;
        let pos_embed =
            vb.get_with_hints((1, cfg.num_pos_tokens(), d), "pos_embed", TRUNC_NORMAL_002)?;
        let register_tokens = (r > 0)
            .then(|| vb.get_with_hints((1, r, d), "register_tokens", NORMAL_1E6))
            .transpose()?;
        let mask_token = vb.get_with_hints((1, d), "mask_token", ZEROS)?;
        let patch_embed = PatchEmbed::new(cfg, vb.pp("patch_embed"))?;
        let vb_blocks = vb.pp("blocks");
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, cfg.drop_path_rate_of_block(i), vb_blocks.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm"))?;
        let params = std::mem::take(
            &mut *seen
                .lock()
                .map_err(|_| Error::invalid("vb", "parameter recorder lock poisoned"))?,
        );
        let mutable = params.iter().any(|(_, t)| t.is_variable() || t.track_op());
        Ok(DinoVisionTransformer {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            register_tokens,
            mask_token,
            blocks,
            norm,
            params,
            resamplers: Arc::default(),
            fused: None,
            mutable,
            compute_dtype: None,
        })
    }

    /// Every parameter a model of configuration `cfg` has, `(official name, shape)` in the official
    /// state-dict order, read off a build (nothing is allocated).
    ///
    /// ```
    /// let shapes = dinov2_model::DinoVisionTransformer::parameter_shapes(&dinov2_model::VitConfig::vit_small())?;
    /// assert_eq!(shapes.len(), 175); // the key count of dinov2_vits14_pretrain.pth
    /// assert_eq!(shapes[1], ("pos_embed".to_string(), vec![1, 1370, 384]));
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn parameter_shapes(cfg: &VitConfig) -> Result<Vec<(String, Vec<usize>)>> {
        meta_build(|vb| Self::new(cfg, vb))
    }

    /// Strict check of `sd` against `cfg`, as the official `load_state_dict(strict=True)`: every parameter
    /// present with its shape ([`Error::MissingKey`], [`Error::ShapeMismatch`]) and no key the model does not
    /// use ([`Error::UnexpectedKey`]). Each error names the key and the shapes.
    ///
    /// ```
    /// use dinov2_model::{DinoVisionTransformer, Error, VitConfig};
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let mut sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// DinoVisionTransformer::check_state_dict(&cfg, &sd)?;
    /// sd.remove("norm.bias");
    /// let err = DinoVisionTransformer::check_state_dict(&cfg, &sd).unwrap_err();
    /// assert!(matches!(err, Error::MissingKey { ref key, ref expected } if key == "norm.bias" && expected == &[384]));
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn check_state_dict(cfg: &VitConfig, sd: &StateDict) -> Result<()> {
        let expected = Self::parameter_shapes(cfg)?;
        for (name, shape) in &expected {
            sd.get_shaped(name, shape)?;
        }
        let names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some((k, t)) = sd.iter().find(|(k, _)| !names.contains(k.as_str())) {
            return Err(Error::UnexpectedKey {
                key: k.clone(),
                shape: t.dims().to_vec(),
                hint: format!(
                    "the configuration has depth {}, {} register tokens, a {:?} FFN, biases qkv/proj/ffn \
                     {}/{}/{}, LayerScale {}",
                    cfg.depth,
                    cfg.num_register_tokens,
                    cfg.ffn,
                    cfg.qkv_bias,
                    cfg.proj_bias,
                    cfg.ffn_bias,
                    cfg.layer_scale_init.is_some()
                ),
            });
        }
        Ok(())
    }

    /// An inference model from official-named weights, converted to `dtype` on `device`: strictly checked
    /// ([`Self::check_state_dict`]), built through [`StateDict::var_builder`] (constants: `Var`s are
    /// copied), and fused for inference. The tensors must not be views of `Var`s made with `detach` (the fused
    /// weights would not follow their in-place updates): take a trainable model's weights with
    /// [`Self::state_dict`], which copies them.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?; // or `weights::load_weights(path)?.state_dict`
    /// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// assert!(model.is_fused());
    /// // The fusions do not change the function: same features as the plain build, up to rounding.
    /// let plain = DinoVisionTransformer::new(&cfg, sd.var_builder(DType::F32, &Device::Cpu))?;
    /// let x = (Tensor::arange(0f32, 3. * 28. * 42., &Device::Cpu)? * 0.01)?.sin()?.reshape((1, 3, 28, 42))?;
    /// let (a, b) = (model.forward_features(&x, None)?, plain.forward_features(&x, None)?);
    /// let diff = (a.x_prenorm - b.x_prenorm)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    /// assert!(diff < 1e-5);
    /// // In half precision, for instance:
    /// let bf16 = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::BF16)?;
    /// assert_eq!(bf16.forward_features(&x, None)?.x_norm_clstoken.dtype(), DType::BF16);
    /// # Ok(()) }
    /// ```
    pub fn from_state_dict(
        cfg: &VitConfig,
        sd: &StateDict,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::check_state_dict(cfg, sd)?;
        let mut model = Self::new(cfg, sd.var_builder(dtype, device))?;
        model.fuse_for_inference()?;
        Ok(model)
    }

    /// A trainable model: strictly checked, every tensor of `sd` copied into `varmap` as a `Var` (under its
    /// official name, see [`StateDict::to_var_map`]) and the model built on them.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let varmap = VarMap::new();
    /// let model = DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd, &varmap, &Device::Cpu, DType::F32)?;
    /// assert_eq!(varmap.all_vars().len(), sd.len());
    /// assert!(model.named_parameters()[0].1.is_variable());
    /// # Ok(()) }
    /// ```
    pub fn from_state_dict_trainable(
        cfg: &VitConfig,
        sd: &StateDict,
        varmap: &VarMap,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::check_state_dict(cfg, sd)?;
        sd.to_var_map(varmap, "", dtype, device)?;
        Self::new(cfg, VarBuilder::from_varmap(varmap, dtype, device))
    }

    /// Precomputes the inference fusions: every block's linear layers packed once for the CPU GEMM, with
    /// LayerScale folded into `proj` and the FFN output layer (whose GEMMs then accumulate straight into the
    /// residual stream), and a cache of interpolated position tables. Forwards on the CPU in f32 use them whenever no gradient is recorded.
    ///
    /// Only weights that cannot change are fused: a model on `Var`s (or a [`detached`](Self::detached)
    /// view of one) is refused with [`Error::MutableWeights`]; its gradient-free forwards fold on every
    /// call instead, so they always see the current weights.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_model::{DinoVisionTransformer, Error, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let mut model = DinoVisionTransformer::new(&cfg, sd.var_builder(DType::F32, &Device::Cpu))?;
    /// model.fuse_for_inference()?;
    /// assert!(model.is_fused());
    /// let varmap = candle_nn::VarMap::new();
    /// let mut trainable = DinoVisionTransformer::from_state_dict_trainable(&cfg, &sd, &varmap, &Device::Cpu, DType::F32)?;
    /// assert!(matches!(trainable.fuse_for_inference(), Err(Error::MutableWeights)));
    /// # Ok(()) }
    /// ```
    pub fn fuse_for_inference(&mut self) -> Result<()> {
        if self.mutable {
            return Err(Error::MutableWeights);
        }
        let folded = if crate::ops::use_cpu_kernel(&self.cls_token) {
            Some(
                self.blocks
                    .iter()
                    .map(Block::fold)
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        self.fused = Some(Arc::new(Fused {
            folded,
            pos: Mutex::default(),
        }));
        Ok(())
    }

    /// Whether [`Self::fuse_for_inference`] has run.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// assert!(DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?.is_fused());
    /// assert!(!DinoVisionTransformer::new(&cfg, sd.var_builder(DType::F32, &Device::Cpu))?.is_fused());
    /// # Ok(()) }
    /// ```
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// A view of the model with every weight detached (sharing storage, so in-place `Var` updates show
    /// through): its forwards record no gradient graph and take the fused CPU inference path, folding
    /// LayerScale on each call. This is the teacher's forward in self-distillation.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarMap;
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.depth, cfg.img_size) = (1, 28);
    /// let varmap = VarMap::new();
    /// let teacher = DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
    /// let x = Tensor::zeros((1, 3, 28, 28), DType::F32, &Device::Cpu)?;
    /// assert!(teacher.forward_features(&x, None)?.x_prenorm.track_op()); // graph through the Vars
    /// assert!(!teacher.detached().forward_features(&x, None)?.x_prenorm.track_op());
    /// # Ok(()) }
    /// ```
    pub fn detached(&self) -> Self {
        let opt = |t: &Option<Tensor>| t.as_ref().map(Tensor::detach);
        DinoVisionTransformer {
            cfg: self.cfg.clone(),
            patch_embed: self.patch_embed.detached(),
            cls_token: self.cls_token.detach(),
            pos_embed: self.pos_embed.detach(),
            register_tokens: opt(&self.register_tokens),
            mask_token: self.mask_token.detach(),
            blocks: self.blocks.iter().map(Block::detached).collect(),
            norm: self.norm.detached(),
            params: self
                .params
                .iter()
                .map(|(k, t)| (k.clone(), t.detach()))
                .collect(),
            resamplers: self.resamplers.clone(),
            fused: self.fused.clone(),
            mutable: self.mutable,
            compute_dtype: self.compute_dtype,
        }
    }

    /// The configuration.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// assert_eq!(model.config(), &cfg);
    /// assert_eq!(model.config().depth, 2);
    /// # Ok(()) }
    /// ```
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Token width D.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// assert_eq!(model.embed_dim(), 32);
    /// assert_eq!(model.forward_features(&image(1, 28, 28)?, None)?.x_norm_clstoken.dims(), &[1, 32]);
    /// # Ok(()) }
    /// ```
    pub fn embed_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    /// The device the weights live on (inputs are moved there by the caller).
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// assert!(model.device().is_cpu());
    /// # Ok(()) }
    /// ```
    pub fn device(&self) -> &Device {
        self.cls_token.device()
    }

    /// The blocks.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// assert_eq!(model.blocks().len(), cfg.depth);
    /// assert_eq!(model.blocks()[1].attn().proj().weight().dims(), &[32, 32]);
    /// # Ok(()) }
    /// ```
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Runs the forwards in `dtype` whatever the weights' dtype (mixed precision): the input is cast to it, and
    /// every layer casts its weights to its input's dtype, so f32 master weights (`Var`s) compute in bf16 and
    /// receive f32 gradients through the casts. Layer-norm statistics and the softmax reductions stay in f32.
    /// `None` (the default) computes in the weights' dtype.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarMap;
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28);
    /// let varmap = VarMap::new();
    /// let mut model = DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
    /// model.set_compute_dtype(Some(DType::BF16));
    /// let x = Tensor::zeros((1, 3, 28, 28), DType::F32, &Device::Cpu)?;
    /// let out = model.forward_features(&x, None)?;
    /// assert_eq!(out.x_norm_clstoken.dtype(), DType::BF16);
    /// let grads = out.x_norm_clstoken.to_dtype(DType::F32)?.sum_all()?.backward()?;
    /// let w = varmap.data().lock().unwrap()["norm.weight"].clone();
    /// assert_eq!(grads.get(&w).unwrap().dtype(), DType::F32); // f32 gradients for the f32 weights
    /// # Ok(()) }
    /// ```
    pub fn set_compute_dtype(&mut self, dtype: Option<DType>) {
        self.compute_dtype = dtype;
    }

    /// The dtype the forwards compute in: [`Self::set_compute_dtype`]'s, or the weights'.
    ///
    /// ```
    /// # use candle_core::{DType, Device};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 1, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// assert_eq!(model.compute_dtype(), DType::F32);
    /// # Ok(()) }
    /// ```
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype.unwrap_or(self.cls_token.dtype())
    }

    /// Replaces the attention kernel of every block (for example a CUDA varlen kernel; see
    /// [`AttentionBackend`] for writing one).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use dinov2_model::ops::GenericAttention;
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// let mut model = model;
    /// let x = image(2, 28, 28)?;
    /// let fused_kernel = model.forward_features(&x, None)?;
    /// model.set_attention_backend(Arc::new(GenericAttention));
    /// let generic = model.forward_features(&x, None)?;
    /// assert!(max_diff(&fused_kernel.x_prenorm, &generic.x_prenorm)? < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn set_attention_backend(&mut self, backend: Arc<dyn AttentionBackend>) {
        for b in &mut self.blocks {
            b.set_attention_backend(backend.clone());
        }
    }

    /// Parameters under their official names, in the official state-dict order (as the builder handed them
    /// out: `Var`s for a trainable model).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let varmap = VarMap::new();
    /// let model = DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
    /// let params = model.named_parameters();
    /// let names: Vec<&str> = params.iter().take(4).map(|(n, _)| n.as_str()).collect();
    /// assert_eq!(names, ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight"]);
    /// assert_eq!(params.len(), DinoVisionTransformer::parameter_shapes(&cfg)?.len());
    /// assert!(params.iter().all(|(_, t)| t.is_variable())); // trainable: the VarMap's Vars
    /// # Ok(()) }
    /// ```
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The weights as a [`StateDict`] under the official names: a snapshot. For a model on immutable weights
    /// the tensors share storage with the model's; for a model on `Var`s (or a detached view of one) they are
    /// copies, detached from the graph, so later in-place updates do not reach them.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarMap;
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// cfg.depth = 1;
    /// let varmap = VarMap::new();
    /// let model = DinoVisionTransformer::new(&cfg, dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu))?;
    /// let snapshot = model.state_dict()?;
    /// let ones = Tensor::ones(384, DType::F32, &Device::Cpu)?;
    /// varmap.data().lock().unwrap()["norm.bias"].set(&ones)?; // an optimizer step, in place
    /// let sum = |t: &Tensor| t.sum_all().and_then(|s| s.to_scalar::<f32>());
    /// assert_eq!(sum(snapshot.get("norm.bias").unwrap())?, 0.0); // the snapshot keeps the old value
    /// assert_eq!(sum(model.state_dict()?.get("norm.bias").unwrap())?, 384.0);
    /// # Ok(()) }
    /// ```
    pub fn state_dict(&self) -> Result<StateDict> {
        self.params
            .iter()
            .map(|(k, t)| {
                let t = if self.mutable {
                    t.detach().copy()?
                } else {
                    t.clone()
                };
                Ok((k.clone(), t))
            })
            .collect()
    }

    /// Position table for an `h × w` grid of a `pixels` input (cached when the model is fused).
    fn pos_embed_for(&self, grid: (usize, usize), pixels: (usize, usize)) -> Result<Tensor> {
        let key = (grid.0, grid.1, pixels.0 == pixels.1);
        let cache = self.fused.as_ref().map(|f| &f.pos);
        if let Some(t) = cache.and_then(|c| c.lock().ok().and_then(|c| c.get(&key).cloned())) {
            return Ok(t);
        }
        let t = interpolate_pos_embed(
            &self.pos_embed,
            grid,
            pixels,
            self.cfg.interpolation,
            Some(&self.resamplers),
        )?;
        if let Some(Ok(mut c)) = cache.map(|c| c.lock()) {
            c.insert(key, t.clone());
        }
        Ok(t)
    }

    /// Patch embedding, optional mask tokens, CLS, positions, registers: `[B, 1 + R + N, D]` and the grid.
    /// `masks` is `[B, N]` (any dtype, nonzero = masked); another shape is [`Error::MaskShape`].
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// let (tokens, grid) = model.prepare_tokens(&image(2, 28, 42)?, None)?;
    /// assert_eq!((tokens.dims(), grid), (&[2, 1 + 6, 32][..], (2, 3)));
    /// // Every patch masked: the tokens no longer depend on the image.
    /// let all = Tensor::ones((1, 6), DType::U8, &Device::Cpu)?;
    /// let (a, _) = model.prepare_tokens(&image(1, 28, 42)?, Some(&all))?;
    /// let (b, _) = model.prepare_tokens(&Tensor::zeros((1, 3, 28, 42), DType::F32, &Device::Cpu)?, Some(&all))?;
    /// assert_eq!(max_diff(&a, &b)?, 0.0);
    /// # Ok(()) }
    /// ```
    pub fn prepare_tokens(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, (usize, usize))> {
        let (b, _, hp, wp) = x.dims4()?;
        let x = x.to_dtype(self.compute_dtype())?;
        let (t, grid) = self.patch_embed.forward_grid(&x)?;
        let (_, n, d) = t.dims3()?;
        let t = match masks {
            Some(m) => {
                if m.dims() != [b, n] {
                    return Err(Error::MaskShape {
                        expected: vec![b, n],
                        actual: m.dims().to_vec(),
                    });
                }
                let cond = m
                    .to_device(t.device())?
                    .ne(0u8)?
                    .unsqueeze(2)?
                    .broadcast_as((b, n, d))?;
                let tok = ops::cast_like(&self.mask_token, &t)?
                    .reshape((1, 1, d))?
                    .broadcast_as((b, n, d))?;
                cond.where_cond(&tok, &t)?
            }
            None => t,
        };
        let cls = ops::cast_like(&self.cls_token, &t)?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &t], 1)?;
        let x = x.broadcast_add(&ops::cast_like(&self.pos_embed_for(grid, (hp, wp))?, &x)?)?;
        let x = match &self.register_tokens {
            Some(reg) => {
                let r = reg.dim(1)?;
                Tensor::cat(
                    &[
                        &x.narrow(1, 0, 1)?,
                        &ops::cast_like(reg, &x)?.broadcast_as((b, r, d))?,
                        &x.narrow(1, 1, n)?,
                    ],
                    1,
                )?
            }
            None => x,
        };
        Ok((x, grid))
    }

    /// Runs the blocks over packed rows, calling `visit(block, rows_before, rows_after)` after each; stops
    /// after block `until` (inclusive) when given. Stochastic depth when `drop_path_rng` is given.
    fn run_blocks(
        &self,
        mut rows: Tensor,
        packing: &Packing,
        until: Option<usize>,
        mut drop_path_rng: Option<&mut dyn RngCore>,
        mut visit: impl FnMut(usize, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let last = until.unwrap_or(self.blocks.len().saturating_sub(1));
        let layout = packing.layout();
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            let folded = self
                .fused
                .as_ref()
                .and_then(|f| f.folded.as_ref())
                .map(|f| &f[i]);
            let rng = drop_path_rng.as_mut().map(|r| &mut **r as &mut dyn RngCore);
            let next = blk.forward_rows(&rows, packing, &layout, rng, folded)?;
            visit(i, &rows, &next)?;
            rows = next;
        }
        Ok(rows)
    }

    /// [`Self::run_blocks`] on a uniform batch of tokens `[B, T, D]`; the result is `[B, T, D]` too.
    fn run_batch(
        &self,
        tokens: &Tensor,
        until: Option<usize>,
        drop_path_rng: Option<&mut dyn RngCore>,
        visit: impl FnMut(usize, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let (b, t, d) = tokens.dims3()?;
        let rows = self.run_blocks(
            tokens.reshape((b * t, d))?,
            &Packing::uniform(b, t),
            until,
            drop_path_rng,
            visit,
        )?;
        Ok(rows.reshape((b, t, d))?)
    }

    fn split_features(
        &self,
        prenorm: Tensor,
        masks: Option<&Tensor>,
        grid: (usize, usize),
    ) -> Result<Features> {
        let r = self.cfg.num_register_tokens;
        let (_, t, _) = prenorm.dims3()?;
        let normed = self.norm.forward(&prenorm)?;
        Ok(Features {
            x_norm_clstoken: normed.narrow(1, 0, 1)?.squeeze(1)?,
            x_norm_regtokens: normed.narrow(1, 1, r)?,
            x_norm_patchtokens: normed.narrow(1, 1 + r, t - 1 - r)?,
            x_prenorm: prenorm,
            masks: masks.cloned(),
            grid,
        })
    }

    /// The official `forward_features(x, masks)` in eval mode: `x` is `[B, 3, H, W]` with H and W multiples
    /// of the patch size; `masks` (optional, `[B, N]`, nonzero = masked) replaces patch tokens by the mask
    /// token.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// let x = image(2, 28, 28)?;
    /// let masks = Tensor::new(&[[1u8, 0, 0, 0], [0, 0, 0, 0]], &Device::Cpu)?; // mask patch 0 of image 0
    /// let f = model.forward_features(&x, Some(&masks))?;
    /// assert_eq!(f.x_norm_patchtokens.dims(), &[2, 4, 32]);
    /// let plain = model.forward_features(&x, None)?;
    /// assert!(max_diff(&f.x_norm_clstoken.get(0)?, &plain.x_norm_clstoken.get(0)?)? > 0.0);
    /// assert_eq!(max_diff(&f.x_norm_clstoken.get(1)?, &plain.x_norm_clstoken.get(1)?)?, 0.0);
    /// # Ok(()) }
    /// ```
    pub fn forward_features(&self, x: &Tensor, masks: Option<&Tensor>) -> Result<Features> {
        self.forward_features_t(x, masks, None)
    }

    /// [`Self::forward_features`] in training mode when `drop_path_rng` is given: stochastic depth (the
    /// official `model.train()`) drawn from the caller's generator, which a trainer can checkpoint.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::rand::{rngs::StdRng, SeedableRng};
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.depth, cfg.img_size, cfg.drop_path_rate, cfg.drop_path_uniform) = (2, 28, 0.5, true);
    /// let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// let x = (Tensor::arange(0f32, 4. * 3. * 28. * 28., &Device::Cpu)? * 0.01)?.sin()?.reshape((4, 3, 28, 28))?;
    /// let run = |rng: Option<&mut StdRng>| -> dinov2_model::Result<Vec<f32>> {
    ///     let rng = rng.map(|r| r as &mut dyn dinov2_model::rand::RngCore);
    ///     let f = model.forward_features_t(&x, None, rng)?;
    ///     Ok(f.x_prenorm.flatten_all()?.to_vec1()?)
    /// };
    /// let mut rng = StdRng::seed_from_u64(1);
    /// let first = run(Some(&mut rng))?;
    /// assert_eq!(first, run(Some(&mut StdRng::seed_from_u64(1)))?); // same generator state, same draw
    /// assert_ne!(first, run(None)?); // `None`: the eval forward, as `forward_features`
    /// # Ok(()) }
    /// ```
    pub fn forward_features_t(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        drop_path_rng: Option<&mut dyn RngCore>,
    ) -> Result<Features> {
        let (tokens, grid) = self.prepare_tokens(x, masks)?;
        let prenorm = self.run_batch(&tokens, None, drop_path_rng, |_, _, _| Ok(()))?;
        self.split_features(prenorm, masks, grid)
    }

    /// The official `forward_features_list` in eval mode: several crop sets of different sizes (2 × 224
    /// globals and 8 × 98 locals, say) in one packed sequence with block-diagonal attention. Equal to calling
    /// [`forward_features`](Self::forward_features) on each, in one pass over the weights. `masks` is empty
    /// or has one entry per input.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// let (globals, locals) = (image(2, 42, 42)?, image(3, 28, 28)?); // 9 and 4 patches each
    /// let both = model.forward_features_list(&[globals.clone(), locals.clone()], &[])?;
    /// assert_eq!(both[0].x_norm_patchtokens.dims(), &[2, 9, 32]);
    /// assert_eq!(both[1].x_norm_patchtokens.dims(), &[3, 4, 32]);
    /// let alone = model.forward_features(&locals, None)?;
    /// assert!(max_diff(&both[1].x_prenorm, &alone.x_prenorm)? < 1e-5);
    /// # Ok(()) }
    /// ```
    pub fn forward_features_list(
        &self,
        xs: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Vec<Features>> {
        self.forward_features_list_t(xs, masks, None)
    }

    /// [`Self::forward_features_list`] in training mode when `drop_path_rng` is given (the student's
    /// forward: batch-subset stochastic depth per crop set, as the official list forward).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::rand::{rngs::StdRng, SeedableRng};
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut cfg = VitConfig::vit_small();
    /// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// (cfg.drop_path_rate, cfg.drop_path_uniform) = (0.4, true);
    /// let varmap = candle_nn::VarMap::new();
    /// let vb = dinov2_model::init::seeded(&varmap, 0, DType::F32, &Device::Cpu);
    /// let student = DinoVisionTransformer::new(&cfg, vb)?;
    /// let globals = Tensor::ones((2, 3, 42, 42), DType::F32, &Device::Cpu)?;
    /// let locals = Tensor::ones((4, 3, 28, 28), DType::F32, &Device::Cpu)?;
    /// let crops = [globals, locals];
    /// let masks = [Some(Tensor::zeros((2, 9), DType::U8, &Device::Cpu)?), None]; // iBOT masks of the globals
    /// let mut rng = StdRng::seed_from_u64(0); // part of the trainer's checkpoint
    /// let out = student.forward_features_list_t(&crops, &masks, Some(&mut rng))?;
    /// assert_eq!((out.len(), out[1].x_norm_clstoken.dims()), (2, &[4, 32][..]));
    /// assert!(out[0].x_norm_clstoken.track_op()); // a graph through the Vars, for backward
    /// # Ok(()) }
    /// ```
    pub fn forward_features_list_t(
        &self,
        xs: &[Tensor],
        masks: &[Option<Tensor>],
        drop_path_rng: Option<&mut dyn RngCore>,
    ) -> Result<Vec<Features>> {
        if !masks.is_empty() && masks.len() != xs.len() {
            return Err(Error::invalid(
                "masks",
                format!(
                    "{} inputs but {} mask entries: give none or one per input",
                    xs.len(),
                    masks.len()
                ),
            ));
        }
        let mut prepared = Vec::with_capacity(xs.len());
        for (i, x) in xs.iter().enumerate() {
            let m = masks.get(i).and_then(|m| m.as_ref());
            prepared.push(self.prepare_tokens(x, m)?);
        }
        let d = self.cfg.embed_dim;
        let mut groups = Vec::new();
        let mut rows = Vec::new();
        for (tok, _) in &prepared {
            let (b, t, _) = tok.dims3()?;
            groups.push((b, t));
            rows.push(tok.reshape((b * t, d))?);
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let packing = Packing {
            groups: groups.clone(),
            is_list: true,
        };
        let out = self.run_blocks(
            Tensor::cat(&rows, 0)?,
            &packing,
            None,
            drop_path_rng,
            |_, _, _| Ok(()),
        )?;
        let mut offset = 0;
        let mut result = Vec::with_capacity(groups.len());
        for (i, &(b, t)) in groups.iter().enumerate() {
            let part = out.narrow(0, offset, b * t)?.reshape((b, t, d))?;
            offset += b * t;
            let m = masks.get(i).and_then(|m| m.as_ref());
            result.push(self.split_features(part, m, prepared[i].1)?);
        }
        Ok(result)
    }

    /// The official `get_intermediate_layers`: outputs of the selected blocks (in block order), optionally
    /// normalised by the final norm, reshaped to `[B, D, h, w]`, with class tokens. Registers are dropped.
    ///
    /// ```
    /// use dinov2_model::{BlockSelection, IntermediateOptions};
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// let x = image(2, 28, 42)?;
    /// let opts = IntermediateOptions { reshape: true, return_class_token: true, norm: true };
    /// let outs = model.get_intermediate_layers(&x, &BlockSelection::Indices(vec![0, 1]), opts)?;
    /// assert_eq!(outs[0].patch_tokens.dims(), &[2, 32, 2, 3]); // [B, D, h, w]
    /// // The last block, normalised, is the final output of `forward_features`.
    /// let last = &outs[1];
    /// let f = model.forward_features(&x, None)?;
    /// assert!(max_diff(last.class_token.as_ref().unwrap(), &f.x_norm_clstoken)? < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn get_intermediate_layers(
        &self,
        x: &Tensor,
        which: &BlockSelection,
        opts: IntermediateOptions,
    ) -> Result<Vec<IntermediateOutput>> {
        let depth = self.blocks.len();
        let wanted: BTreeSet<usize> = match which {
            BlockSelection::Last(n) => {
                if *n == 0 || *n > depth {
                    return Err(Error::invalid(
                        "which",
                        format!("cannot take the last {n} of {depth} blocks"),
                    ));
                }
                (depth - n..depth).collect()
            }
            BlockSelection::Indices(ix) => {
                let set: BTreeSet<usize> = ix.iter().copied().collect();
                if set.len() != ix.len() || ix.is_empty() {
                    return Err(Error::invalid(
                        "which",
                        format!("block indices {ix:?} must be distinct and non-empty"),
                    ));
                }
                if let Some(&index) = set.iter().find(|&&i| i >= depth) {
                    return Err(Error::BlockIndex { index, depth });
                }
                set
            }
        };
        let (tokens, (h, w)) = self.prepare_tokens(x, None)?;
        let (b, t, d) = tokens.dims3()?;
        let mut raw = Vec::new();
        let last = wanted.iter().next_back().copied();
        self.run_batch(&tokens, last, None, |i, _, out| {
            if wanted.contains(&i) {
                raw.push((i, out.reshape((b, t, d))?));
            }
            Ok(())
        })?;
        let r = self.cfg.num_register_tokens;
        raw.into_iter()
            .map(|(block, out)| {
                let out = if opts.norm {
                    self.norm.forward(&out)?
                } else {
                    out
                };
                let cls = out.narrow(1, 0, 1)?.squeeze(1)?;
                let mut patch = out.narrow(1, 1 + r, t - 1 - r)?;
                if opts.reshape {
                    patch = patch
                        .reshape((b, h, w, d))?
                        .permute((0, 3, 1, 2))?
                        .contiguous()?;
                }
                Ok(IntermediateOutput {
                    block,
                    patch_tokens: patch,
                    class_token: opts.return_class_token.then_some(cls),
                })
            })
            .collect()
    }

    /// Features plus the attention probabilities `[B, heads, T, T]` of the chosen blocks (token order:
    /// CLS, registers, patches). The official code cannot return these (xformers / SDPA hide them).
    ///
    /// ```
    /// use candle_core::D;
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 2, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let image = |b: usize, h: usize, w: usize| -> candle_core::Result<Tensor> {
    /// #     (Tensor::arange(0f32, (b * 3 * h * w) as f32, &Device::Cpu)? * 0.01)?.sin()?.reshape((b, 3, h, w))
    /// # };
    /// # let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
    /// #     (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    /// # };
    /// let x = image(1, 28, 28)?;
    /// let (features, maps) = model.forward_with_attention(&x, &[1])?;
    /// let (block, probs) = &maps[0];
    /// assert_eq!((*block, probs.dims()), (1, &[1, 2, 5, 5][..])); // [B, heads, T, T], T = CLS + 4 patches
    /// let cls_row = probs.get(0)?.get(0)?.get(0)?; // what the class token attends to, head 0
    /// assert!((cls_row.sum(D::Minus1)?.to_scalar::<f32>()? - 1.0).abs() < 1e-5);
    /// assert!(max_diff(&features.x_prenorm, &model.forward_features(&x, None)?.x_prenorm)? < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn forward_with_attention(
        &self,
        x: &Tensor,
        blocks: &[usize],
    ) -> Result<(Features, Vec<(usize, Tensor)>)> {
        let depth = self.blocks.len();
        if let Some(&index) = blocks.iter().find(|&&i| i >= depth) {
            return Err(Error::BlockIndex { index, depth });
        }
        let (tokens, grid) = self.prepare_tokens(x, None)?;
        let b = tokens.dim(0)?;
        let mut maps = Vec::new();
        let prenorm = self.run_batch(&tokens, None, None, |i, before, _| {
            if blocks.contains(&i) {
                let blk = &self.blocks[i];
                let normed = blk.norm1().forward(before)?;
                maps.push((i, blk.attn().probabilities(&normed, b)?));
            }
            Ok(())
        })?;
        Ok((self.split_features(prenorm, None, grid)?, maps))
    }
}

/// The normalised class token `[B, D]` of an eval forward: what the torch-hub backbones return from
/// `model(x)`. (candle's blanket `ModuleT` is the same eval forward; training with stochastic depth is
/// [`DinoVisionTransformer::forward_features_t`] with the caller's generator.)
impl Module for DinoVisionTransformer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_features(x, None)
            .map(|f| f.x_norm_clstoken)
            .map_err(Error::into_candle)
    }
}
