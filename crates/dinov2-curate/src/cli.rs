//! The `dinov2 curate` command line: [`CurateCommand`] (clap subcommands) and [`run`].
//!
//! Every stage writes `.npy` arrays and a `summary.json` into its `--output` directory. A stage whose
//! `summary.json` exists is skipped (use `--force` to recompute); `dedup` also checkpoints its neighbour edges per
//! chunk and `hkmeans` per level, so an interrupted run continues where it stopped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::dedup::{self, Searcher};
use crate::embed::{self, write_json, EmbedConfig, Embedder};
use crate::error::{io_err, CurateError, Result};
use crate::hkmeans::{self, Level, LevelConfig, Pick};
use crate::ivf::{measure_edge_recall, measure_recall, IvfFlat, IvfParams, RecallSpec};
use crate::kmeans::{self, Init, KMeansConfig};
use crate::knn;
use crate::npy;
use crate::retrieve;
use crate::store::{read_ids, Embeddings};

/// `dinov2 curate <subcommand>`.
#[derive(Debug, Clone, Subcommand)]
pub enum CurateCommand {
    /// Embed an image pool with a backbone into sharded .npy files (resumable).
    Embed(EmbedArgs),
    /// Self-dedup (k-NN graph, cosine threshold, one row per component) or relative dedup against references.
    Dedup(DedupArgs),
    /// k-nearest neighbours (or a threshold query) by cosine, exact or IVF.
    Knn(KnnArgs),
    /// Retrieve pool images for query sets (sample-based or cluster-based).
    Retrieve(RetrieveArgs),
    /// k-means (k-means++ or random init, Lloyd with f64 accumulation).
    Kmeans(KmeansArgs),
    /// Hierarchical k-means with resampling.
    Hkmeans(HkmeansArgs),
    /// Balanced hierarchical sampling from an `hkmeans` output.
    Sample(SampleArgs),
}

/// Input embeddings.
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Embeddings: a 2-D .npy (f32 is memory-mapped) or .safetensors file.
    #[arg(long)]
    pub embeddings: PathBuf,
    /// Only use these rows (1-D integer .npy, e.g. a previous keep.npy); output ids remain original row ids.
    #[arg(long)]
    pub rows: Option<PathBuf>,
    /// Use the rows as they are instead of L2-normalising them.
    #[arg(long)]
    pub no_normalize: bool,
}

/// Output directory and overwrite switch.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Output directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Recompute even if the output (or a checkpoint of other parameters) exists.
    #[arg(long)]
    pub force: bool,
}

/// Search index choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum IndexKind {
    /// Exact up to 200,000 rows, IVF above.
    Auto,
    /// Exact blocked GEMM search.
    Exact,
    /// IVF-Flat.
    Ivf,
}

/// Search index parameters.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct IndexArgs {
    /// Index to use.
    #[arg(long, value_enum, default_value_t = IndexKind::Auto)]
    pub index: IndexKind,
    /// IVF lists (default: sqrt of the number of rows).
    #[arg(long)]
    pub nlist: Option<usize>,
    /// IVF lists probed per query.
    #[arg(long, default_value_t = 16)]
    pub nprobe: usize,
    /// Queries sampled to measure IVF recall against exact search (0 = skip).
    #[arg(long, default_value_t = 500)]
    pub recall_sample: usize,
}

/// `embed` arguments. The backbone is built by the embedder factory given to [`run_with_embedder`].
#[derive(Debug, Clone, Args)]
pub struct EmbedArgs {
    /// Directory of images (searched recursively).
    #[arg(long, conflicts_with = "list")]
    pub images: Option<PathBuf>,
    /// Text file with one image path per line.
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// Output directory (shards, paths.txt, manifest.json).
    #[arg(long)]
    pub output: PathBuf,
    /// Rows per shard.
    #[arg(long, default_value_t = 65536)]
    pub shard_size: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Keep raw embeddings instead of L2-normalising them.
    #[arg(long)]
    pub no_normalize: bool,
    /// Backbone name (e.g. dinov2_vits14), interpreted by the embedder factory.
    #[arg(long, default_value = "dinov2_vits14")]
    pub model: String,
    /// Local weights file, interpreted by the embedder factory.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Input resolution, interpreted by the embedder factory.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Also write all shards concatenated to this .npy file.
    #[arg(long)]
    pub merge_to: Option<PathBuf>,
}

