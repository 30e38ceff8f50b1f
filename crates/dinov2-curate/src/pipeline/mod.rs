//! The curation pipeline as resumable stages over files: embed → dedup → (knn) → retrieve → kmeans / hkmeans →
//! sample. `dinov2 curate <stage>` is a thin command line over these functions.
//!
//! Every stage takes a plain parameter struct (serde, so a pipeline can be described in a JSON file) and a
//! [`Progress`] callback, writes `.npy` arrays and a `summary.json` into its output directory, and returns the
//! typed summary it wrote:
//!
//! | stage | function | summary |
//! |---|---|---|
//! | embed images into shards | [`embed`] | [`EmbedSummary`] |
//! | self / relative dedup | [`dedup`] | [`DedupSummary`] |
//! | k-NN or threshold query | [`knn`] | [`KnnSummary`] |
//! | retrieval for query sets | [`retrieve`] | [`RetrieveSummary`] |
//! | k-means | [`kmeans`] | [`KmeansSummary`] |
//! | hierarchical k-means | [`hkmeans`] | [`HkmeansSummary`] |
//! | balanced sampling | [`sample`] | [`SampleSummary`] |
//!
//! Resumability: a stage whose `summary.json` exists is done; it is skipped ([`Outcome::Skipped`]) unless `force`
//! is set. `dedup` checkpoints its neighbour edges per query chunk (valid only for the same parameters, recorded in
//! `params.json`: other parameters are an [`Error::ParamsChanged`] without `force`),
//! `kmeans` its centroids every `checkpoint_every` iterations (a checkpoint of other parameters is ignored), and
//! `hkmeans` each finished level; `embed` skips finished shards. An interrupted stage therefore continues where it
//! stopped, with the same result as an uninterrupted run.
//!
//! ```
//! use dinov2_curate::pipeline::{self, DedupParams, Input, NoProgress, Outcome};
//! use dinov2_curate::store::Embeddings;
//! let dir = tempfile::tempdir()?;
//! // Four rows: 0 and 2 are the same image.
//! let x = Embeddings::from_vec(vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.6, 0.8], 4, 2)?;
//! x.save_npy(&dir.path().join("emb.npy"))?;
//! let params = DedupParams {
//!     k: 2,
//!     threshold: 0.99,
//!     ..DedupParams::new(Input::new(dir.path().join("emb.npy")), dir.path().join("dedup"))
//! };
//! let Outcome::Completed(s) = pipeline::dedup(&params, &NoProgress)? else { unreachable!() };
//! assert_eq!(s.result.n_kept(), 3);
//! // Done: a second call skips the stage.
//! assert!(pipeline::dedup(&params, &NoProgress)?.is_skipped());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use crate::dedup::Searcher;
use crate::error::{invalid, io_err, Error, Result};
use crate::ivf::{measure_edge_recall, measure_recall, IvfFlat, IvfParams, RecallSpec, SearchFn};
use crate::store::{read_ids, Embeddings};
use dinov2_dist::{shard_range, Communicator};

mod dedup;
mod embed;
mod hkmeans;
mod kmeans;
mod knn;
mod retrieve;
mod sample;

pub use self::dedup::{
    dedup, dedup_on, DedupFingerprint, DedupMode, DedupParams, DedupStats, DedupSummary,
};
pub use self::embed::{embed, embed_on, EmbedParams, EmbedSummary};
pub use self::hkmeans::{hkmeans, hkmeans_on, HkmeansParams, HkmeansSummary, LevelSummary};
pub use self::kmeans::{kmeans, kmeans_on, KmeansParams, KmeansSummary};
pub use self::knn::{knn, knn_on, KnnParams, KnnSearchSummary, KnnSummary, RangeSummary};
pub use self::retrieve::{retrieve, retrieve_on, RetrieveMode, RetrieveParams, RetrieveSummary};
pub use self::sample::{sample, SampleParams, SampleSummary};

