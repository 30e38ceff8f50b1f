//! # dinov2
//!
//! DINOv2 in Rust on candle. This crate re-exports the workspace's libraries and holds the pieces of the
//! `dinov2` command-line tool that join them:
//!
//! * [`model`] (`dinov2-model`): the backbones, weight formats, Hub download;
//! * [`loss`] (`dinov2-loss`): DINO head, DINO / iBOT / KoLeo losses;
//! * [`data`] (`dinov2-data`): decoding, augmentation, masking, datasets, loaders;
//! * [`curate`] (`dinov2-curate`): embedding stores, k-NN, deduplication, (hierarchical) k-means, sampling;
//! * [`train`] (`dinov2-train`): DINOv2 pretraining (meta-architecture, optimiser, schedules, checkpoints, runs);
//! * [`dist`] (`dinov2-dist`): the collectives (single process, thread groups, MPI, NCCL) behind multi-process runs;
//! * [`pretrain_demo`]: the main job, pretraining on generated shapes with a k-NN comparison;
//! * [`embed`]: image files or pixel tensors to features, in batches;
//! * [`pca`]: the classic RGB picture of the first three principal components of patch features.
pub use dinov2_curate as curate;
pub use dinov2_data as data;
pub use dinov2_dist as dist;
pub use dinov2_loss as loss;
pub use dinov2_model as model;
pub use dinov2_train as train;

pub mod embed;
pub mod pca;
pub mod pretrain_demo;
