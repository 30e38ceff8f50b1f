//! Evaluation of frozen backbones, as the official `eval/` scripts: [`knn`] (weighted k-NN on L2-normalised class
//! tokens).
pub mod knn;
