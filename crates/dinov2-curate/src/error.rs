//! Typed errors of the curation crate.

use std::path::PathBuf;

/// Everything that can go wrong in `dinov2-curate`.
#[derive(Debug, thiserror::Error)]
pub enum CurateError {
    /// An I/O error, with the path involved.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed or unsupported `.npy` file.
    #[error("npy {path}: {msg}")]
    Npy {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A malformed or unsupported safetensors file.
    #[error("safetensors {path}: {msg}")]
    Safetensors {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Shapes of inputs do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// JSON (de)serialisation failed.
    #[error("json {path}: {source}")]
    Json {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The embedding model failed.
    #[error("embedder: {0}")]
    Embedder(String),
    /// Workers of a sharded run could not complete a collective operation.
    #[error("collective: {0}")]
    Collective(String),
    /// A resumable stage found state from an incompatible earlier run.
    #[error("cannot resume in {path}: {msg}")]
    Resume {
        /// Directory involved.
        path: PathBuf,
        /// What does not match.
        msg: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, CurateError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CurateError {
    let path = path.into();
    move |source| CurateError::Io { path, source }
}