/// A stage of the pipeline (named in [`ProgressEvent`]s).
///
/// ```
/// use dinov2_curate::pipeline::Stage;
/// assert_eq!(Stage::Hkmeans.name(), "hkmeans");
/// assert_eq!(Stage::Dedup.to_string(), "dedup");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Stage {
    /// [`embed`].
    Embed,
    /// [`dedup`].
    Dedup,
    /// [`knn`].
    Knn,
    /// [`retrieve`].
    Retrieve,
    /// [`kmeans`].
    Kmeans,
    /// [`hkmeans`].
    Hkmeans,
    /// [`sample`].
    Sample,
}

impl Stage {
    /// The stage's name as on the command line (`dinov2 curate <name>`).
    ///
    /// ```
    /// assert_eq!(dinov2_curate::pipeline::Stage::Knn.name(), "knn");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Stage::Embed => "embed",
            Stage::Dedup => "dedup",
            Stage::Knn => "knn",
            Stage::Retrieve => "retrieve",
            Stage::Kmeans => "kmeans",
            Stage::Hkmeans => "hkmeans",
            Stage::Sample => "sample",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a stage reports while it runs. A task (`"dedup"`, `"ivf build"`, `"kmeans"`, ...) is announced by
/// [`Begin`](ProgressEvent::Begin), advanced by [`Advance`](ProgressEvent::Advance) and closed by
/// [`End`](ProgressEvent::End); [`Message`](ProgressEvent::Message) is a note for the user (e.g. "kmeans: resuming
/// after iteration 5").
///
/// ```
/// use dinov2_curate::pipeline::{ProgressEvent, Stage};
/// let e = ProgressEvent::Advance { stage: Stage::Knn, task: "knn", done: 3, total: 10 };
/// assert_eq!(e.stage(), Stage::Knn);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressEvent<'a> {
    /// A task of `total` units starts.
    Begin {
        /// The running stage.
        stage: Stage,
        /// What is being done (a short label).
        task: &'static str,
        /// Units of work (rows, iterations, levels).
        total: u64,
    },
    /// `done` of `total` units are finished.
    Advance {
        /// The running stage.
        stage: Stage,
        /// The task (as in its `Begin`).
        task: &'static str,
        /// Units finished so far.
        done: u64,
        /// Units in total.
        total: u64,
    },
    /// The task is finished.
    End {
        /// The running stage.
        stage: Stage,
        /// The task (as in its `Begin`).
        task: &'static str,
    },
    /// A note for the user.
    Message {
        /// The running stage.
        stage: Stage,
        /// The note, one line.
        text: &'a str,
    },
}

impl ProgressEvent<'_> {
    /// The stage that sent the event.
    ///
    /// ```
    /// use dinov2_curate::pipeline::{ProgressEvent, Stage};
    /// let e = ProgressEvent::Message { stage: Stage::Kmeans, text: "hello" };
    /// assert_eq!(e.stage(), Stage::Kmeans);
    /// ```
    pub fn stage(&self) -> Stage {
        match *self {
            ProgressEvent::Begin { stage, .. }
            | ProgressEvent::Advance { stage, .. }
            | ProgressEvent::End { stage, .. }
            | ProgressEvent::Message { stage, .. } => stage,
        }
    }
}

/// Receives the [`ProgressEvent`]s of a stage. Implemented by [`NoProgress`] and by every
/// `Fn(&ProgressEvent)` closure.
///
/// ```
/// use std::cell::RefCell;
/// use dinov2_curate::pipeline::{Progress, ProgressEvent, Stage};
/// let seen = RefCell::new(Vec::new());
/// let progress = |e: &ProgressEvent| seen.borrow_mut().push(e.stage());
/// progress.event(&ProgressEvent::End { stage: Stage::Sample, task: "sample" });
/// assert_eq!(seen.into_inner(), vec![Stage::Sample]);
/// ```
pub trait Progress {
    /// Called by the stage for every event, on the thread that called the stage.
    fn event(&self, event: &ProgressEvent<'_>);
}

impl<F: Fn(&ProgressEvent<'_>)> Progress for F {
    fn event(&self, event: &ProgressEvent<'_>) {
        self(event)
    }
}

/// Ignores every event.
///
/// ```
/// use dinov2_curate::pipeline::{NoProgress, Progress, ProgressEvent, Stage};
/// NoProgress.event(&ProgressEvent::Message { stage: Stage::Embed, text: "ignored" });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: &ProgressEvent<'_>) {}
}