/// `dedup` arguments.
#[derive(Debug, Clone, Args)]
pub struct DedupArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub input: InputArgs,
    /// Neighbours per row.
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    /// Cosine threshold of an edge (DINOv2: 0.6 self, 0.45 relative).
    #[arg(long, default_value_t = 0.6)]
    pub threshold: f32,
    /// Reference embeddings (repeatable): relative dedup, dropping every component that touches one.
    #[arg(long)]
    pub reference: Vec<PathBuf>,
    /// Query rows per checkpointed chunk.
    #[arg(long, default_value_t = 65536)]
    pub chunk: usize,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub search: IndexArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub out: OutputArgs,
}

/// `knn` arguments.
#[derive(Debug, Clone, Args)]
pub struct KnnArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub input: InputArgs,
    /// Query embeddings (default: every base row, excluding itself).
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Threshold query instead of k-NN: all base rows with cosine > threshold (exact; CSR output).
    #[arg(long)]
    pub threshold: Option<f32>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub search: IndexArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub out: OutputArgs,
}

/// Retrieval mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RetrieveMode {
    /// k nearest pool images per query.
    Sample,
    /// Pool clusters hit by more than `min-queries` queries.
    Cluster,
}

/// `retrieve` arguments.
#[derive(Debug, Clone, Args)]
pub struct RetrieveArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub input: InputArgs,
    /// Query embeddings (the curated dataset).
    #[arg(long)]
    pub queries: PathBuf,
    /// Retrieval mode.
    #[arg(long, value_enum, default_value_t = RetrieveMode::Sample)]
    pub mode: RetrieveMode,
    /// Sample mode: neighbours per query (DINOv2: 4, 32 for ImageNet-1k).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// Sample mode: output distinct ids instead of every hit.
    #[arg(long)]
    pub unique: bool,
    /// Cluster mode: a `kmeans` output directory over the same pool (centroids.npy, assignment.npy).
    #[arg(long)]
    pub clusters: Option<PathBuf>,
    /// Cluster mode without --clusters: run k-means with this many clusters.
    #[arg(long, default_value_t = 1000)]
    pub n_clusters: usize,
    /// Cluster mode: clusters need more than this many queries.
    #[arg(long, default_value_t = 3)]
    pub min_queries: usize,
    /// Cluster mode: images taken per selected cluster.
    #[arg(long, default_value_t = 10000)]
    pub per_cluster: usize,
    /// Cluster mode: at most this many images per dataset.
    #[arg(long, default_value_t = 1_000_000)]
    pub cap: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub search: IndexArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub out: OutputArgs,
}

/// k-means initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    /// Greedy k-means++.
    KmeansPp,
    /// Random rows.
    Random,
}

/// `kmeans` arguments.
#[derive(Debug, Clone, Args)]
pub struct KmeansArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub input: InputArgs,
    /// Clusters.
    #[arg(long)]
    pub k: usize,
    /// Maximum Lloyd iterations.
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Initialisation.
    #[arg(long, value_enum, default_value_t = InitArg::KmeansPp)]
    pub init: InitArg,
    /// Train on at most k * this many random rows (faiss: 256).
    #[arg(long)]
    pub max_points_per_centroid: Option<usize>,
    /// Early stop on relative objective decrease below this.
    #[arg(long, default_value_t = 1e-6)]
    pub tol: f64,
    /// Save a resumable checkpoint every this many iterations (0 = never).
    #[arg(long, default_value_t = 5)]
    pub checkpoint_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub out: OutputArgs,
}

/// `hkmeans` arguments (comma-separated lists, one entry per level, a single value applies to all levels).
#[derive(Debug, Clone, Args)]
pub struct HkmeansArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub input: InputArgs,
    /// Clusters per level, bottom-up, e.g. 1000,300.
    #[arg(long, value_delimiter = ',', required = true)]
    pub k: Vec<usize>,
    /// Lloyd iterations per k-means run.
    #[arg(long, value_delimiter = ',', default_value = "50")]
    pub iters: Vec<usize>,
    /// Resampling steps per level.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub resampling_steps: Vec<usize>,
    /// Points taken per cluster in each resampling step.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub sample_size: Vec<usize>,
    /// Resampling pick: c (closest to centroid) or r (random).
    #[arg(long, default_value = "c")]
    pub strategy: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub out: OutputArgs,
}

/// `sample` arguments.
#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    /// An `hkmeans` output directory.
    #[arg(long)]
    pub clustering: PathBuf,
    /// Number of rows to select.
    #[arg(long)]
    pub target: usize,
    /// Most copies of one row.
    #[arg(long, default_value_t = 1)]
    pub multiplier: usize,
    /// Leaf pick: r (random) or c (closest to centroid).
    #[arg(long, default_value = "r")]
    pub strategy: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub out: OutputArgs,
}

