//! `dinov2 curate <stage>`: clap arguments → [`dinov2_curate::pipeline`] parameters → the stage → messages.
//!
//! Every stage writes `.npy` arrays and a `summary.json` into its `--output` directory. A stage whose
//! `summary.json` exists is skipped (use `--force` to recompute); `dedup` also checkpoints its neighbour edges per
//! chunk, `kmeans` its centroids and `hkmeans` each level, so an interrupted run continues where it stopped.

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::{Args, Subcommand, ValueEnum};
use dinov2::embed::ModelEmbedder;
use dinov2_curate::hkmeans::Pick;
use dinov2_curate::kmeans::Init;
use dinov2_curate::pipeline::{
    self, IndexKind, IndexParams, Input, Outcome, Progress, ProgressEvent,
};
use dinov2_data::preprocess::Preprocess;
use indicatif::{ProgressBar, ProgressStyle};

use super::model::{load, ModelArgs};

/// `dinov2 curate <subcommand>`.
#[derive(Debug, Clone, Subcommand)]
pub(super) enum CurateCommand {
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
pub(super) struct InputArgs {
    /// Embeddings: a 2-D .npy (f32 is memory-mapped) or .safetensors file.
    #[arg(long)]
    embeddings: PathBuf,
    /// Only use these rows (1-D integer .npy, e.g. a previous keep.npy); output ids remain original row ids.
    #[arg(long)]
    rows: Option<PathBuf>,
    /// Use the rows as they are instead of L2-normalising them.
    #[arg(long)]
    no_normalize: bool,
}

impl From<InputArgs> for Input {
    fn from(a: InputArgs) -> Self {
        Input {
            embeddings: a.embeddings,
            rows: a.rows,
            normalize: !a.no_normalize,
        }
    }
}

/// Output directory and overwrite switch.
#[derive(Debug, Clone, Args)]
pub(super) struct OutputArgs {
    /// Output directory.
    #[arg(long)]
    output: PathBuf,
    /// Recompute even if the output (or a checkpoint of other parameters) exists.
    #[arg(long)]
    force: bool,
}

/// Search index choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IndexArg {
    /// Exact up to 200,000 rows, IVF above.
    Auto,
    /// Exact blocked GEMM search.
    Exact,
    /// IVF-Flat.
    Ivf,
}

/// Search index parameters.
#[derive(Debug, Clone, Args)]
pub(super) struct IndexArgs {
    /// Index to use.
    #[arg(long, value_enum, default_value_t = IndexArg::Auto)]
    index: IndexArg,
    /// IVF lists (default: sqrt of the number of rows).
    #[arg(long)]
    nlist: Option<usize>,
    /// IVF lists probed per query.
    #[arg(long, default_value_t = 16)]
    nprobe: usize,
    /// Queries sampled to measure IVF recall against exact search (0 = skip).
    #[arg(long, default_value_t = 500)]
    recall_sample: usize,
}

impl From<IndexArgs> for IndexParams {
    fn from(a: IndexArgs) -> Self {
        IndexParams {
            index: match a.index {
                IndexArg::Auto => IndexKind::Auto,
                IndexArg::Exact => IndexKind::Exact,
                IndexArg::Ivf => IndexKind::Ivf,
            },
            nlist: a.nlist,
            nprobe: a.nprobe,
            recall_sample: a.recall_sample,
        }
    }
}

/// `embed` arguments.
#[derive(Debug, Clone, Args)]
pub(super) struct EmbedArgs {
    /// Directory of images (searched recursively).
    #[arg(long, conflicts_with = "list")]
    images: Option<PathBuf>,
    /// Text file with one image path per line.
    #[arg(long)]
    list: Option<PathBuf>,
    /// Output directory (shards, paths.txt, manifest.json).
    #[arg(long)]
    output: PathBuf,
    /// Rows per shard.
    #[arg(long, default_value_t = 65536)]
    shard_size: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Keep raw embeddings instead of L2-normalising them.
    #[arg(long)]
    no_normalize: bool,
    /// Backbone: an official name (e.g. dinov2_vits14) or Hub id, used when --weights is not given.
    #[arg(long, default_value = "dinov2_vits14")]
    model: String,
    /// Local weights file or directory (any format `dinov2 info` reads).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input resolution (center crop after resizing the shorter side to 256/224 of it).
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Also write all shards concatenated to this .npy file.
    #[arg(long)]
    merge_to: Option<PathBuf>,
}

