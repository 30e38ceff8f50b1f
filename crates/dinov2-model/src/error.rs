//! Typed errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running a DINOv2 model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle (shape mismatch inside an op, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A weight the model needs is absent from the checkpoint.
    #[error("missing weight `{key}` (the model expects shape {expected:?})")]
    MissingKey { key: String, expected: Vec<usize> },

    /// A weight is present but has the wrong shape.
    #[error(
        "weight `{key}` has shape {actual:?} in the checkpoint but the model expects {expected:?}"
    )]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// The checkpoint has a backbone weight this configuration does not use (strict loading, as the official code).
    #[error("unexpected weight `{key}` with shape {shape:?}: the checkpoint does not match the configuration ({hint})")]
    UnexpectedKey {
        key: String,
        shape: Vec<usize>,
        hint: String,
    },

    /// The input image size is not usable (not a multiple of the patch size, zero, ...).
    #[error("input of {height}x{width} pixels is not a multiple of the patch size {patch}; resize or center-pad it first (see `dinov2_data` preprocessing)")]
    InputNotMultipleOfPatch {
        height: usize,
        width: usize,
        patch: usize,
    },

    /// A configuration that cannot describe a model.
    #[error("invalid model configuration: {0}")]
    Config(String),

    /// An argument outside its domain (bad mask shape, block index past the depth, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A model name that is neither an official short name, a Hub id we know, nor an existing path.
    #[error("unknown model `{0}`: expected a weights file or directory, an official name such as `dinov2_vits14` or `dinov2_vitb14_reg`, or a Hub id such as `facebook/dinov2-small`")]
    UnknownModel(String),

    /// A checkpoint whose layout or content we cannot interpret.
    #[error("cannot read weights from {path}: {reason}")]
    Format { path: PathBuf, reason: String },

    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Downloading from (or resolving in the cache of) the Hugging Face Hub failed.
    #[error("hub: {0}")]
    Hub(String),
}

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}
