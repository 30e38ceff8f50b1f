//! Throughput of the full DINOv2 multi-crop augmentation (decode JPEG → 2x224 + 8x96 crops → ToTensor + Normalize)
//! on a thread pool. Run by `tools/bench_data.py`, which compares it with the official PyTorch pipeline.
//!
//! ```text
//! cargo bench -p dinov2-data --bench bench_augment -- [<jpeg dir> [<threads> [<passes> [decode|loader]]]]
//! ```
//! Defaults: 2 threads, 1 pass; without a folder (or with `-`) it runs on 8 synthetic JPEGs written to a temporary
//! folder (a smoke run). The optional last argument measures decoding only (`decode`, to see how the time splits) or the whole
//! `Loader` (`loader`: sampler, augmentation, normalisation into batch tensors, iBOT masks, batches of 16).
//! Prints one line: `images=<n> seconds=<s> images_per_s=<r> checksum=<c>`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use dinov2_data::rand::SeedableRng;
use dinov2_data::rand_chacha::ChaCha8Rng;
use dinov2_data::sampler::mix_seed;
use dinov2_data::{
    image, to_tensor_normalized, DataAugmentationDino, Dataset, DinoPipeline, FileDataset, Loader,
    LoaderConfig, ShardedInfiniteSampler, IMAGENET_MEAN, IMAGENET_STD,
};
use rayon::prelude::*;

/// Writes `n` textured 500x375 JPEGs (quality 90) into `dir`.
fn synthetic_jpegs(dir: &Path, n: u32) -> Result<(), Box<dyn std::error::Error>> {
    for i in 0..n {
        let img = image::RgbImage::from_fn(500, 375, |x, y| {
            let v = |a: u32, b: u32| ((a * (7 + i) + b * 13 + (a ^ b) * 3) % 256) as u8;
            image::Rgb([v(x, y), v(y, x + i), v(x + y, i)])
        });
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{i}.jpg")))?);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 90).encode_image(&img)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` appends `--bench`: flags are not ours
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let threads: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
    let passes: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let mode = args.get(3).map(String::as_str);
    let decode_only = mode == Some("decode");
    let tmp = tempfile::tempdir()?;
    let dir = match args.first().filter(|d| *d != "-") {
        Some(d) => Path::new(d),
        None => {
            synthetic_jpegs(tmp.path(), 8)?;
            tmp.path()
        }
    };
    let ds = FileDataset::unlabeled_folder(dir)?;
    let aug = DataAugmentationDino::official();
    if mode == Some("loader") {
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
                    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[pass as u64, i as u64]));
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
    let pipeline = Arc::new(DinoPipeline::new(aug, 14));
    let cfg = LoaderConfig {
        batch_size: batch,
        num_threads: threads,
        prefetch: 2,
        ..Default::default()
    };
    let t0 = Instant::now();
    let loader = Loader::new(Arc::new(ds), sampler, pipeline, cfg)?;
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
