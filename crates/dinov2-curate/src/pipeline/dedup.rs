//! The `dedup` stage: self or relative deduplication with per-chunk edge checkpoints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    load_plain, map_ids, read_json, run_stage_on, to_json, write_rows, Index, IndexInfo,
    IndexParams, Input, Outcome, Progress, Reporter, Stage,
};
use crate::dedup::{self as algo, DedupResult, RelativeResult, Searcher};
use crate::error::{io_err, Error, Result};
use crate::npy;
use dinov2_dist::{Communicator, SingleProcess};

/// Parameters of [`dedup`](fn@dedup).
///
/// ```
/// use dinov2_curate::pipeline::{DedupParams, Input};
/// let p = DedupParams::new(Input::new("pool.npy"), "dedup/");
/// assert_eq!((p.k, p.threshold, p.chunk), (64, 0.6, 65536));
/// assert!(p.reference.is_empty(), "self-dedup by default");
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DedupParams {
    /// Input embeddings.
    pub input: Input,
    /// Neighbours per row.
    pub k: usize,
    /// Cosine threshold of an edge (DINOv2: 0.6 self, 0.45 relative).
    pub threshold: f32,
    /// Reference embeddings: relative dedup, dropping every component that touches one (empty = self-dedup).
    pub reference: Vec<PathBuf>,
    /// Query rows per checkpointed chunk.
    pub chunk: usize,
    /// Search index.
    pub index: IndexParams,
    /// Output directory.
    pub output: PathBuf,
    /// Recompute even if the output exists; drop edge checkpoints of other parameters instead of refusing them.
    pub force: bool,
}

impl Default for DedupParams {
    /// No input or output yet; `k` 64, threshold 0.6, self-dedup, chunks of 65,536 rows, automatic index.
    fn default() -> Self {
        Self {
            input: Input::default(),
            k: 64,
            threshold: 0.6,
            reference: Vec::new(),
            chunk: 65536,
            index: IndexParams::default(),
            output: PathBuf::new(),
            force: false,
        }
    }
}

impl DedupParams {
    /// Self-dedup of `input` into `output` with the defaults.
    ///
    /// ```
    /// use dinov2_curate::pipeline::{DedupParams, Input};
    /// assert_eq!(DedupParams::new(Input::new("x.npy"), "out").output, std::path::Path::new("out"));
    /// ```
    pub fn new(input: Input, output: impl Into<PathBuf>) -> Self {
        Self {
            input,
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What the edge checkpoints of a dedup depend on (`params.json`, and `params` in the summary). Checkpoints are
/// reused only when this is unchanged.
///
/// ```
/// use dinov2_curate::pipeline::{DedupFingerprint, IndexParams};
/// let f = DedupFingerprint {
///     embeddings: "x.npy".into(), rows: None, no_normalize: false, n: 10, d: 4, k: 3,
///     threshold: 0.5, reference: vec![], chunk: 5, index: IndexParams::default(),
/// };
/// let v = serde_json::to_value(&f).unwrap();
/// assert_eq!(v["index"]["index"], "Auto");
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DedupFingerprint {
    /// [`Input::embeddings`].
    pub embeddings: PathBuf,
    /// [`Input::rows`].
    pub rows: Option<PathBuf>,
    /// `!`[`Input::normalize`].
    pub no_normalize: bool,
    /// Rows deduplicated.
    pub n: usize,
    /// Dimension.
    pub d: usize,
    /// [`DedupParams::k`].
    pub k: usize,
    /// [`DedupParams::threshold`].
    pub threshold: f32,
    /// [`DedupParams::reference`].
    pub reference: Vec<PathBuf>,
    /// [`DedupParams::chunk`].
    pub chunk: usize,
    /// [`DedupParams::index`].
    pub index: IndexParams,
}

/// Self or relative dedup.
///
/// ```
/// use dinov2_curate::pipeline::DedupMode;
/// assert_eq!(serde_json::to_string(&DedupMode::SelfDedup).unwrap(), "\"self\"");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum DedupMode {
    /// Within the pool.
    #[serde(rename = "self")]
    SelfDedup,
    /// Against references.
    #[serde(rename = "relative")]
    Relative,
}

/// The counts of a self or relative dedup (`result` in the summary).
///
/// ```
/// use dinov2_curate::dedup::self_dedup_from_edges;
/// use dinov2_curate::pipeline::DedupStats;
/// let s = DedupStats::SelfDedup(self_dedup_from_edges(3, &[(0, 2)]).unwrap());
/// assert_eq!((s.n_rows(), s.n_kept()), (3, 2));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum DedupStats {
    /// Relative dedup.
    Relative(RelativeResult),
    /// Self-dedup.
    SelfDedup(DedupResult),
}

impl DedupStats {
    /// Pool rows kept.
    ///
    /// ```
    /// # use dinov2_curate::{dedup::self_dedup_from_edges, pipeline::DedupStats};
    /// assert_eq!(DedupStats::SelfDedup(self_dedup_from_edges(2, &[]).unwrap()).n_kept(), 2);
    /// ```
    pub fn n_kept(&self) -> usize {
        match self {
            DedupStats::Relative(r) => r.n_kept,
            DedupStats::SelfDedup(r) => r.n_kept,
        }
    }

