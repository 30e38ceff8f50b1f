//! The `knn` stage: k nearest neighbours (exact or IVF) or an exact threshold query.

use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use super::{
    load_plain, map_ids, run_stage_on, Index, IndexInfo, IndexParams, Input, Outcome, Progress,
    Reporter, Stage,
};
use crate::error::Result;
use crate::{knn as algo, npy};
use dinov2_dist::{shard_range, Communicator, SingleProcess};

/// Query rows searched per step (one progress update each).
const QUERY_CHUNK: usize = 65536;

/// Parameters of [`knn`](fn@knn).
///
/// ```
/// use dinov2_curate::pipeline::{Input, KnnParams};
/// let p = KnnParams::new(Input::new("pool.npy"), "knn/");
/// assert_eq!((p.k, p.threshold, p.queries), (10, None, None));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KnnParams {
    /// Base embeddings.
    pub input: Input,
    /// Query embeddings (default: every base row, excluding itself).
    pub queries: Option<PathBuf>,
    /// Neighbours per query.
    pub k: usize,
    /// Threshold query instead of k-NN: all base rows with cosine `> threshold` (exact; CSR output).
    pub threshold: Option<f32>,
    /// Search index (k-NN only).
    pub index: IndexParams,
    /// Output directory.
    pub output: PathBuf,
    /// Recompute even if the output exists.
    pub force: bool,
}

impl Default for KnnParams {
    /// No input or output yet; self k-NN with `k` 10, automatic index.
    fn default() -> Self {
        Self {
            input: Input::default(),
            queries: None,
            k: 10,
            threshold: None,
            index: IndexParams::default(),
            output: PathBuf::new(),
            force: false,
        }
    }
}

impl KnnParams {
    /// Self k-NN of `input` into `output` with the defaults.
    ///
    /// ```
    /// use dinov2_curate::pipeline::{Input, KnnParams};
    /// assert_eq!(KnnParams::new(Input::new("x.npy"), "out").k, 10);
    /// ```
    pub fn new(input: Input, output: impl Into<PathBuf>) -> Self {
        Self {
            input,
            output: output.into(),
            ..Self::default()
        }
    }
}

/// Summary of a threshold query ([`KnnSummary::Range`]).
///
/// ```
/// use dinov2_curate::pipeline::{knn, KnnParams, KnnSummary, NoProgress};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// let p = KnnParams { threshold: Some(0.9), ..KnnParams::new(input, dir.path().join("r")) };
/// let Some(KnnSummary::Range(s)) = knn(&p, &NoProgress)?.completed() else { unreachable!() };
/// assert_eq!((s.queries, s.pairs), (4, 4));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RangeSummary {
    /// Queries.
    pub queries: usize,
    /// The threshold.
    pub threshold: f32,
    /// (query, base row) pairs above it.
    pub pairs: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Summary of a k-NN search ([`KnnSummary::Knn`]).
///
/// ```
/// use dinov2_curate::pipeline::{knn, IndexInfo, KnnParams, KnnSummary, NoProgress};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// let p = KnnParams { k: 2, ..KnnParams::new(input, dir.path().join("k")) };
/// let Some(KnnSummary::Knn(s)) = knn(&p, &NoProgress)?.completed() else { unreachable!() };
/// assert_eq!((s.queries, s.base, s.index, s.recall_at_k), (4, 4, IndexInfo::Exact, None));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnnSearchSummary {
    /// Queries.
    pub queries: usize,
    /// Base rows.
    pub base: usize,
    /// Neighbours per query.
    pub k: usize,
    /// The index searched.
    pub index: IndexInfo,
    /// IVF only: sampled recall@k against exact search.
    pub recall_at_k: Option<f64>,
    /// IVF only: sampled recall@1.
    pub recall_at_1: Option<f64>,
    /// Time of the search (index build included).
    pub search_seconds: f64,
    /// `queries / search_seconds`.
    pub queries_per_second: f64,
}

/// What [`knn`](fn@knn) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{KnnSummary, RangeSummary};
/// let s = KnnSummary::Range(RangeSummary { queries: 2, threshold: 0.5, pairs: 3, seconds: 0.1 });
/// let back: KnnSummary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
/// assert_eq!(back, s);
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum KnnSummary {
    /// A threshold query.
    Range(RangeSummary),
    /// A k-NN search.
    Knn(KnnSearchSummary),
}

