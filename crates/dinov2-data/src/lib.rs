//! # dinov2-data
//!
//! The DINOv2 data pipeline in Rust, independent of the model crate (plain `Vec<f32>` outputs):
//!
//! * [`decode`]: robust decoding of JPEG/PNG/WebP/BMP/TIFF/GIF to 8-bit RGB (EXIF orientation, CMYK, 16-bit,
//!   grey/alpha, decompression-bomb guard), typed errors, never a panic;
//! * [`resize`]: Pillow-exact (bit-identical) antialiased bicubic resampling, torchvision `CenterCrop`;
//! * [`preprocess`](mod@preprocess): inference preprocessing (the official eval transform, and patch-multiple
//!   variants) to normalised CHW [`ImageTensor`]s;
//! * [`transforms`]: torchvision-on-PIL transforms (RandomResizedCrop, flip, ColorJitter, grayscale, Gaussian blur,
//!   solarize), pixel-exact against PIL/torchvision;
//! * [`augment`]: `DataAugmentationDINO` (2 global + n local crops) with the released or the intended blur
//!   probabilities;
//! * [`masking`] and [`collate`]: the official block masking and batch collation (crop-major crops, stratified
//!   mask ratios, `mask_indices_list`, `masks_weight`, `upperbound`);
//! * [`dataset`]: image folders, file lists (txt/CSV), the ImageNet-1k layout, tar shards;
//! * [`sampler`]: sharded infinite sampler with exact resume, epoch sampler;
//! * [`loader`]: parallel loader with bounded prefetch, identical batches for any thread count, bad files skipped
//!   and counted (or fail fast).
//!
//! ```
//! use dinov2_data::{preprocess, Preprocess};
//! let img = image::RgbImage::from_pixel(640, 480, image::Rgb([90, 120, 200]));
//! let x = preprocess(&img, &Preprocess::OFFICIAL_EVAL)?; // Resize(256) + CenterCrop(224) + Normalize
//! assert_eq!(x.shape(), [3, 224, 224]);
//! # Ok::<(), dinov2_data::DataError>(())
//! ```
#![deny(missing_docs)]

pub mod augment;
pub mod collate;
pub mod dataset;
pub mod decode;
pub mod error;
pub mod loader;
pub mod masking;
pub mod preprocess;
pub mod resize;
pub mod sampler;
pub mod transforms;

pub use augment::{
    BlurProbabilities, ClassificationTrainTransform, CropsConfig, DataAugmentationDino, MultiCrop,
};
pub use collate::{Batch, MaskBatch, MaskCollate};
pub use dataset::{Dataset, FileDataset, ImageNetSplit, Sample, TarDataset};
pub use decode::{decode_rgb, load_rgb, load_rgb_with, DecodeOptions};
pub use error::{DataError, Result};
pub use loader::{
    BadDataPolicy, DinoPipeline, EvalBatch, EvalPipeline, Loader, LoaderConfig, Pipeline,
};
pub use masking::MaskingGenerator;
pub use preprocess::{
    preprocess, to_tensor_normalized, ImageTensor, Preprocess, IMAGENET_MEAN, IMAGENET_STD,
};
pub use sampler::{EpochSampler, IndexStream, ShardedInfiniteSampler};
