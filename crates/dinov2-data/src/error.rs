//! Typed errors of the data pipeline: [`Error`] and the [`Result`] alias.
//!
//! Variants carry what a caller can act on (the path of a bad file, a sample index, an image size, the name of a
//! bad configuration field); the messages name the bad value and, where there is one, what to do about it.
//!
//! ```
//! use dinov2_data::{preprocess, Error, Preprocess};
//! let img = image::RgbImage::new(30, 20);
//! match preprocess(&img, &Preprocess::Exact { multiple: 14 }) {
//!     Err(Error::NotMultiple { width: 30, height: 20, multiple: 14 }) => {}
//!     other => panic!("expected NotMultiple, got {other:?}"),
//! }
//! ```

use std::path::PathBuf;

/// Errors produced by `dinov2-data`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading a file or folder failed, with the path it concerns when known.
    #[error("cannot read {}: {source}", path_or(.path, "input"))]
    Io {
        /// File or folder concerned, if any.
        path: Option<PathBuf>,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes could not be decoded as an image (corrupt, truncated, empty or not an image).
    #[error("cannot decode image {}: {reason}", path_or(.path, "(in memory)"))]
    Decode {
        /// File concerned, if any.
        path: Option<PathBuf>,
        /// Human-readable reason from the decoder.
        reason: String,
    },
    /// The image has more pixels than the configured decompression-bomb limit.
    #[error(
        "image {} has {width}x{height} = {pixels} pixels, above the limit of {limit} (decompression bomb guard; \
         raise DecodeOptions::max_pixels to accept it)",
        path_or(.path, "(in memory)")
    )]
    TooManyPixels {
        /// File concerned, if any.
        path: Option<PathBuf>,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// width * height.
        pixels: u64,
        /// Configured limit.
        limit: u64,
    },
    /// An image with no pixels was given to an operation that needs some.
    #[error("image of {width}x{height} pixels is empty")]
    EmptyImage {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
    },
    /// An image side is not a multiple of the patch size ([`Preprocess::Exact`](crate::Preprocess::Exact)).
    #[error(
        "image of {width}x{height} pixels is not a multiple of {multiple}; use Preprocess::CenterPad or \
         Preprocess::ResizeToMultiple"
    )]
    NotMultiple {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The required multiple.
        multiple: u32,
    },
    /// A configuration value is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// Name of the configuration field (as in the struct or the official config).
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A rank does not lie in `0..world_size`.
    #[error("rank {rank} is not in 0..{world_size}")]
    InvalidRank {
        /// The rank.
        rank: usize,
        /// The world size.
        world_size: usize,
    },
    /// Fewer samples than ranks: the sharded sampler would give some rank nothing.
    #[error("{samples} samples cannot be sharded over {world_size} ranks; use a larger dataset or fewer ranks")]
    TooFewSamples {
        /// Samples in the dataset.
        samples: usize,
        /// The world size.
        world_size: usize,
    },
    /// A folder has no class subfolders (`ImageFolder` layout expected).
    #[error("no class subfolders in {}; put the images of each class in a subfolder, or use an unlabeled folder", .root.display())]
    NoClassFolders {
        /// The folder.
        root: PathBuf,
    },
    /// A folder has no files with an image extension (see [`IMAGE_EXTENSIONS`](crate::IMAGE_EXTENSIONS)).
    #[error("no images under {} (recognised extensions: {})", .root.display(), crate::dataset::IMAGE_EXTENSIONS.join(", "))]
    NoImages {
        /// The folder.
        root: PathBuf,
    },
    /// A file list has no entries.
    #[error("file list {} has no entries", .path.display())]
    EmptyFileList {
        /// The list file.
        path: PathBuf,
    },
    /// A file list has a label that is not an integer.
    #[error("{}:{line}: label {label:?} is not an integer", .path.display())]
    BadLabel {
        /// The list file.
        path: PathBuf,
        /// Line number (1-based).
        line: usize,
        /// The label as written.
        label: String,
    },
    /// Tar shards without any image member.
    #[error("no image members in the {} tar shards given", .shards.len())]
    NoTarImages {
        /// The shards.
        shards: Vec<PathBuf>,
    },
    /// A dataset path (a folder, a root, a list) that does not exist.
    #[error(
        "dataset path {} does not exist; give an existing image folder or a dataset string ({})",
        .path.display(),
        crate::dataset::DATASET_FORMS
    )]
    DatasetNotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// A dataset string (`Name:key=value:...`) naming a dataset this crate does not have.
    #[error(
        "unknown dataset `{name}` in `{spec}`; valid: {}",
        crate::dataset::DATASET_FORMS
    )]
    UnknownDataset {
        /// The whole dataset string.
        spec: String,
        /// The name.
        name: String,
    },
    /// A dataset string with an unknown, missing or repeated key, or a bad value.
    #[error("dataset `{spec}`: {reason}")]
    DatasetSpec {
        /// The whole dataset string.
        spec: String,
        /// The key at fault (empty when the string as a whole is).
        key: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// A dataset with no samples was given to the loader.
    #[error("the dataset is empty")]
    EmptyDataset,
    /// A sample index beyond the dataset.
    #[error("sample index {index} is out of range for a dataset of {len} samples")]
    IndexOutOfRange {
        /// The index.
        index: usize,
        /// Dataset length.
        len: usize,
    },
    /// The loader met `count` bad samples in a row and gave up
    /// ([`LoaderConfig::max_consecutive_bad`](crate::LoaderConfig::max_consecutive_bad)).
    #[error("{count} bad samples in a row (last: {name}); giving up: check the dataset or raise max_consecutive_bad")]
    TooManyBadSamples {
        /// Number of consecutive bad samples.
        count: usize,
        /// Dataset index of the last one.
        index: usize,
        /// Its description (path).
        name: String,
    },
    /// A worker panicked while processing a sample (reported, never propagated as a panic).
    #[error("worker panicked while processing sample {index}: {message}")]
    WorkerPanic {
        /// Dataset index of the sample.
        index: usize,
        /// Panic payload, if it was a string.
        message: String,
    },
    /// The pipeline's `collate` panicked while building a batch.
    #[error("collate panicked while building batch {step}: {message}")]
    CollatePanic {
        /// Step number of the batch.
        step: u64,
        /// Panic payload, if it was a string.
        message: String,
    },
    /// The loader's thread pool could not be started.
    #[error("cannot start the loader's thread pool: {source}")]
    ThreadPool {
        /// Underlying error.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    /// The loader's producer thread could not be started.
    #[error("cannot start the loader thread: {source}")]
    SpawnThread {
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn path_or(p: &Option<PathBuf>, default: &str) -> String {
    p.as_ref()
        .map_or_else(|| default.to_string(), |p| p.display().to_string())
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    ///
    /// ```
    /// use dinov2_data::Error;
    /// let e = Error::io("a.jpg", std::io::Error::from(std::io::ErrorKind::NotFound));
    /// assert!(matches!(&e, Error::Io { path: Some(p), .. } if p.ends_with("a.jpg")));
    /// assert!(e.to_string().starts_with("cannot read a.jpg"));
    /// ```
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: Some(path.into()),
            source,
        }
    }

    /// Attaches a path to a path-less error (used when a decode error surfaces from a byte buffer); errors that
    /// already have a path, or have none to take, are returned unchanged.
    ///
    /// ```
    /// use dinov2_data::{decode_rgb, DecodeOptions, Error};
    /// let e = decode_rgb(b"not an image", &DecodeOptions::default()).unwrap_err();
    /// assert!(matches!(e, Error::Decode { path: None, .. }));
    /// let e = e.with_path("notes.png");
    /// assert!(matches!(&e, Error::Decode { path: Some(p), .. } if p.ends_with("notes.png")));
    /// ```
    pub fn with_path(self, p: impl Into<PathBuf>) -> Self {
        let p = Some(p.into());
        match self {
            Error::Io { path: None, source } => Error::Io { path: p, source },
            Error::Decode { path: None, reason } => Error::Decode { path: p, reason },
            Error::TooManyPixels {
                path: None,
                width,
                height,
                pixels,
                limit,
            } => Error::TooManyPixels {
                path: p,
                width,
                height,
                pixels,
                limit,
            },
            other => other,
        }
    }

    /// A configuration error on `field`.
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static_and_names_its_path() {
        fn boxed(e: Error) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            Box::new(e)
        }
        let e = Error::io("data/x.png", std::io::Error::other("boom"));
        assert_eq!(boxed(e).to_string(), "cannot read data/x.png: boom");
        let e = Error::config("batch_size", "must be positive");
        assert_eq!(e.to_string(), "invalid batch_size: must be positive");
    }
}
