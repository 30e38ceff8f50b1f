//! Where the class token looks: the attention of the CLS query over the patches in the last block (heads
//! averaged, or one head), upsampled to the image and drawn as a heat map over it. With trained weights the
//! heads single out the main objects (the DINO figure); a random network attends almost uniformly.
//!
//! ```text
//! cargo run --release --example attention_map -- [--image FILE] [--output runs/examples/attention.png]
//! cargo run --release --example attention_map -- --model dinov2_vits14_reg --image cat.jpg --size 448 --head 2
//! ```
//! `--model` takes anything `dinov2 embed --model` does (an official name or Hub id is downloaded once); without it
//! a seeded random ViT runs, offline. `--alpha 1` shows the heat map alone.

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use dinov2::data::image::{imageops, ImageBuffer, Luma, Rgb, RgbImage};

#[derive(Parser, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: common::ModelArg,
    #[command(flatten)]
    pub input: common::ImageArg,
    /// The PNG to write.
    #[arg(long, default_value = "runs/examples/attention.png")]
    pub output: PathBuf,
    /// One attention head instead of the mean over heads.
    #[arg(long)]
    pub head: Option<usize>,
    /// Opacity of the heat map over the image (0: image only, 1: heat map only).
    #[arg(long, default_value_t = 0.6)]
    pub alpha: f32,
}

/// Runs the example; returns the picture and the CLS attention per patch (row-major over the patch grid).
pub fn run(args: &Args) -> Result<(RgbImage, Vec<f32>)> {
    let model = args.model.load()?;
    let (cfg, last) = (model.config(), model.blocks().len() - 1);
    let (patch, regs) = (cfg.patch_size as u32, cfg.num_register_tokens);
    let x = args.input.tensor(patch as usize)?;
    let (features, maps) = model.forward_with_attention(&x, &[last])?;
    let (rows, cols) = features.grid;
    // [1, heads, T, T] softmax probabilities, tokens T = CLS, registers, patches: keep the CLS query row
    let cls_row = maps[0].1.get(0)?.narrow(1, 0, 1)?.squeeze(1)?; // [heads, T]
    let heads = cls_row.dim(0)?;
    let cls_row = match args.head {
        Some(h) => {
            ensure!(
                h < heads,
                "--head {h}: the model has {heads} heads (0..{})",
                heads - 1
            );
            cls_row.get(h)?
        }
        None => cls_row.mean(0)?,
    };
    let on_regs = cls_row.narrow(0, 1, regs)?.sum_all()?.to_scalar::<f32>()?;
    let attn = cls_row.narrow(0, 1 + regs, rows * cols)?.to_vec1::<f32>()?;
    let on_patches: f32 = attn.iter().sum();
    let best = (0..attn.len())
        .max_by(|&a, &b| attn[a].total_cmp(&attn[b]))
        .unwrap_or(0);
    let head = args
        .head
        .map_or(format!("mean of {heads} heads"), |h| format!("head {h}"));
    println!(
        "block {last}, {head}: CLS attention on patches {:.1} %, registers {:.1} %, itself {:.1} %",
        100.0 * on_patches,
        100.0 * on_regs,
        100.0 * (1.0 - on_patches - on_regs)
    );
    let (r, c) = (best / cols, best % cols);
    let uniform = 100.0 * on_patches / attn.len() as f32;
    println!(
        "  most attended: patch ({r}, {c}) of {rows}x{cols}, {:.2} % (uniform: {uniform:.2} %)",
        100.0 * attn[best]
    );

    // heat map: min-max scaled, bilinear upsampling to the input size, blended over the resized image
    let (lo, hi) = attn
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let scaled: Vec<f32> = attn
        .iter()
        .map(|v| (v - lo) / (hi - lo).max(1e-12))
        .collect();
    let grid = ImageBuffer::<Luma<f32>, _>::from_raw(cols as u32, rows as u32, scaled);
    let grid = grid.context("the attention does not fill the patch grid")?;
    let (w, h) = (cols as u32 * patch, rows as u32 * patch);
    let heat = imageops::resize(&grid, w, h, imageops::FilterType::Triangle);
    let image = args.input.picture(w, h)?;
    let alpha = args.alpha.clamp(0.0, 1.0);
    let picture = RgbImage::from_fn(w, h, |x, y| {
        let (c, p) = (colour(heat.get_pixel(x, y)[0]), image.get_pixel(x, y));
        Rgb(std::array::from_fn(|i| {
            ((1.0 - alpha) * p[i] as f32 + alpha * c[i]).round() as u8
        }))
    });
    common::save_png(&picture, &args.output)?;
    println!("wrote {} ({w}x{h} px)", args.output.display());
    Ok((picture, attn))
}

/// A black-red-yellow-white colour scale for `v` in [0, 1].
fn colour(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0) * 3.0;
    [
        v.min(1.0),
        (v - 1.0).clamp(0.0, 1.0),
        (v - 2.0).clamp(0.0, 1.0),
    ]
    .map(|c| 255.0 * c)
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}
