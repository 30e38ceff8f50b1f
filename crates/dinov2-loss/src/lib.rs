//! # dinov2-loss
//!
//! The self-supervised pieces of DINOv2 (Oquab et al., 2023) on candle, equal to the official
//! `facebookresearch/dinov2` definitions to float precision and differentiable with candle autograd:
//!
//! * [`DinoHead`]: MLP → L2 normalisation → weight-normed prototypes with a trainable `g`, built from a
//!   [`candle_nn::VarBuilder`] under the official names (a checkpoint → constants, a `VarMap` → `Var`s;
//!   [`DinoHead::from_state_dict`], [`DinoHead::from_state_dict_trainable`]), [`candle_core::Module`] for
//!   inference;
//! * [`DinoLoss`]: DINO cross-entropy with lazy EMA centering and Sinkhorn-Knopp targets;
//! * [`IbotPatchLoss`]: iBOT masked-patch loss (`forward_masked` and the dense variant);
//! * [`KoLeoLoss`]: the KoLeo regulariser (a batch of one is an error, not a NaN);
//! * [`DinoV2Loss`]: the full DINOv2 combination of `SSLMetaArch.forward_backward`, with named inputs
//!   ([`TeacherOutputs`], [`StudentOutputs`], [`PackedStudentOutputs`], [`PatchMasks`]);
//! * [`all_reduce_sum`]: every global-batch statistic is summed over the ranks of a
//!   [`dinov2_dist::Communicator`] ([`SingleProcess`], [`ThreadGroup`] for in-process simulation, `Mpi`).
//!
//! Sizes and options live in configuration structs whose [`Default`] is the official configuration
//! ([`DinoHeadConfig`], [`DinoLossConfig`], [`IbotLossConfig`], [`KoLeoLossConfig`], [`DinoV2LossConfig`]);
//! errors are [`Error`] with typed fields. Only differentiable candle ops (or fused CPU kernels with a
//! backward) are used on gradient paths.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use dinov2_loss::{DinoLoss, DinoLossConfig, TargetMode};
//! let mut loss = DinoLoss::new(DinoLossConfig::new(4), &Device::Cpu)?; // student_temp 0.1, momentum 0.9
//! let teacher = Tensor::new(&[[2f32, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], &Device::Cpu)?;
//! let targets = loss.softmax_center_teacher(&teacher, 0.04)?;
//! loss.update_center(&teacher)?;
//! let student = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
//! let value = loss.forward(&[student], &[targets])?.to_scalar::<f32>()?;
//! assert!((value - 4f32.ln()).abs() < 1e-5); // uniform student: ln K
//! assert_eq!(TargetMode::default(), TargetMode::Centering);
//! # Ok::<(), dinov2_loss::Error>(())
//! ```
#![warn(missing_docs)]

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
    DinoV2Loss, DinoV2LossConfig, LossTerms, PackedStudentOutputs, StudentOutputs, TargetMode,
    TeacherOutputs, TeacherTargets,
};
pub use dino::{DinoLoss, DinoLossConfig};
pub use error::{Error, Result};
pub use head::{DinoHead, DinoHeadConfig};
pub use ibot::{mask_indices, masks_weight, IbotLossConfig, IbotPatchLoss, PatchMasks};
pub use koleo::{KoLeoLoss, KoLeoLossConfig};
pub use reduce::{all_reduce_sum, Communicator, SingleProcess, ThreadGroup, ThreadRank};

/// The state dict type the head is loaded from and saved to (`dinov2-model`'s, so backbone and heads of a
/// checkpoint share one type).
pub use dinov2_model::StateDict;
