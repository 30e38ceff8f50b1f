//! The `sample` stage: balanced hierarchical sampling from an `hkmeans` output.

use std::path::Path;
use std::path::PathBuf;

use super::hkmeans::load_level;
use super::{map_ids, require_path, run_stage, Outcome, Progress};
use crate::error::{Error, Result};
use crate::hkmeans::{self as algo, Pick};
use crate::npy;
use crate::store::read_ids;

/// Parameters of [`sample`](fn@sample).
///
/// ```
/// use dinov2_curate::hkmeans::Pick;
/// use dinov2_curate::pipeline::SampleParams;
/// let p = SampleParams::new("hk/", 1000, "sel/");
/// assert_eq!((p.multiplier, p.strategy, p.seed), (1, Pick::Random, 0));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SampleParams {
    /// An [`hkmeans`](super::hkmeans()) output directory.
    pub clustering: PathBuf,
    /// Number of rows to select.
    pub target: usize,
    /// Most copies of one row.
    pub multiplier: usize,
    /// Leaf pick: random or closest to the centroid.
    pub strategy: Pick,
    /// Seed.
    pub seed: u64,
    /// Output directory.
    pub output: PathBuf,
    /// Recompute even if the output exists.
    pub force: bool,
}

impl Default for SampleParams {
    /// No clustering, target or output yet; one copy per row at most, random leaf pick, seed 0.
    fn default() -> Self {
        Self {
            clustering: PathBuf::new(),
            target: 0,
            multiplier: 1,
            strategy: Pick::Random,
            seed: 0,
            output: PathBuf::new(),
            force: false,
        }
    }
}

impl SampleParams {
    /// `target` rows from the hierarchy in `clustering` into `output` with the defaults.
    ///
    /// ```
    /// assert_eq!(dinov2_curate::pipeline::SampleParams::new("hk", 10, "out").target, 10);
    /// ```
    pub fn new(clustering: impl Into<PathBuf>, target: usize, output: impl Into<PathBuf>) -> Self {
        Self {
            clustering: clustering.into(),
            target,
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What [`sample`](fn@sample) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{hkmeans, sample, HkmeansParams, NoProgress, SampleParams, SampleSummary};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// hkmeans(&HkmeansParams::new(input, vec![2], dir.path().join("hk")), &NoProgress)?;
/// let s = sample(&SampleParams::new(dir.path().join("hk"), 2, dir.path().join("s")), &NoProgress)?;
/// let s = s.completed().unwrap();
/// assert_eq!((s.selected, s.levels), (2, 1));
/// let written: SampleSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("s/summary.json"))?)?;
/// assert_eq!(written, s);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleSummary {
    /// Rows asked for.
    pub target: usize,
    /// Rows selected (fewer than `target` when the pool times `multiplier` is smaller).
    pub selected: usize,
    /// Most copies of one row.
    pub multiplier: usize,
    /// Leaf pick.
    pub strategy: Pick,
    /// Levels of the hierarchy.
    pub levels: usize,
}

/// Balanced hierarchical sampling (water-filling per level, from the top): `selection.npy` (int64 original row
/// ids, ascending, repeated up to `multiplier` times) and `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{hkmeans, sample, HkmeansParams, Input, NoProgress, SampleParams};
/// use dinov2_curate::{npy, store::Embeddings};
/// let dir = tempfile::tempdir()?;
/// let v: Vec<f32> = (0..40).map(|i| ((i * 7919) % 97) as f32 / 97.0).collect();
/// Embeddings::from_vec(v, 20, 2)?.save_npy(&dir.path().join("x.npy"))?;
/// let hk = HkmeansParams::new(Input::new(dir.path().join("x.npy")), vec![4], dir.path().join("hk"));
/// hkmeans(&hk, &NoProgress)?;
/// let s = sample(&SampleParams::new(dir.path().join("hk"), 8, dir.path().join("sel")), &NoProgress)?;
/// assert_eq!(s.completed().unwrap().selected, 8);
/// assert_eq!(npy::read_i64(&dir.path().join("sel/selection.npy"))?.0.len(), 8);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sample(params: &SampleParams, progress: &dyn Progress) -> Result<Outcome<SampleSummary>> {
    run_stage(&params.output, params.force, |out| {
        run(params, progress, out)
    })
}

fn run(params: &SampleParams, _progress: &dyn Progress, out: &Path) -> Result<SampleSummary> {
    require_path("clustering", &params.clustering)?;
    let level_dir = |t: usize| params.clustering.join(format!("level{t}"));
    let mut levels = Vec::new();
    while level_dir(levels.len() + 1).join("summary.json").exists() {
        levels.push(load_level(&level_dir(levels.len() + 1))?);
    }
    if levels.is_empty() {
        return Err(Error::MissingOutput {
            path: params.clustering.clone(),
            stage: "hkmeans",
        });
    }
    for t in 1..levels.len() {
        if levels[t].assignment.len() != levels[t - 1].k {
            return Err(Error::Resume {
                path: params.clustering.clone(),
                reason: format!(
                    "level{} does not cluster the centroids of level{}; rerun hkmeans",
                    t + 1,
                    t
                ),
            });
        }
    }
    let mut sel = algo::balanced_sample(
        &levels,
        params.target,
        params.multiplier,
        params.strategy,
        params.seed,
    )?;
    let rows_path = params.clustering.join("rows.npy");
    if rows_path.exists() {
        let r = read_ids(&rows_path)?;
        if r.len() != levels[0].assignment.len() {
            return Err(Error::LengthMismatch {
                path: rows_path,
                what: "row ids",
                expected: levels[0].assignment.len(),
                got: r.len(),
            });
        }
        map_ids(&mut sel, &Some(r));
        sel.sort_unstable();
    }
    npy::write_i64(&out.join("selection.npy"), &sel, &[sel.len()])?;
    let s = SampleSummary {
        target: params.target,
        selected: sel.len(),
        multiplier: params.multiplier,
        strategy: params.strategy,
        levels: levels.len(),
    };
    Ok(s)
}
