//! Typed errors of the model crate: [`Error`] and [`Result`].

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running a DINOv2 model.
///
/// Variants name what a caller can act on (the key, the shapes, the path, the index); messages follow the
/// same style: what was wrong, with which value, and what to do.
///
/// ```
/// use dinov2_model::{DinoVisionTransformer, Error, StateDict, VitConfig};
/// let cfg = VitConfig::vit_small();
/// let err = DinoVisionTransformer::from_state_dict(&cfg, &StateDict::new(), &candle_core::Device::Cpu,
///     candle_core::DType::F32).unwrap_err();
/// assert!(matches!(err, Error::MissingKey { ref key, .. } if key == "cls_token"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from candle (shape mismatch inside an op, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A weight the model needs is absent from the checkpoint.
    #[error("missing weight `{key}` (the model expects shape {expected:?})")]
    MissingKey {
        /// Official parameter name.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },

    /// A weight is present but has the wrong shape.
    #[error(
        "weight `{key}` has shape {actual:?} in the checkpoint but the model expects {expected:?}"
    )]
    ShapeMismatch {
        /// Official parameter name.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },

    /// The checkpoint has a weight this configuration does not use (strict loading, as the official code).
    #[error("unexpected weight `{key}` with shape {shape:?}: the checkpoint does not match the configuration ({hint})")]
    UnexpectedKey {
        /// The name found.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The configuration it was checked against, in words.
        hint: String,
    },

    /// The input image size is not a multiple of the patch size (or is empty).
    #[error("input of {height}x{width} pixels is not a multiple of the patch size {patch}; resize or center-pad it first (see `dinov2_data` preprocessing)")]
    InputNotMultipleOfPatch {
        /// Input height in pixels.
        height: usize,
        /// Input width in pixels.
        width: usize,
        /// The model's patch size.
        patch: usize,
    },

    /// The input has another number of channels than the model.
    #[error("input has {actual} channels, the model expects {expected}")]
    ChannelMismatch {
        /// The model's `in_chans`.
        expected: usize,
        /// Channels of the input.
        actual: usize,
    },

    /// Patch masks whose shape does not match the input.
    #[error("masks have shape {actual:?}, expected {expected:?} (batch, patches)")]
    MaskShape {
        /// `[batch, patches]` of the input.
        expected: Vec<usize>,
        /// The shape given.
        actual: Vec<usize>,
    },

    /// A block index past the model's depth.
    #[error("block index {index} is past the depth {depth}")]
    BlockIndex {
        /// The index asked for.
        index: usize,
        /// Number of blocks.
        depth: usize,
    },

    /// A configuration that cannot describe a model.
    #[error("invalid model configuration: `{field}` {reason}")]
    InvalidConfig {
        /// The configuration field (or checkpoint entry) at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// An argument outside its domain.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// Inference fusion asked of a model whose weights can change in place.
    #[error("cannot fuse a model whose weights are `Var`s (or views of them) for inference: the fused copies would go stale after an in-place update; its forward passes fold LayerScale on every call instead")]
    MutableWeights,

    /// A model name that is neither an official short name, a Hub id we know, nor an existing path.
    #[error("unknown model `{spec}`: expected a weights file or directory, an official name such as `dinov2_vits14` or `dinov2_vitb14_reg`, or a Hub id such as `facebook/dinov2-small`")]
    UnknownModel {
        /// What was asked for.
        spec: String,
    },

    /// A checkpoint whose layout or content we cannot interpret.
    #[error("cannot read weights from {path}: {reason}")]
    Format {
        /// The file or directory.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// A weight holding NaN or an infinity: a corrupt file or the checkpoint of a run that diverged.
    #[error("cannot use weights from {path}: `{tensor}` is not finite ({value} at flat index {index} of {numel}); the file is corrupt or comes from a diverged run: use an earlier checkpoint")]
    NonFinite {
        /// The file or directory.
        path: PathBuf,
        /// The tensor's name as stored in the file's layout after conversion (official names).
        tensor: String,
        /// Flat (row-major) index of its first non-finite element.
        index: usize,
        /// Number of elements of the tensor.
        numel: usize,
        /// The value there (NaN, inf or -inf).
        value: f64,
    },

    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Downloading from (or resolving in the cache of) the Hugging Face Hub failed.
    #[error("hub: {repo}: {reason}")]
    Hub {
        /// The repository id.
        repo: String,
        /// What failed.
        reason: String,
    },
}

/// Result alias of the model crate.
///
/// ```
/// fn width(name: &str) -> dinov2_model::Result<usize> {
///     Ok(name.parse::<dinov2_model::OfficialModel>()?.config().embed_dim)
/// }
/// assert_eq!(width("dinov2_vitb14").unwrap(), 768);
/// assert!(matches!(width("resnet50"), Err(dinov2_model::Error::UnknownModel { .. })));
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    /// This error as a candle error (for [`candle_core::Module`] implementations); the message is kept.
    pub(crate) fn into_candle(self) -> candle_core::Error {
        match self {
            Error::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}