/// `dedup` arguments.
#[derive(Debug, Clone, Args)]
pub(super) struct DedupArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Neighbours per row.
    #[arg(long, default_value_t = 64)]
    k: usize,
    /// Cosine threshold of an edge (DINOv2: 0.6 self, 0.45 relative).
    #[arg(long, default_value_t = 0.6)]
    threshold: f32,
    /// Reference embeddings (repeatable): relative dedup, dropping every component that touches one.
    #[arg(long)]
    reference: Vec<PathBuf>,
    /// Query rows per checkpointed chunk.
    #[arg(long, default_value_t = 65536)]
    chunk: usize,
    #[command(flatten)]
    search: IndexArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// `knn` arguments.
#[derive(Debug, Clone, Args)]
pub(super) struct KnnArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Query embeddings (default: every base row, excluding itself).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// Neighbours per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Threshold query instead of k-NN: all base rows with cosine > threshold (exact; CSR output).
    #[arg(long)]
    threshold: Option<f32>,
    #[command(flatten)]
    search: IndexArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// Retrieval mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RetrieveModeArg {
    /// k nearest pool images per query.
    Sample,
    /// Pool clusters hit by more than `min-queries` queries.
    Cluster,
}

/// `retrieve` arguments.
#[derive(Debug, Clone, Args)]
pub(super) struct RetrieveArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Query embeddings (the curated dataset).
    #[arg(long)]
    queries: PathBuf,
    /// Retrieval mode.
    #[arg(long, value_enum, default_value_t = RetrieveModeArg::Sample)]
    mode: RetrieveModeArg,
    /// Sample mode: neighbours per query (DINOv2: 4, 32 for ImageNet-1k).
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Sample mode: output distinct ids instead of every hit.
    #[arg(long)]
    unique: bool,
    /// Cluster mode: a `kmeans` output directory over the same pool (centroids.npy, assignment.npy).
    #[arg(long)]
    clusters: Option<PathBuf>,
    /// Cluster mode without --clusters: run k-means with this many clusters.
    #[arg(long, default_value_t = 1000)]
    n_clusters: usize,
    /// Cluster mode: clusters need more than this many queries.
    #[arg(long, default_value_t = 3)]
    min_queries: usize,
    /// Cluster mode: images taken per selected cluster.
    #[arg(long, default_value_t = 10000)]
    per_cluster: usize,
    /// Cluster mode: at most this many images per dataset.
    #[arg(long, default_value_t = 1_000_000)]
    cap: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    search: IndexArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// k-means initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InitArg {
    /// Greedy k-means++.
    KmeansPp,
    /// Random rows.
    Random,
}

/// `kmeans` arguments.
#[derive(Debug, Clone, Args)]
pub(super) struct KmeansArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Clusters.
    #[arg(long)]
    k: usize,
    /// Maximum Lloyd iterations.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Initialisation.
    #[arg(long, value_enum, default_value_t = InitArg::KmeansPp)]
    init: InitArg,
    /// Train on at most k * this many random rows (faiss: 256).
    #[arg(long)]
    max_points_per_centroid: Option<usize>,
    /// Early stop on relative objective decrease below this.
    #[arg(long, default_value_t = 1e-6)]
    tol: f64,
    /// Save a resumable checkpoint every this many iterations (0 = never).
    #[arg(long, default_value_t = 5)]
    checkpoint_every: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    out: OutputArgs,
}

