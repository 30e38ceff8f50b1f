//! Model configuration: [`VitConfig`] for any size, and the eight official backbones.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Feed-forward block of a transformer layer.
///
/// ```
/// use dinov2_model::{FfnKind, VitConfig};
/// assert_eq!(VitConfig::vit_large().ffn, FfnKind::Mlp);
/// assert_eq!(VitConfig::vit_giant2().ffn, FfnKind::Swiglu);
/// assert_eq!(serde_json::to_string(&FfnKind::Swiglu).unwrap(), r#""swiglu""#); // as in config JSON
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FfnKind {
    /// `fc1` → exact (erf) GELU → `fc2` (ViT-S/B/L).
    Mlp,
    /// Packed SwiGLU: `w12` → silu(first half) · second half → `w3` (ViT-g).
    Swiglu,
}

/// How the learned position table is resampled to another patch grid.
///
/// The official code has two bicubic paths, and which one a model uses is part of the model
/// (it was trained with it), not of the weight format:
/// * non-register models: `scale_factor = (n + offset) / M` with offset 0.1, no antialias (A = -0.75, clamped taps);
/// * register models: `size = n`, antialias on (A = -0.5, renormalised taps, PIL-style support).
///
/// ```
/// use dinov2_model::{PosEmbedInterpolation, VitConfig};
/// let plain = VitConfig::vit_small().interpolation;
/// assert_eq!(plain, PosEmbedInterpolation { offset: 0.1, antialias: false });
/// let reg = VitConfig::vit_small().with_registers(4).interpolation;
/// assert_eq!(reg, PosEmbedInterpolation { offset: 0.0, antialias: true });
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PosEmbedInterpolation {
    /// Offset added to the target grid before computing the scale factor; 0 selects the size path.
    pub offset: f64,
    /// Antialiased bicubic (`_upsample_bicubic2d_aa`).
    pub antialias: bool,
}

/// Architecture of a DINOv2 vision transformer. Every field has the official meaning
/// (`dinov2/models/vision_transformer.py`).
///
/// Start from an official size and change fields; [`validate`](Self::validate) checks the result (every
/// model constructor calls it). The struct (de)serialises with serde, field for field.
///
/// ```
/// use dinov2_model::VitConfig;
/// let mut cfg = VitConfig::vit_small();
/// (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (64, 4, 2, 56); // a tiny custom model
/// cfg.validate()?;
/// assert_eq!((cfg.head_dim(), cfg.pos_grid(), cfg.ffn_hidden_dim()), (16, 4, 256));
/// let json = serde_json::to_string(&cfg).unwrap();
/// assert_eq!(serde_json::from_str::<VitConfig>(&json).unwrap(), cfg);
/// # Ok::<(), dinov2_model::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Image size the position table was trained at (518 for the released weights): the table has
    /// `(img_size / patch_size)^2 + 1` rows.
    pub img_size: usize,
    /// Patch size (14 for every released model).
    pub patch_size: usize,
    /// Input channels.
    pub in_chans: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads (head dim = embed_dim / num_heads).
    pub num_heads: usize,
    /// FFN hidden size ratio (4 for all released models; SwiGLU rounds the hidden size, see [`VitConfig::ffn_hidden_dim`]).
    pub mlp_ratio: f64,
    /// FFN kind.
    pub ffn: FfnKind,
    /// Bias in the fused qkv projection.
    pub qkv_bias: bool,
    /// Bias in the attention output projection.
    pub proj_bias: bool,
    /// Biases in the FFN linears.
    pub ffn_bias: bool,
    /// LayerScale initial value; `None` means no LayerScale parameters (`ls1`/`ls2`).
    pub layer_scale_init: Option<f64>,
    /// Register tokens (0 or 4 for the released models).
    pub num_register_tokens: usize,
    /// Position-table interpolation of this model.
    pub interpolation: PosEmbedInterpolation,
    /// LayerNorm epsilon (1e-6).
    pub layer_norm_eps: f64,
    /// Stochastic depth rate (training only).
    pub drop_path_rate: f64,
    /// Same drop-path rate for every block (`true` in the official training configs) instead of `linspace(0, rate, depth)`.
    pub drop_path_uniform: bool,
}

