//! Data curation on a small image pool with the `dinov2-curate` library: embed every image (normalised class
//! token), drop duplicates (self-dedup: k-NN graph, edges above a cosine threshold, one image per connected
//! component), cluster the rest with k-means, and draw a sample balanced over the clusters (water-filling, as the
//! hierarchical sampling of Vo et al. 2024 at one level).
//! The pool is written to `OUTPUT/pool`: the shipped images, an exact copy and a near-duplicate (resized to 90 %,
//! as a thumbnail or a re-upload) of each, and generated shapes of random colours.
//!
//! ```text
//! cargo run --release --example curate_pool -- [--output runs/examples/curate_pool] [--clusters 10] [--target 20]
//! cargo run --release --example curate_pool -- --model dinov2_vits14 --threshold 0.6   # real weights
//! ```
//! `--model` takes anything `dinov2 embed --model` does (an official name or Hub id is downloaded once); without it
//! a seeded random ViT runs, offline. The official threshold for real features is 0.6; the default, 0.999, suits
//! the random network, whose class tokens mostly see colour (shapes of similar colours reach a cosine of 0.997).
//! `dinov2 curate embed|dedup|kmeans|hkmeans|sample` runs the same steps on files, resumably.

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use dinov2::curate::dedup::{self_dedup, Searcher};
use dinov2::curate::embed::Embedder;
use dinov2::curate::hkmeans::{balanced_sample, hierarchical_kmeans, LevelConfig, Pick};
use dinov2::curate::store::{l2_normalize_rows, Embeddings};
use dinov2::data::{image::imageops, load_rgb, synthetic::SyntheticShapes, Preprocess};
use dinov2::embed::{collect_images, ModelEmbedder};

#[derive(Parser, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: common::ModelArg,
    /// Where the pool is written.
    #[arg(long, default_value = "runs/examples/curate_pool")]
    pub output: PathBuf,
    /// Generated images in the pool.
    #[arg(long, default_value_t = 60)]
    pub shapes: usize,
    /// Cosine similarity above which two images are duplicates (official: 0.6, for real features).
    #[arg(long, default_value_t = 0.999)]
    pub threshold: f32,
    /// k-means clusters.
    #[arg(long, default_value_t = 10)]
    pub clusters: usize,
    /// Images to sample.
    #[arg(long, default_value_t = 20)]
    pub target: usize,
}

/// Runs the example; returns the pool's paths, the rows kept by dedup and the sampled rows.
pub fn run(args: &Args) -> Result<(Vec<PathBuf>, Vec<i64>, Vec<i64>)> {
    let paths = write_pool(&args.output.join("pool"), args.shapes)?;
    let model = args.model.load()?;
    let mut embedder = ModelEmbedder {
        model,
        preprocess: Preprocess::OFFICIAL_EVAL,
        device: Device::Cpu,
    };
    let (n, d, mut x) = (paths.len(), embedder.dim(), Vec::new());
    for chunk in paths.chunks(16) {
        x.extend(embedder.embed(chunk)?);
    }
    l2_normalize_rows(&mut x, d); // cosine similarity = inner product

    // 1. self-dedup: each image's 8 nearest neighbours, edges above the threshold, one image per component
    let exact = Searcher::Exact { base: &x };
    let dedup = self_dedup(&x, d, 8, args.threshold, &exact, 1024)?;
    println!(
        "pool: {n} images; dedup (cosine > {}) keeps {}",
        args.threshold, dedup.n_kept
    );
    for (row, &c) in dedup.components.iter().enumerate() {
        let rep = dedup.keep[c as usize] as usize; // components are numbered in the order of `keep`
        if rep != row {
            let (dropped, kept) = (paths[row].display(), paths[rep].display());
            println!("  dropped {dropped} (duplicate of {kept})");
        }
    }

    // 2. k-means on the kept rows; 3. a sample balanced over the clusters (closest to the centroids first)
    let kept = Embeddings::from_vec(x, n, d)?.select(&dedup.keep)?;
    let level = LevelConfig {
        k: args.clusters,
        n_iter: 50,
        n_resampling_steps: 0,
        sample_size: 0,
        strategy: Pick::Closest,
    };
    let levels = hierarchical_kmeans(kept.as_slice(), d, &[level], 0)?;
    let picked = balanced_sample(&levels, args.target, 1, Pick::Closest, 0)?; // rows of `kept`
    println!(
        "k-means: {} clusters; balanced sample of {} images:",
        levels[0].k,
        picked.len()
    );
    for j in 0..levels[0].k {
        let members = levels[0].cluster(j);
        let chosen = members.iter().filter(|&&r| picked.contains(&(r as i64)));
        println!(
            "  cluster {j:2}: {:3} images, {} sampled",
            members.len(),
            chosen.count()
        );
    }
    let sampled = picked.iter().map(|&r| dedup.keep[r as usize]).collect();
    Ok((paths, dedup.keep, sampled))
}

/// The pool: shipped images, an exact copy and a 90 % copy of each, `n` generated shapes (64 px), all PNG.
/// Returns the paths written (files of earlier runs with other sizes are left alone and not part of the pool).
fn write_pool(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for src in collect_images(&[PathBuf::from("examples/images")])? {
        let stem = src
            .file_stem()
            .context("an image without a name")?
            .to_string_lossy();
        let img = load_rgb(&src)?;
        let small = imageops::resize(
            &img,
            img.width() * 9 / 10,
            img.height() * 9 / 10,
            imageops::FilterType::Triangle,
        );
        for (suffix, pixels) in [("", &img), ("_copy", &img), ("_small", &small)] {
            paths.push(dir.join(format!("{stem}{suffix}.png")));
            common::save_png(pixels, paths.last().unwrap())?;
        }
    }
    let shapes = SyntheticShapes::new(n, 0).with_image_size(64)?;
    paths.extend(shapes.write_image_folder(dir.join("shapes"))?);
    Ok(paths)
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}
