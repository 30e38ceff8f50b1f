//! The error type of collective operations.

/// What went wrong in a collective operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A peer left the group (its handle was dropped, its process ended or it reported a failure), so the
    /// collective cannot complete.
    #[error(
        "rank {rank}: worker {peer} of {world} left the group, so the collective cannot complete"
    )]
    PeerLeft {
        /// The peer that left.
        peer: usize,
        /// Number of ranks.
        world: usize,
        /// The rank reporting the error.
        rank: usize,
    },
    /// The ranks made collective calls that do not match (different operations, or all-reduce buffers of
    /// different lengths, in the same round).
    #[error("rank {rank}: the ranks made collective calls that do not match: {reason}")]
    Mismatch {
        /// The rank reporting the error.
        rank: usize,
        /// What did not match.
        reason: String,
    },
    /// A peer did not arrive within the group's timeout.
    #[error("rank {rank}: {op} timed out after {secs} s waiting for the other ranks")]
    Timeout {
        /// The rank reporting the error.
        rank: usize,
        /// The collective operation.
        op: &'static str,
        /// The timeout in seconds.
        secs: f64,
    },
    /// An argument is out of range (a root rank beyond the group, a zero-sized group, ...).
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The launcher environment is incomplete or inconsistent (`RANK`, `WORLD_SIZE`, `OMPI_COMM_WORLD_*`, ...).
    #[error("launcher environment: {reason}")]
    Environment {
        /// What is wrong.
        reason: String,
    },
    /// The backend library reported an error, or is not available in this build or on this machine.
    #[error("{backend}: {reason}")]
    Backend {
        /// `mpi`, `nccl`, ...
        backend: &'static str,
        /// The library's message.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
