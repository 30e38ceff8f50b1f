//! The stages over tiny seeded data: skip when done, resume after an interruption, parameter changes, `force`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use super::*;
use crate::embed::Embedder;
use crate::npy;
use crate::store::l2_normalize_rows;

const D: usize = 4;

/// `n` rows around 5 seeded centres, every 5th a near-copy of the row before, L2-normalised.
fn pool(dir: &Path, n: usize) -> PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let centres: Vec<f32> = (0..5 * D).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut x = Vec::with_capacity(n * D);
    for i in 0..n {
        let c = rng.random_range(0..5);
        for p in 0..D {
            let v = if i % 5 == 4 {
                x[(i - 1) * D + p] + (rng.random::<f32>() - 0.5) * 1e-3
            } else {
                centres[c * D + p] + (rng.random::<f32>() - 0.5) * 0.4
            };
            x.push(v);
        }
    }
    l2_normalize_rows(&mut x, D);
    let path = dir.join("pool.npy");
    npy::write_f32(&path, &x, &[n, D]).unwrap();
    path
}

fn ids(path: &Path) -> Vec<i64> {
    npy::read_i64(path).unwrap().0
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// Records every event as text.
#[derive(Default)]
struct Log(RefCell<Vec<String>>);

impl Progress for Log {
    fn event(&self, e: &ProgressEvent<'_>) {
        let s = match *e {
            ProgressEvent::Begin { task, total, .. } => format!("begin {task} {total}"),
            ProgressEvent::Advance {
                task, done, total, ..
            } => format!("advance {task} {done}/{total}"),
            ProgressEvent::End { task, .. } => format!("end {task}"),
            ProgressEvent::Message { text, .. } => text.to_string(),
        };
        self.0.borrow_mut().push(s);
    }
}

impl Log {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

fn dedup_params(dir: &Path, data: &Path) -> DedupParams {
    DedupParams {
        k: 8,
        threshold: 0.99,
        chunk: 16,
        ..DedupParams::new(Input::new(data), dir.join("dedup"))
    }
}

#[test]
fn dedup_skips_when_done_resumes_from_chunks_and_guards_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 60);
    let p = dedup_params(dir.path(), &data);
    let out = p.output.clone();
    let log = Log::default();
    let first = dedup(&p, &log).unwrap().completed().unwrap();
    assert_eq!(first.mode, DedupMode::SelfDedup);
    assert!(first.result.n_kept() < 60, "the planted copies are found");
    let events = log.take();
    assert_eq!(events.first().unwrap(), "begin dedup 60");
    assert!(events.contains(&"advance dedup 32/60".to_string()));
    assert_eq!(events.last().unwrap(), "end dedup");
    let keep = ids(&out.join("keep.npy"));
    assert!(keep.windows(2).all(|w| w[0] < w[1]));
    // Done: skipped, nothing rewritten.
    let stamp = modified(&out.join("summary.json"));
    match dedup(&p, &log).unwrap() {
        Outcome::Skipped { summary } => assert_eq!(summary, out.join("summary.json")),
        other => panic!("{other:?}"),
    }
    assert_eq!(modified(&out.join("summary.json")), stamp);
    // Interrupted after two chunks: the finished chunks are read back, not recomputed. Emptying chunk 0 shows
    // it: its edges no longer join anything, so more rows are kept.
    for f in ["summary.json", "keep.npy", "edges/chunk_0000000032.npy"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    std::fs::remove_file(out.join("edges/chunk_0000000048.npy")).unwrap();
    let chunk0 = out.join("edges/chunk_0000000000.npy");
    let original_chunk0 = ids(&chunk0);
    assert!(!original_chunk0.is_empty());
    npy::write_i64(&chunk0, &[], &[0, 2]).unwrap();
    let resumed = dedup(&p, &NoProgress).unwrap().completed().unwrap();
    assert!(resumed.result.n_kept() > first.result.n_kept());
    assert!(out.join("edges/chunk_0000000048.npy").exists());
    // Same parameters and `force`: recomputed, but same-parameter checkpoints are still reused (as before).
    let forced = DedupParams {
        force: true,
        ..p.clone()
    };
    let again = dedup(&forced, &NoProgress).unwrap().completed().unwrap();
    assert_eq!(again.result, resumed.result);
    // Other parameters: refused without `force` (a finished summary would be skipped first, so drop it) ...
    std::fs::remove_file(out.join("summary.json")).unwrap();
    let other = DedupParams {
        threshold: 0.98,
        ..p.clone()
    };
    match dedup(&other, &NoProgress) {
        Err(Error::ParamsChanged { path }) => assert_eq!(path, out),
        r => panic!("{r:?}"),
    }
    // ... and with `force` the old checkpoints are dropped, so the emptied chunk is recomputed.
    dedup(
        &DedupParams {
            force: true,
            ..other.clone()
        },
        &NoProgress,
    )
    .unwrap();
    assert!(ids(&chunk0).len() >= original_chunk0.len());
    // Back to the first parameters with `force`: the first result again.
    dedup(&forced, &NoProgress).unwrap();
    assert_eq!(ids(&out.join("keep.npy")), keep);
    assert_eq!(ids(&chunk0), original_chunk0);
}

#[test]
fn dedup_resumes_from_checkpoints_written_by_earlier_versions() {
    // `params.json` as the clap-based command wrote it (keys sorted, `--index` names): still a match.
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 30);
    let p = dedup_params(dir.path(), &data);
    std::fs::create_dir_all(&p.output).unwrap();
    let old = serde_json::json!({
        "chunk": 16, "d": 4, "embeddings": data, "index": {"index": "Auto", "nlist": null, "nprobe": 16,
        "recall_sample": 500}, "k": 8, "n": 30, "no_normalize": false, "reference": [], "rows": null,
        "threshold": 0.99f32,
    });
    std::fs::write(p.output.join("params.json"), old.to_string()).unwrap();
    assert!(dedup(&p, &NoProgress).is_ok());
}

