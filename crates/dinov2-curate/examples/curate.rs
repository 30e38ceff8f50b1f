//! The curation pipeline from a program: self-dedup, hierarchical k-means on the kept rows, balanced sampling.
//!
//! ```text
//! cargo run --release -p dinov2-curate --example curate -- [EMBEDDINGS.npy OUTPUT_DIR [TARGET]]
//! ```
//! Without arguments it runs on 2,000 synthetic rows in a temporary directory. Rerunning with the same output
//! directory skips the finished stages. (`dinov2 curate <stage>` is the command line over the same calls.)

use std::path::PathBuf;

use dinov2_curate::pipeline::{
    self, DedupParams, HkmeansParams, Input, ProgressEvent, SampleParams,
};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scratch = tempfile::tempdir()?;
    let (embeddings, out) = match args.as_slice() {
        [e, o, ..] => (PathBuf::from(e), PathBuf::from(o)),
        _ => (
            synthetic(&scratch.path().join("pool.npy"))?,
            scratch.path().into(),
        ),
    };
    let target: usize = args.get(2).map(|t| t.parse()).transpose()?.unwrap_or(500);
    let progress = |e: &ProgressEvent| {
        if let ProgressEvent::Message { text, .. } = e {
            eprintln!("{text}");
        }
    };

    let dedup = DedupParams::new(Input::new(&embeddings), out.join("dedup"));
    if let Some(s) = pipeline::dedup(&dedup, &progress)?.completed() {
        println!(
            "dedup: kept {} of {} rows",
            s.result.n_kept(),
            s.result.n_rows()
        );
    }
    let input = Input {
        rows: Some(out.join("dedup/keep.npy")),
        ..Input::new(&embeddings)
    };
    let hk = HkmeansParams::new(input, vec![100, 10], out.join("hkmeans"));
    if let Some(s) = pipeline::hkmeans(&hk, &progress)?.completed() {
        println!("hkmeans: clusters per level {:?}", s.k);
    }
    let sample = SampleParams::new(out.join("hkmeans"), target, out.join("sample"));
    if let Some(s) = pipeline::sample(&sample, &progress)?.completed() {
        println!(
            "sample: {} rows in {}",
            s.selected,
            out.join("sample/selection.npy").display()
        );
    }
    Ok(())
}

/// 2,000 rows of dimension 32 around 50 seeded centres, every 10th a near-copy of the row before.
fn synthetic(path: &std::path::Path) -> dinov2_curate::Result<PathBuf> {
    let (n, d) = (2000, 32);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let centres: Vec<f32> = (0..50 * d).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut x: Vec<f32> = Vec::with_capacity(n * d);
    for i in 0..n {
        let c = rng.random_range(0..50);
        for p in 0..d {
            let v = match i % 10 {
                9 => x[(i - 1) * d + p] + 1e-3 * rng.random::<f32>(),
                _ => centres[c * d + p] + 2.0 * (rng.random::<f32>() - 0.5),
            };
            x.push(v);
        }
    }
    dinov2_curate::npy::write_f32(path, &x, &[n, d])?;
    Ok(path.into())
}
