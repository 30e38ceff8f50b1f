//! The official linear classifier heads (`dinov2/hub/classifiers.py`, the `_lc` torch-hub models).
//!
//! * `layers = 1`: input `concat(x_norm_clstoken, mean(x_norm_patchtokens))`, `2·D` wide (also the
//!   Hugging Face `Dinov2ForImageClassification` head, `classifier.*`);
//! * `layers = n` (4 for the released heads): `get_intermediate_layers(n, return_class_token, norm)`, input
//!   `concat(cls of each of the last n blocks, oldest first, mean of the last block's patch tokens)`, `(n+1)·D` wide.
//!
//! Registers never enter the patch mean.
//!
//! The official linear evaluation (`eval/linear.py`) also trains heads without the patch mean
//! (`avgpool = False`: the class tokens alone, `n·D` wide); [`LinearClassifier::new_with_avgpool`] and
//! [`LinearClassifier::from_state_dict_with_avgpool`] build those.

use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::state_dict::StateDict;
use crate::vit::{BlockSelection, DinoVisionTransformer, IntermediateOptions};

/// A linear classifier on top of a DINOv2 backbone.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use dinov2_model::{LinearClassifier, StateDict};
/// # fn main() -> dinov2_model::Result<()> {
/// let (d, classes) = (384, 10);
/// let mut sd = StateDict::new();
/// sd.insert("weight", Tensor::zeros((classes, 2 * d), DType::F32, &Device::Cpu)?);
/// sd.insert("bias", Tensor::zeros(classes, DType::F32, &Device::Cpu)?);
/// let head = LinearClassifier::from_state_dict(&sd, "", 1, d)?;
/// assert_eq!((head.layers(), head.num_classes()), (1, 10));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LinearClassifier {
    layers: usize,
    avgpool: bool,
    linear: Linear,
}

