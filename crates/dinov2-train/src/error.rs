//! Typed errors of the crate: [`Error`] and [`Result`].

use std::path::PathBuf;

/// Everything that can go wrong while configuring, running, saving or resuming a training run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from `dinov2-model`.
    #[error(transparent)]
    Model(#[from] dinov2_model::Error),
    /// An error from `dinov2-loss`.
    #[error(transparent)]
    Loss(#[from] dinov2_loss::Error),
    /// An error from `dinov2-data`.
    #[error(transparent)]
    Data(#[from] dinov2_data::Error),
    /// A collective of data-parallel training failed (`dinov2-dist`).
    #[error(transparent)]
    Dist(#[from] dinov2_dist::Error),
    /// Data-parallel ranks whose weights are no longer bit-identical (see
    /// [`DataParallel::check_in_sync`](crate::data_parallel::DataParallel::check_in_sync)).
    #[error("data-parallel ranks out of sync at iteration {iteration}: the {what} of rank(s) {ranks:?} differ from rank 0's")]
    RanksOutOfSync {
        /// What was compared.
        what: String,
        /// Completed iterations when it was checked.
        iteration: u64,
        /// The ranks whose values differ from rank 0's.
        ranks: Vec<usize>,
    },
    /// Another rank of a data-parallel run failed (what it reported).
    #[error("rank {rank} failed: {reason}")]
    RankFailed {
        /// The rank.
        rank: usize,
        /// Its error.
        reason: String,
    },

    /// A configuration key that does not exist.
    #[error("unknown configuration key `{key}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        /// The full dotted key.
        key: String,
        /// The closest valid key, if one is close.
        suggestion: Option<String>,
    },
    /// A configuration value of the wrong type or outside its domain.
    #[error("invalid configuration: `{key}` = {value}: {reason}")]
    InvalidConfig {
        /// The full dotted key.
        key: String,
        /// The value as written.
        value: String,
        /// What the value must be.
        reason: String,
    },
    /// A configuration file or override that is not valid YAML / `key=value`.
    #[error("cannot parse {source_name}: {reason}")]
    ConfigSyntax {
        /// The file or the override.
        source_name: String,
        /// The parser's message.
        reason: String,
    },

    /// A file system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint that cannot be read or does not match this run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A loss that is NaN or infinite: training stopped, the last good checkpoint is kept.
    #[error("non-finite loss at iteration {iteration}: {terms}; stopped, the last good checkpoint is kept{}", last_checkpoint.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    NonFiniteLoss {
        /// The iteration.
        iteration: u64,
        /// The loss terms, as `name=value` pairs.
        terms: String,
        /// The last good checkpoint, if any.
        last_checkpoint: Option<PathBuf>,
    },
    /// The frozen teacher of a distillation run cannot be loaded, or does not fit the student.
    #[error("distillation teacher `{spec}`: {reason}")]
    Teacher {
        /// The teacher as given (`distillation.teacher_model`).
        spec: String,
        /// What went wrong.
        reason: String,
    },
    /// An argument outside its domain.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// What it must be.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(
        key: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Error::InvalidConfig {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