impl VitConfig {
    fn base(embed_dim: usize, depth: usize, num_heads: usize, ffn: FfnKind) -> Self {
        VitConfig {
            img_size: 518,
            patch_size: 14,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            ffn,
            qkv_bias: true,
            proj_bias: true,
            ffn_bias: true,
            layer_scale_init: Some(1.0),
            num_register_tokens: 0,
            interpolation: PosEmbedInterpolation {
                offset: 0.1,
                antialias: false,
            },
            layer_norm_eps: 1e-6,
            drop_path_rate: 0.0,
            drop_path_uniform: false,
        }
    }

    /// ViT-S/14 as released (D=384, 12 blocks, 6 heads).
    ///
    /// ```
    /// use dinov2_model::{DinoVisionTransformer, VitConfig};
    /// let cfg = VitConfig::vit_small();
    /// assert_eq!((cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size), (384, 12, 6, 518));
    /// let params: usize = DinoVisionTransformer::parameter_shapes(&cfg)?
    ///     .iter()
    ///     .map(|(_, shape)| shape.iter().product::<usize>())
    ///     .sum();
    /// assert_eq!(params, 22_056_576); // with the 518-pixel position table and the mask token
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn vit_small() -> Self {
        Self::base(384, 12, 6, FfnKind::Mlp)
    }
    /// ViT-B/14 as released (D=768, 12 blocks, 12 heads).
    ///
    /// ```
    /// let cfg = dinov2_model::VitConfig::vit_base();
    /// assert_eq!((cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.head_dim()), (768, 12, 12, 64));
    /// ```
    pub fn vit_base() -> Self {
        Self::base(768, 12, 12, FfnKind::Mlp)
    }
    /// ViT-L/14 as released (D=1024, 24 blocks, 16 heads).
    ///
    /// ```
    /// let cfg = dinov2_model::VitConfig::vit_large();
    /// assert_eq!((cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_hidden_dim()), (1024, 24, 16, 4096));
    /// ```
    pub fn vit_large() -> Self {
        Self::base(1024, 24, 16, FfnKind::Mlp)
    }
    /// ViT-g/14 as released (D=1536, 40 blocks, 24 heads, SwiGLU).
    ///
    /// ```
    /// use dinov2_model::{FfnKind, VitConfig};
    /// let cfg = VitConfig::vit_giant2();
    /// assert_eq!((cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn), (1536, 40, 24, FfnKind::Swiglu));
    /// assert_eq!(cfg.ffn_hidden_dim(), 4096); // SwiGLU: 2/3 of 4·D, rounded up to a multiple of 8
    /// ```
    pub fn vit_giant2() -> Self {
        Self::base(1536, 40, 24, FfnKind::Swiglu)
    }

    /// The same model with `n` register tokens and the register models' interpolation (size path, antialias).
    ///
    /// ```
    /// use dinov2_model::{OfficialModel, VitConfig};
    /// let cfg = VitConfig::vit_base().with_registers(4);
    /// assert_eq!(cfg, "dinov2_vitb14_reg".parse::<OfficialModel>()?.config());
    /// assert!(cfg.interpolation.antialias);
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn with_registers(mut self, n: usize) -> Self {
        self.num_register_tokens = n;
        if n > 0 {
            self.interpolation = PosEmbedInterpolation {
                offset: 0.0,
                antialias: true,
            };
        }
        self
    }

    /// Side of the square position grid stored in the weights (`img_size / patch_size`, 37 for the released models).
    ///
    /// ```
    /// let mut cfg = dinov2_model::VitConfig::vit_small();
    /// assert_eq!(cfg.pos_grid(), 37);
    /// cfg.img_size = 224;
    /// assert_eq!(cfg.pos_grid(), 16);
    /// ```
    pub fn pos_grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Rows of `pos_embed`: one class slot plus the grid.
    ///
    /// ```
    /// assert_eq!(dinov2_model::VitConfig::vit_small().num_pos_tokens(), 1 + 37 * 37);
    /// ```
    pub fn num_pos_tokens(&self) -> usize {
        self.pos_grid() * self.pos_grid() + 1
    }

    /// Width of one attention head.
    ///
    /// ```
    /// assert_eq!(dinov2_model::VitConfig::vit_giant2().head_dim(), 1536 / 24);
    /// ```
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// FFN hidden size: `int(D * mlp_ratio)` for the MLP; for SwiGLU the official rounding
    /// `(int(hidden * 2 / 3) + 7) // 8 * 8` (4096 for ViT-g).
    ///
    /// ```
    /// use dinov2_model::{FfnKind, VitConfig};
    /// let mut cfg = VitConfig::vit_small();
    /// assert_eq!(cfg.ffn_hidden_dim(), 1536);
    /// cfg.ffn = FfnKind::Swiglu;
    /// assert_eq!(cfg.ffn_hidden_dim(), 1024); // int(1536 · 2/3) = 1024, already a multiple of 8
    /// ```
    pub fn ffn_hidden_dim(&self) -> usize {
        let hidden = (self.embed_dim as f64 * self.mlp_ratio) as usize;
        match self.ffn {
            FfnKind::Mlp => hidden,
            FfnKind::Swiglu => (hidden * 2 / 3).div_ceil(8) * 8,
        }
    }

