//! The project's main job: pretrain a small ViT with DINOv2 on a generated dataset, then compare its k-NN
//! accuracy with the same network at random initialisation (`examples/pretrain_tiny.rs`).
//!
//! The pool is [`SyntheticShapes`](crate::data::synthetic::SyntheticShapes) written as an image folder (its
//! labels are never shown to the trainer); the k-NN evaluation uses two other seeds of the same generator as
//! labelled train and test splits, the official k-NN protocol (cosine similarity, 20 neighbours, softmax
//! weights at T = 0.07) and the teacher's normalised CLS token.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::data::synthetic::SyntheticShapes;
use crate::model::DinoVisionTransformer;
use crate::train::run::{Event, RunOptions};
use crate::train::{eval::knn, TrainConfig};

/// The configuration of the main job (vit_tiny with patch 8 on 32-pixel images, small heads, a short
/// schedule), shipped as `examples/pretrain_tiny.yaml`.
pub const CONFIG_YAML: &str = include_str!("../examples/pretrain_tiny.yaml");

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the generated pool and the training run go.
    pub output_dir: PathBuf,
    /// Images in the (unlabelled) pretraining pool.
    pub pool_size: usize,
    /// Labelled images the k-NN classifier votes with.
    pub knn_train: usize,
    /// Labelled images it is evaluated on.
    pub knn_test: usize,
    /// `key=value` overrides on top of [`CONFIG_YAML`] (`optim.epochs=1`, say).
    pub overrides: Vec<String>,
}

impl DemoOptions {
    /// The main job's sizes: a 4000-image pool, 1000 / 1000 labelled k-NN images.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            pool_size: 4000,
            knn_train: 1000,
            knn_test: 1000,
            overrides: Vec::new(),
        }
    }
}

/// The outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoResult {
    /// k-NN top-1 accuracy of the network at initialisation.
    pub random_init_accuracy: f64,
    /// k-NN top-1 accuracy of the trained teacher.
    pub trained_accuracy: f64,
    /// Training iterations run.
    pub iterations: u64,
    /// Training wall time (seconds).
    pub train_seconds: f64,
}

const POOL_SEED: u64 = 0;
const KNN_TRAIN_SEED: u64 = 1;
const KNN_TEST_SEED: u64 = 2;
const KNN_K: usize = 20;

/// Generates the data, measures the random-init accuracy, trains (resuming a previous run of the same
/// directory), measures the trained accuracy. `on_event` sees the trainer's events.
pub fn run(opts: &DemoOptions, on_event: &mut dyn FnMut(Event<'_>)) -> Result<DemoResult> {
    let mut cfg = TrainConfig::from_yaml_str(CONFIG_YAML, "examples/pretrain_tiny.yaml")?;
    let image_size = cfg.crops.global_crops_size as u32;
    let pool_dir = opts.output_dir.join("pool");
    write_pool(&pool_dir, opts.pool_size, image_size)?;
    let mut overrides = vec![format!("train.dataset_path={}", pool_dir.display())];
    overrides.extend(opts.overrides.iter().cloned());
    cfg.apply_overrides(&overrides)?;
    cfg.validate()?;

    let knn_train = SyntheticShapes::new(opts.knn_train, KNN_TRAIN_SEED)
        .with_image_size(image_size)?
        .with_class_colours();
    let knn_test = SyntheticShapes::new(opts.knn_test, KNN_TEST_SEED)
        .with_image_size(image_size)?
        .with_class_colours();
    let size = cfg.crops.global_crops_size;
    let accuracy = |model: &DinoVisionTransformer| -> Result<f64> {
        let (train, train_labels) = knn::embed_dataset(model, &knn_train, size, 100)?;
        let (test, test_labels) = knn::embed_dataset(model, &knn_test, size, 100)?;
        Ok(knn::knn_accuracy(
            &train,
            &train_labels,
            &test,
            &test_labels,
            KNN_K,
            knn::TEMPERATURE,
        )?)
    };

    // the network at initialisation: the teacher of iteration 0 (= the student's official init)
    let init = crate::train::run::build_arch(&cfg, &Device::Cpu)?;
    let random_init_accuracy = accuracy(&init.teacher().backbone)?;
    drop(init);

    let run_dir = opts.output_dir.join("run");
    let started = Instant::now();
    let summary = crate::train::run::run(&cfg, &RunOptions::new(&run_dir), on_event)?;
    let train_seconds = started.elapsed().as_secs_f64();

    let w = crate::model::weights::load_weights(&summary.teacher)
        .with_context(|| format!("cannot load {}", summary.teacher.display()))?;
    let trained =
        DinoVisionTransformer::from_state_dict(&w.config, &w.state_dict, &Device::Cpu, DType::F32)?;
    let trained_accuracy = accuracy(&trained)?;
    Ok(DemoResult {
        random_init_accuracy,
        trained_accuracy,
        iterations: summary.iteration,
        train_seconds,
    })
}

/// Writes the pool once (a complete earlier copy is reused).
fn write_pool(dir: &Path, n: usize, image_size: u32) -> Result<()> {
    let marker = dir.join(".complete");
    let want = format!("{n} {image_size} {POOL_SEED} class-colours");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == want) {
        return Ok(());
    }
    SyntheticShapes::new(n, POOL_SEED)
        .with_image_size(image_size)?
        .with_class_colours()
        .write_image_folder(dir)?;
    std::fs::write(&marker, want).with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(())
}
