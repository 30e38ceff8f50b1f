//! The `retrieve` stage: pool images for curated query sets, sample- or cluster-based.

use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use super::{
    load_plain, map_ids, require_path, run_stage_on, Index, IndexParams, Input, Outcome, Progress,
    Reporter, Stage,
};
use crate::error::{Error, Result};
use crate::kmeans::{self, KMeansConfig};
use crate::npy;
use crate::retrieve::{self as algo, Retrieval};
use crate::store::read_ids;
use dinov2_dist::{shard_range, Communicator, SingleProcess};

/// Retrieval mode.
///
/// ```
/// use dinov2_curate::pipeline::RetrieveMode;
/// assert_eq!(RetrieveMode::default(), RetrieveMode::Sample);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RetrieveMode {
    /// The `k` nearest pool images of every query.
    #[default]
    Sample,
    /// Pool clusters hit by more than `min_queries` queries.
    Cluster,
}

/// Parameters of [`retrieve`](fn@retrieve).
///
/// ```
/// use dinov2_curate::pipeline::{Input, RetrieveParams};
/// let p = RetrieveParams::new(Input::new("pool.npy"), "queries.npy", "ret/");
/// assert_eq!((p.k, p.min_queries, p.per_cluster, p.cap), (4, 3, 10000, 1_000_000));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RetrieveParams {
    /// Pool embeddings.
    pub input: Input,
    /// Query embeddings (the curated dataset).
    pub queries: PathBuf,
    /// Retrieval mode.
    pub mode: RetrieveMode,
    /// Sample mode: neighbours per query (DINOv2: 4, 32 for ImageNet-1k).
    pub k: usize,
    /// Sample mode: output distinct ids instead of every hit.
    pub unique: bool,
    /// Cluster mode: a [`kmeans`](super::kmeans()) output directory over the same pool (`centroids.npy`,
    /// `assignment.npy`); `None` runs k-means with `n_clusters`.
    pub clusters: Option<PathBuf>,
    /// Cluster mode without `clusters`: clusters of the k-means run.
    pub n_clusters: usize,
    /// Cluster mode: clusters need more than this many queries.
    pub min_queries: usize,
    /// Cluster mode: images taken per selected cluster.
    pub per_cluster: usize,
    /// Cluster mode: at most this many images per dataset.
    pub cap: usize,
    /// Seed.
    pub seed: u64,
    /// Search index (sample mode).
    pub index: IndexParams,
    /// Output directory.
    pub output: PathBuf,
    /// Recompute even if the output exists.
    pub force: bool,
}

impl Default for RetrieveParams {
    /// No inputs or output yet; sample mode with `k` 4; cluster mode defaults 1,000 clusters, more than 3
    /// queries, 10,000 images per cluster, cap 1,000,000; seed 0.
    fn default() -> Self {
        Self {
            input: Input::default(),
            queries: PathBuf::new(),
            mode: RetrieveMode::Sample,
            k: 4,
            unique: false,
            clusters: None,
            n_clusters: 1000,
            min_queries: 3,
            per_cluster: 10000,
            cap: 1_000_000,
            seed: 0,
            index: IndexParams::default(),
            output: PathBuf::new(),
            force: false,
        }
    }
}

impl RetrieveParams {
    /// Sample-based retrieval of `queries` from `input` into `output` with the defaults.
    ///
    /// ```
    /// use dinov2_curate::pipeline::{Input, RetrieveParams};
    /// let p = RetrieveParams::new(Input::new("pool.npy"), "q.npy", "out");
    /// assert_eq!(p.queries, std::path::Path::new("q.npy"));
    /// ```
    pub fn new(input: Input, queries: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            input,
            queries: queries.into(),
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What [`retrieve`](fn@retrieve) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{retrieve, NoProgress, RetrieveParams, RetrieveSummary};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// let p = RetrieveParams::new(input, dir.path().join("x.npy"), dir.path().join("r"));
/// let s = retrieve(&p, &NoProgress)?.completed().unwrap();
/// assert_eq!((s.result.n_queries, s.result.n_hits), (4, 16));
/// let written: RetrieveSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("r/summary.json"))?)?;
/// assert_eq!(written.result, s.result);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrieveSummary {
    /// Counts and collision statistics.
    pub result: Retrieval,
    /// Wall time.
    pub seconds: f64,
}

/// Retrieves pool rows for a query set: `retrieved.npy` (int64 original row ids: every hit in query order, or
/// ascending distinct ids with `unique` or in cluster mode) and `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{retrieve, Input, NoProgress, RetrieveParams};
/// use dinov2_curate::{npy, store::Embeddings};
/// let dir = tempfile::tempdir()?;
/// Embeddings::from_vec(vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8], 3, 2)?.save_npy(&dir.path().join("pool.npy"))?;
/// Embeddings::from_vec(vec![0.1, 1.0], 1, 2)?.save_npy(&dir.path().join("q.npy"))?;
/// let mut p = RetrieveParams::new(
///     Input::new(dir.path().join("pool.npy")), dir.path().join("q.npy"), dir.path().join("ret"));
/// p.k = 2;
/// let s = retrieve(&p, &NoProgress)?.completed().unwrap();
/// assert_eq!(s.result.n_hits, 2);
/// assert_eq!(npy::read_i64(&dir.path().join("ret/retrieved.npy"))?.0, vec![1, 2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn retrieve(
    params: &RetrieveParams,
    progress: &dyn Progress,
) -> Result<Outcome<RetrieveSummary>> {
    retrieve_on(params, progress, &SingleProcess)
}