/// The events of one stage.
pub(crate) struct Reporter<'a> {
    progress: &'a dyn Progress,
    stage: Stage,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(progress: &'a dyn Progress, stage: Stage) -> Self {
        Self { progress, stage }
    }

    pub(crate) fn begin(&self, task: &'static str, total: usize) {
        self.progress.event(&ProgressEvent::Begin {
            stage: self.stage,
            task,
            total: total as u64,
        });
    }

    pub(crate) fn advance(&self, task: &'static str, done: usize, total: usize) {
        self.progress.event(&ProgressEvent::Advance {
            stage: self.stage,
            task,
            done: done as u64,
            total: total as u64,
        });
    }

    pub(crate) fn end(&self, task: &'static str) {
        self.progress.event(&ProgressEvent::End {
            stage: self.stage,
            task,
        });
    }

    pub(crate) fn message(&self, text: &str) {
        self.progress.event(&ProgressEvent::Message {
            stage: self.stage,
            text,
        });
    }
}

/// What a stage call did: computed its output, or found it finished and left it alone.
///
/// ```
/// use dinov2_curate::pipeline::Outcome;
/// let done: Outcome<u32> = Outcome::Skipped { summary: "out/summary.json".into() };
/// assert!(done.is_skipped());
/// assert_eq!(done.completed(), None);
/// assert_eq!(Outcome::Completed(7).completed(), Some(7));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome<S> {
    /// The stage ran (possibly resuming from checkpoints) and wrote this summary.
    Completed(S),
    /// The output directory already held a finished run (`summary` exists) and `force` was not set.
    Skipped {
        /// The existing `summary.json`.
        summary: PathBuf,
    },
}

impl<S> Outcome<S> {
    /// Whether the stage was skipped.
    ///
    /// ```
    /// assert!(!dinov2_curate::pipeline::Outcome::Completed(()).is_skipped());
    /// ```
    pub fn is_skipped(&self) -> bool {
        matches!(self, Outcome::Skipped { .. })
    }

    /// The summary of a stage that ran, `None` when it was skipped.
    ///
    /// ```
    /// assert_eq!(dinov2_curate::pipeline::Outcome::Completed(1).completed(), Some(1));
    /// ```
    pub fn completed(self) -> Option<S> {
        match self {
            Outcome::Completed(s) => Some(s),
            Outcome::Skipped { .. } => None,
        }
    }
}

/// Input embeddings of a stage.
///
/// ```
/// use dinov2_curate::pipeline::Input;
/// let i = Input::new("pool.npy");
/// assert!(i.normalize && i.rows.is_none());
/// let j: Input = serde_json::from_str(r#"{"embeddings": "pool.npy", "rows": "keep.npy"}"#).unwrap();
/// assert!(j.normalize, "defaults fill what the JSON leaves out");
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Input {
    /// Embeddings: a 2-D `.npy` (f32 is memory-mapped) or `.safetensors` file.
    pub embeddings: PathBuf,
    /// Only use these rows (1-D integer `.npy`, e.g. a previous `keep.npy`); output ids remain original row ids.
    pub rows: Option<PathBuf>,
    /// L2-normalise the rows (default); `false` uses them as they are.
    pub normalize: bool,
}

impl Default for Input {
    /// No path yet (set `embeddings`), all rows, normalised.
    fn default() -> Self {
        Self {
            embeddings: PathBuf::new(),
            rows: None,
            normalize: true,
        }
    }
}

impl Input {
    /// All rows of `embeddings`, L2-normalised.
    ///
    /// ```
    /// assert_eq!(dinov2_curate::pipeline::Input::new("x.npy").embeddings, std::path::Path::new("x.npy"));
    /// ```
    pub fn new(embeddings: impl Into<PathBuf>) -> Self {
        Self {
            embeddings: embeddings.into(),
            ..Self::default()
        }
    }

    /// Loads the embeddings (the row subset, normalised as asked); returns them and the subset's original ids.
    fn load(&self) -> Result<(Embeddings, Option<Vec<i64>>)> {
        require_path("embeddings", &self.embeddings)?;
        let e = Embeddings::open(&self.embeddings)?;
        let (e, rows) = match &self.rows {
            Some(p) => {
                let ids = read_ids(p)?;
                let sel = select_rows(&e, &ids, p)?;
                (sel, Some(ids))
            }
            None => (e, None),
        };
        Ok((
            if self.normalize {
                e.into_normalized()
            } else {
                e
            },
            rows,
        ))
    }
}

