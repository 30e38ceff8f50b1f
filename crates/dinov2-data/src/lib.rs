//! # dinov2-data
//!
//! The DINOv2 data pipeline, independent of the model crate:
//!
//! * [`decode`]: robust decoding of JPEG/PNG/WebP/BMP/TIFF/GIF to 8-bit RGB (EXIF orientation, CMYK, 16-bit,
//!   decompression-bomb guard);
//! * [`resize`]: Pillow-exact bicubic (antialiased) resampling and cropping;
//! * [`preprocess`](mod@preprocess): inference preprocessing (the official eval transform and patch-multiple variants)
//!   producing normalised CHW `f32` tensors.
#![deny(missing_docs)]

pub mod decode;
pub mod error;
pub mod preprocess;
pub mod resize;

pub use decode::{decode_rgb, load_rgb, load_rgb_with, DecodeOptions};
pub use error::{DataError, Result};
pub use preprocess::{
    preprocess, to_tensor_normalized, ImageTensor, Preprocess, IMAGENET_MEAN, IMAGENET_STD,
};
pub mod augment;
pub mod collate;
pub mod dataset;
pub mod loader;
pub mod masking;
pub mod sampler;
pub mod transforms;