/// Runs a subcommand. `embed` needs a model: use [`run_with_embedder`].
pub fn run(cmd: CurateCommand) -> Result<()> {
    run_with_embedder(cmd, &|_: &EmbedArgs| {
        Err(CurateError::Embedder(
            "no embedding backbone is wired into this build (see run_with_embedder)".into(),
        ))
    })
}

/// Runs a subcommand, building the embedder of `embed` with `factory`.
pub fn run_with_embedder(
    cmd: CurateCommand,
    factory: &dyn Fn(&EmbedArgs) -> Result<Box<dyn Embedder>>,
) -> Result<()> {
    match cmd {
        CurateCommand::Embed(a) => run_embed(&a, factory),
        CurateCommand::Dedup(a) => run_dedup(&a),
        CurateCommand::Knn(a) => run_knn(&a),
        CurateCommand::Retrieve(a) => run_retrieve(&a),
        CurateCommand::Kmeans(a) => run_kmeans(&a),
        CurateCommand::Hkmeans(a) => run_hkmeans(&a),
        CurateCommand::Sample(a) => run_sample(&a),
    }
}

fn bar(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(msg.to_string());
    pb
}

/// Prepares the output directory; returns false if the stage is already finished (and not forced).
fn begin(out: &OutputArgs) -> Result<bool> {
    let summary = out.output.join("summary.json");
    if summary.exists() && !out.force {
        eprintln!(
            "{} exists: stage already done (use --force to recompute)",
            summary.display()
        );
        return Ok(false);
    }
    std::fs::create_dir_all(&out.output).map_err(io_err(&out.output))?;
    Ok(true)
}

/// Loads embeddings (optionally a row subset, optionally normalised); returns the matrix and the subset ids.
fn load(input: &InputArgs) -> Result<(Embeddings, Option<Vec<i64>>)> {
    let e = Embeddings::open(&input.embeddings)?;
    let (e, rows) = match &input.rows {
        Some(p) => {
            let ids = read_ids(p)?;
            (e.select(&ids)?, Some(ids))
        }
        None => (e, None),
    };
    let e = if input.no_normalize {
        e
    } else {
        e.into_normalized()
    };
    Ok((e, rows))
}

fn load_plain(path: &Path, normalize: bool, d: usize) -> Result<Embeddings> {
    let e = Embeddings::open(path)?;
    if e.dim() != d {
        return Err(CurateError::Shape(format!(
            "{} has dim {}, expected {d}",
            path.display(),
            e.dim()
        )));
    }
    Ok(if normalize { e.into_normalized() } else { e })
}

fn map_ids(ids: &mut [i64], rows: &Option<Vec<i64>>) {
    if let Some(r) = rows {
        for i in ids.iter_mut().filter(|i| **i >= 0) {
            *i = r[*i as usize];
        }
    }
}

enum Index {
    Exact,
    Ivf(IvfFlat, usize),
}

impl Index {
    fn build(x: &Embeddings, a: &IndexArgs) -> Result<Self> {
        let n = x.rows();
        let use_ivf = match a.index {
            IndexKind::Exact => false,
            IndexKind::Ivf => true,
            IndexKind::Auto => n > 200_000,
        };
        if !use_ivf {
            return Ok(Index::Exact);
        }
        let nlist = a
            .nlist
            .unwrap_or_else(|| ((n as f64).sqrt().round() as usize).max(1));
        let pb = bar(1, "ivf build");
        let idx = IvfFlat::build(x.as_slice(), x.dim(), &IvfParams::new(nlist))?;
        pb.finish_and_clear();
        Ok(Index::Ivf(idx, a.nprobe))
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
        match self {
            Index::Exact => Ok(None),
            Index::Ivf(index, nprobe) if sample > 0 => {
                let f = |q: &[f32], off: Option<usize>| index.search(q, k, *nprobe, off);
                let spec = RecallSpec {
                    k,
                    n_sample: sample,
                    self_search,
                    seed: 12345,
                };
                Ok(Some(measure_recall(&f, queries, base, d, &spec)?))
            }
            Index::Ivf(..) => Ok(None),
        }
    }

    /// Sampled recall of the threshold edges (`None` for exact search).
    fn edge_recall(
        &self,
        x: &[f32],
        d: usize,
        k: usize,
        sample: usize,
        threshold: f32,
    ) -> Result<Option<(f64, usize)>> {
        match self {
            Index::Ivf(index, nprobe) if sample > 0 => {
                let f = |q: &[f32], off: Option<usize>| index.search(q, k, *nprobe, off);
                let spec = RecallSpec {
                    k,
                    n_sample: sample,
                    self_search: true,
                    seed: 12345,
                };
                Ok(Some(measure_edge_recall(&f, x, x, d, &spec, threshold)?))
            }
            _ => Ok(None),
        }
    }