    /// Drop-path rate of block `i` (uniform or `linspace(0, rate, depth)`).
    ///
    /// ```
    /// let mut cfg = dinov2_model::VitConfig::vit_small();
    /// (cfg.depth, cfg.drop_path_rate) = (5, 0.4);
    /// for (i, rate) in [0.0, 0.1, 0.2, 0.3, 0.4].into_iter().enumerate() {
    ///     assert!((cfg.drop_path_rate_of_block(i) - rate).abs() < 1e-12); // linspace(0, 0.4, 5)
    /// }
    /// cfg.drop_path_uniform = true; // the official training configurations
    /// assert_eq!(cfg.drop_path_rate_of_block(0), 0.4);
    /// ```
    pub fn drop_path_rate_of_block(&self, i: usize) -> f64 {
        if self.drop_path_uniform || self.depth <= 1 {
            self.drop_path_rate
        } else {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        }
    }

    /// Checks that the numbers describe a buildable model: an [`Error::InvalidConfig`] naming the field
    /// otherwise.
    ///
    /// ```
    /// use dinov2_model::{Error, VitConfig};
    /// let mut cfg = VitConfig::vit_small();
    /// assert!(cfg.validate().is_ok());
    /// cfg.num_heads = 5;
    /// assert!(matches!(cfg.validate(), Err(Error::InvalidConfig { field: "num_heads", .. })));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let fail = |field: &'static str, reason: String| Err(Error::config(field, reason));
        for (field, v) in [
            ("patch_size", self.patch_size),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("in_chans", self.in_chans),
        ] {
            if v == 0 {
                return fail(field, "must be positive (got 0)".into());
            }
        }
        if self.embed_dim % self.num_heads != 0 {
            return fail(
                "num_heads",
                format!(
                    "{} does not divide embed_dim {}",
                    self.num_heads, self.embed_dim
                ),
            );
        }
        if self.img_size < self.patch_size {
            return fail(
                "img_size",
                format!(
                    "{} is smaller than patch_size {}",
                    self.img_size, self.patch_size
                ),
            );
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return fail(
                "drop_path_rate",
                format!("{} is outside [0, 1)", self.drop_path_rate),
            );
        }
        if self.ffn_hidden_dim() == 0 {
            return fail(
                "mlp_ratio",
                format!("{} makes the FFN hidden size round to zero", self.mlp_ratio),
            );
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return fail(
                "layer_norm_eps",
                format!("must be positive (got {})", self.layer_norm_eps),
            );
        }
        Ok(())
    }
}

/// Size of an official backbone.
///
/// ```
/// use dinov2_model::Arch;
/// let arch = Arch::from_embed_dim(768).unwrap();
/// assert_eq!((arch, arch.letter(), arch.hf_word()), (Arch::Base, 'b', "base"));
/// assert_eq!(arch.config().depth, 12);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Arch {
    /// ViT-S/14, 21 M parameters.
    Small,
    /// ViT-B/14, 86 M parameters.
    Base,
    /// ViT-L/14, 300 M parameters.
    Large,
    /// ViT-g/14, 1.1 B parameters.
    Giant,
}

