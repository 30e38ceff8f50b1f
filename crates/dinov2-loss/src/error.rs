//! Error type of the crate.

/// Errors returned by the heads and losses.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle (shape/dtype mismatch inside an op, allocation, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An invalid configuration value (zero dimension, non-positive temperature, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An input tensor has the wrong shape or dtype for the operation.
    #[error("invalid input: {0}")]
    Input(String),
    /// The loss is undefined for this batch (for example KoLeo with fewer than two samples).
    #[error("degenerate batch: {0}")]
    DegenerateBatch(String),
    /// A collective operation of a [`crate::Reducer`] failed.
    #[error("reduction failed: {0}")]
    Reduce(String),
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;
