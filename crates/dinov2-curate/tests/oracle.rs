//! Tests against the numpy / faiss-cpu oracle in `tests/fixtures` (built by `tools/make_curate_fixtures.py`).

use std::path::{Path, PathBuf};

use dinov2_curate::dedup::{self, Searcher};
use dinov2_curate::hkmeans::water_fill;
use dinov2_curate::ivf::{IvfFlat, IvfParams};
use dinov2_curate::kmeans::{self, Init, KMeansConfig};
use dinov2_curate::knn::exact_knn;
use dinov2_curate::npy;
use dinov2_curate::pipeline::{self, IndexKind, Input, NoProgress};
use dinov2_curate::store::Embeddings;
use rand::SeedableRng;

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn ids(name: &str) -> Vec<i64> {
    npy::read_i64(&fx(name)).unwrap().0
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fx("expected.json")).unwrap()).unwrap()
}

/// Compares k-NN lists up to ties: similarities per rank must agree, ids must agree where the similarity is
/// not tied (within `tol`) with a neighbour rank.
fn assert_knn_eq(
    got_ids: &[i64],
    got_sims: &[f32],
    want_ids: &[i64],
    want_sims: &[f32],
    k: usize,
    tol: f32,
) {
    for q in 0..want_ids.len() / k {
        for j in 0..k {
            let w = want_sims[q * k + j];
            assert!(
                (got_sims[q * k + j] - w).abs() < tol,
                "query {q} rank {j}: {} vs {w}",
                got_sims[q * k + j]
            );
            let tied = (j > 0 && (want_sims[q * k + j - 1] - w).abs() < tol)
                || (j + 1 < k && (want_sims[q * k + j + 1] - w).abs() < tol);
            if !tied {
                assert_eq!(
                    got_ids[q * k + j],
                    want_ids[q * k + j],
                    "query {q} rank {j}"
                );
            }
        }
    }
}

#[test]
fn exact_knn_equals_brute_force() {
    let x = Embeddings::open(&fx("data.npy")).unwrap();
    assert!(x.is_mapped());
    let k = expected()["knn_k"].as_u64().unwrap() as usize;
    let r = exact_knn(x.as_slice(), x.as_slice(), x.dim(), k, Some(0)).unwrap();
    let want_sims = npy::read_f32(&fx("knn_sims.npy")).unwrap().0;
    assert_knn_eq(&r.ids, &r.sims, &ids("knn_ids.npy"), &want_sims, k, 1e-5);
    let q = Embeddings::open(&fx("queries.npy")).unwrap();
    let r = exact_knn(q.as_slice(), x.as_slice(), x.dim(), k, None).unwrap();
    let want_sims = npy::read_f32(&fx("qknn_sims.npy")).unwrap().0;
    assert_knn_eq(&r.ids, &r.sims, &ids("qknn_ids.npy"), &want_sims, k, 1e-5);
}

#[test]
fn ivf_all_lists_equals_brute_force_and_partial_probe_reports_recall() {
    let x = Embeddings::open(&fx("data.npy")).unwrap();
    let (d, k) = (x.dim(), 10);
    let idx = IvfFlat::build(x.as_slice(), d, &IvfParams::new(16)).unwrap();
    let r = idx.search(x.as_slice(), k, 16, Some(0)).unwrap();
    let want_sims = npy::read_f32(&fx("knn_sims.npy")).unwrap().0;
    assert_knn_eq(&r.ids, &r.sims, &ids("knn_ids.npy"), &want_sims, k, 1e-5);
    let f = |q: &[f32], off: Option<usize>| idx.search(q, k, 4, off);
    let (rk, r1) = dinov2_curate::ivf::measure_recall(
        &f,
        x.as_slice(),
        x.as_slice(),
        d,
        &dinov2_curate::ivf::RecallSpec {
            k,
            n_sample: 300,
            self_search: true,
            seed: 0,
        },
    )
    .unwrap();
    assert!(rk > 0.0 && rk <= 1.0 && r1 <= 1.0);
    // Recall measured independently: fraction of brute-force neighbours found.
    let want = ids("knn_ids.npy");
    let approx = idx.search(x.as_slice(), k, 4, Some(0)).unwrap();
    let found: usize = (0..x.rows())
        .map(|q| {
            want[q * k..(q + 1) * k]
                .iter()
                .filter(|i| approx.ids_of(q).contains(i))
                .count()
        })
        .sum();
    let full = found as f64 / (x.rows() * k) as f64;
    assert!(
        (full - rk).abs() < 0.1,
        "sampled recall {rk} vs full {full}"
    );
}

