//! Classification without training a classifier: embed a labelled training set and a test set, then label each
//! test image by the weighted vote of its nearest training images (the official k-NN evaluation: cosine
//! similarity of normalised class tokens, softmax weights at T = 0.07, top-1 and top-5 accuracy).
//! The data are generated shapes of ten classes (`SyntheticShapes`, each class in its own colour family, as in
//! the main job), so the example runs offline. Colour gives the class away even to a random network (about 80 %
//! top-1; the main job's teacher, second command, about 95 %); `--plain-colours` leaves shape as the only cue,
//! where both are near chance (the teacher learned the colour families). The third command runs the released
//! ViT-S/14 on 224-pixel renderings.
//!
//! ```text
//! cargo run --release --example knn_classify -- [--train 500] [--test 200]
//! cargo run --release --example knn_classify -- --model runs/pretrain_tiny/run/teacher.safetensors
//! cargo run --release --example knn_classify -- --model dinov2_vits14 --image-size 224
//! ```
//! `--model` takes anything `dinov2 embed --model` does (an official name or Hub id is downloaded once); without it
//! a seeded random ViT runs. On your own folders (one subfolder per class): `dinov2 eval knn --model M --train DIR
//! --val DIR`.

#[path = "common/mod.rs"]
mod common;

use anyhow::Result;
use clap::Parser;
use dinov2::data::synthetic::{SyntheticShapes, CLASSES};
use dinov2::train::eval::knn::{
    embed_dataset, knn_evaluate, knn_predict, KnnAccuracy, TEMPERATURE,
};

#[derive(Parser, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: common::ModelArg,
    /// Labelled training images (the neighbours that vote).
    #[arg(long, default_value_t = 500)]
    pub train: usize,
    /// Test images.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    /// Image side in pixels (default: 4 patches, 56 for patch 14, 32 for the main job's patch 8).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Numbers of neighbours.
    #[arg(long, value_delimiter = ',', default_value = "10,20")]
    pub k: Vec<usize>,
    /// Object colours independent of the class: shape is then the only cue (much harder).
    #[arg(long)]
    pub plain_colours: bool,
}

/// Runs the example; returns the accuracy for every k and the predicted class of every test image (first k).
pub fn run(args: &Args) -> Result<(Vec<KnnAccuracy>, Vec<usize>)> {
    let model = args.model.load()?;
    let size = args
        .image_size
        .unwrap_or(4 * model.config().patch_size as u32);
    let shapes = |n, seed| -> Result<SyntheticShapes> {
        let ds = SyntheticShapes::new(n, seed).with_image_size(size)?;
        Ok(if args.plain_colours {
            ds
        } else {
            ds.with_class_colours()
        })
    };
    // two seeds of the generator: independent training and test images
    let (train, train_labels) = embed_dataset(&model, &shapes(args.train, 1)?, size as usize, 64)?;
    let (test, test_labels) = embed_dataset(&model, &shapes(args.test, 2)?, size as usize, 64)?;

    let results = knn_evaluate(
        &train,
        &train_labels,
        &test,
        &test_labels,
        &args.k,
        TEMPERATURE,
    )?;
    println!(
        "k-NN on generated shapes: {} training / {} test images of {size} px, 10 classes (chance 10 %)",
        args.train, args.test
    );
    for r in &results {
        println!(
            "  k = {:3}: top-1 {:5.1} %   top-5 {:5.1} %",
            r.k, r.top1, r.top5
        );
    }
    // the predictions themselves, per class
    let k = args.k[0];
    let predicted = knn_predict(&train, &train_labels, &test, k, TEMPERATURE)?;
    println!("right per class (k = {k}):");
    for (c, name) in CLASSES.iter().enumerate() {
        let of_class = (0..predicted.len()).filter(|&i| test_labels[i] == c);
        let right = of_class.clone().filter(|&i| predicted[i] == c).count();
        println!("  {name:10} {right:3} of {:3}", of_class.count());
    }
    Ok((results, predicted))
}

fn main() -> Result<()> {
    run(&Args::parse()).map(drop)
}