/// [`retrieve`] as one rank of a sharded run (`mpirun -np N dinov2 curate retrieve`): every rank of `comm` calls
/// it with the same parameters. Sample mode: each rank searches a contiguous part of the queries against the whole
/// pool (an IVF index is built together) and the hits are gathered; cluster mode: the pool k-means is trained
/// sharded on contiguous row shares and the pool labels gathered. Rank 0 writes the outputs; with the exact search
/// they are identical to a one-process run's.
pub fn retrieve_on(
    params: &RetrieveParams,
    progress: &dyn Progress,
    comm: &dyn Communicator,
) -> Result<Outcome<RetrieveSummary>> {
    run_stage_on(&params.output, params.force, comm, |out| {
        run(params, progress, out, comm)
    })
}

fn run(
    params: &RetrieveParams,
    progress: &dyn Progress,
    out: &Path,
    comm: &dyn Communicator,
) -> Result<RetrieveSummary> {
    let r = Reporter::new(progress, Stage::Retrieve);
    let t = Instant::now();
    let (x, rows) = params.input.load()?;
    let d = x.dim();
    require_path("queries", &params.queries)?;
    let q = load_plain(&params.queries, params.input.normalize, d)?;
    let mut res = match params.mode {
        RetrieveMode::Sample => {
            let index = Index::build(&x, &params.index, &r, comm)?;
            algo::sample_based_sharded(
                q.as_slice(),
                &index.searcher(x.as_slice()),
                d,
                params.k,
                params.unique,
                comm,
            )?
        }
        RetrieveMode::Cluster => {
            let (centroids, labels) = match &params.clusters {
                Some(dir) => read_clusters(dir, d, x.rows())?,
                None => {
                    let cfg = KMeansConfig {
                        seed: params.seed,
                        max_points_per_centroid: Some(256),
                        ..KMeansConfig::new(params.n_clusters)
                    };
                    let mine = shard_range(x.rows(), comm.world_size(), comm.rank());
                    let xl = x.row_range(mine.start, mine.end)?;
                    let km = kmeans::train_sharded(
                        xl,
                        d,
                        &cfg,
                        comm,
                        None,
                        &mut |_, _| {},
                        &mut |_| Ok(()),
                    )?;
                    let labels = km.assign(xl)?.0;
                    let labels = if comm.world_size() == 1 {
                        labels
                    } else {
                        let l: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
                        comm.all_gather_i64(&l)?
                            .into_iter()
                            .map(|l| l as u32)
                            .collect()
                    };
                    (km.centroids, labels)
                }
            };
            let k = centroids.len() / d;
            let (ql, _) = kmeans::assign(q.as_slice(), d, &centroids)?;
            algo::cluster_based(
                &labels,
                k,
                &ql,
                params.min_queries,
                params.per_cluster,
                Some(params.cap),
                params.seed,
            )?
        }
    };
    // The ids go to the file only (the summary is the counts).
    let mut ids = std::mem::take(&mut res.ids);
    map_ids(&mut ids, &rows);
    if comm.rank() == 0 {
        npy::write_i64(&out.join("retrieved.npy"), &ids, &[ids.len()])?;
    }
    let s = RetrieveSummary {
        result: res,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok(s)
}

/// Centroids and pool labels of a `kmeans` output directory over `rows` rows of dimension `d`.
fn read_clusters(dir: &std::path::Path, d: usize, rows: usize) -> Result<(Vec<f32>, Vec<u32>)> {
    let cpath = dir.join("centroids.npy");
    let (c, shape) = npy::read_f32(&cpath)?;
    if shape.len() != 2 {
        return Err(Error::Npy {
            path: cpath,
            reason: format!("centroids of shape {shape:?}, expected [k, {d}]"),
        });
    }
    if shape[1] != d {
        return Err(Error::DimMismatch {
            path: cpath,
            expected: d,
            got: shape[1],
        });
    }
    crate::store::check_finite(&c, d, Some(&cpath))?;
    let apath = dir.join("assignment.npy");
    let assignment = read_ids(&apath)?;
    if assignment.len() != rows {
        return Err(Error::LengthMismatch {
            path: apath,
            what: "assignments",
            expected: rows,
            got: assignment.len(),
        });
    }
    let labels = assignment
        .iter()
        .map(|&l| u32::try_from(l).unwrap_or(u32::MAX))
        .collect::<Vec<u32>>();
    Ok((c, labels))
}
