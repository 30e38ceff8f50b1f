//! [`DinoVisionTransformer`]: the DINOv2 backbone (`dinov2/models/vision_transformer.py`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::config::VitConfig;
use crate::error::{Error, Result};
use crate::layers::{Block, LayerNorm, Packing, PatchEmbed, SharedBackend, TrainContext};
use crate::ops::{AttentionBackend, CpuFusedAttention};
use crate::pos_embed::{interpolate_pos_embed, ResamplerCache};
use crate::state_dict::StateDict;

/// Outputs of [`DinoVisionTransformer::forward_features`], named as the official dict.
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockSelection {
    /// The last `n` blocks (official `n: int`).
    Last(usize),
    /// These 0-based block indices (official `n: Sequence`); outputs come in block order.
    Indices(Vec<usize>),
}

/// Options of [`DinoVisionTransformer::get_intermediate_layers`] (official defaults: all false but `norm`).
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
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::{DinoVisionTransformer, VitConfig};
/// # fn main() -> dinov2_model::Result<()> {
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) = (32, 2, 2, 56); // tiny for the example
/// let model = DinoVisionTransformer::new_random(&cfg, &Device::Cpu, DType::F32, 0)?;
/// let x = Tensor::zeros((2, 3, 42, 70), DType::F32, &Device::Cpu)?; // any multiple of 14
/// let f = model.forward_features(&x, None)?;
/// assert_eq!(f.x_norm_patchtokens.dims(), &[2, 15, 32]); // 3 x 5 patches
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DinoVisionTransformer {
    cfg: VitConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    register_tokens: Option<Tensor>,
    mask_token: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    backend: SharedBackend,
    resamplers: ResamplerCache,
    pos_cache: Mutex<HashMap<(usize, usize, bool), Tensor>>,
    training: bool,
    rng: Mutex<StdRng>,
    vars: Vec<(String, Var)>,
}

impl DinoVisionTransformer {
    /// Builds an inference model from official-named weights, converted to `dtype` on `device`.
    ///
    /// Loading is strict, like the official hub code: a missing or wrongly shaped weight and a
    /// backbone weight the configuration does not use are typed errors naming the key. `mask_token`
    /// may be absent (timm drops it); it then starts at zero, its official initial value.
    pub fn from_state_dict(
        cfg: &VitConfig,
        sd: &StateDict,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(cfg, sd, device, dtype, false)
    }

    /// Like [`from_state_dict`](Self::from_state_dict), with every parameter a trainable [`Var`].
    pub fn from_state_dict_trainable(
        cfg: &VitConfig,
        sd: &StateDict,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(cfg, sd, device, dtype, true)
    }

    /// A trainable model with the official initialisation (see [`crate::init`]).
    pub fn new_random(cfg: &VitConfig, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        let sd = crate::init::init_state_dict(cfg, seed)?;
        let mut m = Self::build(cfg, &sd, device, dtype, true)?;
        m.set_seed(seed);
        Ok(m)
    }