#[test]
fn dedup_on_a_row_subset_reports_original_ids_and_bad_ids_with_their_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 40);
    let rows = dir.path().join("rows.npy");
    let subset: Vec<i64> = (10..40).collect();
    npy::write_i64(&rows, &subset, &[30]).unwrap();
    let mut p = dedup_params(dir.path(), &data);
    p.input.rows = Some(rows.clone());
    let s = dedup(&p, &NoProgress).unwrap().completed().unwrap();
    assert_eq!(s.result.n_rows(), 30);
    let keep = ids(&p.output.join("keep.npy"));
    assert!(keep.iter().all(|i| (10..40).contains(i)));
    assert_eq!(ids(&p.output.join("rows.npy")), subset);
    npy::write_i64(&rows, &[3, 40], &[2]).unwrap();
    p.output = dir.path().join("bad");
    match dedup(&p, &NoProgress) {
        Err(Error::RowOutOfRange { row, rows: n, path }) => {
            assert_eq!((row, n, path), (40, 40, Some(rows)))
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn relative_dedup_and_knn_modes() {
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 30);
    let x = npy::read_f32(&data).unwrap().0;
    // References: copies of rows 3 and 7.
    let refs = dir.path().join("refs.npy");
    let r: Vec<f32> = [3usize, 7]
        .iter()
        .flat_map(|&i| x[i * D..(i + 1) * D].to_vec())
        .collect();
    npy::write_f32(&refs, &r, &[2, D]).unwrap();
    let mut p = dedup_params(dir.path(), &data);
    p.reference = vec![refs.clone()];
    let s = dedup(&p, &NoProgress).unwrap().completed().unwrap();
    assert_eq!(s.mode, DedupMode::Relative);
    let keep = ids(&p.output.join("keep.npy"));
    assert!(!keep.contains(&3) && !keep.contains(&7));
    // A reference of another dimension names the file.
    npy::write_f32(&refs, &[1.0, 0.0], &[1, 2]).unwrap();
    p.output = dir.path().join("bad");
    assert!(matches!(
        dedup(&p, &NoProgress),
        Err(Error::DimMismatch {
            expected: 4,
            got: 2,
            ..
        })
    ));
    // k-NN and threshold queries.
    let kp = KnnParams {
        k: 3,
        ..KnnParams::new(Input::new(&data), dir.path().join("knn"))
    };
    let Some(KnnSummary::Knn(s)) = knn(&kp, &NoProgress).unwrap().completed() else {
        panic!("k-NN summary expected")
    };
    assert_eq!(
        (s.queries, s.base, s.k, s.index),
        (30, 30, 3, IndexInfo::Exact)
    );
    let got = ids(&kp.output.join("ids.npy"));
    assert_eq!(got.len(), 90);
    assert!(
        (0..30).all(|q| !got[q * 3..q * 3 + 3].contains(&(q as i64))),
        "self excluded"
    );
    let tp = KnnParams {
        threshold: Some(0.99),
        ..KnnParams::new(Input::new(&data), dir.path().join("range"))
    };
    let Some(KnnSummary::Range(s)) = knn(&tp, &NoProgress).unwrap().completed() else {
        panic!("range summary expected")
    };
    assert_eq!(ids(&tp.output.join("ids.npy")).len(), s.pairs);
    assert!(s.pairs >= 2 * 5, "each planted pair, both ways");
    // The summary on disk reads back as the returned one (times aside: JSON float parsing may differ in the
    // last bit).
    let text = std::fs::read_to_string(tp.output.join("summary.json")).unwrap();
    let Ok(KnnSummary::Range(back)) = serde_json::from_str::<KnnSummary>(&text) else {
        panic!("{text}")
    };
    assert_eq!(
        (back.queries, back.threshold, back.pairs),
        (s.queries, s.threshold, s.pairs)
    );
}

fn kmeans_params(dir: &Path, data: &Path, iters: usize, out: &str) -> KmeansParams {
    KmeansParams {
        iters,
        tol: 0.0,
        init: crate::kmeans::Init::Random,
        checkpoint_every: 5,
        ..KmeansParams::new(Input::new(data), 6, dir.join(out))
    }
}

#[test]
fn kmeans_resumes_from_its_checkpoint_and_ignores_one_of_other_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 80);
    let full = kmeans(&kmeans_params(dir.path(), &data, 10, "full"), &NoProgress)
        .unwrap()
        .completed()
        .unwrap();
    assert_eq!(full.resumed_from_iteration, None);
    // A 5-iteration run leaves a checkpoint; rerunning with 10 iterations (its summary removed, as after a
    // crash) resumes there and ends where the uninterrupted run did.
    let p5 = kmeans_params(dir.path(), &data, 5, "res");
    kmeans(&p5, &NoProgress).unwrap();
    std::fs::remove_file(p5.output.join("summary.json")).unwrap();
    let log = Log::default();
    let p10 = kmeans_params(dir.path(), &data, 10, "res");
    let resumed = kmeans(&p10, &log).unwrap().completed().unwrap();
    assert!(log
        .take()
        .contains(&"kmeans: resuming after iteration 5".to_string()));
    assert_eq!(resumed.resumed_from_iteration, Some(5));
    assert_eq!(resumed.iterations, full.iterations);
    let centroids = |out: &Path| npy::read_f32(&out.join("centroids.npy")).unwrap().0;
    assert_eq!(centroids(&p10.output), centroids(&dir.path().join("full")));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(p10.output.join("checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert!(full.iterations > 5, "the resumed run has work left");
    assert_eq!(state["checkpoint"]["iterations"], full.iterations / 5 * 5);
    // Another seed: the checkpoint is ignored, with a note.
    std::fs::remove_file(p10.output.join("summary.json")).unwrap();
    let other = KmeansParams {
        seed: 1,
        ..p10.clone()
    };
    let s = kmeans(&other, &log).unwrap().completed().unwrap();
    assert!(log
        .take()
        .contains(&"kmeans: checkpoint of other parameters ignored".to_string()));
    assert_eq!(s.resumed_from_iteration, None);
    // `force`: recomputed from scratch although a matching checkpoint exists.
    let s = kmeans(
        &KmeansParams {
            force: true,
            ..other
        },
        &log,
    )
    .unwrap()
    .completed()
    .unwrap();
    assert_eq!(s.resumed_from_iteration, None);
    assert!(!log.take().iter().any(|m| m.starts_with("kmeans:")));
    // k is required.
    let no_k = KmeansParams {
        k: 0,
        output: dir.path().join("no_k"),
        ..p10
    };
    assert!(matches!(
        kmeans(&no_k, &NoProgress),
        Err(Error::InvalidArgument { name: "k", .. })
    ));
}

#[test]
fn hkmeans_reuses_finished_levels_and_sample_follows() {
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 80);
    let mut p = HkmeansParams::new(Input::new(&data), vec![12, 3], dir.path().join("hk"));
    p.iters = vec![10];
    p.resampling_steps = vec![2];
    p.sample_size = vec![4, 2];
    let first = hkmeans(&p, &NoProgress).unwrap().completed().unwrap();
    assert_eq!((first.levels, first.k.clone()), (2, vec![12, 3]));
    let level2 = npy::read_f32(&p.output.join("level2/centroids.npy"))
        .unwrap()
        .0;
    // Interrupted during level 2: level 1 is loaded (not rewritten), level 2 recomputed identically.
    let stamp = modified(&p.output.join("level1/centroids.npy"));
    std::fs::remove_file(p.output.join("summary.json")).unwrap();
    std::fs::remove_dir_all(p.output.join("level2")).unwrap();
    let again = hkmeans(&p, &NoProgress).unwrap().completed().unwrap();
    assert_eq!(again.k, first.k);
    assert_eq!(modified(&p.output.join("level1/centroids.npy")), stamp);
    assert_eq!(
        npy::read_f32(&p.output.join("level2/centroids.npy"))
            .unwrap()
            .0,
        level2
    );
    // Balanced sampling from it; skipped when done; `force` recomputes the same selection.
    let sp = SampleParams::new(&p.output, 30, dir.path().join("sel"));
    let s = sample(&sp, &NoProgress).unwrap().completed().unwrap();
    assert_eq!((s.selected, s.levels), (30, 2));
    let sel = ids(&sp.output.join("selection.npy"));
    assert!(sel.windows(2).all(|w| w[0] < w[1]));
    assert!(sample(&sp, &NoProgress).unwrap().is_skipped());
    let forced = SampleParams {
        force: true,
        ..sp.clone()
    };
    assert!(!sample(&forced, &NoProgress).unwrap().is_skipped());
    assert_eq!(ids(&sp.output.join("selection.npy")), sel);
    // Damaged level files are refused; a directory without levels names the stage to run.
    npy::write_i64(&p.output.join("level1/sorted_offsets.npy"), &[0, 1], &[2]).unwrap();
    let damaged = SampleParams::new(&p.output, 30, dir.path().join("sel2"));
    assert!(matches!(
        sample(&damaged, &NoProgress),
        Err(Error::Resume { .. })
    ));
    let empty = SampleParams::new(dir.path(), 30, dir.path().join("sel3"));
    assert!(matches!(
        sample(&empty, &NoProgress),
        Err(Error::MissingOutput {
            stage: "hkmeans",
            ..
        })
    ));
    // Per-level lists must fit the levels.
    p.iters = vec![1, 2, 3];
    p.force = true;
    assert!(matches!(
        hkmeans(&p, &NoProgress),
        Err(Error::InvalidArgument { name: "iters", .. })
    ));
}