    fn describe(&self) -> serde_json::Value {
        match self {
            Index::Exact => json!({"kind": "exact"}),
            Index::Ivf(i, p) => json!({"kind": "ivf", "nlist": i.nlist(), "nprobe": p}),
        }
    }
}

fn run_embed(
    a: &EmbedArgs,
    factory: &dyn Fn(&EmbedArgs) -> Result<Box<dyn Embedder>>,
) -> Result<()> {
    let paths = match (&a.images, &a.list) {
        (Some(dir), _) => embed::list_images(dir)?,
        (None, Some(list)) => crate::store::read_paths(list)?,
        (None, None) => {
            return Err(CurateError::InvalidArgument(
                "give --images DIR or --list FILE".into(),
            ))
        }
    };
    let mut model = factory(a)?;
    let cfg = EmbedConfig {
        shard_size: a.shard_size,
        batch_size: a.batch_size,
        normalize: !a.no_normalize,
    };
    let pb = bar(paths.len() as u64, "embed");
    let t = Instant::now();
    let rep = embed::embed_pool(model.as_mut(), &paths, &a.output, &cfg, &mut |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    if let Some(m) = &a.merge_to {
        embed::merge_shards(&a.output, m)?;
    }
    write_json(
        &a.output.join("summary.json"),
        &json!({"report": rep, "seconds": t.elapsed().as_secs_f64(), "model": a.model}),
    )?;
    eprintln!(
        "embedded {} images: {} shards computed, {} skipped",
        rep.n_rows, rep.computed, rep.skipped
    );
    Ok(())
}

fn run_dedup(a: &DedupArgs) -> Result<()> {
    if !begin(&a.out)? {
        return Ok(());
    }
    let t = Instant::now();
    let out = &a.out.output;
    let (x, rows) = load(&a.input)?;
    let (n, d) = (x.rows(), x.dim());
    let mut reference = Vec::new();
    for p in &a.reference {
        reference.extend_from_slice(load_plain(p, !a.input.no_normalize, d)?.as_slice());
    }
    let nr = reference.len() / d;
    // Checkpoints are only valid for the same inputs and parameters.
    let params = json!({
        "embeddings": a.input.embeddings, "rows": a.input.rows, "no_normalize": a.input.no_normalize, "n": n, "d": d,
        "k": a.k, "threshold": a.threshold, "reference": a.reference, "chunk": a.chunk, "index": a.search,
    });
    let edge_dir = out.join("edges");
    let ppath = out.join("params.json");
    if ppath.exists() {
        let old: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ppath).map_err(io_err(&ppath))?)
                .map_err(|source| CurateError::Json {
                    path: ppath.clone(),
                    source,
                })?;
        if old != params {
            if !a.out.force {
                return Err(CurateError::Resume {
                    path: out.clone(),
                    msg: "params.json differs; use --force".into(),
                });
            }
            let _ = std::fs::remove_dir_all(&edge_dir);
        }
    }
    write_json(&ppath, &params)?;
    std::fs::create_dir_all(&edge_dir).map_err(io_err(&edge_dir))?;
    let index = Index::build(&x, &a.search)?;
    let searcher = index.searcher(x.as_slice());
    let refs = Searcher::Exact { base: &reference };
    let chunk = a.chunk.max(1);
    let pb = bar(n as u64, "dedup");
    let mut edges: Vec<(i64, i64)> = Vec::new();
    let mut s = 0;
    while s < n {
        let e = (s + chunk).min(n);
        let path = edge_dir.join(format!("chunk_{s:010}.npy"));
        let chunk_edges = if path.exists() {
            read_edges(&path)?
        } else {
            let q = &x.as_slice()[s * d..e * d];
            let mut ce =
                dedup::threshold_edges(&searcher.search(q, d, a.k, Some(s))?, s, a.threshold);
            if nr > 0 {
                let r = refs.search(q, d, a.k, None)?;
                ce.extend(
                    dedup::threshold_edges(&r, s, a.threshold)
                        .into_iter()
                        .map(|(p, q)| (p, q + n as i64)),
                );
            }
            write_edges(&path, &ce)?;
            ce
        };
        edges.extend(chunk_edges);
        pb.set_position(e as u64);
        s = e;
    }
    if nr > 0 {
        let path = edge_dir.join("reference.npy");
        let re = if path.exists() {
            read_edges(&path)?
        } else {
            let re =
                dedup::threshold_edges(&searcher.search(&reference, d, a.k, None)?, n, a.threshold);
            write_edges(&path, &re)?;
            re
        };
        edges.extend(re);
    }
    pb.finish_and_clear();
    let search_s = t.elapsed().as_secs_f64();
    let recall = index.recall(
        x.as_slice(),
        x.as_slice(),
        d,
        a.k,
        a.search.recall_sample,
        true,
    )?;
    let edge_recall =
        index.edge_recall(x.as_slice(), d, a.k, a.search.recall_sample, a.threshold)?;
    let recall_s = t.elapsed().as_secs_f64() - search_s;
    let (mut keep, components, result) = if nr > 0 {
        let r = dedup::relative_dedup_from_edges(n, nr, &edges)?;
        let v = serde_json::to_value(&r).map_err(|source| CurateError::Json {
            path: out.clone(),
            source,
        })?;
        (r.keep, r.components, v)
    } else {
        let r = dedup::self_dedup_from_edges(n, &edges)?;
        let v = serde_json::to_value(&r).map_err(|source| CurateError::Json {
            path: out.clone(),
            source,
        })?;
        (r.keep, r.components, v)
    };
    map_ids(&mut keep, &rows);
    keep.sort_unstable();
    npy::write_i64(&out.join("keep.npy"), &keep, &[keep.len()])?;
    npy::write_i64(
        &out.join("components.npy"),
        &components,
        &[components.len()],
    )?;
    if let Some(r) = &rows {
        npy::write_i64(&out.join("rows.npy"), r, &[r.len()])?;
    }
    let summary = json!({
        "mode": if nr > 0 { "relative" } else { "self" }, "result": result, "params": params,
        "index": index.describe(), "recall_at_k": recall.map(|r| r.0), "recall_at_1": recall.map(|r| r.1),
        "edge_recall": edge_recall.map(|r| r.0), "edge_recall_sampled_edges": edge_recall.map(|r| r.1),
        "recall_seconds": recall_s, "seconds": t.elapsed().as_secs_f64() - recall_s,
    });
    write_json(&out.join("summary.json"), &summary)?;
    eprintln!("dedup: kept {} of {n} rows", keep.len());
    Ok(())
}