    fn build(
        cfg: &VitConfig,
        sd: &StateDict,
        device: &Device,
        dtype: DType,
        trainable: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        let mut converted = StateDict::new();
        let mut vars = Vec::new();
        for (k, t) in sd.iter() {
            let t = t.to_device(device)?.to_dtype(dtype)?;
            if trainable {
                let v = Var::from_tensor(&t)?;
                converted.insert(k.clone(), v.as_tensor().clone());
                vars.push((k.clone(), v));
            } else {
                converted.insert(k.clone(), t);
            }
        }
        if !converted.contains("mask_token") {
            let z = Tensor::zeros((1, d), dtype, device)?;
            if trainable {
                let v = Var::from_tensor(&z)?;
                converted.insert("mask_token", v.as_tensor().clone());
                vars.push(("mask_token".to_string(), v));
            } else {
                converted.insert("mask_token", z);
            }
        }
        let sd = &converted;
        let r = cfg.num_register_tokens;
        let model = DinoVisionTransformer {
            patch_embed: PatchEmbed::load(sd, cfg)?,
            cls_token: sd.get_shaped("cls_token", &[1, 1, d])?.clone(),
            pos_embed: sd
                .get_shaped("pos_embed", &[1, cfg.num_pos_tokens(), d])?
                .clone(),
            register_tokens: if r > 0 {
                Some(sd.get_shaped("register_tokens", &[1, r, d])?.clone())
            } else {
                None
            },
            mask_token: sd.get_shaped("mask_token", &[1, d])?.clone(),
            blocks: (0..cfg.depth)
                .map(|i| Block::load(sd, i, cfg))
                .collect::<Result<_>>()?,
            norm: LayerNorm::load(sd, "norm", d, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
            backend: Arc::new(CpuFusedAttention),
            resamplers: ResamplerCache::default(),
            pos_cache: Mutex::new(HashMap::new()),
            training: false,
            rng: Mutex::new(StdRng::seed_from_u64(0)),
            vars: Vec::new(),
        };
        let used: BTreeSet<String> = model
            .named_parameters()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for (k, t) in sd.iter() {
            if !used.contains(k) {
                return Err(Error::UnexpectedKey {
                    key: k.clone(),
                    shape: t.dims().to_vec(),
                    hint: format!(
                        "depth {}, {} registers, ffn {:?}, layer scale {}",
                        cfg.depth,
                        cfg.num_register_tokens,
                        cfg.ffn,
                        cfg.layer_scale_init.is_some()
                    ),
                });
            }
        }
        let mut model = model;
        if trainable {
            let order: Vec<String> = model
                .named_parameters()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            let mut by_name: HashMap<String, Var> = vars.into_iter().collect();
            model.vars = order
                .into_iter()
                .filter_map(|k| by_name.remove(&k).map(|v| (k, v)))
                .collect();
        }
        Ok(model)
    }

    /// The configuration.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Token width D.
    pub fn embed_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    /// Replaces the attention kernel (for example a CUDA varlen kernel).
    pub fn set_attention_backend(&mut self, backend: Arc<dyn AttentionBackend>) {
        self.backend = backend;
    }

    /// Training mode enables stochastic depth (the official `model.train()`).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether training mode is on.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Seeds the drop-path random stream.
    pub fn set_seed(&mut self, seed: u64) {
        self.rng = Mutex::new(StdRng::seed_from_u64(seed));
    }

    /// Parameters in the official state-dict order, under their official names.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("cls_token".to_string(), self.cls_token.clone()),
            ("pos_embed".to_string(), self.pos_embed.clone()),
        ];
        if let Some(r) = &self.register_tokens {
            out.push(("register_tokens".to_string(), r.clone()));
        }
        out.push(("mask_token".to_string(), self.mask_token.clone()));
        out.push((
            "patch_embed.proj.weight".to_string(),
            self.patch_embed.weight.clone(),
        ));
        out.push((
            "patch_embed.proj.bias".to_string(),
            self.patch_embed.bias.clone(),
        ));
        for (i, b) in self.blocks.iter().enumerate() {
            b.named(i, &mut out);
        }
        self.norm.named("norm", &mut out);
        out
    }

    /// The trainable variables (empty for an inference model), in official order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The weights as a [`StateDict`] (official names).
    pub fn state_dict(&self) -> StateDict {
        self.named_parameters().into_iter().collect()
    }

    /// Position table for an `h × w` grid of a `pixels` input, cached for inference models.
    fn pos_embed_for(&self, grid: (usize, usize), pixels: (usize, usize)) -> Result<Tensor> {
        let key = (grid.0, grid.1, pixels.0 == pixels.1);
        let cacheable = !self.pos_embed.track_op();
        if cacheable {
            if let Some(t) = self
                .pos_cache
                .lock()
                .ok()
                .and_then(|c| c.get(&key).cloned())
            {
                return Ok(t);
            }
        }
        let t = interpolate_pos_embed(
            &self.pos_embed,
            grid,
            pixels,
            self.cfg.interpolation,
            Some(&self.resamplers),
        )?;
        if cacheable {
            if let Ok(mut c) = self.pos_cache.lock() {
                c.insert(key, t.clone());
            }
        }
        Ok(t)
    }

    /// Patch embedding, optional mask tokens, CLS, positions, registers: `[B, 1 + R + N, D]` and the grid.
    pub fn prepare_tokens(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, (usize, usize))> {
        let (b, _, hp, wp) = x.dims4()?;
        let x = x.to_dtype(self.cls_token.dtype())?;
        let (t, grid) = self.patch_embed.forward(&x)?;
        let (_, n, d) = t.dims3()?;
        let t = match masks {
            Some(m) => {
                if m.dims() != [b, n] {
                    return Err(Error::invalid(format!(
                        "masks have shape {:?}, expected [{b}, {n}] (batch, patches)",
                        m.dims()
                    )));
                }
                let cond = m
                    .to_device(t.device())?
                    .ne(0u8)?
                    .unsqueeze(2)?
                    .broadcast_as((b, n, d))?;
                let tok = self
                    .mask_token
                    .reshape((1, 1, d))?
                    .broadcast_as((b, n, d))?;
                cond.where_cond(&tok, &t)?
            }
            None => t,
        };
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &t], 1)?;
        let x = x.broadcast_add(&self.pos_embed_for(grid, (hp, wp))?)?;
        let x = match &self.register_tokens {
            Some(reg) => {
                let r = reg.dim(1)?;
                Tensor::cat(
                    &[
                        &x.narrow(1, 0, 1)?,
                        &reg.broadcast_as((b, r, d))?,
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
    /// after block `until` (inclusive) when given.
    fn run_blocks(
        &self,
        mut rows: Tensor,
        packing: &Packing,
        until: Option<usize>,
        mut visit: impl FnMut(usize, &Tensor, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let mut guard = if self.training {
            Some(
                self.rng
                    .lock()
                    .map_err(|_| Error::invalid("drop-path RNG poisoned"))?,
            )
        } else {
            None
        };
        let mut ctx = guard.as_mut().map(|g| TrainContext { rng: &mut **g });
        let last = until.unwrap_or(self.blocks.len().saturating_sub(1));
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            let next = blk.forward(&rows, packing, self.backend.as_ref(), ctx.as_mut())?;
            visit(i, &rows, &next)?;
            rows = next;
        }
        Ok(rows)
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

    /// The official `forward_features(x, masks)`: `x` is `[B, 3, H, W]` with H and W multiples of the
    /// patch size; `masks` (optional, `[B, N]`, nonzero = masked) replaces patch tokens by the mask token.
    pub fn forward_features(&self, x: &Tensor, masks: Option<&Tensor>) -> Result<Features> {
        let (tokens, grid) = self.prepare_tokens(x, masks)?;
        let (b, t, d) = tokens.dims3()?;
        let packing = Packing {
            groups: vec![(b, t)],
            is_list: false,
        };
        let rows = self.run_blocks(
            tokens.reshape((b * t, d))?,
            &packing,
            None,
            |_, _, _| Ok(()),
        )?;
        self.split_features(rows.reshape((b, t, d))?, masks, grid)
    }

    /// The normalised class token `[B, D]`: what the torch-hub backbones return from `model(x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_features(x, None)?.x_norm_clstoken)
    }

    /// The official `forward_features_list`: several crop sets of different sizes (2 × 224 globals and
    /// 8 × 98 locals, say) in one packed sequence with block-diagonal attention. Equal to calling
    /// [`forward_features`](Self::forward_features) on each, in one pass over the weights.
    pub fn forward_features_list(
        &self,
        xs: &[Tensor],
        masks: &[Option<Tensor>],
    ) -> Result<Vec<Features>> {
        if !masks.is_empty() && masks.len() != xs.len() {
            return Err(Error::invalid(format!(
                "{} inputs but {} mask entries",
                xs.len(),
                masks.len()
            )));
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
        let out = self.run_blocks(Tensor::cat(&rows, 0)?, &packing, None, |_, _, _| Ok(()))?;
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
                    return Err(Error::invalid(format!(
                        "cannot take the last {n} of {depth} blocks"
                    )));
                }
                (depth - n..depth).collect()
            }
            BlockSelection::Indices(ix) => {
                let set: BTreeSet<usize> = ix.iter().copied().collect();
                if set.len() != ix.len() || ix.is_empty() {
                    return Err(Error::invalid(format!(
                        "block indices {ix:?} must be distinct and non-empty"
                    )));
                }
                if let Some(&bad) = set.iter().find(|&&i| i >= depth) {
                    return Err(Error::invalid(format!(
                        "block index {bad} is past the depth {depth}"
                    )));
                }
                set
            }
        };
        let (tokens, (h, w)) = self.prepare_tokens(x, None)?;
        let (b, t, d) = tokens.dims3()?;
        let packing = Packing {
            groups: vec![(b, t)],
            is_list: false,
        };
        let mut raw = Vec::new();
        let last = wanted.iter().next_back().copied();
        self.run_blocks(tokens.reshape((b * t, d))?, &packing, last, |i, _, out| {
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
    pub fn forward_with_attention(
        &self,
        x: &Tensor,
        blocks: &[usize],
    ) -> Result<(Features, Vec<(usize, Tensor)>)> {
        let depth = self.blocks.len();
        if let Some(&bad) = blocks.iter().find(|&&i| i >= depth) {
            return Err(Error::invalid(format!(
                "block index {bad} is past the depth {depth}"
            )));
        }
        let (tokens, grid) = self.prepare_tokens(x, None)?;
        let (b, t, d) = tokens.dims3()?;
        let packing = Packing {
            groups: vec![(b, t)],
            is_list: false,
        };
        let mut maps = Vec::new();
        let rows = self.run_blocks(
            tokens.reshape((b * t, d))?,
            &packing,
            None,
            |i, before, _| {
                if blocks.contains(&i) {
                    let blk = &self.blocks[i];
                    maps.push((i, blk.attn.probabilities(&blk.norm1.forward(before)?, b)?));
                }
                Ok(())
            },
        )?;
        Ok((
            self.split_features(rows.reshape((b, t, d))?, None, grid)?,
            maps,
        ))
    }
}