#[test]
fn self_dedup_components_equal_oracle() {
    let x = Embeddings::open(&fx("data.npy")).unwrap();
    let e = expected();
    let k = e["dedup_k"].as_u64().unwrap() as usize;
    let th = e["dedup_threshold"].as_f64().unwrap() as f32;
    let r = dedup::self_dedup(
        x.as_slice(),
        x.dim(),
        k,
        th,
        &Searcher::Exact { base: x.as_slice() },
        500,
    )
    .unwrap();
    assert_eq!(r.components, ids("dedup_components.npy"));
    assert_eq!(r.keep, ids("dedup_keep.npy"));
}

#[test]
fn pipeline_dedup_contract_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dd");
    let data = fx("data.npy");
    let params = pipeline::DedupParams {
        k: 64,
        threshold: 0.6,
        chunk: 256,
        ..pipeline::DedupParams::new(Input::new(&data), &out)
    };
    pipeline::dedup(&params, &NoProgress).unwrap();
    let h = npy::read_header(&out.join("keep.npy")).unwrap();
    assert_eq!(h.dtype, npy::NpyDtype::I64);
    let keep = npy::read_i64(&out.join("keep.npy")).unwrap().0;
    assert!(keep.windows(2).all(|w| w[0] < w[1]), "keep.npy ascending");
    assert_eq!(keep, ids("dedup_keep.npy"));
    assert_eq!(
        npy::read_i64(&out.join("components.npy")).unwrap().0,
        ids("dedup_components.npy")
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["result"]["n_kept"].as_u64().unwrap() as usize,
        keep.len()
    );
    // Simulated crash after some chunks: drop the summary, outputs and the last two edge chunks, then resume.
    for f in [
        "summary.json",
        "keep.npy",
        "components.npy",
        "edges/chunk_0000001024.npy",
        "edges/chunk_0000000768.npy",
    ] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    pipeline::dedup(&params, &NoProgress).unwrap();
    assert_eq!(npy::read_i64(&out.join("keep.npy")).unwrap().0, keep);
    // Different parameters on the same directory are refused without force.
    let mut other = pipeline::DedupParams {
        threshold: 0.7,
        ..params.clone()
    };
    std::fs::remove_file(out.join("summary.json")).unwrap();
    assert!(matches!(
        pipeline::dedup(&other, &NoProgress),
        Err(dinov2_curate::Error::ParamsChanged { .. })
    ));
    other.force = true;
    pipeline::dedup(&other, &NoProgress).unwrap();
    // Forced IVF with every list probed gives the exact answer too.
    let ivf = pipeline::DedupParams {
        index: pipeline::IndexParams {
            index: IndexKind::Ivf,
            nlist: Some(8),
            nprobe: 8,
            ..Default::default()
        },
        ..pipeline::DedupParams::new(Input::new(&data), dir.path().join("ivf"))
    };
    let s = pipeline::dedup(&ivf, &NoProgress)
        .unwrap()
        .completed()
        .unwrap();
    assert_eq!(
        npy::read_i64(&dir.path().join("ivf/keep.npy")).unwrap().0,
        keep
    );
    assert!((s.recall_at_k.unwrap() - 1.0).abs() < 1e-9);
    assert!((s.edge_recall.unwrap() - 1.0).abs() < 1e-9);
}

#[test]
fn pipeline_relative_dedup_equals_oracle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rel");
    let th = expected()["relative_threshold"].as_f64().unwrap() as f32;
    let (data, refs) = (fx("data.npy"), fx("reference.npy"));
    let params = pipeline::DedupParams {
        reference: vec![refs.clone()],
        threshold: th,
        ..pipeline::DedupParams::new(Input::new(&data), &out)
    };
    pipeline::dedup(&params, &NoProgress).unwrap();
    assert_eq!(
        npy::read_i64(&out.join("keep.npy")).unwrap().0,
        ids("relative_keep.npy")
    );
    assert_eq!(
        npy::read_i64(&out.join("components.npy")).unwrap().0,
        ids("relative_components.npy")
    );
    // Library path agrees.
    let x = Embeddings::open(&data).unwrap();
    let r = Embeddings::open(&refs).unwrap();
    let res = dedup::relative_dedup(
        x.as_slice(),
        r.as_slice(),
        x.dim(),
        64,
        th,
        &Searcher::Exact { base: x.as_slice() },
        300,
    )
    .unwrap();
    assert_eq!(res.keep, ids("relative_keep.npy"));
}

