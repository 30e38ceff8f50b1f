//! # dinov2-train
//!
//! DINOv2 self-supervised pretraining on candle, step for step the official `train/train.py` +
//! `SSLMetaArch`, and the paper's distillation recipe on the same machinery ([`distill`]).
#![warn(missing_docs)]

pub mod config;
mod error;
pub mod eval;

pub use config::TrainConfig;
pub use error::{Error, Result};
pub mod checkpoint;
pub mod data_parallel;
pub mod distill;
pub mod ema;
pub mod meta_arch;
pub mod optim;
pub mod param_groups;
pub mod plot;
pub mod run;
pub mod schedules;
pub mod trainer;