    /// Pool rows deduplicated.
    ///
    /// ```
    /// # use dinov2_curate::{dedup::self_dedup_from_edges, pipeline::DedupStats};
    /// assert_eq!(DedupStats::SelfDedup(self_dedup_from_edges(2, &[]).unwrap()).n_rows(), 2);
    /// ```
    pub fn n_rows(&self) -> usize {
        match self {
            DedupStats::Relative(r) => r.n_rows,
            DedupStats::SelfDedup(r) => r.n_rows,
        }
    }
}

/// What [`dedup`](fn@dedup) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{dedup, DedupMode, DedupParams, DedupSummary, NoProgress};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// let s = dedup(&DedupParams::new(input, dir.path().join("d")), &NoProgress)?.completed().unwrap();
/// assert_eq!(s.mode, DedupMode::SelfDedup);
/// let written: DedupSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("d/summary.json"))?)?;
/// assert_eq!((written.result, written.params), (s.result, s.params));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DedupSummary {
    /// Self or relative.
    pub mode: DedupMode,
    /// Counts.
    pub result: DedupStats,
    /// The parameters the checkpoints were made with.
    pub params: DedupFingerprint,
    /// The index searched.
    pub index: IndexInfo,
    /// IVF only: sampled recall@k of the neighbour search against exact search.
    pub recall_at_k: Option<f64>,
    /// IVF only: sampled recall@1.
    pub recall_at_1: Option<f64>,
    /// IVF only: fraction of the exact above-threshold edges of sampled rows that were found.
    pub edge_recall: Option<f64>,
    /// IVF only: exact edges in the edge-recall sample.
    pub edge_recall_sampled_edges: Option<usize>,
    /// Time spent measuring recall.
    pub recall_seconds: f64,
    /// Time of the dedup itself (without the recall measurement).
    pub seconds: f64,
}

/// Self-dedup (k-NN graph, cosine threshold, one row per connected component) or, with references, relative
/// dedup (every component touching a reference is dropped). Writes `keep.npy` (int64 original row ids,
/// ascending), `components.npy` (int64 component per row), `rows.npy` (with a row subset), `params.json`,
/// `edges/chunk_*.npy` (the above-threshold edges per query chunk, reused by a rerun with the same
/// [`DedupFingerprint`]) and `summary.json`. Edge checkpoints of other parameters are an
/// [`Error::ParamsChanged`] unless `force`.
///
/// ```
/// use dinov2_curate::pipeline::{dedup, DedupParams, Input, NoProgress};
/// use dinov2_curate::{npy, store::Embeddings, Error};
/// let dir = tempfile::tempdir()?;
/// let x = Embeddings::from_vec(vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.01], 3, 2)?;
/// x.save_npy(&dir.path().join("x.npy"))?;
/// let mut p = DedupParams::new(Input::new(dir.path().join("x.npy")), dir.path().join("d"));
/// p.k = 2;
/// let s = dedup(&p, &NoProgress)?.completed().unwrap();
/// assert_eq!(s.result.n_kept(), 2);
/// assert_eq!(npy::read_i64(&dir.path().join("d/keep.npy"))?.0, vec![0, 1]);
/// // Another threshold on the same directory: refused without `force`.
/// std::fs::remove_file(dir.path().join("d/summary.json"))?;
/// p.threshold = 0.9;
/// assert!(matches!(dedup(&p, &NoProgress), Err(Error::ParamsChanged { .. })));
/// p.force = true;
/// assert!(!dedup(&p, &NoProgress)?.is_skipped());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn dedup(params: &DedupParams, progress: &dyn Progress) -> Result<Outcome<DedupSummary>> {
    dedup_on(params, progress, &SingleProcess)
}