impl Arch {
    /// Letter used in the official names (`s`, `b`, `l`, `g`).
    ///
    /// ```
    /// assert_eq!(dinov2_model::Arch::Giant.letter(), 'g'); // dinov2_vitg14
    /// ```
    pub fn letter(self) -> char {
        match self {
            Arch::Small => 's',
            Arch::Base => 'b',
            Arch::Large => 'l',
            Arch::Giant => 'g',
        }
    }
    /// Word used in the Hugging Face repository names.
    ///
    /// ```
    /// assert_eq!(dinov2_model::Arch::Large.hf_word(), "large"); // facebook/dinov2-large
    /// ```
    pub fn hf_word(self) -> &'static str {
        match self {
            Arch::Small => "small",
            Arch::Base => "base",
            Arch::Large => "large",
            Arch::Giant => "giant",
        }
    }
    /// Official configuration of this size (without registers).
    ///
    /// ```
    /// use dinov2_model::{Arch, VitConfig};
    /// assert_eq!(Arch::Small.config(), VitConfig::vit_small());
    /// assert_eq!(Arch::Giant.config().num_register_tokens, 0);
    /// ```
    pub fn config(self) -> VitConfig {
        match self {
            Arch::Small => VitConfig::vit_small(),
            Arch::Base => VitConfig::vit_base(),
            Arch::Large => VitConfig::vit_large(),
            Arch::Giant => VitConfig::vit_giant2(),
        }
    }
    /// The size whose width is `embed_dim`, if any.
    ///
    /// ```
    /// use dinov2_model::Arch;
    /// assert_eq!(Arch::from_embed_dim(1024), Some(Arch::Large));
    /// assert_eq!(Arch::from_embed_dim(512), None);
    /// ```
    pub fn from_embed_dim(embed_dim: usize) -> Option<Arch> {
        match embed_dim {
            384 => Some(Arch::Small),
            768 => Some(Arch::Base),
            1024 => Some(Arch::Large),
            1536 => Some(Arch::Giant),
            _ => None,
        }
    }
    const ALL: [Arch; 4] = [Arch::Small, Arch::Base, Arch::Large, Arch::Giant];
}

/// One of the eight released backbones.
///
/// ```
/// use dinov2_model::OfficialModel;
/// let m: OfficialModel = "dinov2_vitb14_reg".parse().unwrap();
/// assert_eq!(m.hf_repo(), "facebook/dinov2-with-registers-base");
/// assert_eq!(m.config().num_register_tokens, 4);
/// assert_eq!("facebook/dinov2-small".parse::<OfficialModel>().unwrap().short_name(), "dinov2_vits14");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OfficialModel {
    /// Backbone size.
    pub arch: Arch,
    /// With 4 register tokens.
    pub registers: bool,
}

impl OfficialModel {
    /// All eight, plain then register models, small to giant.
    ///
    /// ```
    /// let names: Vec<String> = dinov2_model::OfficialModel::all().iter().map(|m| m.short_name()).collect();
    /// assert_eq!(names.len(), 8);
    /// assert_eq!((names[0].as_str(), names[7].as_str()), ("dinov2_vits14", "dinov2_vitg14_reg"));
    /// ```
    pub fn all() -> Vec<OfficialModel> {
        [false, true]
            .iter()
            .flat_map(|&registers| {
                Arch::ALL
                    .iter()
                    .map(move |&arch| OfficialModel { arch, registers })
            })
            .collect()
    }
    /// torch-hub entry point name, e.g. `dinov2_vits14` or `dinov2_vitg14_reg`. Also its `Display`.
    ///
    /// ```
    /// use dinov2_model::{Arch, OfficialModel};
    /// let m = OfficialModel { arch: Arch::Large, registers: true };
    /// assert_eq!(m.short_name(), "dinov2_vitl14_reg");
    /// assert_eq!(m.to_string(), m.short_name());
    /// ```
    pub fn short_name(&self) -> String {
        format!(
            "dinov2_vit{}14{}",
            self.arch.letter(),
            if self.registers { "_reg" } else { "" }
        )
    }
    /// Checkpoint file stem on the official download server, e.g. `dinov2_vits14_reg4_pretrain`.
    ///
    /// ```
    /// use dinov2_model::OfficialModel;
    /// let m: OfficialModel = "dinov2_vits14_reg".parse()?;
    /// assert_eq!(format!("{}.pth", m.checkpoint_stem()), "dinov2_vits14_reg4_pretrain.pth");
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn checkpoint_stem(&self) -> String {
        format!(
            "dinov2_vit{}14{}_pretrain",
            self.arch.letter(),
            if self.registers { "_reg4" } else { "" }
        )
    }
    /// Hugging Face repository holding the `transformers` checkpoint.
    ///
    /// ```
    /// use dinov2_model::OfficialModel;
    /// assert_eq!("dinov2_vitg14".parse::<OfficialModel>()?.hf_repo(), "facebook/dinov2-giant");
    /// assert_eq!(
    ///     "dinov2_vits14_reg".parse::<OfficialModel>()?.hf_repo(),
    ///     "facebook/dinov2-with-registers-small"
    /// );
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn hf_repo(&self) -> String {
        if self.registers {
            format!("facebook/dinov2-with-registers-{}", self.arch.hf_word())
        } else {
            format!("facebook/dinov2-{}", self.arch.hf_word())
        }
    }
    /// The official configuration (img_size 518, LayerScale, registers and interpolation as released).
    ///
    /// ```
    /// use dinov2_model::{OfficialModel, VitConfig};
    /// let cfg = "dinov2_vitl14_reg".parse::<OfficialModel>()?.config();
    /// assert_eq!(cfg, VitConfig::vit_large().with_registers(4));
    /// assert_eq!(cfg.layer_scale_init, Some(1.0));
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    pub fn config(&self) -> VitConfig {
        let c = self.arch.config();
        if self.registers {
            c.with_registers(4)
        } else {
            c
        }
    }
}

