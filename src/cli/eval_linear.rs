//! `dinov2 eval linear`: the official linear probe (`eval/linear.py`) on image folders, a thin layer over
//! `dinov2_train::eval::linear` (features cached once, the grid of heads, selection on a held-out split).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dinov2_data::{FileDataset, Preprocess};
use dinov2_train::eval::linear::{
    embed_linear_features, linear_probe, HeadResult, LinearProbeConfig, OFFICIAL_LEARNING_RATES,
};
use dinov2_train::eval::write_metrics;

use super::eval::EvalData;

/// The default crop never exceeds the official evaluation crop.
const MAX_DEFAULT_IMAGE_SIZE: usize = 224;

/// `dinov2 eval linear` arguments.
#[derive(clap::Args)]
pub(super) struct LinearArgs {
    #[command(flatten)]
    data: EvalData,
    /// JSON file to write (or update): {"linear": {"best": {..}, "heads": {..}}}, accuracies in percent.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where to save the selected head: safetensors in the official _linear_head layout (weight, bias), with
    /// n_last_blocks, avgpool and the class names in its metadata.
    #[arg(long)]
    head_output: Option<PathBuf>,
    /// Epochs of --epoch-length iterations.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Iterations per epoch. Default: the official 1250, or one pass over the training split when that is longer.
    #[arg(long)]
    epoch_length: Option<usize>,
    /// SGD minibatch size (the learning rates scale by batch/256); capped at the training split.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Crop size S: the shorter side is resized to S*256/224 (bicubic), then center-cropped to S. Default: the
    /// model's img_size, at most 224.
    #[arg(long)]
    image_size: Option<u32>,
    /// Fraction of the training images held out to select the head (at least one image); 0 selects on the
    /// validation set, as the official script.
    #[arg(long, default_value_t = 0.1)]
    holdout: f64,
    /// Numbers of last blocks whose class tokens feed a head (comma-separated). Default 1,4 (4 is skipped, with
    /// a note, for backbones of fewer blocks).
    #[arg(long, value_delimiter = ',')]
    n_last_blocks: Option<Vec<usize>>,
    /// Base learning rates of the grid (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = OFFICIAL_LEARNING_RATES)]
    learning_rates: Vec<f64>,
    /// Seed of the held-out split, the initial weights and the minibatch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per forward pass when computing the features.
    #[arg(long, default_value_t = 64)]
    embed_batch_size: usize,
}

/// Runs `dinov2 eval linear`.
pub(super) fn linear(args: LinearArgs) -> Result<()> {
    let (train_ds, val_ds, loaded) = args.data.open()?;
    let cfg = loaded.model.config();
    let size = match args.image_size {
        Some(0) => bail!("--image-size must be positive"),
        Some(s) => s,
        None => u32::try_from(cfg.img_size.min(MAX_DEFAULT_IMAGE_SIZE))?,
    };
    let transform = Preprocess::eval_at(size);
    // the class tokens of the last 4 blocks serve the official grid; more only when asked for
    let wanted = args
        .n_last_blocks
        .as_ref()
        .and_then(|v| v.iter().copied().max())
        .unwrap_or(4);
    let blocks = wanted.clamp(1, cfg.depth);
    eprintln!(
        "embedding {} training and {} validation images ({} classes) at {size}x{size}",
        train_ds.entries.len(),
        val_ds.entries.len(),
        train_ds.classes.len()
    );
    let embed = |ds: &FileDataset, what: &str| {
        embed_linear_features(&loaded.model, ds, transform, args.embed_batch_size, blocks)
            .with_context(|| format!("cannot embed the {what} images"))
    };
    let train = embed(&train_ds, "training")?;
    let val = embed(&val_ds, "validation")?;
    let probe = LinearProbeConfig {
        n_last_blocks: args.n_last_blocks.clone(),
        learning_rates: args.learning_rates.clone(),
        epochs: args.epochs,
        epoch_length: args.epoch_length,
        batch_size: args.batch_size,
        holdout: args.holdout,
        seed: args.seed,
    };
    let result = linear_probe(&train, &val, train_ds.classes.len(), &probe)?;
    for note in &result.notes {
        eprintln!("note: {note}");
    }
    eprintln!(
        "trained {} heads for {} iterations (batch {}) on {} images, {} held out",
        result.heads.len(),
        result.iterations,
        result.batch_size,
        result.train_rows,
        result.holdout_rows
    );
    for h in result.best_per_config() {
        println!("{}", summary(h));
    }
    let best = result.best();
    println!("best: {}", best.name); // the official name: its lr is the scaled one
    println!("{}", summary(best));
    if let Some(out) = &args.output {
        write_metrics(out, "linear", result.metrics_json())?;
        eprintln!("wrote {}", out.display());
    }
    if let Some(out) = &args.head_output {
        result
            .head
            .save(out, &train_ds.classes)
            .with_context(|| format!("cannot save the head to {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// `4 blocks + avgpool  base lr 0.001   held-out top-1  95.00%  val top-1  93.33%  top-5 100.00%`.
fn summary(h: &HeadResult) -> String {
    let held_out = h
        .holdout
        .map_or_else(|| "     -".to_string(), |s| format!("{:6.2}%", s.top1));
    format!(
        "{:<18} base lr {:<7}  held-out top-1 {held_out}  val top-1 {:6.2}%  top-5 {:6.2}%",
        h.spec.config.describe(),
        h.spec.lr,
        h.val.top1,
        h.val.top5
    )
}
