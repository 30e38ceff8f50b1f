//! Throughput of the full DINOv2 multi-crop augmentation (decode JPEG → 2x224 + 8x96 crops → ToTensor + Normalize)
//! on a thread pool. Run by `tools/bench_data.py`, which compares it with the official PyTorch pipeline.
//!
//! ```text
//! cargo run -p dinov2-data --example bench_augment -- <jpeg dir> <threads> <passes>
//! ```
//! Prints one line: `images=<n> seconds=<s> images_per_s=<r>`.

use std::path::PathBuf;
use std::time::Instant;

use dinov2_data::augment::{BlurProbabilities, CropsConfig, DataAugmentationDino};
use std::sync::Arc;

use dinov2_data::collate::MaskCollate;
use dinov2_data::dataset::{Dataset, FileDataset};
use dinov2_data::loader::{DinoPipeline, Loader, LoaderConfig};
use dinov2_data::preprocess::{to_tensor_normalized, IMAGENET_MEAN, IMAGENET_STD};
use dinov2_data::sampler::mix_seed;
use dinov2_data::sampler::ShardedInfiniteSampler;
use rand::SeedableRng;
use rayon::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .ok_or("usage: bench_augment <jpeg dir> <threads> <passes>")?,
    );
    let threads: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let passes: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;
    // optional 4th argument: `decode` = decoding only (to see how the time splits); `loader` = the whole `Loader`
    // (sampler, augmentation, normalisation into batch tensors, iBOT masks) with batches of 16
    let decode_only = args.get(4).is_some_and(|s| s == "decode");
    let ds = FileDataset::unlabeled_folder(&dir)?;
    let aug = DataAugmentationDino::new(CropsConfig::default(), BlurProbabilities::RELEASED)?;
    if args.get(4).is_some_and(|s| s == "loader") {
        return bench_loader(ds, aug, threads, passes);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let opts = dinov2_data::DecodeOptions::default();
    let t0 = Instant::now();
    let mut checksum = 0f64;
    for pass in 0..passes {
        checksum += pool.install(|| {
            ds.entries
                .par_iter()
                .enumerate()
                .map(|(i, (p, _))| {
                    let img =
                        dinov2_data::load_rgb_with(p, &opts).expect("benchmark images are valid");
                    if decode_only {
                        return f64::from(img.as_raw()[0]);
                    }
                    let mut rng =
                        rand_chacha::ChaCha8Rng::seed_from_u64(mix_seed(&[pass as u64, i as u64]));
                    let mc = aug.apply(&img, &mut rng);
                    let mut s = 0f64;
                    for c in mc.global.iter().chain(&mc.local) {
                        let t = to_tensor_normalized(c, IMAGENET_MEAN, IMAGENET_STD);
                        s += f64::from(t.data[t.data.len() / 2]);
                    }
                    s
                })
                .sum::<f64>()
        });
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = ds.len() * passes;
    println!(
        "images={n} seconds={secs:.3} images_per_s={:.2} checksum={checksum:.3}",
        n as f64 / secs
    );
    Ok(())
}

fn bench_loader(
    ds: FileDataset,
    aug: DataAugmentationDino,
    threads: usize,
    passes: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let n = ds.len();
    let batch = 16;
    let batches = (n * passes).div_ceil(batch);
    let sampler = ShardedInfiniteSampler::new(n, 0, 0, 1, true)?;
    let pipeline = Arc::new(DinoPipeline {
        augmentation: aug,
        masking: MaskCollate::official(224, 14),
    });
    let cfg = LoaderConfig {
        batch_size: batch,
        num_threads: threads,
        prefetch: 2,
        ..Default::default()
    };
    let t0 = Instant::now();
    let loader = Loader::new(Arc::new(ds), Box::new(sampler), pipeline, cfg)?;
    let mut checksum = 0f64;
    for b in loader.take(batches) {
        let b = b?.batch;
        checksum +=
            f64::from(b.global_crops[b.global_crops.len() / 2]) + b.masks.n_masked_patches as f64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let imgs = batches * batch;
    println!(
        "images={imgs} seconds={secs:.3} images_per_s={:.2} checksum={checksum:.3}",
        imgs as f64 / secs
    );
    Ok(())
}