/// Search index choice.
///
/// ```
/// use dinov2_curate::pipeline::IndexKind;
/// assert_eq!(IndexKind::default(), IndexKind::Auto);
/// let k: IndexKind = serde_json::from_str("\"ivf\"").unwrap();
/// assert_eq!(k, IndexKind::Ivf);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum IndexKind {
    /// Exact up to 200,000 rows, IVF above.
    #[default]
    #[serde(alias = "auto")]
    Auto,
    /// Exact blocked GEMM search.
    #[serde(alias = "exact")]
    Exact,
    /// IVF-Flat.
    #[serde(alias = "ivf")]
    Ivf,
}

/// Search index parameters (of [`dedup`], [`knn`] and sample-based [`retrieve`]).
///
/// ```
/// use dinov2_curate::pipeline::{IndexKind, IndexParams};
/// let p = IndexParams::default();
/// assert_eq!((p.index, p.nlist, p.nprobe, p.recall_sample), (IndexKind::Auto, None, 16, 500));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IndexParams {
    /// Index to use.
    pub index: IndexKind,
    /// IVF lists (default: the square root of the number of rows).
    pub nlist: Option<usize>,
    /// IVF lists probed per query.
    pub nprobe: usize,
    /// Queries sampled to measure IVF recall against exact search (0 = skip).
    pub recall_sample: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        Self {
            index: IndexKind::Auto,
            nlist: None,
            nprobe: 16,
            recall_sample: 500,
        }
    }
}

/// The index a stage searched with, as recorded in its summary (`{"kind": "exact"}` or
/// `{"kind": "ivf", "nlist": .., "nprobe": ..}`).
///
/// ```
/// use dinov2_curate::pipeline::IndexInfo;
/// let i = IndexInfo::Ivf { nlist: 8, nprobe: 2 };
/// assert_eq!(serde_json::to_string(&i).unwrap(), r#"{"kind":"ivf","nlist":8,"nprobe":2}"#);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[non_exhaustive]
pub enum IndexInfo {
    /// Exact search.
    Exact,
    /// IVF-Flat.
    Ivf {
        /// Lists.
        nlist: usize,
        /// Lists probed per query.
        nprobe: usize,
    },
}

/// Rows above which [`IndexKind::Auto`] picks IVF.
const AUTO_IVF_ROWS: usize = 200_000;
/// Seed of the recall sample.
const RECALL_SEED: u64 = 12345;

/// A built search index over the base rows.
enum Index {
    Exact,
    Ivf(IvfFlat, usize),
}

impl Index {
    fn build(
        x: &Embeddings,
        p: &IndexParams,
        r: &Reporter,
        comm: &dyn Communicator,
    ) -> Result<Self> {
        let n = x.rows();
        let use_ivf = match p.index {
            IndexKind::Exact => false,
            IndexKind::Ivf => true,
            IndexKind::Auto => n > AUTO_IVF_ROWS,
        };
        if !use_ivf {
            return Ok(Index::Exact);
        }
        let nlist = p
            .nlist
            .unwrap_or_else(|| ((n as f64).sqrt().round() as usize).max(1));
        r.begin("ivf build", 1);
        let idx = IvfFlat::build_sharded(x.as_slice(), x.dim(), &IvfParams::new(nlist), comm)?;
        r.end("ivf build");
        Ok(Index::Ivf(idx, p.nprobe))
    }

    fn searcher<'a>(&'a self, base: &'a [f32]) -> Searcher<'a> {
        match self {
            Index::Exact => Searcher::Exact { base },
            Index::Ivf(index, nprobe) => Searcher::Ivf {
                index,
                nprobe: *nprobe,
            },
        }
    }

