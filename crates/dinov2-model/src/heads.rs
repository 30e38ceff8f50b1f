//! The official linear classifier heads (`dinov2/hub/classifiers.py`, the `_lc` torch-hub models).
//!
//! * `layers = 1`: input `concat(x_norm_clstoken, mean(x_norm_patchtokens))`, `2·D` wide (also the
//!   Hugging Face `Dinov2ForImageClassification` head, `classifier.*`);
//! * `layers = n` (4 for the released heads): `get_intermediate_layers(n, return_class_token, norm)`, input
//!   `concat(cls of each of the last n blocks, oldest first, mean of the last block's patch tokens)`, `(n+1)·D` wide.
//!
//! Registers never enter the patch mean.

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
    linear: Linear,
}

impl LinearClassifier {
    /// A head reading the class tokens of the last `layers` blocks of a `embed_dim`-wide backbone into
    /// `num_classes` logits, from `vb` (`weight` `[classes, (layers+1)·D]`, `bias` `[classes]`; official head
    /// files hold exactly these two keys, a Hugging Face classifier has them under `classifier`).
    pub fn new(
        layers: usize,
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
        Ok(LinearClassifier {
            layers,
            linear: Linear::new((layers + 1) * embed_dim, num_classes, true, vb)?,
        })
    }

    /// From a state dict holding `{prefix}weight` and `{prefix}bias` (prefix `""` for official head files,
    /// `"classifier."` for Hugging Face checkpoints); the number of classes is read off the weight.
    pub fn from_state_dict(
        sd: &StateDict,
        prefix: &str,
        layers: usize,
        embed_dim: usize,
    ) -> Result<Self> {
        let key = format!("{prefix}weight");
        let width = (layers + 1) * embed_dim;
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
        Self::new(layers, embed_dim, classes, vb)
    }

    /// Number of backbone blocks whose class tokens feed the head.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.linear.weight().dim(0).unwrap_or(0)
    }

    /// The head's input for images `x`.
    pub fn features(&self, model: &DinoVisionTransformer, x: &Tensor) -> Result<Tensor> {
        if self.layers == 1 {
            let f = model.forward_features(x, None)?;
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
        parts.push(last.patch_tokens.mean(1)?);
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }

    /// Logits `[B, classes]`.
    pub fn forward(&self, model: &DinoVisionTransformer, x: &Tensor) -> Result<Tensor> {
        let f = self.features(model, x)?;
        Ok(self
            .linear
            .forward(&f.to_dtype(self.linear.weight().dtype())?)?)
    }
}