fn write_edges(path: &Path, e: &[(i64, i64)]) -> Result<()> {
    let flat: Vec<i64> = e.iter().flat_map(|&(a, b)| [a, b]).collect();
    npy::write_i64(path, &flat, &[e.len(), 2])
}

fn read_edges(path: &Path) -> Result<Vec<(i64, i64)>> {
    let (v, shape) = npy::read_i64(path)?;
    if shape.len() != 2 || shape[1] != 2 {
        return Err(CurateError::Npy {
            path: path.into(),
            msg: format!("edges shape {shape:?}"),
        });
    }
    Ok(v.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

fn run_knn(a: &KnnArgs) -> Result<()> {
    if !begin(&a.out)? {
        return Ok(());
    }
    let t = Instant::now();
    let out = &a.out.output;
    let (x, rows) = load(&a.input)?;
    let d = x.dim();
    let q_owned = match &a.queries {
        Some(p) => Some(load_plain(p, !a.input.no_normalize, d)?),
        None => None,
    };
    let (q, self_off) = match &q_owned {
        Some(q) => (q.as_slice(), None),
        None => (x.as_slice(), Some(0)),
    };
    let nq = q.len() / d;
    if let Some(th) = a.threshold {
        let r = knn::range_search(q, x.as_slice(), d, th, self_off)?;
        let mut ids = r.ids;
        map_ids(&mut ids, &rows);
        let offsets: Vec<i64> = r.offsets.iter().map(|&o| o as i64).collect();
        npy::write_i64(&out.join("offsets.npy"), &offsets, &[offsets.len()])?;
        npy::write_i64(&out.join("ids.npy"), &ids, &[ids.len()])?;
        npy::write_f32(&out.join("sims.npy"), &r.sims, &[r.sims.len()])?;
        let s = json!({"queries": nq, "threshold": th, "pairs": ids.len(), "seconds": t.elapsed().as_secs_f64()});
        return write_json(&out.join("summary.json"), &s);
    }
    let index = Index::build(&x, &a.search)?;
    let searcher = index.searcher(x.as_slice());
    let pb = bar(nq as u64, "knn");
    let mut ids = Vec::with_capacity(nq * a.k);
    let mut sims = Vec::with_capacity(nq * a.k);
    const CHUNK: usize = 65536;
    let mut s = 0;
    while s < nq {
        let e = (s + CHUNK).min(nq);
        let r = searcher.search(&q[s * d..e * d], d, a.k, self_off.map(|o| o + s))?;
        ids.extend(r.ids);
        sims.extend(r.sims);
        pb.set_position(e as u64);
        s = e;
    }
    pb.finish_and_clear();
    let search_s = t.elapsed().as_secs_f64();
    let recall = index.recall(
        q,
        x.as_slice(),
        d,
        a.k,
        a.search.recall_sample,
        self_off.is_some(),
    )?;
    map_ids(&mut ids, &rows);
    npy::write_i64(&out.join("ids.npy"), &ids, &[nq, a.k])?;
    npy::write_f32(&out.join("sims.npy"), &sims, &[nq, a.k])?;
    let s = json!({"queries": nq, "base": x.rows(), "k": a.k, "index": index.describe(),
        "recall_at_k": recall.map(|r| r.0), "recall_at_1": recall.map(|r| r.1),
        "search_seconds": search_s, "queries_per_second": nq as f64 / search_s.max(1e-9)});
    write_json(&out.join("summary.json"), &s)
}

fn run_retrieve(a: &RetrieveArgs) -> Result<()> {
    if !begin(&a.out)? {
        return Ok(());
    }
    let t = Instant::now();
    let out = &a.out.output;
    let (x, rows) = load(&a.input)?;
    let d = x.dim();
    let q = load_plain(&a.queries, !a.input.no_normalize, d)?;
    let mut r = match a.mode {
        RetrieveMode::Sample => {
            let index = Index::build(&x, &a.search)?;
            retrieve::sample_based(
                q.as_slice(),
                &index.searcher(x.as_slice()),
                d,
                a.k,
                a.unique,
            )?
        }
        RetrieveMode::Cluster => {
            let (centroids, labels) = match &a.clusters {
                Some(dir) => {
                    let (c, shape) = npy::read_f32(&dir.join("centroids.npy"))?;
                    if shape.len() != 2 || shape[1] != d {
                        return Err(CurateError::Shape(format!(
                            "centroids shape {shape:?}, dim {d}"
                        )));
                    }
                    let assignment = read_ids(&dir.join("assignment.npy"))?;
                    if assignment.len() != x.rows() {
                        return Err(CurateError::Shape(format!(
                            "{} assignments for {} rows",
                            assignment.len(),
                            x.rows()
                        )));
                    }
                    let labels = assignment
                        .iter()
                        .map(|&l| u32::try_from(l).unwrap_or(u32::MAX))
                        .collect::<Vec<u32>>();
                    (c, labels)
                }
                None => {
                    let cfg = KMeansConfig {
                        seed: a.seed,
                        max_points_per_centroid: Some(256),
                        ..KMeansConfig::new(a.n_clusters)
                    };
                    let km = kmeans::train(x.as_slice(), d, &cfg)?;
                    let labels = km.assign(x.as_slice())?.0;
                    (km.centroids, labels)
                }
            };
            let k = centroids.len() / d;
            let (ql, _) = kmeans::assign(q.as_slice(), d, &centroids)?;
            retrieve::cluster_based(
                &labels,
                k,
                &ql,
                a.min_queries,
                a.per_cluster,
                Some(a.cap),
                a.seed,
            )?
        }
    };
    map_ids(&mut r.ids, &rows);
    npy::write_i64(&out.join("retrieved.npy"), &r.ids, &[r.ids.len()])?;
    let s = json!({"result": r, "seconds": t.elapsed().as_secs_f64()});
    write_json(&out.join("summary.json"), &s)
}

fn run_kmeans(a: &KmeansArgs) -> Result<()> {
    if !begin(&a.out)? {
        return Ok(());
    }
    let t = Instant::now();
    let out = &a.out.output;
    let (x, rows) = load(&a.input)?;
    let cfg = KMeansConfig {
        k: a.k,
        n_iter: a.iters,
        init: match a.init {
            InitArg::KmeansPp => Init::KMeansPlusPlus,
            InitArg::Random => Init::Random,
        },
        n_local_trials: None,
        seed: a.seed,
        max_points_per_centroid: a.max_points_per_centroid,
        tol: a.tol,
    };
    // Checkpoints: `checkpoint/state.json` names the centroid file of the last saved iteration.
    let ck_dir = out.join("checkpoint");
    let state_path = ck_dir.join("state.json");
    let params = json!({
        "embeddings": a.input.embeddings, "rows": a.input.rows, "no_normalize": a.input.no_normalize,
        "n": x.rows(), "d": x.dim(), "k": a.k, "init": format!("{:?}", a.init), "seed": a.seed,
        "max_points_per_centroid": a.max_points_per_centroid, "tol": a.tol,
    });
    let mut resume = None;
    if state_path.exists() && !a.out.force {
        let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| CurateError::Json {
                path: state_path.clone(),
                source,
            })?;
        if v["params"] == params {
            let mut ck: kmeans::KMeansCheckpoint = serde_json::from_value(v["checkpoint"].clone())
                .map_err(|source| CurateError::Json {
                    path: state_path.clone(),
                    source,
                })?;
            let (c, shape) =
                npy::read_f32(&ck_dir.join(format!("centroids_{:06}.npy", ck.iterations)))?;
            if shape != [a.k, x.dim()] {
                return Err(CurateError::Resume {
                    path: ck_dir.clone(),
                    msg: format!("centroids shape {shape:?}"),
                });
            }
            ck.centroids = c;
            eprintln!("kmeans: resuming after iteration {}", ck.iterations);
            resume = Some(ck);
        } else {
            eprintln!("kmeans: checkpoint of other parameters ignored");
        }
    }
    let resumed_from = resume.as_ref().map(|c| c.iterations);
    let pb = bar(a.iters as u64, "kmeans");
    let every = a.checkpoint_every;
    let mut save = |ck: &kmeans::KMeansCheckpoint| -> Result<()> {
        if every == 0 || ck.iterations % every != 0 {
            return Ok(());
        }
        std::fs::create_dir_all(&ck_dir).map_err(io_err(&ck_dir))?;
        let name = format!("centroids_{:06}.npy", ck.iterations);
        npy::write_f32(
            &ck_dir.join(&name),
            &ck.centroids,
            &[a.k, ck.centroids.len() / a.k.max(1)],
        )?;
        write_json(&state_path, &json!({"params": params, "checkpoint": ck}))?;
        // Older centroid files are no longer referenced.
        if let Ok(rd) = std::fs::read_dir(&ck_dir) {
            for e in rd.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f.starts_with("centroids_") && f != name {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    };
    let km = kmeans::train_resumable(
        x.as_slice(),
        x.dim(),
        &cfg,
        resume,
        &mut |it, _| pb.set_position(it as u64 + 1),
        &mut save,
    )?;
    pb.finish_and_clear();
    let train_s = t.elapsed().as_secs_f64();
    let (labels, dist) = km.assign(x.as_slice())?;
    let objective: f64 = dist.iter().map(|&v| v as f64).sum();
    npy::write_f32(&out.join("centroids.npy"), &km.centroids, &[km.k, km.d])?;
    let lab: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    npy::write_i64(&out.join("assignment.npy"), &lab, &[lab.len()])?;
    npy::write_f32(&out.join("distances.npy"), &dist, &[dist.len()])?;
    if let Some(r) = &rows {
        npy::write_i64(&out.join("rows.npy"), r, &[r.len()])?;
    }
    let s = json!({"k": km.k, "d": km.d, "n": x.rows(), "iterations": km.iterations,
        "objective_history": km.objective_history, "objective": objective, "config": cfg,
        "resumed_from_iteration": resumed_from,
        "train_seconds": train_s, "seconds": t.elapsed().as_secs_f64()});
    write_json(&out.join("summary.json"), &s)
}

fn per_level<T: Copy>(v: &[T], levels: usize, name: &str) -> Result<Vec<T>> {
    match v.len() {
        1 => Ok(vec![v[0]; levels]),
        l if l == levels => Ok(v.to_vec()),
        l => Err(CurateError::InvalidArgument(format!(
            "--{name} has {l} values for {levels} levels"
        ))),
    }
}

fn save_level(dir: &Path, l: &Level, d: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    npy::write_f32(&dir.join("centroids.npy"), &l.centroids, &[l.k, d])?;
    let a: Vec<i64> = l.assignment.iter().map(|&x| x as i64).collect();
    npy::write_i64(&dir.join("assignment.npy"), &a, &[a.len()])?;
    let o: Vec<i64> = l.offsets.iter().map(|&x| x as i64).collect();
    npy::write_i64(&dir.join("sorted_offsets.npy"), &o, &[o.len()])?;
    let m: Vec<i64> = l.members.iter().map(|&x| x as i64).collect();
    npy::write_i64(&dir.join("sorted_members.npy"), &m, &[m.len()])?;
    write_json(
        &dir.join("summary.json"),
        &json!({"k": l.k, "n_input": l.assignment.len()}),
    )
}

fn load_level(dir: &Path) -> Result<Level> {
    let (centroids, shape) = npy::read_f32(&dir.join("centroids.npy"))?;
    let to_usize = |v: Vec<i64>| {
        v.into_iter()
            .map(|x| x.max(0) as usize)
            .collect::<Vec<usize>>()
    };
    let assignment: Vec<u32> = read_ids(&dir.join("assignment.npy"))?
        .into_iter()
        .map(|x| x.max(0) as u32)
        .collect();
    let offsets = to_usize(read_ids(&dir.join("sorted_offsets.npy"))?);
    let members = to_usize(read_ids(&dir.join("sorted_members.npy"))?);
    let k = shape.first().copied().unwrap_or(0);
    let n_input = assignment.len();
    let ok = offsets.len() == k + 1
        && members.len() == n_input
        && members.iter().all(|&m| m < n_input)
        && assignment.iter().all(|&a| (a as usize) < k)
        && offsets.last() == Some(&members.len())
        && offsets.windows(2).all(|w| w[0] <= w[1]);
    if !ok {
        return Err(CurateError::Resume {
            path: dir.into(),
            msg: "inconsistent level files".into(),
        });
    }
    Ok(Level {
        k,
        centroids,
        assignment,
        offsets,
        members,
    })
}

fn run_hkmeans(a: &HkmeansArgs) -> Result<()> {
    if !begin(&a.out)? {
        return Ok(());
    }
    let t = Instant::now();
    let out = &a.out.output;
    let (x, rows) = load(&a.input)?;
    let d = x.dim();
    let nl = a.k.len();
    let iters = per_level(&a.iters, nl, "iters")?;
    let steps = per_level(&a.resampling_steps, nl, "resampling-steps")?;
    let sizes = per_level(&a.sample_size, nl, "sample-size")?;
    let strategy: Pick = a.strategy.parse()?;
    let pb = bar(nl as u64, "hkmeans");
    let mut levels: Vec<Level> = Vec::new();
    for lv in 0..nl {
        let dir = out.join(format!("level{}", lv + 1));
        let level = if dir.join("summary.json").exists() && !a.out.force {
            load_level(&dir)?
        } else {
            let cfg = LevelConfig {
                k: a.k[lv],
                n_iter: iters[lv],
                n_resampling_steps: steps[lv],
                sample_size: sizes[lv],
                strategy,
            };
            let input: &[f32] = match levels.last() {
                Some(l) => &l.centroids,
                None => x.as_slice(),
            };
            let l = hkmeans::run_level(input, d, &cfg, a.seed.wrapping_add(lv as u64 * 7919))?;
            save_level(&dir, &l, d)?;
            l
        };
        levels.push(level);
        pb.set_position(lv as u64 + 1);
    }
    pb.finish_and_clear();
    if let Some(r) = &rows {
        npy::write_i64(&out.join("rows.npy"), r, &[r.len()])?;
    }
    let s = json!({"levels": nl, "k": levels.iter().map(|l| l.k).collect::<Vec<_>>(), "n": x.rows(), "d": d,
        "seconds": t.elapsed().as_secs_f64()});
    write_json(&out.join("summary.json"), &s)
}

fn run_sample(a: &SampleArgs) -> Result<()> {
    if !begin(&a.out)? {
        return Ok(());
    }
    let mut levels = Vec::new();
    while a
        .clustering
        .join(format!("level{}", levels.len() + 1))
        .join("summary.json")
        .exists()
    {
        levels.push(load_level(
            &a.clustering.join(format!("level{}", levels.len() + 1)),
        )?);
    }
    for t in 1..levels.len() {
        if levels[t].assignment.len() != levels[t - 1].k {
            return Err(CurateError::Resume {
                path: a.clustering.clone(),
                msg: format!(
                    "level{} does not cluster the centroids of level{}",
                    t + 1,
                    t
                ),
            });
        }
    }
    if levels.is_empty() {
        return Err(CurateError::InvalidArgument(format!(
            "no level1/ in {}",
            a.clustering.display()
        )));
    }
    let pick: Pick = a.strategy.parse()?;
    let mut sel = hkmeans::balanced_sample(&levels, a.target, a.multiplier, pick, a.seed)?;
    let rows_path = a.clustering.join("rows.npy");
    if rows_path.exists() {
        let r = read_ids(&rows_path)?;
        if r.len() != levels[0].assignment.len() {
            return Err(CurateError::Resume {
                path: a.clustering.clone(),
                msg: format!(
                    "rows.npy has {} ids for {} rows",
                    r.len(),
                    levels[0].assignment.len()
                ),
            });
        }
        map_ids(&mut sel, &Some(r));
        sel.sort_unstable();
    }
    let out = &a.out.output;
    npy::write_i64(&out.join("selection.npy"), &sel, &[sel.len()])?;
    let s = json!({"target": a.target, "selected": sel.len(), "multiplier": a.multiplier, "strategy": a.strategy,
        "levels": levels.len()});
    write_json(&out.join("summary.json"), &s)
}