impl LinearClassifier {
    /// A head reading the class tokens of the last `layers` blocks of a `embed_dim`-wide backbone into
    /// `num_classes` logits, from `vb` (`weight` `[classes, (layers+1)·D]`, `bias` `[classes]`; official head
    /// files hold exactly these two keys, a Hugging Face classifier has them under `classifier`).
    /// `layers = 0` is an [`Error::InvalidArgument`].
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// use dinov2_model::LinearClassifier;
    /// # fn main() -> dinov2_model::Result<()> {
    /// let vm = VarMap::new(); // a new head to train on a frozen backbone
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let head = LinearClassifier::new(4, 384, 1000, vb.pp("head"))?;
    /// assert_eq!(vm.data().lock().unwrap()["head.weight"].dims(), &[1000, 5 * 384]);
    /// assert_eq!(head.num_classes(), 1000);
    /// assert!(LinearClassifier::new(0, 384, 1000, vb.pp("other")).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(
        layers: usize,
        embed_dim: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::new_with_avgpool(layers, true, embed_dim, num_classes, vb)
    }

    /// [`new`](Self::new) with the patch mean optional: `avgpool = false` gives a head on the class tokens
    /// alone (`weight` `[classes, layers·D]`), as the `avgpool = False` heads of the official `eval/linear.py`;
    /// `avgpool = true` is [`new`](Self::new).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarMap;
    /// use dinov2_model::LinearClassifier;
    /// # fn main() -> dinov2_model::Result<()> {
    /// let vm = VarMap::new();
    /// let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let head = LinearClassifier::new_with_avgpool(4, false, 384, 10, vb.pp("head"))?;
    /// assert_eq!(vm.data().lock().unwrap()["head.weight"].dims(), &[10, 4 * 384]);
    /// assert!(!head.avgpool());
    /// # Ok(()) }
    /// ```
    pub fn new_with_avgpool(
        layers: usize,
        avgpool: bool,
        embed_dim: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if layers == 0 {
            return Err(Error::invalid(
                "layers",
                "a linear head reads at least one block",
            ));
        }
        let width = (layers + usize::from(avgpool)) * embed_dim;
        Ok(LinearClassifier {
            layers,
            avgpool,
            linear: Linear::new(width, num_classes, true, vb)?,
        })
    }

    /// From a state dict holding `{prefix}weight` and `{prefix}bias` (prefix `""` for official head files,
    /// `"classifier."` for Hugging Face checkpoints); the number of classes is read off the weight.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{Error, LinearClassifier, StateDict};
    /// # fn main() -> dinov2_model::Result<()> {
    /// // What `weights::load_weights` leaves in `extra` for a `Dinov2ForImageClassification` checkpoint.
    /// let mut extra = StateDict::new();
    /// extra.insert("classifier.weight", Tensor::zeros((3, 2 * 32), DType::F32, &Device::Cpu)?);
    /// extra.insert("classifier.bias", Tensor::zeros(3, DType::F32, &Device::Cpu)?);
    /// let head = LinearClassifier::from_state_dict(&extra, "classifier.", 1, 32)?;
    /// assert_eq!(head.num_classes(), 3);
    /// let wrong_width = LinearClassifier::from_state_dict(&extra, "classifier.", 4, 32).unwrap_err();
    /// assert!(matches!(wrong_width, Error::ShapeMismatch { .. }));
    /// # Ok(()) }
    /// ```
    pub fn from_state_dict(
        sd: &StateDict,
        prefix: &str,
        layers: usize,
        embed_dim: usize,
    ) -> Result<Self> {
        Self::from_state_dict_with_avgpool(sd, prefix, layers, true, embed_dim)
    }

    /// [`from_state_dict`](Self::from_state_dict) for a head with or without the patch mean (see
    /// [`new_with_avgpool`](Self::new_with_avgpool)): the weight must be `[classes, (layers + avgpool)·D]`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use dinov2_model::{LinearClassifier, StateDict};
    /// # fn main() -> dinov2_model::Result<()> {
    /// let mut sd = StateDict::new(); // an `avgpool = False` head of eval/linear.py on 4 blocks of width 32
    /// sd.insert("weight", Tensor::zeros((5, 4 * 32), DType::F32, &Device::Cpu)?);
    /// sd.insert("bias", Tensor::zeros(5, DType::F32, &Device::Cpu)?);
    /// let head = LinearClassifier::from_state_dict_with_avgpool(&sd, "", 4, false, 32)?;
    /// assert_eq!((head.layers(), head.avgpool(), head.num_classes()), (4, false, 5));
    /// assert!(LinearClassifier::from_state_dict_with_avgpool(&sd, "", 4, true, 32).is_err());
    /// # Ok(()) }
    /// ```
    pub fn from_state_dict_with_avgpool(
        sd: &StateDict,
        prefix: &str,
        layers: usize,
        avgpool: bool,
        embed_dim: usize,
    ) -> Result<Self> {
        let key = format!("{prefix}weight");
        let width = (layers + usize::from(avgpool)) * embed_dim;
        let weight = sd.get(&key).ok_or_else(|| Error::MissingKey {
            key: key.clone(),
            expected: vec![0, width],
        })?;
        let classes = weight.dims().first().copied().unwrap_or(0);
        sd.get_shaped(&key, &[classes, width])?;
        sd.get_shaped(&format!("{prefix}bias"), &[classes])?;
        let vb = sd.var_builder(weight.dtype(), weight.device());
        let vb = match prefix.strip_suffix('.') {
            Some(p) => vb.pp(p),
            None if prefix.is_empty() => vb,
            None => {
                return Err(Error::invalid(
                    "prefix",
                    format!("`{prefix}` must be empty or end with `.`"),
                ))
            }
        };
        Self::new_with_avgpool(layers, avgpool, embed_dim, classes, vb)
    }

    /// Number of backbone blocks whose class tokens feed the head.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let head = dinov2_model::LinearClassifier::new(4, 384, 1000, vb)?; // the released `_lc` heads
    /// assert_eq!(head.layers(), 4);
    /// # Ok(()) }
    /// ```
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Whether the mean of the last block's patch tokens feeds the head (always for the released heads).
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let head = dinov2_model::LinearClassifier::new(4, 384, 1000, vb)?;
    /// assert!(head.avgpool());
    /// # Ok(()) }
    /// ```
    pub fn avgpool(&self) -> bool {
        self.avgpool
    }

    /// Number of classes.
    ///
    /// ```
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, candle_core::DType::F32, &candle_core::Device::Cpu);
    /// let head = dinov2_model::LinearClassifier::new(1, 384, 10, vb)?;
    /// assert_eq!(head.num_classes(), 10);
    /// # Ok(()) }
    /// ```
    pub fn num_classes(&self) -> usize {
        self.linear.weight().dim(0).unwrap_or(0)
    }

    /// The head's input for images `x` (see the [module docs](self)): `[B, (layers + 1)·D]`, or `[B, layers·D]`
    /// without the patch mean.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, LinearClassifier, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 4, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let x = (Tensor::arange(0f32, 2. * 3. * 28. * 28., &Device::Cpu)? * 0.01)?.sin()?.reshape((2, 3, 28, 28))?;
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let one = LinearClassifier::new(1, 32, 10, vb.pp("one"))?;
    /// let f = model.forward_features(&x, None)?;
    /// let expected = Tensor::cat(&[&f.x_norm_clstoken, &f.x_norm_patchtokens.mean(1)?], 1)?;
    /// let diff = (one.features(&model, &x)? - expected)?.abs()?.flatten_all()?.max(0)?;
    /// assert!(diff.to_scalar::<f32>()? < 1e-6);
    /// let four = LinearClassifier::new(4, 32, 10, vb.pp("four"))?;
    /// assert_eq!(four.features(&model, &x)?.dims(), &[2, 5 * 32]);
    /// let cls_only = LinearClassifier::new_with_avgpool(1, false, 32, 10, vb.pp("cls"))?;
    /// let diff = (cls_only.features(&model, &x)? - &f.x_norm_clstoken)?.abs()?.flatten_all()?.max(0)?;
    /// assert!(diff.to_scalar::<f32>()? < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn features(&self, model: &DinoVisionTransformer, x: &Tensor) -> Result<Tensor> {
        if self.layers == 1 {
            let f = model.forward_features(x, None)?;
            if !self.avgpool {
                return Ok(f.x_norm_clstoken);
            }
            let mean = f.x_norm_patchtokens.mean(1)?;
            return Ok(Tensor::cat(&[&f.x_norm_clstoken, &mean], D::Minus1)?);
        }
        let outs = model.get_intermediate_layers(
            x,
            &BlockSelection::Last(self.layers),
            IntermediateOptions {
                reshape: false,
                return_class_token: true,
                norm: true,
            },
        )?;
        let mut parts: Vec<Tensor> = outs.iter().filter_map(|o| o.class_token.clone()).collect();
        let last = outs
            .last()
            .ok_or_else(|| Error::invalid("layers", "no intermediate layers were returned"))?;
        if self.avgpool {
            parts.push(last.patch_tokens.mean(1)?);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }

    /// Logits `[B, classes]`.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # use dinov2_model::{DinoVisionTransformer, LinearClassifier, VitConfig};
    /// # fn main() -> dinov2_model::Result<()> {
    /// # let mut cfg = VitConfig::vit_small();
    /// # (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.img_size) = (32, 2, 4, 28);
    /// # let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
    /// # let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
    /// # let x = (Tensor::arange(0f32, 2. * 3. * 28. * 28., &Device::Cpu)? * 0.01)?.sin()?.reshape((2, 3, 28, 28))?;
    /// # let vm = candle_nn::VarMap::new();
    /// # let vb = dinov2_model::init::seeded(&vm, 0, DType::F32, &Device::Cpu);
    /// let mut head_sd = dinov2_model::StateDict::new(); // a head that ignores the features: logits = bias
    /// head_sd.insert("weight", Tensor::zeros((3, 2 * 32), DType::F32, &Device::Cpu)?);
    /// head_sd.insert("bias", Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?);
    /// let head = LinearClassifier::from_state_dict(&head_sd, "", 1, 32)?;
    /// assert_eq!(head.forward(&model, &x)?.to_vec2::<f32>()?, [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]);
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, model: &DinoVisionTransformer, x: &Tensor) -> Result<Tensor> {
        let f = self.features(model, x)?;
        Ok(self
            .linear
            .forward(&f.to_dtype(self.linear.weight().dtype())?)?)
    }
}