#[test]
fn retrieve_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let data = pool(dir.path(), 60);
    let x = npy::read_f32(&data).unwrap().0;
    let queries = dir.path().join("q.npy");
    npy::write_f32(&queries, &x[..8 * D], &[8, D]).unwrap();
    let p = RetrieveParams {
        k: 2,
        unique: true,
        ..RetrieveParams::new(Input::new(&data), &queries, dir.path().join("ret"))
    };
    let s = retrieve(&p, &NoProgress).unwrap().completed().unwrap();
    let got = ids(&p.output.join("retrieved.npy"));
    assert_eq!(got.len(), s.result.n_unique);
    assert!((0..8).all(|q| got.contains(&q)), "each query finds itself");
    // Cluster mode over a k-means output.
    let km = KmeansParams::new(Input::new(&data), 4, dir.path().join("km"));
    kmeans(&km, &NoProgress).unwrap();
    let c = RetrieveParams {
        mode: RetrieveMode::Cluster,
        clusters: Some(km.output.clone()),
        min_queries: 0,
        per_cluster: 5,
        ..RetrieveParams::new(Input::new(&data), &queries, dir.path().join("retc"))
    };
    let s = retrieve(&c, &NoProgress).unwrap().completed().unwrap();
    assert!(s.result.n_clusters_selected.unwrap() >= 1);
    assert!(ids(&c.output.join("retrieved.npy")).len() <= 5 * 4);
    // Assignments of another pool are refused with the file named.
    npy::write_i64(&km.output.join("assignment.npy"), &[0, 1], &[2]).unwrap();
    let bad = RetrieveParams {
        output: dir.path().join("retc2"),
        ..c
    };
    assert!(matches!(
        retrieve(&bad, &NoProgress),
        Err(Error::LengthMismatch {
            expected: 60,
            got: 2,
            ..
        })
    ));
}