/// `hkmeans` arguments (comma-separated lists, one entry per level, a single value applies to all levels).
#[derive(Debug, Clone, Args)]
pub(super) struct HkmeansArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Clusters per level, bottom-up, e.g. 1000,300.
    #[arg(long, value_delimiter = ',', required = true)]
    k: Vec<usize>,
    /// Lloyd iterations per k-means run.
    #[arg(long, value_delimiter = ',', default_value = "50")]
    iters: Vec<usize>,
    /// Resampling steps per level.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    resampling_steps: Vec<usize>,
    /// Points taken per cluster in each resampling step.
    #[arg(long, value_delimiter = ',', default_value = "10")]
    sample_size: Vec<usize>,
    /// Resampling pick: c (closest to centroid) or r (random).
    #[arg(long, default_value = "c")]
    strategy: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    out: OutputArgs,
}

/// `sample` arguments.
#[derive(Debug, Clone, Args)]
pub(super) struct SampleArgs {
    /// An `hkmeans` output directory.
    #[arg(long)]
    clustering: PathBuf,
    /// Number of rows to select.
    #[arg(long)]
    target: usize,
    /// Most copies of one row.
    #[arg(long, default_value_t = 1)]
    multiplier: usize,
    /// Leaf pick: r (random) or c (closest to centroid).
    #[arg(long, default_value = "r")]
    strategy: String,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    out: OutputArgs,
}

/// Runs one stage with progress bars on stderr, then prints what it did.
///
/// Under `mpirun -np N` every rank runs the stage on its share (`pipeline::*_on`); rank 0 shows the progress and
/// prints the closing message, and `sample` (which reads the clustering only) runs on rank 0 alone.
pub(super) fn run(
    cmd: CurateCommand,
    comm: std::sync::Arc<dyn dinov2_dist::Communicator>,
) -> Result<()> {
    let comm = comm.as_ref();
    let lead = comm.rank() == 0;
    if lead && comm.world_size() > 1 {
        eprintln!("curate: {} ranks ({})", comm.world_size(), comm.backend());
    }
    let bars = Bars::default();
    let quiet = pipeline::NoProgress;
    let bars: &dyn Progress = if lead { &bars } else { &quiet };
    match cmd {
        CurateCommand::Embed(a) => {
            let params = pipeline::EmbedParams {
                images: a.images.clone(),
                list: a.list.clone(),
                output: a.output.clone(),
                config: dinov2_curate::embed::EmbedConfig {
                    shard_size: a.shard_size,
                    batch_size: a.batch_size,
                    normalize: !a.no_normalize,
                },
                model: a.model.clone(),
                merge_to: a.merge_to.clone(),
            };
            let s = pipeline::embed_on(&params, || model_embedder(&a), bars, comm)?;
            let r = s.report;
            if lead {
                eprintln!(
                    "embedded {} images: {} shards computed, {} skipped",
                    r.n_rows, r.computed, r.skipped
                );
            }
        }
        CurateCommand::Dedup(a) => {
            let params = pipeline::DedupParams {
                input: a.input.into(),
                k: a.k,
                threshold: a.threshold,
                reference: a.reference,
                chunk: a.chunk,
                index: a.search.into(),
                output: a.out.output,
                force: a.out.force,
            };
            if let Some(s) = done(lead, pipeline::dedup_on(&params, bars, comm)?).filter(|_| lead) {
                eprintln!(
                    "dedup: kept {} of {} rows",
                    s.result.n_kept(),
                    s.result.n_rows()
                );
            }
        }
        CurateCommand::Knn(a) => {
            let params = pipeline::KnnParams {
                input: a.input.into(),
                queries: a.queries,
                k: a.k,
                threshold: a.threshold,
                index: a.search.into(),
                output: a.out.output,
                force: a.out.force,
            };
            done(lead, pipeline::knn_on(&params, bars, comm)?);
        }
        CurateCommand::Retrieve(a) => {
            let params = pipeline::RetrieveParams {
                input: a.input.into(),
                queries: a.queries,
                mode: match a.mode {
                    RetrieveModeArg::Sample => pipeline::RetrieveMode::Sample,
                    RetrieveModeArg::Cluster => pipeline::RetrieveMode::Cluster,
                },
                k: a.k,
                unique: a.unique,
                clusters: a.clusters,
                n_clusters: a.n_clusters,
                min_queries: a.min_queries,
                per_cluster: a.per_cluster,
                cap: a.cap,
                seed: a.seed,
                index: a.search.into(),
                output: a.out.output,
                force: a.out.force,
            };
            done(lead, pipeline::retrieve_on(&params, bars, comm)?);
        }
        CurateCommand::Kmeans(a) => {
            let params = pipeline::KmeansParams {
                input: a.input.into(),
                k: a.k,
                iters: a.iters,
                init: match a.init {
                    InitArg::KmeansPp => Init::KMeansPlusPlus,
                    InitArg::Random => Init::Random,
                },
                max_points_per_centroid: a.max_points_per_centroid,
                tol: a.tol,
                checkpoint_every: a.checkpoint_every,
                seed: a.seed,
                output: a.out.output,
                force: a.out.force,
            };
            done(lead, pipeline::kmeans_on(&params, bars, comm)?);
        }
        CurateCommand::Hkmeans(a) => {
            let params = pipeline::HkmeansParams {
                input: a.input.into(),
                k: a.k,
                iters: a.iters,
                resampling_steps: a.resampling_steps,
                sample_size: a.sample_size,
                strategy: a.strategy.parse::<Pick>()?,
                seed: a.seed,
                output: a.out.output,
                force: a.out.force,
            };
            done(lead, pipeline::hkmeans_on(&params, bars, comm)?);
        }
        CurateCommand::Sample(a) => {
            let params = pipeline::SampleParams {
                clustering: a.clustering,
                target: a.target,
                multiplier: a.multiplier,
                strategy: a.strategy.parse::<Pick>()?,
                seed: a.seed,
                output: a.out.output,
                force: a.out.force,
            };
            if lead {
                done(lead, pipeline::sample(&params, bars)?);
            }
        }
    }
    Ok(())
}

