//! The `hkmeans` stage: hierarchical k-means with resampling, one resumable directory per level.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{run_stage_on, write_rows, Input, Outcome, Progress, Reporter, Stage};
use crate::embed::write_json;
use crate::error::{invalid, io_err, Error, Result};
use crate::hkmeans::{self as algo, Level, LevelConfig, Pick};
use crate::npy;
use crate::store::read_ids;
use dinov2_dist::{Communicator, SingleProcess};

/// Parameters of [`hkmeans`](fn@hkmeans). The per-level lists hold one value per level, or a single value for
/// every level.
///
/// ```
/// use dinov2_curate::hkmeans::Pick;
/// use dinov2_curate::pipeline::{HkmeansParams, Input};
/// let p = HkmeansParams::new(Input::new("pool.npy"), vec![1000, 300], "hk/");
/// assert_eq!((p.iters.clone(), p.resampling_steps.clone(), p.strategy), (vec![50], vec![10], Pick::Closest));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HkmeansParams {
    /// Input embeddings.
    pub input: Input,
    /// Clusters per level, bottom-up, e.g. `[1000, 300]` (required: at least one level).
    pub k: Vec<usize>,
    /// Lloyd iterations per k-means run.
    pub iters: Vec<usize>,
    /// Resampling steps per level.
    pub resampling_steps: Vec<usize>,
    /// Points taken per cluster in each resampling step.
    pub sample_size: Vec<usize>,
    /// Resampling pick: closest to the centroid or random.
    pub strategy: Pick,
    /// Seed (level `t` uses [`level_seed`](crate::hkmeans::level_seed)`(seed, t)`).
    pub seed: u64,
    /// Output directory.
    pub output: PathBuf,
    /// Recompute even if the output or finished levels exist.
    pub force: bool,
}

impl Default for HkmeansParams {
    /// No input, output or levels yet; 50 iterations, 10 resampling steps of 10 closest points, seed 0.
    fn default() -> Self {
        Self {
            input: Input::default(),
            k: Vec::new(),
            iters: vec![50],
            resampling_steps: vec![10],
            sample_size: vec![10],
            strategy: Pick::Closest,
            seed: 0,
            output: PathBuf::new(),
            force: false,
        }
    }
}

