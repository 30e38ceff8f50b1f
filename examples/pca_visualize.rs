//! The DINOv2 patch-feature picture: the first three principal components of an image's patch tokens shown as
//! red, green and blue, one square per patch (as in the figures of the paper). With trained weights the parts of
//! an object get consistent colours and the background one of its own; a random network mostly shows colour.
//!
//! ```text
//! cargo run --release --example pca_visualize -- [--image FILE] [--output runs/examples/pca.png] [--side-by-side]
//! cargo run --release --example pca_visualize -- --model dinov2_vitl14_reg --image cat.jpg --size 448
//! ```
//! `--model` takes anything `dinov2 embed --model` does (an official name or Hub id is downloaded once); without it
//! a seeded random ViT runs, offline. The image is resized so its shorter side is near `--size` and both sides are
//! multiples of the patch size; the output has the size of that model input, next to the input itself with
//! `--side-by-side`. `dinov2 pca` is the same as a command.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use dinov2::data::image::{imageops, RgbImage};
use dinov2::pca::pca_image;

#[derive(Parser, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: common::ModelArg,
    #[command(flatten)]
    pub input: common::ImageArg,
    /// The PNG to write.
    #[arg(long, default_value = "runs/examples/pca.png")]
    pub output: PathBuf,
    /// Put the (resized) input image left of the PCA picture.
    #[arg(long)]
    pub side_by_side: bool,
}

/// Runs the example; returns the picture it wrote.
pub fn run(args: &Args) -> Result<RgbImage> {
    let model = args.model.load()?;
    let patch = model.config().patch_size as u32;
    let x = args.input.tensor(patch as usize)?;
    let features = model.forward_features(&x, None)?;
    let (rows, cols) = features.grid;
    // [N, D] patch tokens -> one RGB square of `patch` pixels per token
    let pca = pca_image(
        &features.x_norm_patchtokens.squeeze(0)?,
        features.grid,
        patch,
    )?;
    let picture = if args.side_by_side {
        let input = args.input.picture(pca.width(), pca.height())?;
        let mut both = RgbImage::new(2 * pca.width(), pca.height());
        imageops::replace(&mut both, &input, 0, 0);
        imageops::replace(&mut both, &pca, pca.width() as i64, 0);
        both
    } else {
        pca
    };
    common::save_png(&picture, &args.output)?;
    println!(
        "{}: {rows}x{cols} patches of {patch} px, {}-dim features -> {} ({}x{} px)",
        args.input.image.display(),
        model.embed_dim(),
        args.output.display(),
        picture.width(),
        picture.height()
    );
    Ok(picture)
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}
