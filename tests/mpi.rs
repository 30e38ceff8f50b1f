//! `mpirun -np 2 dinov2 curate ...` writes what one `dinov2 curate ...` process writes. Built with
//! `--features mpi`; skipped when no MPI launcher is installed, unless `DINOV2_REQUIRE_MPI=1` (CI sets it).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dinov2_curate::npy;
use dinov2_curate::store::Embeddings;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dinov2")
}

/// `mpirun -np <np> dinov2 <args>`, or `None` (skip) without a launcher.
fn mpirun(np: usize, args: &[&str]) -> Option<Output> {
    let Some(mut cmd) = dinov2_dist::mpirun_command(np) else {
        assert!(
            std::env::var("DINOV2_REQUIRE_MPI").as_deref() != Ok("1"),
            "DINOV2_REQUIRE_MPI=1 but no mpirun/mpiexec on PATH"
        );
        eprintln!("skipped: no MPI launcher on PATH");
        return None;
    };
    Some(
        cmd.arg(bin())
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap(),
    )
}

fn single(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// 400 rows of 16 dims around 8 centres, every 10th a near-copy of an earlier row (seeded formula).
fn pool(dir: &Path) -> PathBuf {
    let d = 16;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let centres: Vec<f32> = (0..8 * d).map(|_| next() * 4.0).collect();
    let mut x: Vec<f32> = Vec::new();
    for i in 0..400 {
        for p in 0..d {
            let v = if i % 10 == 9 {
                x[(i - 5) * d + p] + next() * 0.001
            } else {
                centres[(i % 8) * d + p] + next()
            };
            x.push(v);
        }
    }
    let path = dir.join("pool.npy");
    Embeddings::from_vec(x, 400, d)
        .unwrap()
        .save_npy(&path)
        .unwrap();
    path
}

#[test]
fn curation_stages_under_mpirun_write_what_one_process_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let x = pool(tmp.path());
    let x = x.to_str().unwrap();
    let q = tmp.path().join("q.npy");
    let (v, _) = npy::read_f32(Path::new(x)).unwrap();
    Embeddings::from_vec(v[..30 * 16].to_vec(), 30, 16)
        .unwrap()
        .save_npy(&q)
        .unwrap();
    let q = q.to_str().unwrap();
    type Stage<'a> = (&'a str, Vec<&'a str>, &'a [&'a str]);
    let stages: Vec<Stage> = vec![
        (
            "dedup",
            vec!["--threshold", "0.999", "--k", "8", "--chunk", "64"],
            &["keep.npy", "components.npy"],
        ),
        (
            "dedup",
            vec![
                "--threshold",
                "0.999",
                "--k",
                "8",
                "--index",
                "ivf",
                "--nlist",
                "8",
                "--nprobe",
                "8",
            ],
            &["keep.npy", "components.npy"],
        ),
        (
            "dedup",
            vec!["--threshold", "0.999", "--k", "8", "--reference", q],
            &["keep.npy", "components.npy"],
        ),
        ("knn", vec!["--k", "5"], &["ids.npy", "sims.npy"]),
        (
            "retrieve",
            vec!["--queries", q, "--k", "3"],
            &["retrieved.npy"],
        ),
        (
            "kmeans",
            vec!["--k", "8", "--iters", "10"],
            &["assignment.npy"],
        ),
        (
            "hkmeans",
            vec![
                "--k",
                "16,4",
                "--iters",
                "10",
                "--resampling-steps",
                "2",
                "--sample-size",
                "5",
            ],
            &[
                "level1/assignment.npy",
                "level1/sorted_members.npy",
                "level2/sorted_members.npy",
            ],
        ),
    ];
    for (i, (stage, extra, files)) in stages.iter().enumerate() {
        let (one, two) = (
            tmp.path().join(format!("one{i}")),
            tmp.path().join(format!("two{i}")),
        );
        let args = |out: &Path| -> Vec<String> {
            let mut a: Vec<String> = ["curate", stage, "--embeddings", x]
                .map(String::from)
                .to_vec();
            a.extend(extra.iter().map(|s| s.to_string()));
            a.extend(["--output".to_string(), out.to_str().unwrap().to_string()]);
            a
        };
        let a1 = args(&one);
        ok(&single(&a1.iter().map(String::as_str).collect::<Vec<_>>()));
        let a2 = args(&two);
        let Some(out) = mpirun(2, &a2.iter().map(String::as_str).collect::<Vec<_>>()) else {
            return;
        };
        let stderr = ok(&out);
        assert!(stderr.contains("curate: 2 ranks (mpi)"), "{stderr}");
        for f in *files {
            assert!(
                bytes(&one.join(f)) == bytes(&two.join(f)),
                "{stage} {extra:?}: {f} differs"
            );
        }
        if *stage == "kmeans" {
            let c1 = npy::read_f32(&one.join("centroids.npy")).unwrap().0;
            let c2 = npy::read_f32(&two.join("centroids.npy")).unwrap().0;
            let diff = c1
                .iter()
                .zip(&c2)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-6, "k-means centroids differ by {diff}");
        }
        // rerunning a finished stage is a skip on every rank
        let again = mpirun(2, &a2.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        let stderr = ok(&again);
        assert_eq!(stderr.matches("stage already done").count(), 1, "{stderr}");
    }
    let keep = npy::read_i64(&tmp.path().join("one0/keep.npy")).unwrap().0;
    assert_eq!(
        keep.len(),
        360,
        "the 40 planted near-copies are the duplicates"
    );
}

#[test]
fn embedding_under_mpirun_splits_the_shards_between_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for (i, name) in [
        "checker.png",
        "circles.png",
        "gradient.jpg",
        "checker.png",
        "circles.png",
    ]
    .iter()
    .enumerate()
    {
        std::fs::copy(
            root.join("examples/images").join(name),
            images.join(format!("{i}_{name}")),
        )
        .unwrap();
    }
    let model = root.join("crates/dinov2-model/tests/fixtures/plain/hf");
    let run = |tag: &str, np: usize| -> Option<PathBuf> {
        let merged = tmp.path().join(format!("{tag}.npy"));
        let out = tmp.path().join(tag);
        let args = [
            "curate",
            "embed",
            "--images",
            images.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
            "--shard-size",
            "2",
            "--batch-size",
            "2",
            "--merge-to",
            merged.to_str().unwrap(),
        ];
        let o = if np == 1 {
            single(&args)
        } else {
            mpirun(np, &args)?
        };
        let stderr = ok(&o);
        assert!(
            stderr.contains("embedded 5 images: 3 shards computed"),
            "{stderr}"
        );
        Some(merged)
    };
    let one = run("one", 1).unwrap();
    let Some(two) = run("two", 2) else { return };
    assert!(bytes(&one) == bytes(&two), "merged embeddings differ");
}

#[test]
fn a_failing_run_under_mpirun_ends_every_rank_with_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.npy");
    let Some(out) = mpirun(
        2,
        &[
            "curate",
            "kmeans",
            "--embeddings",
            missing.to_str().unwrap(),
            "--k",
            "2",
            "--output",
            tmp.path().join("km").to_str().unwrap(),
        ],
    ) else {
        return;
    };
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.npy"), "{stderr}");
    assert!(stderr.contains("Error on rank"), "{stderr}");
}
