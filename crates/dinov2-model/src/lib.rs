//! # dinov2-model
//!
//! DINOv2 vision transformers (ViT-S/B/L/g, patch 14, with and without register tokens) on candle,
//! exact to the official PyTorch code, loading every official weight format.
//!
//! Models follow candle's conventions: every layer and the backbone are built from a
//! [`candle_nn::VarBuilder`] positioned at their official module path, and implement
//! [`candle_core::Module`]; training forwards (stochastic depth) take the caller's random generator, so a
//! trainer can checkpoint it. Where the parameters come from is the builder's business:
//!
//! * a checkpoint in any official format: [`load_model`], or [`weights::load_weights`] then
//!   [`DinoVisionTransformer::from_state_dict`] (strict, fused for inference);
//! * trainable `Var`s in a [`candle_nn::VarMap`]: [`init::seeded`] (official initialisation, seeded) or
//!   [`DinoVisionTransformer::from_state_dict_trainable`]; a teacher's gradient-free forward is
//!   [`DinoVisionTransformer::detached`].
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use dinov2_model::{DinoVisionTransformer, VitConfig};
//! # fn main() -> dinov2_model::Result<()> {
//! // Official weights: `load_model("dinov2_vits14", ...)` or `weights::load_weights(path)`.
//! let mut cfg = VitConfig::vit_small().with_registers(4);
//! (cfg.depth, cfg.img_size) = (1, 56); // tiny, for the example
//! let sd = dinov2_model::init::init_state_dict(&cfg, 0)?;
//! let model = DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32)?;
//! let image = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu)?;
//! let cls = model.forward(&image)?; // normalised class token, [1, 384]
//! assert_eq!(cls.dims(), &[1, 384]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod heads;
pub mod hub;
pub mod init;
pub mod layers;
pub mod loader;
pub mod ops;
pub mod params;
pub mod pos_embed;
pub mod state_dict;
#[cfg(test)]
mod testutil;
pub mod vit;
pub mod weights;

/// The `rand` crate this one draws stochastic depth with (its `RngCore` is what the training forwards take).
pub use rand;

pub use config::{Arch, FfnKind, OfficialModel, PosEmbedInterpolation, VitConfig};
pub use error::{Error, Result};
pub use heads::LinearClassifier;
pub use layers::Packing;
pub use loader::{load_model, load_model_with, LoadedModel};
pub use ops::{AttentionBackend, SeqLayout};
pub use state_dict::StateDict;
pub use vit::{
    BlockSelection, DinoVisionTransformer, Features, IntermediateOptions, IntermediateOutput,
};