impl HkmeansParams {
    /// Levels of `k` clusters (bottom-up) over `input` into `output` with the defaults.
    ///
    /// ```
    /// use dinov2_curate::pipeline::{HkmeansParams, Input};
    /// assert_eq!(HkmeansParams::new(Input::new("x.npy"), vec![8, 2], "out").k, vec![8, 2]);
    /// ```
    pub fn new(input: Input, k: Vec<usize>, output: impl Into<PathBuf>) -> Self {
        Self {
            input,
            k,
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What [`hkmeans`](fn@hkmeans) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{hkmeans, HkmeansParams, HkmeansSummary, NoProgress};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// let s = hkmeans(&HkmeansParams::new(input, vec![2, 1], dir.path().join("hk")), &NoProgress)?.completed().unwrap();
/// assert_eq!(s.k, vec![2, 1]);
/// let written: HkmeansSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("hk/summary.json"))?)?;
/// assert_eq!((written.k, written.n), (s.k, s.n));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HkmeansSummary {
    /// Number of levels.
    pub levels: usize,
    /// Clusters of each level (a level has at most as many clusters as input rows).
    pub k: Vec<usize>,
    /// Rows clustered.
    pub n: usize,
    /// Dimension.
    pub d: usize,
    /// Wall time.
    pub seconds: f64,
}

/// What [`hkmeans`](fn@hkmeans) wrote to `level{t}/summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{hkmeans, HkmeansParams, LevelSummary, NoProgress};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// hkmeans(&HkmeansParams::new(input, vec![2, 1], dir.path().join("hk")), &NoProgress)?;
/// let level2: LevelSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("hk/level2/summary.json"))?)?;
/// assert_eq!(level2, LevelSummary { k: 1, n_input: 2 });
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LevelSummary {
    /// Clusters.
    pub k: usize,
    /// Rows of the level's input (pool rows at level 1, the previous level's clusters above).
    pub n_input: usize,
}

/// Hierarchical k-means with resampling (Vo et al. 2024): `level{t}/` holds `centroids.npy`, `assignment.npy`,
/// `sorted_offsets.npy`, `sorted_members.npy` (members of each cluster, closest first) and a `summary.json`
/// ([`LevelSummary`]) for level `t = 1, 2, ...`; then `rows.npy` (with a row subset) and `summary.json`. A finished
/// level is loaded instead of recomputed (unless `force`), so an interrupted run continues at the next level.
///
/// ```
/// use dinov2_curate::pipeline::{hkmeans, HkmeansParams, Input, NoProgress};
/// use dinov2_curate::store::Embeddings;
/// let dir = tempfile::tempdir()?;
/// let v: Vec<f32> = (0..40).map(|i| ((i * 7919) % 97) as f32 / 97.0).collect();
/// Embeddings::from_vec(v, 20, 2)?.save_npy(&dir.path().join("x.npy"))?;
/// let mut p = HkmeansParams::new(Input::new(dir.path().join("x.npy")), vec![6, 2], dir.path().join("hk"));
/// p.resampling_steps = vec![1];
/// let s = hkmeans(&p, &NoProgress)?.completed().unwrap();
/// assert_eq!((s.levels, s.k.clone(), s.n), (2, vec![6, 2], 20));
/// assert!(dir.path().join("hk/level2/sorted_members.npy").exists());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn hkmeans(params: &HkmeansParams, progress: &dyn Progress) -> Result<Outcome<HkmeansSummary>> {
    hkmeans_on(params, progress, &SingleProcess)
}

/// [`hkmeans`] as one rank of a sharded run (`mpirun -np N dinov2 curate hkmeans`): every rank of `comm` calls it
/// with the same parameters and reads only its contiguous share of the rows. Level 1 runs sharded
/// ([`algo::run_level_sharded`]: k-means and resampling on the shares); the higher levels cluster the previous
/// centroids, which every rank holds, so each rank computes them alike. Rank 0 decides which levels are already
/// done (resume), writes the level directories and shares their centroids. The outputs equal a one-process run's
/// up to the order of the f64 additions of the level-1 k-means sums.
pub fn hkmeans_on(
    params: &HkmeansParams,
    progress: &dyn Progress,
    comm: &dyn Communicator,
) -> Result<Outcome<HkmeansSummary>> {
    run_stage_on(&params.output, params.force, comm, |out| {
        run(params, progress, out, comm)
    })
}

fn run(
    params: &HkmeansParams,
    progress: &dyn Progress,
    out: &Path,
    comm: &dyn Communicator,
) -> Result<HkmeansSummary> {
    let r = Reporter::new(progress, Stage::Hkmeans);
    let t = Instant::now();
    let lead = comm.rank() == 0;
    let local = params.input.load_local(comm)?;
    let (x, rows, n) = (&local.x, &local.rows, local.n);
    let d = x.dim();
    let nl = params.k.len();
    if nl == 0 {
        return Err(invalid("k", "give the clusters of at least one level"));
    }
    let iters = per_level(&params.iters, nl, "iters")?;
    let steps = per_level(&params.resampling_steps, nl, "resampling_steps")?;
    let sizes = per_level(&params.sample_size, nl, "sample_size")?;
    r.begin("hkmeans", nl);
    let mut levels: Vec<Level> = Vec::new();
    for lv in 0..nl {
        let dir = out.join(format!("level{}", lv + 1));
        let mut done = vec![u8::from(
            lead && dir.join("summary.json").exists() && !params.force,
        )];
        comm.broadcast_bytes(&mut done, 0)?;
        let level = if done == [1] {
            // Rank 0 reads the finished level; the others need only its centroids (the next level's input).
            let mut l = if lead {
                load_level(&dir)?
            } else {
                Level {
                    k: 0,
                    centroids: Vec::new(),
                    assignment: Vec::new(),
                    offsets: Vec::new(),
                    members: Vec::new(),
                }
            };
            if comm.world_size() > 1 {
                let mut k = (l.k as u64).to_le_bytes().to_vec();
                comm.broadcast_bytes(&mut k, 0)?;
                l.k = u64::from_le_bytes(k.try_into().unwrap_or_default()) as usize;
                l.centroids.resize(l.k * d, 0.0);
                comm.broadcast_f32(&mut l.centroids, 0)?;
            }
            l
        } else {
            let cfg = LevelConfig {
                k: params.k[lv],
                n_iter: iters[lv],
                n_resampling_steps: steps[lv],
                sample_size: sizes[lv],
                strategy: params.strategy,
            };
            let input: &[f32] = match levels.last() {
                Some(l) => &l.centroids,
                None => x.as_slice(),
            };
            let seed = algo::level_seed(params.seed, lv);
            let l = if levels.is_empty() {
                algo::run_level_sharded(input, d, &cfg, seed, comm)?
            } else {
                algo::run_level(input, d, &cfg, seed)?
            };
            if lead {
                save_level(&dir, &l, d)?;
            }
            l
        };
        levels.push(level);
        r.advance("hkmeans", lv + 1, nl);
    }
    r.end("hkmeans");
    if lead {
        write_rows(out, rows)?;
    }
    let s = HkmeansSummary {
        levels: nl,
        k: levels.iter().map(|l| l.k).collect(),
        n,
        d,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok(s)
}

fn per_level<T: Copy>(v: &[T], levels: usize, name: &'static str) -> Result<Vec<T>> {
    match v.len() {
        1 => Ok(vec![v[0]; levels]),
        l if l == levels => Ok(v.to_vec()),
        l => Err(invalid(
            name,
            format!("{l} values for {levels} levels: give one value, or one per level"),
        )),
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
        &LevelSummary {
            k: l.k,
            n_input: l.assignment.len(),
        },
    )
}

/// Loads a finished level directory, checking that its files fit together.
pub(super) fn load_level(dir: &Path) -> Result<Level> {
    let cpath = dir.join("centroids.npy");
    let (centroids, shape) = npy::read_f32(&cpath)?;
    if let Some(&d) = shape.get(1) {
        crate::store::check_finite(&centroids, d, Some(&cpath))?;
    }
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
        return Err(Error::Resume {
            path: dir.into(),
            reason: "inconsistent level files; delete the directory (or use --force) to recompute"
                .into(),
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
