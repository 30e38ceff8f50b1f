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
//! * [`masking`] and [`collate`](mod@collate): the official block masking and batch collation (crop-major crops,
//!   stratified mask ratios, `mask_indices_list`, `masks_weight`, `upperbound`);
//! * [`dataset`]: image folders, file lists (txt/CSV), the ImageNet-1k layout, tar shards, and [`open_dataset`] for a
//!   folder or a dataset string (`ImageFolder:root=DIR`, ...);
//! * [`sampler`]: sharded infinite sampler with exact resume, epoch sampler;
//! * [`loader`]: parallel loader with bounded prefetch, identical batches for any thread count, bad files skipped
//!   and counted (or fail fast);
//! * [`error`]: the crate's [`Error`] and [`Result`].
//!
//! Every type a caller needs is re-exported at the crate root, and so are the crates that appear in the API:
//! [`image`] (images are `image::RgbImage`), [`rand`] (random draws take any `rand::Rng`) and [`rand_chacha`] (the
//! loader's per-sample streams are `ChaCha8Rng`), so a user's types always match ours without pinning the same
//! versions by hand.
//!
//! ```
//! use dinov2_data::{preprocess, Preprocess};
//! let img = image::RgbImage::from_pixel(640, 480, image::Rgb([90, 120, 200]));
//! let x = preprocess(&img, &Preprocess::OFFICIAL_EVAL)?; // Resize(256) + CenterCrop(224) + Normalize
//! assert_eq!(x.shape(), [3, 224, 224]);
//! # Ok::<(), dinov2_data::Error>(())
//! ```
//!
//! Training augmentation with a seeded ChaCha stream, through the re-exported crates only:
//!
//! ```
//! use dinov2_data::rand::SeedableRng;
//! use dinov2_data::rand_chacha::ChaCha8Rng;
//! use dinov2_data::{image, DataAugmentationDino, MaskCollate};
//! let aug = DataAugmentationDino::official(); // 2 x 224 px global + 8 x 96 px local crops
//! let img = image::RgbImage::from_pixel(500, 375, image::Rgb([30, 60, 90]));
//! let mut rng = ChaCha8Rng::seed_from_u64(0);
//! let crops = aug.apply(&img, &mut rng);
//! assert_eq!((crops.global.len(), crops.local.len()), (2, 8));
//! let masks = MaskCollate::official(224, 14).sample(16, &mut rng); // a batch of 16 images
//! assert_eq!(masks.n_crops, 32);
//! ```
#![deny(missing_docs)]

pub use image;
pub use rand;
pub use rand_chacha;

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
pub mod synthetic;
pub mod transforms;

pub use augment::{
    BlurProbabilities, ClassificationTrainTransform, CropKind, CropPlan, CropsConfig,
    DataAugmentationDino, MultiCrop, GLOBAL_CROPS,
};
pub use collate::{collate, Batch, MaskBatch, MaskCollate};
pub use dataset::{
    open_dataset, Dataset, FileDataset, ImageNetSplit, Sample, TarDataset, TarEntry, DATASET_FORMS,
    IMAGE_EXTENSIONS,
};
pub use decode::{decode_rgb, load_rgb, load_rgb_with, DecodeOptions, DEFAULT_MAX_PIXELS};
pub use error::{Error, Result};
pub use loader::{
    BadDataPolicy, BadDataReport, BadSample, DinoPipeline, EvalBatch, EvalPipeline, Loaded, Loader,
    LoaderConfig, Pipeline,
};
pub use masking::MaskingGenerator;
pub use preprocess::{
    preprocess, to_tensor_normalized, ImageTensor, Preprocess, IMAGENET_MEAN, IMAGENET_STD,
};
pub use resize::CropBox;
pub use sampler::{EpochSampler, IndexStream, ShardedInfiniteSampler};
pub use synthetic::SyntheticShapes;
pub use transforms::{ColorJitter, JitterOp, JitterParams, RandomResizedCrop};
