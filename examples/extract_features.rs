//! Feature extraction: every image of a folder through a DINOv2 backbone, the official outputs written to one
//! safetensors file (`x_norm_clstoken` [B, D], `x_norm_patchtokens` [B, N, D], `x_norm_regtokens` [B, R, D] for
//! models with registers, `x_prenorm` [B, 1+R+N, D]; the image paths in its metadata), then the cosine
//! similarities of the images' class tokens.
//!
//! ```text
//! cargo run --release --example extract_features -- [--images DIR] [--output runs/examples/features.safetensors]
//! cargo run --release --example extract_features -- --model dinov2_vits14 --images photos/   # real weights
//! ```
//! `--model` takes anything `dinov2 embed --model` does: an official name (`dinov2_vitb14_reg`, downloaded once
//! from the Hub), a Hub id (`facebook/dinov2-small`) or a local file; without it a seeded random ViT runs, so the
//! example works offline. Images go through the official evaluation transform (shorter side 256, center crop 224).
//! `dinov2 embed` is the same as a command, with batching options.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, D};
use clap::Parser;
use dinov2::data::Preprocess;
use dinov2::embed::{
    collect_images, load_image, stack, write_safetensors_atomic, EmbeddingOutputs,
};

#[derive(Parser, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: common::ModelArg,
    /// Image files or folders (searched recursively).
    #[arg(long, num_args = 1.., default_value = "examples/images")]
    pub images: Vec<PathBuf>,
    /// The features file to write.
    #[arg(long, default_value = "runs/examples/features.safetensors")]
    pub output: PathBuf,
    /// Center-crop size (the official 224; the shorter side is first resized to 8/7 of it).
    #[arg(long, default_value_t = 224)]
    pub crop: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// Runs the example; returns the written tensors by name.
pub fn run(args: &Args) -> Result<HashMap<String, Tensor>> {
    let model = args.model.load()?;
    let files = collect_images(&args.images)?;
    ensure!(!files.is_empty(), "no images found in {:?}", args.images);
    let pre = Preprocess::Eval {
        resize: args.crop * 8 / 7,
        crop: args.crop,
    };
    let mut out = EmbeddingOutputs::default();
    for chunk in files.chunks(args.batch_size.max(1)) {
        let images = chunk
            .iter()
            .map(|p| load_image(p, &pre))
            .collect::<Result<Vec<_>>>()?;
        out.push_batch(&model, &stack(&images, &Device::Cpu)?)?;
    }
    let named = out.into_named()?;
    let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let meta = HashMap::from([("paths".to_string(), serde_json::to_string(&paths)?)]);
    write_safetensors_atomic(&args.output, &named, Some(meta))?;

    println!("wrote {}:", args.output.display());
    for (name, t) in &named {
        println!("  {name:20} {:?}", t.dims());
    }
    // cosine similarity of the (already layer-normed) class tokens
    let cls = &named[0].1;
    let unit = cls.broadcast_div(&cls.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
    let sim = unit.matmul(&unit.t()?)?.to_vec2::<f32>()?;
    println!("class-token cosine similarity:");
    for (p, row) in paths.iter().zip(&sim) {
        let cells: Vec<String> = row.iter().map(|s| format!("{s:6.3}")).collect();
        println!("  {} {p}", cells.join(" "));
    }
    Ok(named.into_iter().collect())
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}
