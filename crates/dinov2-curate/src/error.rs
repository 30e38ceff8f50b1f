//! The error type of the curation crate: [`Error`] and its [`Result`] alias.

use std::path::PathBuf;

/// A boxed error from outside this crate (the embedding model of [`crate::embed::Embedder`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in `dinov2-curate`.
///
/// Variants carry the values a caller can act on (paths, row ids, sizes, parameter names, worker ranks); the
/// messages name the bad value and, where there is one, the fix.
///
/// ```
/// use dinov2_curate::store::Embeddings;
/// use dinov2_curate::Error;
/// let e = Embeddings::from_vec(vec![1.0, 0.0, 0.0, 1.0], 2, 2).unwrap();
/// match e.select(&[0, 5]) {
///     Err(Error::RowOutOfRange { row, rows, .. }) => assert_eq!((row, rows), (5, 2)),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error, with the path involved.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A malformed or unsupported `.npy` file.
    #[error("npy {}: {reason}", path.display())]
    Npy {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A malformed or unsupported safetensors file.
    #[error("safetensors {}: {reason}", path.display())]
    Safetensors {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// JSON (de)serialisation failed.
    #[error("json {}: {source}", path.display())]
    Json {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A flat buffer whose length is not a whole number of rows of the given dimension.
    #[error("{op}: {len} values are not rows of dimension {dim}")]
    NotRows {
        /// Operation that received the buffer.
        op: &'static str,
        /// Number of values.
        len: usize,
        /// Row dimension (0 is never valid).
        dim: usize,
    },
    /// An input file whose rows have another dimension than the embeddings they are used with.
    #[error("{} has dimension {got}, expected {expected} (the dimension of the embeddings)", path.display())]
    DimMismatch {
        /// File involved.
        path: PathBuf,
        /// Dimension of the embeddings.
        expected: usize,
        /// Dimension found in the file.
        got: usize,
    },
    /// An input file with another number of entries than the rows it describes.
    #[error("{} has {got} {what}, expected {expected} (one per row)", path.display())]
    LengthMismatch {
        /// File involved.
        path: PathBuf,
        /// What the entries are (e.g. "assignments").
        what: &'static str,
        /// Number of rows described.
        expected: usize,
        /// Number of entries found.
        got: usize,
    },
    /// Embeddings holding NaN or an infinity: every distance, cluster and duplicate computed from them would be
    /// meaningless, so they are refused where they enter (files, buffers, model outputs).
    #[error(
        "{}: row {row} is not finite ({value} in column {col}); {rows} of {total} rows hold NaN or inf, and \
         curation needs finite vectors (embeddings: re-embed those images or remove the rows)",
        path.as_ref().map_or_else(|| "embeddings".to_string(), |p| p.display().to_string())
    )]
    NonFinite {
        /// File involved (`None` for an in-memory buffer).
        path: Option<PathBuf>,
        /// First row with a non-finite value.
        row: usize,
        /// Its first non-finite column.
        col: usize,
        /// The value there (NaN, inf or -inf).
        value: f32,
        /// Number of rows with a non-finite value.
        rows: usize,
        /// Number of rows in all.
        total: usize,
    },
    /// A model returned NaN or an infinity for an image (decoded pixels are always finite, so the weights are the
    /// usual suspect). Finished shards are kept; the run resumes once the cause is fixed.
    #[error(
        "the embedding of {} (row {row}) is not finite ({value} in column {col}); check the model's weights \
         (a checkpoint of a diverged run?) or that image",
        image.display()
    )]
    NonFiniteEmbedding {
        /// The image.
        image: PathBuf,
        /// Its row in the pool.
        row: usize,
        /// First non-finite column.
        col: usize,
        /// The value there.
        value: f32,
    },
    /// Other shapes that do not fit together.
    #[error("shape mismatch in {op}: {reason}")]
    Shape {
        /// Operation involved.
        op: &'static str,
        /// What does not fit.
        reason: String,
    },
    /// A parameter out of its valid range.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// Parameter name (as in the parameter structs of [`crate::pipeline`]).
        name: &'static str,
        /// What is wrong and what would be valid.
        reason: String,
    },
    /// A row id outside the embedding matrix.
    #[error("row id {row} is outside 0..{rows}{}", path.as_ref().map(|p| format!(" (in {})", p.display())).unwrap_or_default())]
    RowOutOfRange {
        /// The row id.
        row: i64,
        /// Rows of the matrix.
        rows: usize,
        /// The ids file it came from, when known.
        path: Option<PathBuf>,
    },
    /// The embedding model failed.
    #[error("embedding model failed: {source}")]
    Embedder {
        /// The model's error.
        #[source]
        source: BoxError,
    },
    /// The embedding model returned the wrong number of values.
    #[error("the embedding model returned {values} values for {images} images of dimension {dim}")]
    EmbedderOutput {
        /// Values returned.
        values: usize,
        /// Images in the batch.
        images: usize,
        /// The model's dimension.
        dim: usize,
    },
    /// A collective operation of a sharded run failed (a peer left, timed out, or the ranks' calls did not
    /// match); see [`dinov2_dist::Error`].
    #[error(transparent)]
    Dist(#[from] dinov2_dist::Error),
    /// A resumable stage found state from an incompatible or damaged earlier run.
    #[error("cannot resume in {}: {reason}", path.display())]
    Resume {
        /// Directory involved.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// A stage's output directory holds checkpoints of a run with other parameters.
    #[error("cannot resume in {}: params.json differs; use --force (force = true) to recompute, or another output directory", path.display())]
    ParamsChanged {
        /// Output directory.
        path: PathBuf,
    },
    /// A directory that should hold the output of an earlier stage does not.
    #[error("{} is not a finished `{stage}` output; run `{stage}` first", path.display())]
    MissingOutput {
        /// Directory involved.
        path: PathBuf,
        /// The stage that should have written it.
        stage: &'static str,
    },
}

impl Error {
    /// Wraps an error of the embedding model ([`Error::Embedder`]); strings work too.
    ///
    /// ```
    /// let e = dinov2_curate::Error::embedder("out of memory");
    /// assert_eq!(e.to_string(), "embedding model failed: out of memory");
    /// ```
    pub fn embedder(source: impl Into<BoxError>) -> Self {
        Error::Embedder {
            source: source.into(),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// `NotRows` unless `len` is a whole number of rows of a positive dimension `dim`.
pub(crate) fn check_rows(op: &'static str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 || len % dim != 0 {
        return Err(Error::NotRows { op, len, dim });
    }
    Ok(len / dim)
}

pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        name,
        reason: reason.into(),
    }
}