    /// The IVF search and the sampling of a recall measurement against exact search: `None` for exact search
    /// or a zero sample.
    fn recall_setup(
        &self,
        k: usize,
        sample: usize,
        self_search: bool,
    ) -> Option<(Box<SearchFn<'_>>, RecallSpec)> {
        let (index, nprobe) = match self {
            Index::Ivf(index, nprobe) if sample > 0 => (index, *nprobe),
            _ => return None,
        };
        let search = Box::new(move |q: &[f32], off: Option<usize>| index.search(q, k, nprobe, off));
        let spec = RecallSpec {
            k,
            n_sample: sample,
            self_search,
            seed: RECALL_SEED,
        };
        Some((search, spec))
    }

    /// `(recall@k, recall@1)` of IVF against exact on sampled queries; `None` for exact search.
    fn recall(
        &self,
        queries: &[f32],
        base: &[f32],
        d: usize,
        k: usize,
        sample: usize,
        self_search: bool,
    ) -> Result<Option<(f64, f64)>> {
        self.recall_setup(k, sample, self_search)
            .map(|(f, spec)| measure_recall(&f, queries, base, d, &spec))
            .transpose()
    }

    /// Sampled recall of the threshold edges of a self-search (`None` for exact search).
    fn edge_recall(
        &self,
        x: &[f32],
        d: usize,
        k: usize,
        sample: usize,
        threshold: f32,
    ) -> Result<Option<(f64, usize)>> {
        self.recall_setup(k, sample, true)
            .map(|(f, spec)| measure_edge_recall(&f, x, x, d, &spec, threshold))
            .transpose()
    }

    fn info(&self) -> IndexInfo {
        match self {
            Index::Exact => IndexInfo::Exact,
            Index::Ivf(i, p) => IndexInfo::Ivf {
                nlist: i.nlist(),
                nprobe: *p,
            },
        }
    }
}

fn require_path(name: &'static str, p: &Path) -> Result<()> {
    if p.as_os_str().is_empty() {
        return Err(invalid(name, "no path given"));
    }
    Ok(())
}

/// Runs a stage: skipped when `output/summary.json` exists (unless `force`), otherwise `body` computes and writes
/// the outputs and returns the summary, which is written last, so a stage counts as done only when all its files
/// are there.
fn run_stage<S: serde::Serialize>(
    output: &Path,
    force: bool,
    body: impl FnOnce(&Path) -> Result<S>,
) -> Result<Outcome<S>> {
    if let Some(summary) = finished(output, force)? {
        return Ok(Outcome::Skipped { summary });
    }
    let summary = body(output)?;
    write_summary(output, &summary)?;
    Ok(Outcome::Completed(summary))
}

/// Prepares the output directory; `Some(summary path)` if the stage is already finished (and not forced).
fn finished(output: &Path, force: bool) -> Result<Option<PathBuf>> {
    require_path("output", output)?;
    let summary = output.join("summary.json");
    if summary.exists() && !force {
        return Ok(Some(summary));
    }
    std::fs::create_dir_all(output).map_err(io_err(output))?;
    Ok(None)
}

/// [`run_stage`] for one rank of a sharded run: rank 0 decides whether the stage is already finished (its view
/// of `summary.json`) and every rank follows; rank 0 writes the summary once every rank's part is done.
fn run_stage_on<S: serde::Serialize>(
    output: &Path,
    force: bool,
    comm: &dyn Communicator,
    body: impl FnOnce(&Path) -> Result<S>,
) -> Result<Outcome<S>> {
    if comm.world_size() == 1 {
        return run_stage(output, force, body);
    }
    // 0: run, 1 + path: finished, 2 + message: rank 0 cannot prepare the output.
    let mut decision = Vec::new();
    if comm.rank() == 0 {
        decision = match finished(output, force) {
            Ok(None) => vec![0],
            Ok(Some(p)) => [&[1u8][..], p.to_string_lossy().as_bytes()].concat(),
            Err(e) => [&[2u8][..], e.to_string().as_bytes()].concat(),
        };
    }
    comm.broadcast_bytes(&mut decision, 0)?;
    match decision.split_first() {
        Some((1, _)) => {
            return Ok(Outcome::Skipped {
                summary: output.join("summary.json"),
            })
        }
        Some((2, msg)) => {
            return Err(invalid(
                "output",
                format!("rank 0: {}", String::from_utf8_lossy(msg)),
            ))
        }
        _ => {}
    }
    std::fs::create_dir_all(output).map_err(io_err(output))?;
    let summary = body(output)?;
    if comm.rank() == 0 {
        write_summary(output, &summary)?;
    }
    comm.barrier()?;
    Ok(Outcome::Completed(summary))
}

