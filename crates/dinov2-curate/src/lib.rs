//! # dinov2-curate
//!
//! The DINOv2 data-curation pipeline on precomputed embeddings: an embedding store (memory-mapped `.npy` /
//! safetensors), exact and IVF k-NN, self and relative deduplication, sample- and cluster-based retrieval,
//! k-means, hierarchical k-means with resampling and balanced hierarchical sampling; and [`pipeline`], those
//! steps as resumable stages over files (what `dinov2 curate` runs). Cross-worker reductions (sharded k-means,
//! sharded dedup) go through the workspace's one collective interface, [`dinov2_dist::Communicator`] (re-exported
//! as [`dist`]), so the same code runs in one process, on in-process thread groups and under `mpirun`. Errors:
//! [`Error`] and [`Result`].
#![warn(missing_docs)]

pub mod dedup;
pub mod embed;
pub mod error;
pub mod hkmeans;
pub mod ivf;
pub mod kmeans;
pub mod knn;
pub mod linalg;
pub mod npy;
pub mod pipeline;
pub mod retrieve;
pub mod store;

pub use dinov2_dist as dist;
pub use error::{Error, Result};