/// The summary of a stage that ran; for a finished one, says so.
fn done<S>(lead: bool, outcome: Outcome<S>) -> Option<S> {
    if let (true, Outcome::Skipped { summary }) = (lead, &outcome) {
        eprintln!(
            "{} exists: stage already done (use --force to recompute)",
            summary.display()
        );
    }
    outcome.completed()
}

/// The backbone of `curate embed`: `--weights` (else `--model`), f32 on the CPU, class tokens of the official
/// eval transform at `--image-size`.
fn model_embedder(a: &EmbedArgs) -> dinov2_curate::Result<ModelEmbedder> {
    let spec = a
        .weights
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| a.model.clone());
    let loaded = load(&ModelArgs::named(spec)).map_err(dinov2_curate::Error::embedder)?;
    let s = a.image_size as u32;
    Ok(ModelEmbedder {
        model: loaded.model,
        preprocess: Preprocess::Eval {
            resize: s * 256 / 224,
            crop: s,
        },
        device: Device::Cpu,
    })
}

/// One progress bar per running task, on stderr (hidden when it is not a terminal); notes printed above them.
#[derive(Default)]
struct Bars {
    bars: RefCell<Vec<(&'static str, ProgressBar)>>,
}

impl Progress for Bars {
    fn event(&self, event: &ProgressEvent<'_>) {
        let mut bars = self.bars.borrow_mut();
        match *event {
            ProgressEvent::Begin { task, total, .. } => {
                let pb = ProgressBar::new(total);
                if let Ok(style) = ProgressStyle::with_template(
                    "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})",
                ) {
                    pb.set_style(style);
                }
                pb.set_message(task);
                bars.push((task, pb));
            }
            ProgressEvent::Advance { task, done, .. } => {
                if let Some((_, pb)) = bars.iter().rev().find(|(t, _)| *t == task) {
                    pb.set_position(done);
                }
            }
            ProgressEvent::End { task, .. } => {
                if let Some(i) = bars.iter().rposition(|(t, _)| *t == task) {
                    bars.remove(i).1.finish_and_clear();
                }
            }
            ProgressEvent::Message { text, .. } => match bars.last() {
                Some((_, pb)) => pb.suspend(|| eprintln!("{text}")),
                None => eprintln!("{text}"),
            },
            _ => {}
        }
    }
}
