//! The `embed` stage: an image pool through an [`Embedder`] into resumable shards.

use std::path::PathBuf;
use std::time::Instant;

use super::{write_summary, Progress, Reporter, Stage};
use crate::embed::{self, EmbedConfig, EmbedReport, Embedder};
use crate::error::{invalid, Result};
use dinov2_dist::{Communicator, SingleProcess};

/// Parameters of [`embed`](fn@embed).
///
/// ```
/// use dinov2_curate::pipeline::EmbedParams;
/// let p = EmbedParams::new("images/", "emb/");
/// assert_eq!((p.config.shard_size, p.config.batch_size), (65536, 64));
/// assert_eq!(p.model, "dinov2_vits14");
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EmbedParams {
    /// Directory of images (searched recursively); or give `list`.
    pub images: Option<PathBuf>,
    /// Text file with one image path per line (used when `images` is `None`).
    pub list: Option<PathBuf>,
    /// Output directory (shards, `paths.txt`, `manifest.json`, `summary.json`).
    pub output: PathBuf,
    /// Sharding, batching, normalisation.
    pub config: EmbedConfig,
    /// Name of the model, recorded in the summary (the caller builds the model).
    pub model: String,
    /// Also write all shards concatenated to this `.npy` file.
    pub merge_to: Option<PathBuf>,
}

impl Default for EmbedParams {
    /// No images or output yet; 65,536 rows per shard, 64 images per batch, normalised, `dinov2_vits14`.
    fn default() -> Self {
        Self {
            images: None,
            list: None,
            output: PathBuf::new(),
            config: EmbedConfig::default(),
            model: "dinov2_vits14".into(),
            merge_to: None,
        }
    }
}

impl EmbedParams {
    /// Embeds the images under `images` into `output`, with the defaults.
    ///
    /// ```
    /// let p = dinov2_curate::pipeline::EmbedParams::new("pool", "emb");
    /// assert_eq!(p.images.as_deref(), Some(std::path::Path::new("pool")));
    /// ```
    pub fn new(images: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            images: Some(images.into()),
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What [`embed`](fn@embed) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{embed, EmbedParams, EmbedSummary, NoProgress};
/// # struct Ones;
/// # impl dinov2_curate::embed::Embedder for Ones {
/// #     fn dim(&self) -> usize { 2 }
/// #     fn embed(&mut self, p: &[std::path::PathBuf]) -> dinov2_curate::Result<Vec<f32>> { Ok(vec![1.0; 2 * p.len()]) }
/// # }
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("list.txt"), "a.jpg\n")?;
/// let p = EmbedParams { list: Some(dir.path().join("list.txt")), output: dir.path().join("e"), ..Default::default() };
/// let s = embed(&p, || Ok(Ones), &NoProgress)?;
/// let written: EmbedSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("e/summary.json"))?)?;
/// assert_eq!(written.report, s.report); // (times only up to JSON float parsing)
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmbedSummary {
    /// Rows, shards, and how many shards were computed or found finished.
    pub report: EmbedReport,
    /// Wall time of this call.
    pub seconds: f64,
    /// [`EmbedParams::model`].
    pub model: String,
}

/// Embeds an image pool into `params.output`: `manifest.json`, `paths.txt` and `shard_XXXXX.npy` (+ `.ids.npy`)
/// per block of `shard_size` rows (see [`crate::embed`]), then `summary.json`. Finished shards are skipped, so
/// rerunning after a crash only computes the missing ones; a different pool or configuration in the same directory
/// is an [`Error::Resume`](crate::Error::Resume). The image list is read first, then `make_embedder` builds the
/// model (so a bad list fails before a model is loaded).
///
/// ```
/// use std::path::PathBuf;
/// use dinov2_curate::embed::Embedder;
/// use dinov2_curate::pipeline::{embed, EmbedParams, NoProgress};
/// struct Ones;
/// impl Embedder for Ones {
///     fn dim(&self) -> usize {
///         2
///     }
///     fn embed(&mut self, paths: &[PathBuf]) -> dinov2_curate::Result<Vec<f32>> {
///         Ok(vec![1.0; 2 * paths.len()])
///     }
/// }
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("list.txt"), "a.jpg\nb.jpg\nc.jpg\n")?;
/// let params = EmbedParams {
///     list: Some(dir.path().join("list.txt")),
///     output: dir.path().join("emb"),
///     ..EmbedParams::default()
/// };
/// let s = embed(&params, || Ok(Ones), &NoProgress)?;
/// assert_eq!((s.report.n_rows, s.report.computed), (3, 1));
/// let again = embed(&params, || Ok(Ones), &NoProgress)?;
/// assert_eq!((again.report.computed, again.report.skipped), (0, 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn embed<E: Embedder>(
    params: &EmbedParams,
    make_embedder: impl FnOnce() -> Result<E>,
    progress: &dyn Progress,
) -> Result<EmbedSummary> {
    embed_on(params, make_embedder, progress, &SingleProcess)
}

/// [`embed`] as one rank of a sharded run (`mpirun -np N dinov2 curate embed`): every rank of `comm` loads the
/// model and embeds its shards ([`embed::embed_pool_sharded`]: shard `s` is rank `s % N`'s); rank 0 merges (with
/// `merge_to`) and writes the summary once every rank is done. Merging reads every shard, so it needs `output` on
/// a file system all ranks share.
pub fn embed_on<E: Embedder>(
    params: &EmbedParams,
    make_embedder: impl FnOnce() -> Result<E>,
    progress: &dyn Progress,
    comm: &dyn Communicator,
) -> Result<EmbedSummary> {
    let r = Reporter::new(progress, Stage::Embed);
    let paths = match (&params.images, &params.list) {
        (Some(dir), _) => embed::list_images(dir)?,
        (None, Some(list)) => crate::store::read_paths(list)?,
        (None, None) => {
            return Err(invalid(
                "images",
                "give an image directory (--images DIR) or a list of paths (--list FILE)",
            ))
        }
    };
    super::require_path("output", &params.output)?;
    let mut model = make_embedder()?;
    let t = Instant::now();
    r.begin("embed", paths.len());
    let report = embed::embed_pool_sharded(
        &mut model,
        &paths,
        &params.output,
        &params.config,
        &mut |done, total| r.advance("embed", done, total),
        comm,
    )?;
    r.end("embed");
    comm.barrier()?;
    let summary = EmbedSummary {
        report,
        seconds: t.elapsed().as_secs_f64(),
        model: params.model.clone(),
    };
    if comm.rank() == 0 {
        if let Some(m) = &params.merge_to {
            embed::merge_shards(&params.output, m)?;
        }
        write_summary(&params.output, &summary)?;
    }
    comm.barrier()?;
    Ok(summary)
}
