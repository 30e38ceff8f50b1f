//! The official linear classifier heads (`dinov2/hub/classifiers.py`, the `_lc` torch-hub models).
//!
//! * `layers = 1`: input `concat(x_norm_clstoken, mean(x_norm_patchtokens))`, `2·D` wide (also the
//!   Hugging Face `Dinov2ForImageClassification` head, `classifier.*`);
//! * `layers = n` (4 for the released heads): `get_intermediate_layers(n, return_class_token, norm)`, input
//!   `concat(cls of each of the last n blocks, oldest first, mean of the last block's patch tokens)`, `(n+1)·D` wide.
//!
//! Registers never enter the patch mean.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::state_dict::StateDict;
use crate::vit::{BlockSelection, DinoVisionTransformer, IntermediateOptions};

/// A linear classifier on top of a DINOv2 backbone.
#[derive(Debug, Clone)]
pub struct LinearClassifier {
    layers: usize,
    linear: Linear,
}

impl LinearClassifier {
    /// From the head's `weight` `[classes, (layers+1)·D]` and `bias` `[classes]` (official head files hold
    /// exactly these two keys; for a Hugging Face classifier pass `classifier.weight`/`classifier.bias`, layers 1).
    pub fn new(layers: usize, weight: Tensor, bias: Tensor, embed_dim: usize) -> Result<Self> {
        if layers == 0 {
            return Err(Error::invalid("a linear head needs at least one layer"));
        }
        let (classes, width) = weight.dims2()?;
        if width != (layers + 1) * embed_dim {
            return Err(Error::ShapeMismatch {
                key: "weight".into(),
                expected: vec![classes, (layers + 1) * embed_dim],
                actual: weight.dims().to_vec(),
            });
        }
        if bias.dims() != [classes] {
            return Err(Error::ShapeMismatch {
                key: "bias".into(),
                expected: vec![classes],
                actual: bias.dims().to_vec(),
            });
        }
        Ok(LinearClassifier {
            layers,
            linear: Linear {
                weight,
                bias: Some(bias),
            },
        })
    }

    /// From a state dict holding `{prefix}weight` and `{prefix}bias` (prefix `""` for official head files,
    /// `"classifier."` for Hugging Face checkpoints).
    pub fn from_state_dict(
        sd: &StateDict,
        prefix: &str,
        layers: usize,
        embed_dim: usize,
    ) -> Result<Self> {
        let get = |k: &str| {
            sd.get(&format!("{prefix}{k}"))
                .cloned()
                .ok_or_else(|| Error::MissingKey {
                    key: format!("{prefix}{k}"),
                    expected: vec![],
                })
        };
        Self::new(layers, get("weight")?, get("bias")?, embed_dim)
    }

    /// Number of backbone blocks whose class tokens feed the head.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.linear.weight.dim(0).unwrap_or(0)
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
            .ok_or_else(|| Error::invalid("no intermediate layers"))?;
        parts.push(last.patch_tokens.mean(1)?);
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }

    /// Logits `[B, classes]`.
    pub fn forward(&self, model: &DinoVisionTransformer, x: &Tensor) -> Result<Tensor> {
        let f = self.features(model, x)?;
        self.linear
            .forward(&f.to_dtype(self.linear.weight.dtype())?)
    }
}