#[test]
fn kmeans_objective_within_one_percent_of_faiss() {
    let x = Embeddings::open(&fx("data.npy")).unwrap();
    let e = &expected()["kmeans"];
    let (k, niter) = (
        e["k"].as_u64().unwrap() as usize,
        e["niter"].as_u64().unwrap() as usize,
    );
    let faiss = e["faiss_objective"].as_f64().unwrap();
    for init in [Init::KMeansPlusPlus, Init::Random] {
        let cfg = KMeansConfig {
            k,
            n_iter: niter,
            init,
            seed: 1234,
            tol: 0.0,
            ..KMeansConfig::new(k)
        };
        let km = kmeans::train(x.as_slice(), x.dim(), &cfg).unwrap();
        // Objective of the final centroids on all rows, by definition, in f64.
        let ours: f64 = x
            .as_slice()
            .chunks(x.dim())
            .map(|r| {
                km.centroids
                    .chunks(x.dim())
                    .map(|c| {
                        r.iter()
                            .zip(c)
                            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .sum();
        assert!(
            (ours - faiss).abs() / faiss < 0.01,
            "{init:?}: ours {ours} vs faiss {faiss}"
        );
    }
}

#[test]
fn water_filling_equals_oracle() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for case in expected()["water_fill"].as_array().unwrap() {
        let caps: Vec<usize> = case["caps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let base: Vec<usize> = case["base"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let budget = case["budget"].as_u64().unwrap() as usize;
        let a = water_fill(&caps, budget, &mut rng);
        assert_eq!(a.iter().sum::<usize>(), budget.min(caps.iter().sum()));
        match case["cap_level"].as_u64() {
            None => assert_eq!(a, base),
            Some(c) => {
                for i in 0..caps.len() {
                    assert!(
                        a[i] == base[i] || (a[i] == base[i] + 1 && caps[i] > c as usize),
                        "{caps:?} {a:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn pipeline_kmeans_hkmeans_sample_retrieve_knn() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s);
    let data = fx("data.npy");
    let queries = fx("queries.npy");
    let input = || Input::new(&data);
    let km = pipeline::KmeansParams {
        iters: 10,
        ..pipeline::KmeansParams::new(input(), 20, p("km"))
    };
    pipeline::kmeans(&km, &NoProgress).unwrap();
    let (assign, shape) = npy::read_i64(&p("km/assignment.npy")).unwrap();
    assert_eq!(shape, vec![1200]);
    assert!(assign.iter().all(|&a| (0..20).contains(&a)));
    // Crash/resume of k-means: a 5-iteration run leaves a checkpoint; rerunning with 10 iterations in the same
    // directory (summary removed, as after a crash) resumes from it and must equal an uninterrupted 10-iteration run.
    let km_params = |iters: usize, out: &str| pipeline::KmeansParams {
        iters,
        tol: 0.0,
        init: Init::Random,
        ..pipeline::KmeansParams::new(input(), 20, p(out))
    };
    pipeline::kmeans(&km_params(10, "km_full"), &NoProgress).unwrap();
    pipeline::kmeans(&km_params(5, "km_res"), &NoProgress).unwrap();
    std::fs::remove_file(p("km_res/summary.json")).unwrap();
    let resumed = pipeline::kmeans(&km_params(10, "km_res"), &NoProgress)
        .unwrap()
        .completed()
        .unwrap();
    let full = npy::read_f32(&p("km_full/centroids.npy")).unwrap().0;
    let res = npy::read_f32(&p("km_res/centroids.npy")).unwrap().0;
    assert_eq!(full, res);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("km_res/checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["checkpoint"]["iterations"], 10);
    assert_eq!(resumed.resumed_from_iteration, Some(5));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("km_res/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["resumed_from_iteration"], 5);
    // knn equals the oracle.
    let knn = pipeline::KnnParams {
        queries: Some(queries.clone()),
        k: 10,
        ..pipeline::KnnParams::new(input(), p("knn"))
    };
    pipeline::knn(&knn, &NoProgress).unwrap();
    let got = npy::read_i64(&p("knn/ids.npy")).unwrap().0;
    let sims = npy::read_f32(&p("knn/sims.npy")).unwrap().0;
    assert_knn_eq(
        &got,
        &sims,
        &ids("qknn_ids.npy"),
        &npy::read_f32(&fx("qknn_sims.npy")).unwrap().0,
        10,
        1e-5,
    );
    // Retrieval: sample-based hits = the first 4 of the 10 neighbours above (checked against the oracle).
    let ret = pipeline::RetrieveParams::new(input(), &queries, p("ret"));
    pipeline::retrieve(&ret, &NoProgress).unwrap();
    let r = npy::read_i64(&p("ret/retrieved.npy")).unwrap().0;
    assert_eq!(r.len(), 80 * 4);
    for q in 0..80 {
        assert_eq!(r[q * 4..q * 4 + 4], got[q * 10..q * 10 + 4], "query {q}");
    }
    let retc = pipeline::RetrieveParams {
        mode: pipeline::RetrieveMode::Cluster,
        clusters: Some(p("km")),
        per_cluster: 5,
        min_queries: 3,
        ..pipeline::RetrieveParams::new(input(), &queries, p("retc"))
    };
    pipeline::retrieve(&retc, &NoProgress).unwrap();
    let rc = npy::read_i64(&p("retc/retrieved.npy")).unwrap().0;
    // Independent check: clusters with more than 3 queries, 5 rows each (all if smaller).
    let (cent, _) = npy::read_f32(&p("km/centroids.npy")).unwrap();
    let q = Embeddings::open(&queries).unwrap();
    let (ql, _) = kmeans::assign(q.as_slice(), 32, &cent).unwrap();
    let mut qc = [0usize; 20];
    ql.iter().for_each(|&l| qc[l as usize] += 1);
    let want: usize = (0..20)
        .filter(|&c| qc[c] > 3)
        .map(|c| assign.iter().filter(|&&a| a == c as i64).count().min(5))
        .sum();
    assert_eq!(rc.len(), want);
    assert!(rc.iter().all(|&i| qc[assign[i as usize] as usize] > 3));
    // Hierarchical k-means, then balanced sampling.
    let hk = pipeline::HkmeansParams {
        iters: vec![10],
        resampling_steps: vec![2],
        sample_size: vec![5, 3],
        ..pipeline::HkmeansParams::new(input(), vec![60, 8], p("hk"))
    };
    pipeline::hkmeans(&hk, &NoProgress).unwrap();
    assert!(p("hk/level2/sorted_members.npy").exists());
    let sp = pipeline::SampleParams::new(p("hk"), 300, p("sel"));
    pipeline::sample(&sp, &NoProgress).unwrap();
    let sel = npy::read_i64(&p("sel/selection.npy")).unwrap().0;
    assert_eq!(sel.len(), 300);
    assert!(sel.windows(2).all(|w| w[0] < w[1]));
    // A finished stage is skipped on rerun (its summary is left untouched).
    let before = std::fs::metadata(p("sel/summary.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(pipeline::sample(&sp, &NoProgress).unwrap().is_skipped());
    assert_eq!(
        std::fs::metadata(p("sel/summary.json"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
}

/// The dedup tests above compare keep lists and components exactly. That is sound whatever the summation order of
/// the f32 dot products (thread count, AVX2 or AVX-512 kernels, exact or IVF tiles) only if no similarity that
/// decides an edge lies within rounding of the threshold, and no above-threshold neighbour sits on the k-th rank
/// boundary. The rounding of a d-dimensional dot product of unit vectors is at most about `d * 2^-24`, plus a few
/// units of the normalisation; the fixture keeps 5x that away (checked in f64).
#[test]
fn fixture_similarities_keep_clear_of_the_dedup_thresholds() {
    let x = Embeddings::open(&fx("data.npy")).unwrap().into_normalized();
    let r = Embeddings::open(&fx("reference.npy"))
        .unwrap()
        .into_normalized();
    let (d, e) = (x.dim(), expected());
    let bound = (d + 4) as f64 * f64::from(f32::EPSILON) / 2.0;
    let k = e["dedup_k"].as_u64().unwrap() as usize;
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum()
    };
    let pool: Vec<&[f32]> = (0..x.rows()).map(|i| x.row(i)).collect();
    let refs: Vec<&[f32]> = (0..r.rows()).map(|i| r.row(i)).collect();
    for (th, with_refs) in [
        (e["dedup_threshold"].as_f64().unwrap(), false),
        (e["relative_threshold"].as_f64().unwrap(), true),
    ] {
        let queries = pool
            .iter()
            .chain(if with_refs { &refs[..] } else { &[] })
            .enumerate();
        for (qi, q) in queries {
            // The query's k nearest pool rows (itself excluded) decide its edges.
            let mut s: Vec<f64> = (0..pool.len())
                .filter(|&j| j != qi)
                .map(|j| dot(q, pool[j]))
                .collect();
            s.sort_by(|a, b| b.total_cmp(a));
            for &v in &s[..k] {
                assert!((v - th).abs() > 5.0 * bound, "query {qi}: {v} vs {th}");
            }
            assert!(s[k - 1] < th || s[k - 1] - s[k] > 5.0 * bound, "query {qi}");
            if with_refs && qi < pool.len() {
                for b in &refs {
                    assert!((dot(q, b) - th).abs() > 5.0 * bound, "query {qi}");
                }
            }
        }
    }
}