/// [`dedup`] as one rank of a sharded run (`mpirun -np N dinov2 curate dedup`), self or relative: every rank of
/// `comm` calls it with the same parameters. The IVF index (if any) is built together
/// ([`crate::ivf::IvfFlat::build_sharded`]); the query chunks are dealt round-robin (chunk `c` to rank
/// `c % N`, each written to its own `edges/chunk_*.npy` checkpoint, so a rerun resumes per rank) and the
/// reference rows split in contiguous parts; the above-threshold edges are gathered and every rank builds the same
/// components. Rank 0 measures the sampled recall and writes the outputs. With the exact search the outputs are
/// identical to a one-process run's; with IVF they are the same up to the index's approximation (the coarse
/// k-means differs only in the order of its f64 additions).
pub fn dedup_on(
    params: &DedupParams,
    progress: &dyn Progress,
    comm: &dyn Communicator,
) -> Result<Outcome<DedupSummary>> {
    run_stage_on(&params.output, params.force, comm, |out| {
        run(params, progress, out, comm)
    })
}

fn run(
    params: &DedupParams,
    progress: &dyn Progress,
    out: &Path,
    comm: &dyn Communicator,
) -> Result<DedupSummary> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let r = Reporter::new(progress, Stage::Dedup);
    let t = Instant::now();
    let (x, rows) = params.input.load()?;
    let (n, d) = (x.rows(), x.dim());
    let mut reference = Vec::new();
    for p in &params.reference {
        reference.extend_from_slice(load_plain(p, params.input.normalize, d)?.as_slice());
    }
    let nr = reference.len() / d;
    // Checkpoints are only valid for the same inputs and parameters.
    let fingerprint = DedupFingerprint {
        embeddings: params.input.embeddings.clone(),
        rows: params.input.rows.clone(),
        no_normalize: !params.input.normalize,
        n,
        d,
        k: params.k,
        threshold: params.threshold,
        reference: params.reference.clone(),
        chunk: params.chunk,
        index: params.index.clone(),
    };
    let edge_dir = out.join("edges");
    let ppath = out.join("params.json");
    let fp_json = to_json(&fingerprint, &ppath)?;
    // Every rank checks its own view of the directory (its edge checkpoints may be on a local disk).
    let changed = ppath.exists() && read_json(&ppath)? != fp_json;
    if comm.all_gather_i64(&[i64::from(changed)])?.contains(&1) {
        if !params.force {
            return Err(Error::ParamsChanged {
                path: out.to_path_buf(),
            });
        }
        let _ = std::fs::remove_dir_all(&edge_dir);
    }
    // Rank 0 writes the parameters; a rank whose directory is not shared with rank 0's (a local disk) then
    // writes its own copy, which guards its edge checkpoints.
    comm.barrier()?;
    if lead {
        crate::embed::write_json(&ppath, &fp_json)?;
    }
    comm.barrier()?;
    if !lead && !ppath.exists() {
        crate::embed::write_json(&ppath, &fp_json)?;
    }
    std::fs::create_dir_all(&edge_dir).map_err(io_err(&edge_dir))?;
    let index = Index::build(&x, &params.index, &r, comm)?;
    let searcher = index.searcher(x.as_slice());
    let refs = Searcher::Exact { base: &reference };
    // On several ranks every rank gets at least one chunk: chunks of at most ceil(n / world) queries. Such a
    // chunk's file also names its end, so chunks of another world size are never mistaken for it.
    let chunk = if world == 1 {
        params.chunk.max(1)
    } else {
        params.chunk.max(1).min(n.div_ceil(world).max(1))
    };
    let chunk_name = |s: usize, e: usize| {
        if chunk == params.chunk.max(1) {
            format!("chunk_{s:010}.npy")
        } else {
            format!("chunk_{s:010}_{e:010}.npy")
        }
    };
    let (k, threshold) = (params.k, params.threshold);
    r.begin("dedup", n);
    let mut edges: Vec<(i64, i64)> = Vec::new();
    let mut s = 0;
    while s < n {
        let e = (s + chunk).min(n);
        if (s / chunk) % world != rank {
            s = e;
            continue;
        }
        let path = edge_dir.join(chunk_name(s, e));
        let chunk_edges = if path.exists() {
            read_edges(&path)?
        } else {
            let q = &x.as_slice()[s * d..e * d];
            let mut ce = algo::threshold_edges(&searcher.search(q, d, k, Some(s))?, s, threshold);
            if nr > 0 {
                let hits = refs.search(q, d, k, None)?;
                ce.extend(
                    algo::threshold_edges(&hits, s, threshold)
                        .into_iter()
                        .map(|(p, q)| (p, q + n as i64)),
                );
            }
            write_edges(&path, &ce)?;
            ce
        };
        edges.extend(chunk_edges);
        r.advance("dedup", e, n);
        s = e;
    }
    if nr > 0 {
        // Reference rows as pool queries: contiguous parts by rank (one file for one rank).
        let part = dinov2_dist::shard_range(nr, world, rank);
        let path = if world == 1 {
            edge_dir.join("reference.npy")
        } else {
            edge_dir.join(format!("reference_{:010}_{:010}.npy", part.start, part.end))
        };
        let re = if path.exists() {
            read_edges(&path)?
        } else {
            let q = &reference[part.start * d..part.end * d];
            let re =
                algo::threshold_edges(&searcher.search(q, d, k, None)?, n + part.start, threshold);
            write_edges(&path, &re)?;
            re
        };
        edges.extend(re);
    }
    r.end("dedup");
    if world > 1 {
        let flat: Vec<i64> = edges.iter().flat_map(|&(a, b)| [a, b]).collect();
        edges = comm
            .all_gather_i64(&flat)?
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect();
    }
    let search_s = t.elapsed().as_secs_f64();
    let sample = params.index.recall_sample;
    // The sampled recall is rank 0's to measure (it writes the summary).
    let sample = if lead { sample } else { 0 };
    let recall = index.recall(x.as_slice(), x.as_slice(), d, k, sample, true)?;
    let edge_recall = index.edge_recall(x.as_slice(), d, k, sample, threshold)?;
    let recall_s = t.elapsed().as_secs_f64() - search_s;
    let (mode, mut keep, components, result) = if nr > 0 {
        let mut res = algo::relative_dedup_from_edges(n, nr, &edges)?;
        let (keep, comp) = (
            std::mem::take(&mut res.keep),
            std::mem::take(&mut res.components),
        );
        (DedupMode::Relative, keep, comp, DedupStats::Relative(res))
    } else {
        let mut res = algo::self_dedup_from_edges(n, &edges)?;
        let (keep, comp) = (
            std::mem::take(&mut res.keep),
            std::mem::take(&mut res.components),
        );
        (DedupMode::SelfDedup, keep, comp, DedupStats::SelfDedup(res))
    };
    map_ids(&mut keep, &rows);
    keep.sort_unstable();
    if lead {
        npy::write_i64(&out.join("keep.npy"), &keep, &[keep.len()])?;
        npy::write_i64(
            &out.join("components.npy"),
            &components,
            &[components.len()],
        )?;
        write_rows(out, &rows)?;
    }
    let summary = DedupSummary {
        mode,
        result,
        params: fingerprint,
        index: index.info(),
        recall_at_k: recall.map(|r| r.0),
        recall_at_1: recall.map(|r| r.1),
        edge_recall: edge_recall.map(|r| r.0),
        edge_recall_sampled_edges: edge_recall.map(|r| r.1),
        recall_seconds: recall_s,
        seconds: t.elapsed().as_secs_f64() - recall_s,
    };
    Ok(summary)
}

fn write_edges(path: &Path, e: &[(i64, i64)]) -> Result<()> {
    let flat: Vec<i64> = e.iter().flat_map(|&(a, b)| [a, b]).collect();
    npy::write_i64(path, &flat, &[e.len(), 2])
}

fn read_edges(path: &Path) -> Result<Vec<(i64, i64)>> {
    let (v, shape) = npy::read_i64(path)?;
    if shape.len() != 2 || shape[1] != 2 {
        return Err(Error::Npy {
            path: path.into(),
            reason: format!(
                "edges of shape {shape:?}, expected [n, 2]; delete the file to recompute it"
            ),
        });
    }
    Ok(v.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}
