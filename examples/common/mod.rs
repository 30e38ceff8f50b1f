//! What the examples share: the `--model` option (real weights, or a small seeded random ViT when it is not
//! given), the `--image`/`--size` options of the one-image examples, and atomic PNG writing. Not an example
//! itself: Cargo builds only `examples/*.rs` and `examples/*/main.rs`.
#![allow(dead_code)] // each example uses part of it

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use dinov2::data::image::{imageops, RgbImage};
use dinov2::data::{load_rgb, Preprocess};
use dinov2::embed::{load_image, stack};
use dinov2::model::{init, DinoVisionTransformer, VitConfig};

/// `--model SPEC`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelArg {
    /// Weights: a file or directory (official .pth/.safetensors, a transformers directory, timm, a training
    /// checkpoint or `teacher.safetensors`), an official name (dinov2_vits14, dinov2_vitb14_reg) or a Hub id
    /// (facebook/dinov2-small); anything `dinov2 embed --model` accepts. Without it: a seeded random ViT.
    #[arg(long)]
    pub model: Option<String>,
}

impl ModelArg {
    /// The model named by `--model` (f32, CPU), or [`random_vit`] with a note on stderr.
    pub fn load(&self) -> Result<DinoVisionTransformer> {
        match &self.model {
            Some(spec) => dinov2::model::load_model(spec, &Device::Cpu, DType::F32)
                .with_context(|| format!("cannot load model `{spec}`")),
            None => {
                eprintln!(
                    "note: no --model given, using a seeded random ViT (4 blocks, 192 wide, patch 14); \
                     pass --model dinov2_vits14 (downloaded once) for real features"
                );
                random_vit()
            }
        }
    }
}

/// A small ViT (192 wide, 3 heads, 4 blocks, patch 14, 224-pixel position table) with the official
/// initialisation from seed 0 and LayerScale 1, as the released configurations (training starts from 1e-5,
/// where the untrained blocks barely touch the tokens and every image gets nearly the same class token; at 1
/// random features do depend on the image).
pub fn random_vit() -> Result<DinoVisionTransformer> {
    let cfg = VitConfig {
        embed_dim: 192,
        num_heads: 3,
        depth: 4,
        img_size: 224,
        layer_scale_init: Some(1.0),
        ..VitConfig::vit_small()
    };
    let weights = init::init_state_dict(&cfg, 0)?;
    Ok(DinoVisionTransformer::from_state_dict(
        &cfg,
        &weights,
        &Device::Cpu,
        DType::F32,
    )?)
}

/// `--image FILE --size PIXELS`: one image, resized for the model.
#[derive(clap::Args, Debug, Clone)]
pub struct ImageArg {
    /// The image.
    #[arg(long, default_value = "examples/images/circles.png")]
    pub image: PathBuf,
    /// Shorter side of the model input, in pixels (rounded to a multiple of the patch size).
    #[arg(long, default_value_t = 224)]
    pub size: u32,
}

impl ImageArg {
    /// The model input `[1, 3, H, W]`: shorter side near `size`, both sides multiples of `patch`, normalised.
    pub fn tensor(&self, patch: usize) -> Result<Tensor> {
        let multiple = patch as u32;
        let pre = Preprocess::ResizeToMultiple {
            multiple,
            shorter_side: Some(self.size),
        };
        stack(&[load_image(&self.image, &pre)?], &Device::Cpu)
    }

    /// The image itself at `width` x `height` pixels, to draw next to or under a result.
    pub fn picture(&self, width: u32, height: u32) -> Result<RgbImage> {
        let img = load_rgb(&self.image)?;
        Ok(imageops::resize(
            &img,
            width,
            height,
            imageops::FilterType::CatmullRom,
        ))
    }
}

/// Writes a PNG through a temporary file in the same directory and a rename (never a truncated file).
pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .context("the output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}.png",
        name.to_string_lossy(),
        std::process::id()
    ));
    img.save(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
