//! # dinov2-model
//!
//! DINOv2 vision transformers (ViT-S/B/L/g, patch 14, with and without register tokens) on candle,
//! exact to the official PyTorch code, loading every official weight format.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use dinov2_model::{DinoVisionTransformer, VitConfig};
//! # fn main() -> dinov2_model::Result<()> {
//! // Official weights: `weights::load_weights(path)` or `load_model("dinov2_vits14", ...)`.
//! let mut cfg = VitConfig::vit_small().with_registers(4);
//! (cfg.depth, cfg.img_size) = (1, 56); // tiny, for the example
//! let model = DinoVisionTransformer::new_random(&cfg, &Device::Cpu, DType::F32, 0)?;
//! let image = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu)?;
//! let cls = model.forward(&image)?; // normalised class token, [1, 384]
//! assert_eq!(cls.dims(), &[1, 384]);
//! # Ok(()) }
//! ```
pub mod config;
pub mod error;
pub mod heads;
pub mod hub;
pub mod init;
pub mod layers;
pub mod loader;
pub mod ops;
pub mod pos_embed;
pub mod state_dict;
pub mod vit;
pub mod weights;

pub use config::{Arch, FfnKind, OfficialModel, PosEmbedInterpolation, VitConfig};
pub use error::{Error, Result};
pub use heads::LinearClassifier;
pub use loader::{load_model, load_model_with, LoadedModel};
pub use state_dict::StateDict;
pub use vit::{
    BlockSelection, DinoVisionTransformer, Features, IntermediateOptions, IntermediateOutput,
};
