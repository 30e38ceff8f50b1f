//! Helpers shared by the `dinov2 eval` end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use dinov2_data::synthetic::SyntheticShapes;
use dinov2_model::{DinoVisionTransformer, VitConfig};

/// Runs the built `dinov2` binary offline.
pub fn dinov2(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dinov2"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run dinov2")
}

/// A tiny seeded ViT (32 wide, patch 8, 32 px, one register) of `depth` blocks, written with its configuration in
/// the metadata (what `dinov2 train` exports), and the same model in memory.
pub fn tiny_model(dir: &Path, depth: usize) -> (PathBuf, DinoVisionTransformer) {
    let mut cfg = VitConfig::vit_small().with_registers(1);
    (
        cfg.embed_dim,
        cfg.num_heads,
        cfg.depth,
        cfg.patch_size,
        cfg.img_size,
    ) = (32, 2, depth, 8, 32);
    let sd = dinov2_model::init::init_state_dict(&cfg, 3).unwrap();
    let path = dir.join(format!("tiny{depth}.safetensors"));
    dinov2_model::weights::save_safetensors_with_config(&sd, &cfg, &path).unwrap();
    let model =
        DinoVisionTransformer::from_state_dict(&cfg, &sd, &Device::Cpu, DType::F32).unwrap();
    (path, model)
}

/// `dir/train` and `dir/val`: class folders of generated shapes in class colours (seeds 1 and 2).
pub fn class_folders(dir: &Path, n_train: usize, n_val: usize) -> (PathBuf, PathBuf) {
    let (train, val) = (dir.join("train"), dir.join("val"));
    let shapes = |n, seed| SyntheticShapes::new(n, seed).with_class_colours();
    shapes(n_train, 1).write_image_folder(&train).unwrap();
    shapes(n_val, 2).write_image_folder(&val).unwrap();
    (train, val)
}