/// The rows `ids` of `e`; an id outside it is an error naming the id file `ids_path`.
fn select_rows(e: &Embeddings, ids: &[i64], ids_path: &Path) -> Result<Embeddings> {
    e.select(ids).map_err(|err| match err {
        Error::RowOutOfRange { row, rows, .. } => Error::RowOutOfRange {
            row,
            rows,
            path: Some(ids_path.to_path_buf()),
        },
        other => other,
    })
}

/// One rank's contiguous share of a stage's input rows.
struct LocalRows {
    /// This rank's rows (normalised as the whole input would be).
    x: Embeddings,
    /// Rows of the whole input.
    n: usize,
    /// The subset's original ids (all of them), when the input is a row subset.
    rows: Option<Vec<i64>>,
}

impl Input {
    /// This rank's share of the input: rows [`shard_range`]`(n, world, rank)` of the (subset of the) embeddings,
    /// mapped alone from the file ([`Embeddings::open_shard`]; a `--rows` subset opens the whole file) and
    /// normalised exactly as [`Input::load`] would normalise the whole input (the decision to normalise is taken
    /// over all ranks' rows). One rank: [`Input::load`].
    fn load_local(&self, comm: &dyn Communicator) -> Result<LocalRows> {
        if comm.world_size() == 1 {
            let (x, rows) = self.load()?;
            let n = x.rows();
            return Ok(LocalRows { x, n, rows });
        }
        require_path("embeddings", &self.embeddings)?;
        let (x, n, rows) = match &self.rows {
            Some(p) => {
                let e = Embeddings::open(&self.embeddings)?;
                let ids = read_ids(p)?;
                let r = shard_range(ids.len(), comm.world_size(), comm.rank());
                let sel = select_rows(&e, &ids[r.clone()], p)?;
                (sel, ids.len(), Some(ids))
            }
            None => {
                let (x, n) =
                    Embeddings::open_shard(&self.embeddings, comm.world_size(), comm.rank())?;
                (x, n, None)
            }
        };
        let x = if self.normalize {
            // `into_normalized` over the whole input: normalise unless every row already has unit norm.
            let dev = if x.rows() == 0 {
                0.0
            } else {
                x.max_norm_deviation() as f64
            };
            let max_dev = comm.all_gather_f64(&[dev])?.into_iter().fold(0.0, f64::max);
            if n == 0 || (max_dev as f32) <= 1e-3 {
                x
            } else {
                x.normalized()
            }
        } else {
            x
        };
        Ok(LocalRows { x, n, rows })
    }
}

/// Opens a second matrix used with the embeddings (queries, references): same dimension, normalised alike.
fn load_plain(path: &Path, normalize: bool, d: usize) -> Result<Embeddings> {
    let e = Embeddings::open(path)?;
    if e.dim() != d {
        return Err(Error::DimMismatch {
            path: path.into(),
            expected: d,
            got: e.dim(),
        });
    }
    Ok(if normalize { e.into_normalized() } else { e })
}

/// Maps row ids of a subset back to the original ids (negative ids, "no neighbour", stay).
fn map_ids(ids: &mut [i64], rows: &Option<Vec<i64>>) {
    if let Some(r) = rows {
        for i in ids.iter_mut().filter(|i| **i >= 0) {
            *i = r[*i as usize];
        }
    }
}

/// Writes `rows.npy` (the subset's original ids) when the stage ran on a subset.
fn write_rows(out: &Path, rows: &Option<Vec<i64>>) -> Result<()> {
    match rows {
        Some(r) => crate::npy::write_i64(&out.join("rows.npy"), r, &[r.len()]),
        None => Ok(()),
    }
}

fn write_summary<S: serde::Serialize>(out: &Path, s: &S) -> Result<()> {
    crate::embed::write_json(&out.join("summary.json"), s)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}

fn to_json<S: serde::Serialize>(v: &S, path: &Path) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests;
