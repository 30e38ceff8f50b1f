//! The pipeline stages as several ranks (`pipeline::*_on` on an in-process `ThreadGroup`: the same code paths
//! `mpirun -np N dinov2 curate` takes) write what one process writes: identical files for the exact searches
//! (dedup self and relative, knn, retrieve) and for IVF with every list probed, the same assignments and centroids
//! within the f64 summation-order bound for k-means and hierarchical k-means. The root test `tests/mpi.rs` runs
//! the command itself under `mpirun`.

use std::path::{Path, PathBuf};

use dinov2_curate::hkmeans::Pick;
use dinov2_curate::npy;
use dinov2_curate::pipeline::{
    self, DedupParams, HkmeansParams, IndexKind, Input, KmeansParams, KnnParams, NoProgress,
    RetrieveMode, RetrieveParams,
};
use dinov2_curate::store::Embeddings;
use dinov2_dist::{Communicator, SingleProcess, ThreadGroup};
use rand::{Rng, SeedableRng};

const D: usize = 8;

/// `n` rows around 6 centres (noise of width `spread`) with planted near-duplicates (not normalised: the stages
/// do it).
fn pool_spread(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c: Vec<f32> = (0..6 * D)
        .map(|_| rng.random::<f32>() * 4.0 - 2.0)
        .collect();
    let mut x: Vec<f32> = Vec::with_capacity(n * D);
    for i in 0..n {
        if i > 0 && i % 9 == 0 {
            let src = rng.random_range(0..i);
            for p in 0..D {
                let v = x[src * D + p] + (rng.random::<f32>() - 0.5) * 0.002;
                x.push(v);
            }
        } else {
            let j = i % 6;
            for p in 0..D {
                x.push(c[j * D + p] + (rng.random::<f32>() - 0.5) * spread);
            }
        }
    }
    x
}

fn pool(n: usize, seed: u64) -> Vec<f32> {
    pool_spread(n, seed, 0.8)
}

fn save(dir: &Path, name: &str, x: Vec<f32>) -> PathBuf {
    let p = dir.join(name);
    let n = x.len() / D;
    Embeddings::from_vec(x, n, D).unwrap().save_npy(&p).unwrap();
    p
}

/// Runs `stage(comm)` on `world` in-process ranks.
fn on_ranks(world: usize, stage: impl Fn(&dyn Communicator) + Sync) {
    let ranks = ThreadGroup::new(world).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                let stage = &stage;
                s.spawn(move || stage(&r))
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Largest difference between the f32 matrices of two `.npy` files.
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (x, y) = (npy::read_f32(a).unwrap().0, npy::read_f32(b).unwrap().0);
    assert_eq!(x.len(), y.len());
    x.iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max)
}

