//! # dinov2-train
//!
//! DINOv2 self-supervised pretraining on candle, step for step the official `train/train.py` +
//! `SSLMetaArch`.
#![warn(missing_docs)]

pub mod config;
mod error;
pub mod knn;

pub use error::{Error, Result};