/// k-NN of the queries (or of every base row, itself excluded) by cosine: `ids.npy` (int64, original row ids, -1
/// where fewer than `k` exist) and `sims.npy` (f32), both `queries x k`. With a `threshold`: every base row above
/// it, as CSR `offsets.npy`, `ids.npy`, `sims.npy`. Then `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{knn, Input, KnnParams, KnnSummary, NoProgress};
/// use dinov2_curate::{npy, store::Embeddings};
/// let dir = tempfile::tempdir()?;
/// let x = Embeddings::from_vec(vec![1.0, 0.0, 0.8, 0.6, 0.0, 1.0], 3, 2)?;
/// x.save_npy(&dir.path().join("x.npy"))?;
/// let p = KnnParams { k: 1, ..KnnParams::new(Input::new(dir.path().join("x.npy")), dir.path().join("knn")) };
/// let Some(KnnSummary::Knn(s)) = knn(&p, &NoProgress)?.completed() else { unreachable!() };
/// assert_eq!(s.queries, 3);
/// assert_eq!(npy::read_i64(&dir.path().join("knn/ids.npy"))?.0, vec![1, 0, 1]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn knn(params: &KnnParams, progress: &dyn Progress) -> Result<Outcome<KnnSummary>> {
    knn_on(params, progress, &SingleProcess)
}

/// [`knn`] as one rank of a sharded run (`mpirun -np N dinov2 curate knn`): every rank of `comm` calls it with
/// the same parameters and searches a contiguous part of the queries against the whole base (the IVF index, if
/// any, is built together); the results are gathered in query order and rank 0 writes them. Exact search: the
/// same files as one process.
pub fn knn_on(
    params: &KnnParams,
    progress: &dyn Progress,
    comm: &dyn Communicator,
) -> Result<Outcome<KnnSummary>> {
    run_stage_on(&params.output, params.force, comm, |out| {
        run(params, progress, out, comm)
    })
}

fn run(
    params: &KnnParams,
    progress: &dyn Progress,
    out: &Path,
    comm: &dyn Communicator,
) -> Result<KnnSummary> {
    let lead = comm.rank() == 0;
    let r = Reporter::new(progress, Stage::Knn);
    let t = Instant::now();
    let (x, rows) = params.input.load()?;
    let d = x.dim();
    let q_owned = match &params.queries {
        Some(p) => Some(load_plain(p, params.input.normalize, d)?),
        None => None,
    };
    let (q, self_off) = match &q_owned {
        Some(q) => (q.as_slice(), None),
        None => (x.as_slice(), Some(0)),
    };
    let nq = q.len() / d;
    // This rank's queries.
    let part = shard_range(nq, comm.world_size(), comm.rank());
    if let Some(th) = params.threshold {
        let mine = &q[part.start * d..part.end * d];
        let res = algo::range_search(mine, x.as_slice(), d, th, self_off.map(|o| o + part.start))?;
        let counts: Vec<i64> = res
            .offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as i64)
            .collect();
        let counts = comm.all_gather_i64(&counts)?;
        let mut ids = comm.all_gather_i64(&res.ids)?;
        let sims = comm.all_gather_f32(&res.sims)?;
        map_ids(&mut ids, &rows);
        let offsets: Vec<i64> = std::iter::once(0)
            .chain(counts.iter().scan(0i64, |acc, &c| {
                *acc += c;
                Some(*acc)
            }))
            .collect();
        if lead {
            npy::write_i64(&out.join("offsets.npy"), &offsets, &[offsets.len()])?;
            npy::write_i64(&out.join("ids.npy"), &ids, &[ids.len()])?;
            npy::write_f32(&out.join("sims.npy"), &sims, &[sims.len()])?;
        }
        let s = KnnSummary::Range(RangeSummary {
            queries: nq,
            threshold: th,
            pairs: ids.len(),
            seconds: t.elapsed().as_secs_f64(),
        });
        return Ok(s);
    }
    let k = params.k;
    let index = Index::build(&x, &params.index, &r, comm)?;
    let searcher = index.searcher(x.as_slice());
    r.begin("knn", part.len());
    let mut ids = Vec::with_capacity(part.len() * k);
    let mut sims = Vec::with_capacity(part.len() * k);
    let mut s = part.start;
    while s < part.end {
        let e = (s + QUERY_CHUNK).min(part.end);
        let res = searcher.search(&q[s * d..e * d], d, k, self_off.map(|o| o + s))?;
        ids.extend(res.ids);
        sims.extend(res.sims);
        r.advance("knn", e - part.start, part.len());
        s = e;
    }
    r.end("knn");
    let mut ids = comm.all_gather_i64(&ids)?;
    let sims = comm.all_gather_f32(&sims)?;
    let search_s = t.elapsed().as_secs_f64();
    let recall = index.recall(
        q,
        x.as_slice(),
        d,
        k,
        if lead { params.index.recall_sample } else { 0 },
        self_off.is_some(),
    )?;
    map_ids(&mut ids, &rows);
    if lead {
        npy::write_i64(&out.join("ids.npy"), &ids, &[nq, k])?;
        npy::write_f32(&out.join("sims.npy"), &sims, &[nq, k])?;
    }
    let s = KnnSummary::Knn(KnnSearchSummary {
        queries: nq,
        base: x.rows(),
        k,
        index: index.info(),
        recall_at_k: recall.map(|r| r.0),
        recall_at_1: recall.map(|r| r.1),
        search_seconds: search_s,
        queries_per_second: nq as f64 / search_s.max(1e-9),
    });
    Ok(s)
}