/// A fake model: rows from the file name; fails once it has embedded `fail_after` images.
struct Fake {
    images: usize,
    fail_after: Option<usize>,
}

impl Embedder for Fake {
    fn dim(&self) -> usize {
        2
    }
    fn embed(&mut self, paths: &[PathBuf]) -> Result<Vec<f32>> {
        if self
            .fail_after
            .is_some_and(|f| self.images + paths.len() > f)
        {
            return Err(Error::embedder("simulated crash"));
        }
        self.images += paths.len();
        Ok(paths
            .iter()
            .flat_map(|p| [1.0, p.as_os_str().len() as f32])
            .collect())
    }
}

#[test]
fn embed_resumes_its_shards_and_builds_the_model_after_reading_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    let names: String = (0..10).map(|i| format!("img/{i:02}.jpg\n")).collect();
    std::fs::write(&list, names).unwrap();
    let p = EmbedParams {
        list: Some(list),
        output: dir.path().join("emb"),
        merge_to: Some(dir.path().join("all.npy")),
        config: crate::embed::EmbedConfig {
            shard_size: 4,
            batch_size: 2,
            normalize: true,
        },
        ..EmbedParams::default()
    };
    let crash = embed(
        &p,
        || {
            Ok(Fake {
                images: 0,
                fail_after: Some(6),
            })
        },
        &NoProgress,
    );
    assert!(matches!(crash, Err(Error::Embedder { .. })));
    let s = embed(
        &p,
        || {
            Ok(Fake {
                images: 0,
                fail_after: None,
            })
        },
        &NoProgress,
    )
    .unwrap();
    assert_eq!((s.report.skipped, s.report.computed), (1, 2));
    assert_eq!(s.model, "dinov2_vits14");
    assert_eq!(
        npy::read_f32(&dir.path().join("all.npy")).unwrap().1,
        [10, 2]
    );
    // No image source: refused before the model is built.
    let none = EmbedParams { list: None, ..p };
    let r = embed(
        &none,
        || -> Result<Fake> { panic!("the model must not be built") },
        &NoProgress,
    );
    assert!(matches!(
        r,
        Err(Error::InvalidArgument { name: "images", .. })
    ));
}

#[test]
fn params_read_from_json_take_the_defaults() {
    let p: DedupParams = serde_json::from_str(
        r#"{"input": {"embeddings": "x.npy"}, "output": "out", "threshold": 0.45}"#,
    )
    .unwrap();
    assert_eq!(
        p,
        DedupParams {
            threshold: 0.45,
            ..DedupParams::new(Input::new("x.npy"), "out")
        }
    );
    let h: HkmeansParams = serde_json::from_str(
        r#"{"input": {"embeddings": "x.npy"}, "k": [10, 2], "strategy": "r"}"#,
    )
    .unwrap();
    assert_eq!(h.strategy, crate::hkmeans::Pick::Random);
    assert_eq!(h.iters, vec![50]);
    // Missing paths are named.
    let e = dedup(&DedupParams::default(), &NoProgress).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { name: "output", .. }),
        "{e}"
    );
}
