//! Timing driver for `tools/bench_curate.py`: runs one operation on `.npy` inputs and prints one JSON line.
//!
//! ```text
//! cargo bench -p dinov2-curate --bench bench_ops -- knn <base.npy> <queries.npy> <k>
//! cargo bench -p dinov2-curate --bench bench_ops -- assign <data.npy> <centroids.npy>
//! cargo bench -p dinov2-curate --bench bench_ops -- kmeans <data.npy> <k> <iters> <seed> [random|kmeans++]
//! ```
//! Inputs are used as stored (the benchmark script writes them L2-normalised). Only the operation is timed.
//! The `--bench` flag `cargo bench` appends is ignored. `cargo bench` runs it in `crates/dinov2-curate/`: give absolute
//! paths.

use std::path::PathBuf;
use std::time::Instant;

use dinov2_curate::kmeans::{self, Init, KMeansConfig};
use dinov2_curate::knn::exact_knn;
use dinov2_curate::store::Embeddings;
use dinov2_curate::{Error, Result};

fn arg<T: std::str::FromStr>(a: &[String], i: usize) -> Result<T> {
    a.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::InvalidArgument {
            name: "arguments",
            reason: format!(
                "argument {i} is missing or invalid (see the usage in benches/bench_ops.rs)"
            ),
        })
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let a: Vec<String> = std::env::args().filter(|s| s != "--bench").collect();
    let op: String = arg(&a, 1)?;
    let threads = rayon::current_num_threads();
    match op.as_str() {
        "knn" => {
            let base = Embeddings::open(&arg::<PathBuf>(&a, 2)?)?;
            let q = Embeddings::open(&arg::<PathBuf>(&a, 3)?)?;
            let k: usize = arg(&a, 4)?;
            // Touch the mapped pages first so file I/O is not timed.
            let _ = base.max_norm_deviation();
            let t = Instant::now();
            let r = exact_knn(q.as_slice(), base.as_slice(), base.dim(), k, None)?;
            let s = t.elapsed().as_secs_f64();
            println!(
                "{{\"op\":\"knn\",\"seconds\":{s},\"qps\":{},\"threads\":{threads},\"first_id\":{}}}",
                q.rows() as f64 / s,
                r.ids[0]
            );
        }
        "assign" => {
            let x = Embeddings::open(&arg::<PathBuf>(&a, 2)?)?;
            let c = Embeddings::open(&arg::<PathBuf>(&a, 3)?)?;
            let _ = x.max_norm_deviation();
            let t = Instant::now();
            let (_, dist) = kmeans::assign(x.as_slice(), x.dim(), c.as_slice())?;
            let s = t.elapsed().as_secs_f64();
            let obj: f64 = dist.iter().map(|&v| v as f64).sum();
            println!(
                "{{\"op\":\"assign\",\"seconds\":{s},\"objective\":{obj},\"threads\":{threads}}}"
            );
        }
        "kmeans" => {
            let x = Embeddings::open(&arg::<PathBuf>(&a, 2)?)?;
            let (k, iters, seed): (usize, usize, u64) = (arg(&a, 3)?, arg(&a, 4)?, arg(&a, 5)?);
            let init = match a.get(6).map(String::as_str) {
                Some("kmeans++") => Init::KMeansPlusPlus,
                _ => Init::Random,
            };
            let _ = x.max_norm_deviation();
            let cfg = KMeansConfig {
                k,
                n_iter: iters,
                init,
                seed,
                max_points_per_centroid: Some(256),
                tol: 0.0,
                n_local_trials: None,
            };
            let t = Instant::now();
            let km = kmeans::train(x.as_slice(), x.dim(), &cfg)?;
            let s = t.elapsed().as_secs_f64();
            let t2 = Instant::now();
            let obj = km.objective(x.as_slice())?;
            let s2 = t2.elapsed().as_secs_f64();
            println!(
                "{{\"op\":\"kmeans\",\"seconds\":{s},\"iterations\":{},\"objective_full\":{obj},\"assign_full_seconds\":{s2},\"threads\":{threads}}}",
                km.iterations
            );
        }
        other => {
            return Err(Error::InvalidArgument {
                name: "op",
                reason: format!("unknown op {other:?}: use knn, assign or kmeans"),
            });
        }
    }
    Ok(())
}
