//! # dinov2-loss
//!
//! The self-supervised pieces of DINOv2 (Oquab et al., 2023) on candle, equal to the official
//! `facebookresearch/dinov2` definitions to float precision and differentiable with candle autograd:
//!
//! * [`DinoHead`]: MLP → L2 normalisation → weight-normed prototypes with a trainable `g`, official keys;
//! * [`DinoLoss`]: DINO cross-entropy with lazy EMA centering and Sinkhorn-Knopp targets;
//! * [`IbotPatchLoss`]: iBOT masked-patch loss (`forward_masked` and the dense variant);
//! * [`KoLeoLoss`]: the KoLeo regulariser (a batch of one is an error, not a NaN);
//! * [`Reducer`]: the all-reduce interface behind every global-batch statistic ([`SingleProcess`],
//!   [`ThreadGroup`] for in-process simulation);
//! * [`DinoV2Loss`]: the full DINOv2 combination of `SSLMetaArch.forward_backward`.
//!
//! Only differentiable candle ops are used on gradient paths (no `softmax_last_dim`, no fused LayerNorm).

mod centering;
mod combined;
mod dino;
mod error;
mod fused;
mod head;
mod ibot;
mod koleo;
pub mod ops;
mod reduce;
#[cfg(test)]
mod testutil;

pub use centering::{sinkhorn_knopp, Center};
pub use combined::{
    Centering, DinoV2Loss, DinoV2LossConfig, LossTerms, StudentOutputs, TeacherTargets,
};
pub use dino::DinoLoss;
pub use error::{Error, Result};
pub use head::{DinoHead, DinoHeadConfig};
pub use ibot::{mask_indices, masks_weight, IbotPatchLoss};
pub use koleo::KoLeoLoss;
pub use reduce::{Reducer, SingleProcess, ThreadGroup, ThreadRank};
