//! `dinov2 eval`: evaluations of a frozen backbone on image folders (`knn`, `linear`), thin layers over
//! `dinov2_train::eval`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dinov2_data::{FileDataset, Preprocess};
use dinov2_model::LoadedModel;
use dinov2_train::eval::knn::{embed_dataset_with, knn_evaluate, metrics_json, OFFICIAL_KS};
use dinov2_train::eval::{labelled_folders, write_metrics};

use super::model::{self, ModelArgs};

/// `dinov2 eval <command>`.
#[derive(clap::Subcommand)]
pub(super) enum EvalCommand {
    /// Weighted k-NN classification of L2-normalised class tokens (the official eval/knn.py): top-1 and top-5 per k.
    Knn(KnnArgs),
    /// The linear probe (the official eval/linear.py): a grid of linear heads on cached features, the best chosen
    /// on a held-out part of the training set, scored on the validation set and saved.
    Linear(super::eval_linear::LinearArgs),
}

/// The backbone and the labelled folders every evaluation takes.
#[derive(clap::Args)]
pub(super) struct EvalData {
    #[command(flatten)]
    model: ModelArgs,
    /// Training images: one subfolder per class.
    #[arg(long)]
    train: PathBuf,
    /// Validation images: one subfolder per class, class names as in --train (a subset is fine).
    #[arg(long)]
    val: PathBuf,
}

impl EvalData {
    /// The folders (validation classes matched to training classes by name), then the model.
    pub(super) fn open(&self) -> Result<(FileDataset, FileDataset, LoadedModel)> {
        let (train, val) = labelled_folders(&self.train, &self.val)?;
        Ok((train, val, model::load(&self.model)?))
    }
}

/// `dinov2 eval knn` arguments.
#[derive(clap::Args)]
pub(super) struct KnnArgs {
    #[command(flatten)]
    data: EvalData,
    /// Numbers of neighbours (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = OFFICIAL_KS)]
    k: Vec<usize>,
    /// Voting temperature.
    #[arg(long, default_value_t = dinov2_train::eval::knn::TEMPERATURE)]
    temperature: f64,
    /// Shorter side before cropping (bicubic).
    #[arg(long, default_value_t = 256)]
    resize: u32,
    /// Center-crop size.
    #[arg(long, default_value_t = 224)]
    crop: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// JSON file to write (or update): {"knn": {"<k>": {"top1": .., "top5": ..}}} in percent.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs `dinov2 eval ...`.
pub(super) fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Knn(args) => knn(args),
        EvalCommand::Linear(args) => super::eval_linear::linear(args),
    }
}

fn knn(args: KnnArgs) -> Result<()> {
    if args.k.is_empty() {
        bail!("--k needs at least one value, e.g. --k 10,20,100,200");
    }
    let (train_ds, val_ds, loaded) = args.data.open()?;
    let transform = Preprocess::Eval {
        resize: args.resize,
        crop: args.crop,
    };
    eprintln!(
        "embedding {} training and {} validation images ({} classes)",
        train_ds.entries.len(),
        val_ds.entries.len(),
        train_ds.classes.len()
    );
    let embed = |ds: &FileDataset, what: &str| {
        embed_dataset_with(&loaded.model, ds, transform, args.batch_size)
            .with_context(|| format!("cannot embed the {what} images"))
    };
    let (train, train_labels) = embed(&train_ds, "training")?;
    let (val, val_labels) = embed(&val_ds, "validation")?;
    let results = knn_evaluate(
        &train,
        &train_labels,
        &val,
        &val_labels,
        &args.k,
        args.temperature,
    )?;
    for r in &results {
        println!(
            "k = {:>4}: top-1 {:6.2}%  top-5 {:6.2}%",
            r.k, r.top1, r.top5
        );
    }
    if let Some(out) = &args.output {
        write_metrics(out, "knn", metrics_json(&results))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