fn assert_same_files(a: &Path, b: &Path, names: &[&str]) {
    for n in names {
        assert!(
            bytes(&a.join(n)) == bytes(&b.join(n)),
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn sharded_stages_write_what_one_process_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let x = save(dir, "pool.npy", pool(301, 1));
    let q = save(dir, "queries.npy", pool(40, 2));
    let reference = save(dir, "ref.npy", pool(25, 1)[..20 * D].to_vec());
    let input = || Input::new(&x);
    for world in [2usize, 3] {
        let one = dir.join("one");
        let many = dir.join(format!("many{world}"));
        let run = |out: &Path, comm: &dyn Communicator| {
            let mut dd = DedupParams::new(input(), out.join("dedup"));
            dd.threshold = 0.999;
            dd.chunk = 50;
            pipeline::dedup_on(&dd, &NoProgress, comm).unwrap();
            // relative dedup against rows that are copies of pool rows; IVF probing every list (= exact)
            let mut rd = DedupParams::new(input(), out.join("rel"));
            rd.reference = vec![reference.clone()];
            rd.threshold = 0.999;
            rd.index.index = IndexKind::Ivf;
            rd.index.nlist = Some(6);
            rd.index.nprobe = 6;
            pipeline::dedup_on(&rd, &NoProgress, comm).unwrap();
            let mut kn = KnnParams::new(input(), out.join("knn"));
            kn.k = 5;
            pipeline::knn_on(&kn, &NoProgress, comm).unwrap();
            let mut rg = KnnParams::new(input(), out.join("range"));
            rg.threshold = Some(0.9);
            rg.queries = Some(q.clone());
            pipeline::knn_on(&rg, &NoProgress, comm).unwrap();
            let mut rt = RetrieveParams::new(input(), q.clone(), out.join("retrieve"));
            rt.k = 4;
            pipeline::retrieve_on(&rt, &NoProgress, comm).unwrap();
            let mut rc = RetrieveParams::new(input(), q.clone(), out.join("retrieve_c"));
            rc.mode = RetrieveMode::Cluster;
            rc.n_clusters = 6;
            rc.min_queries = 0;
            rc.per_cluster = 5;
            pipeline::retrieve_on(&rc, &NoProgress, comm).unwrap();
            let mut km = KmeansParams::new(input(), 6, out.join("kmeans"));
            km.iters = 8;
            pipeline::kmeans_on(&km, &NoProgress, comm).unwrap();
            for (name, pick) in [("hk_closest", Pick::Closest), ("hk_random", Pick::Random)] {
                let mut hk = HkmeansParams::new(input(), vec![12, 3], out.join(name));
                hk.resampling_steps = vec![2, 1];
                hk.sample_size = vec![4];
                hk.strategy = pick;
                pipeline::hkmeans_on(&hk, &NoProgress, comm).unwrap();
            }
        };
        if world == 2 {
            run(&one, &SingleProcess);
        }
        on_ranks(world, |comm| run(&many, comm));
        assert_same_files(
            &one.join("dedup"),
            &many.join("dedup"),
            &["keep.npy", "components.npy"],
        );
        assert_same_files(
            &one.join("rel"),
            &many.join("rel"),
            &["keep.npy", "components.npy"],
        );
        assert_same_files(
            &one.join("knn"),
            &many.join("knn"),
            &["ids.npy", "sims.npy"],
        );
        assert_same_files(
            &one.join("range"),
            &many.join("range"),
            &["offsets.npy", "ids.npy", "sims.npy"],
        );
        assert_same_files(
            &one.join("retrieve"),
            &many.join("retrieve"),
            &["retrieved.npy"],
        );
        assert_same_files(
            &one.join("retrieve_c"),
            &many.join("retrieve_c"),
            &["retrieved.npy"],
        );
        // The data must exercise what is compared.
        let keep = npy::read_i64(&one.join("dedup/keep.npy")).unwrap().0;
        assert!(keep.len() < 301 && keep.len() > 200, "{} kept", keep.len());
        let rel = npy::read_i64(&one.join("rel/keep.npy")).unwrap().0;
        assert!(
            rel.len() <= 301 - 20,
            "relative dedup kept {} rows",
            rel.len()
        );
        // k-means: per-cluster sums are added rank by rank, so centroids agree to f64 summation order (then
        // rounded to f32: a few ulps of values of magnitude <= 1); assignments are equal because the blobs are
        // far apart compared with that.
        let diff = max_diff(
            &one.join("kmeans/centroids.npy"),
            &many.join("kmeans/centroids.npy"),
        );
        assert!(diff < 1e-6, "centroids differ by {diff}");
        assert_same_files(
            &one.join("kmeans"),
            &many.join("kmeans"),
            &["assignment.npy"],
        );
        for hk in ["hk_closest", "hk_random"] {
            for lv in ["level1", "level2"] {
                let (a, b) = (one.join(hk).join(lv), many.join(hk).join(lv));
                assert_same_files(
                    &a,
                    &b,
                    &["assignment.npy", "sorted_offsets.npy", "sorted_members.npy"],
                );
                let diff = max_diff(&a.join("centroids.npy"), &b.join("centroids.npy"));
                assert!(diff < 1e-6, "{hk}/{lv}: centroids differ by {diff}");
            }
        }
    }
}

#[test]
fn a_sharded_kmeans_resumes_from_rank_0s_checkpoint_with_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    // overlapping clusters, so that k-means runs all its iterations
    let x = save(tmp.path(), "pool.npy", pool_spread(200, 3, 6.0));
    let params = |out: &Path, iters| {
        let mut p = KmeansParams::new(Input::new(&x), 5, out);
        p.iters = iters;
        p.checkpoint_every = 1;
        p.tol = 0.0;
        p
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    pipeline::kmeans(&params(&a, 6), &NoProgress).unwrap();
    // 3 iterations on 2 ranks, then the run "crashes" (the summary goes) and 3 ranks finish it.
    on_ranks(2, |c| {
        pipeline::kmeans_on(&params(&b, 3), &NoProgress, c).unwrap();
    });
    std::fs::remove_file(b.join("summary.json")).unwrap();
    on_ranks(3, |c| {
        let s = pipeline::kmeans_on(&params(&b, 6), &NoProgress, c)
            .unwrap()
            .completed()
            .unwrap();
        assert_eq!(s.resumed_from_iteration, Some(3));
    });
    assert_same_files(&a, &b, &["assignment.npy"]);
    let diff = max_diff(&a.join("centroids.npy"), &b.join("centroids.npy"));
    assert!(diff < 1e-6, "centroids differ by {diff}");
}