impl std::fmt::Display for OfficialModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.short_name())
    }
}

impl std::str::FromStr for OfficialModel {
    type Err = Error;

    /// Accepts official short names (`dinov2_vits14`, `dinov2_vits14_reg`, `dinov2_vits14_reg4`) and
    /// Hub ids (`facebook/dinov2-small`, `facebook/dinov2-with-registers-small`), case-insensitively;
    /// anything else is [`Error::UnknownModel`].
    ///
    /// ```
    /// use dinov2_model::{Arch, Error, OfficialModel};
    /// let m: OfficialModel = "DINOv2_ViTS14_reg4".parse()?;
    /// assert_eq!(m, OfficialModel { arch: Arch::Small, registers: true });
    /// assert_eq!("facebook/dinov2-with-registers-small".parse::<OfficialModel>()?, m);
    /// assert!(matches!("dinov2_vits16".parse::<OfficialModel>(), Err(Error::UnknownModel { .. })));
    /// # Ok::<(), dinov2_model::Error>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        OfficialModel::all()
            .into_iter()
            .find(|m| {
                lower == m.short_name()
                    || lower == m.hf_repo()
                    || (m.registers && lower == format!("dinov2_vit{}14_reg4", m.arch.letter()))
            })
            .ok_or_else(|| Error::UnknownModel {
                spec: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_sizes_match_the_reference_table() {
        let s = VitConfig::vit_small();
        assert_eq!(
            (s.embed_dim, s.depth, s.num_heads, s.ffn_hidden_dim()),
            (384, 12, 6, 1536)
        );
        let g = VitConfig::vit_giant2();
        assert_eq!((g.embed_dim, g.depth, g.num_heads), (1536, 40, 24));
        assert_eq!(g.ffn_hidden_dim(), 4096, "SwiGLU hidden rounding of ViT-g");
        assert_eq!(s.num_pos_tokens(), 1370);
        assert_eq!(s.head_dim(), 64);
    }

    #[test]
    fn register_models_use_the_size_path_with_antialias() {
        let c: OfficialModel = "dinov2_vitl14_reg".parse().unwrap();
        let cfg = c.config();
        assert_eq!(cfg.num_register_tokens, 4);
        assert_eq!(cfg.interpolation.offset, 0.0);
        assert!(cfg.interpolation.antialias);
        let p = OfficialModel {
            arch: Arch::Large,
            registers: false,
        }
        .config();
        assert_eq!(p.interpolation.offset, 0.1);
        assert!(!p.interpolation.antialias);
    }

    #[test]
    fn names_round_trip() {
        for m in OfficialModel::all() {
            assert_eq!(m.short_name().parse::<OfficialModel>().unwrap(), m);
            assert_eq!(m.hf_repo().parse::<OfficialModel>().unwrap(), m);
        }
        assert!(matches!(
            "vit_tiny".parse::<OfficialModel>(),
            Err(Error::UnknownModel { .. })
        ));
        assert_eq!(
            OfficialModel {
                arch: Arch::Giant,
                registers: true
            }
            .checkpoint_stem(),
            "dinov2_vitg14_reg4_pretrain"
        );
    }

    #[test]
    fn drop_path_schedule() {
        let mut c = VitConfig::vit_small();
        c.drop_path_rate = 0.3;
        assert_eq!(c.drop_path_rate_of_block(0), 0.0);
        assert!((c.drop_path_rate_of_block(11) - 0.3).abs() < 1e-12);
        c.drop_path_uniform = true;
        assert_eq!(c.drop_path_rate_of_block(0), 0.3);
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut c = VitConfig::vit_small();
        c.num_heads = 5;
        assert!(matches!(c.validate(), Err(Error::InvalidConfig { .. })));
    }
}
