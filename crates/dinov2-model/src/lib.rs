//! # dinov2-model
//!
//! DINOv2 vision transformers on candle, exact to the official PyTorch code.
pub mod config;
pub mod error;
pub mod hub;
pub mod state_dict;
pub mod weights;

pub use config::{Arch, FfnKind, OfficialModel, PosEmbedInterpolation, VitConfig};
pub use error::{Error, Result};
pub use state_dict::StateDict;
