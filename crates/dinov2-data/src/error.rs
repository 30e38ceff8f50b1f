//! Typed errors of the data pipeline.

use std::path::PathBuf;

/// Errors produced by `dinov2-data`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error, with the path it concerns when known.
    #[error("I/O error{}: {source}", path_suffix(.path))]
    Io {
        /// File concerned, if any.
        path: Option<PathBuf>,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes could not be decoded as an image (corrupt, truncated, empty or not an image).
    #[error("cannot decode image{}: {reason}", path_suffix(.path))]
    Decode {
        /// File concerned, if any.
        path: Option<PathBuf>,
        /// Human-readable reason from the decoder.
        reason: String,
    },
    /// The image has more pixels than the configured decompression-bomb limit.
    #[error("image{} has {width}x{height} = {pixels} pixels, above the limit of {limit} (decompression bomb guard)", path_suffix(.path))]
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
    /// An image size is not compatible with an operation (e.g. not a multiple of the patch size).
    #[error("bad image size {width}x{height}: {reason}")]
    BadSize {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A dataset description (folder, file list, CSV, tar shard) is malformed or empty.
    #[error("dataset error: {0}")]
    Dataset(String),
    /// A malformed tar archive.
    #[error("tar error in {path}: {reason}")]
    Tar {
        /// Archive path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A worker panicked while processing a sample (reported, never propagated as a panic).
    #[error("worker panicked while processing sample {index}: {message}")]
    WorkerPanic {
        /// Dataset index of the sample.
        index: usize,
        /// Panic payload, if it was a string.
        message: String,
    },
    /// The loader was stopped (its producer side is gone).
    #[error("loader stopped")]
    Stopped,
}

fn path_suffix(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: Some(path.into()),
            source,
        }
    }

    /// Attaches a path to a path-less error (used when a decode error surfaces from a byte buffer).
    pub fn with_path(self, p: impl Into<PathBuf>) -> Self {
        let p = Some(p.into());
        match self {
            DataError::Io { path: None, source } => DataError::Io { path: p, source },
            DataError::Decode { path: None, reason } => DataError::Decode { path: p, reason },
            DataError::TooManyPixels {
                path: None,
                width,
                height,
                pixels,
                limit,
            } => DataError::TooManyPixels {
                path: p,
                width,
                height,
                pixels,
                limit,
            },
            other => other,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
