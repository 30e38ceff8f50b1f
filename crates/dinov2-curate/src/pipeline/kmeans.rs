//! The `kmeans` stage: k-means with periodic checkpoints, resumed automatically.

use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use super::{
    read_json, run_stage_on, to_json, write_rows, Input, Outcome, Progress, Reporter, Stage,
};
use crate::embed::write_json;
use crate::error::{io_err, Error, Result};
use crate::kmeans::{self as algo, Init, KMeansCheckpoint, KMeansConfig};
use crate::npy;
use dinov2_dist::{Communicator, SingleProcess};

/// Parameters of [`kmeans`](fn@kmeans).
///
/// ```
/// use dinov2_curate::kmeans::Init;
/// use dinov2_curate::pipeline::{Input, KmeansParams};
/// let p = KmeansParams::new(Input::new("pool.npy"), 100, "km/");
/// assert_eq!((p.k, p.iters, p.init, p.checkpoint_every), (100, 50, Init::KMeansPlusPlus, 5));
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KmeansParams {
    /// Input embeddings.
    pub input: Input,
    /// Clusters (required: the default 0 is refused).
    pub k: usize,
    /// Maximum Lloyd iterations.
    pub iters: usize,
    /// Initialisation.
    pub init: Init,
    /// Train on at most `k *` this many random rows (faiss: 256); `None` = all rows.
    pub max_points_per_centroid: Option<usize>,
    /// Early stop on a relative objective decrease below this.
    pub tol: f64,
    /// Save a resumable checkpoint every this many iterations (0 = never).
    pub checkpoint_every: usize,
    /// Seed.
    pub seed: u64,
    /// Output directory.
    pub output: PathBuf,
    /// Recompute even if the output exists, and ignore checkpoints.
    pub force: bool,
}

impl Default for KmeansParams {
    /// No input, output or `k` yet; 50 iterations of k-means++, all rows, `tol` 1e-6, a checkpoint every 5
    /// iterations, seed 0.
    fn default() -> Self {
        Self {
            input: Input::default(),
            k: 0,
            iters: 50,
            init: Init::KMeansPlusPlus,
            max_points_per_centroid: None,
            tol: 1e-6,
            checkpoint_every: 5,
            seed: 0,
            output: PathBuf::new(),
            force: false,
        }
    }
}

impl KmeansParams {
    /// `k` clusters of `input` into `output` with the defaults.
    ///
    /// ```
    /// use dinov2_curate::pipeline::{Input, KmeansParams};
    /// assert_eq!(KmeansParams::new(Input::new("x.npy"), 8, "out").k, 8);
    /// ```
    pub fn new(input: Input, k: usize, output: impl Into<PathBuf>) -> Self {
        Self {
            input,
            k,
            output: output.into(),
            ..Self::default()
        }
    }
}

/// What [`kmeans`](fn@kmeans) wrote to `summary.json`.
///
/// ```
/// use dinov2_curate::pipeline::{kmeans, KmeansParams, KmeansSummary, NoProgress};
/// # let dir = tempfile::tempdir()?;
/// # let x = dinov2_curate::store::Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// # x.save_npy(&dir.path().join("x.npy"))?;
/// # let input = dinov2_curate::pipeline::Input::new(dir.path().join("x.npy"));
/// let s = kmeans(&KmeansParams::new(input, 2, dir.path().join("km")), &NoProgress)?.completed().unwrap();
/// assert!(s.objective < 0.05 && s.resumed_from_iteration.is_none());
/// let written: KmeansSummary =
///     serde_json::from_str(&std::fs::read_to_string(dir.path().join("km/summary.json"))?)?;
/// assert_eq!((written.config, written.iterations), (s.config, s.iterations));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KmeansSummary {
    /// Clusters.
    pub k: usize,
    /// Dimension.
    pub d: usize,
    /// Rows clustered.
    pub n: usize,
    /// Lloyd iterations run (including those before a resume).
    pub iterations: usize,
    /// Training objective after each assignment step.
    pub objective_history: Vec<f64>,
    /// Sum of squared distances of all rows to their final centroids.
    pub objective: f64,
    /// The k-means configuration.
    pub config: KMeansConfig,
    /// The checkpoint iteration this run resumed from, if any.
    pub resumed_from_iteration: Option<usize>,
    /// Training time.
    pub train_seconds: f64,
    /// Wall time.
    pub seconds: f64,
}

/// k-means (k-means++ or random init, Lloyd with f64 accumulation): `centroids.npy` (f32 `k x d`),
/// `assignment.npy` (int64 per row), `distances.npy` (f32 squared distance per row), `rows.npy` (with a row subset)
/// and `summary.json`. Every `checkpoint_every` iterations the centroids go to `checkpoint/`; a rerun with the
/// same parameters resumes from there and ends with the same centroids as an uninterrupted run (a checkpoint of
/// other parameters is ignored, with a progress message).
///
/// ```
/// use dinov2_curate::pipeline::{kmeans, Input, KmeansParams, NoProgress};
/// use dinov2_curate::{npy, store::Embeddings};
/// let dir = tempfile::tempdir()?;
/// let x = Embeddings::from_vec(vec![1.0, 0.0, 0.99, 0.1, 0.0, 1.0, 0.1, 0.99], 4, 2)?;
/// x.save_npy(&dir.path().join("x.npy"))?;
/// let p = KmeansParams::new(Input::new(dir.path().join("x.npy")), 2, dir.path().join("km"));
/// let s = kmeans(&p, &NoProgress)?.completed().unwrap();
/// assert_eq!((s.k, s.n), (2, 4));
/// let labels = npy::read_i64(&dir.path().join("km/assignment.npy"))?.0;
/// assert!(labels[0] == labels[1] && labels[2] == labels[3] && labels[0] != labels[2]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn kmeans(params: &KmeansParams, progress: &dyn Progress) -> Result<Outcome<KmeansSummary>> {
    kmeans_on(params, progress, &SingleProcess)
}

/// [`kmeans`] as one rank of a sharded run (`mpirun -np N dinov2 curate kmeans`): every rank of `comm` calls it
/// with the same parameters, reads only its contiguous share of the rows and takes part in
/// [`algo::train_sharded`]; rank 0 writes the checkpoints and the outputs, which equal a one-process run's up to
/// the order of the f64 additions of the per-cluster sums (same assignments unless a row is that close to two
/// centroids). A resumed run reads rank 0's checkpoint, broadcast to the others, so any world size can resume it.
pub fn kmeans_on(
    params: &KmeansParams,
    progress: &dyn Progress,
    comm: &dyn Communicator,
) -> Result<Outcome<KmeansSummary>> {
    run_stage_on(&params.output, params.force, comm, |out| {
        run(params, progress, out, comm)
    })
}

fn run(
    params: &KmeansParams,
    progress: &dyn Progress,
    out: &Path,
    comm: &dyn Communicator,
) -> Result<KmeansSummary> {
    let r = Reporter::new(progress, Stage::Kmeans);
    let t = Instant::now();
    let local = params.input.load_local(comm)?;
    let (x, rows, n) = (&local.x, &local.rows, local.n);
    let lead = comm.rank() == 0;
    let k = params.k;
    let cfg = KMeansConfig {
        k,
        n_iter: params.iters,
        init: params.init,
        n_local_trials: None,
        seed: params.seed,
        max_points_per_centroid: params.max_points_per_centroid,
        tol: params.tol,
    };
    // Checkpoints: `checkpoint/state.json` names the centroid file of the last saved iteration.
    let ck_dir = out.join("checkpoint");
    let state_path = ck_dir.join("state.json");
    let fingerprint = json!({
        "embeddings": params.input.embeddings, "rows": params.input.rows,
        "no_normalize": !params.input.normalize, "n": n, "d": x.dim(), "k": k,
        // The names of the command line's `--init` values (`KmeansPp`, `Random`), as earlier versions wrote.
        "init": match params.init { Init::KMeansPlusPlus => "KmeansPp", Init::Random => "Random" },
        "seed": params.seed, "max_points_per_centroid": params.max_points_per_centroid, "tol": params.tol,
    });
    let mut resume = None;
    if lead && state_path.exists() && !params.force {
        let state = read_json(&state_path)?;
        if state["params"] == fingerprint {
            let mut ck: KMeansCheckpoint = serde_json::from_value(state["checkpoint"].clone())
                .map_err(|source| Error::Json {
                    path: state_path.clone(),
                    source,
                })?;
            let cpath = ck_dir.join(format!("centroids_{:06}.npy", ck.iterations));
            let (c, shape) = npy::read_f32(&cpath)?;
            if shape != [k, x.dim()] {
                return Err(Error::Resume {
                    path: ck_dir.clone(),
                    reason: format!(
                        "checkpoint centroids of shape {shape:?}, expected [{k}, {}]; use --force",
                        x.dim()
                    ),
                });
            }
            crate::store::check_finite(&c, x.dim(), Some(&cpath))?;
            ck.centroids = c;
            r.message(&format!(
                "kmeans: resuming after iteration {}",
                ck.iterations
            ));
            resume = Some(ck);
        } else {
            r.message("kmeans: checkpoint of other parameters ignored");
        }
    }
    if comm.world_size() > 1 {
        // Rank 0's checkpoint (if any) to every rank: its state as JSON, then the centroids.
        let mut state = match &resume {
            Some(ck) => to_json(ck, &state_path)?.to_string().into_bytes(),
            None => Vec::new(),
        };
        comm.broadcast_bytes(&mut state, 0)?;
        if !state.is_empty() {
            let mut ck: KMeansCheckpoint =
                serde_json::from_slice(&state).map_err(|source| Error::Json {
                    path: state_path.clone(),
                    source,
                })?;
            let mut c = resume
                .take()
                .map_or_else(|| vec![0f32; k * x.dim()], |ck| ck.centroids);
            comm.broadcast_f32(&mut c, 0)?;
            ck.centroids = c;
            resume = Some(ck);
        }
    }
    let resumed_from = resume.as_ref().map(|c| c.iterations);
    r.begin("kmeans", params.iters);
    let every = params.checkpoint_every;
    let mut save = |ck: &KMeansCheckpoint| -> Result<()> {
        if !lead || every == 0 || ck.iterations % every != 0 {
            return Ok(());
        }
        std::fs::create_dir_all(&ck_dir).map_err(io_err(&ck_dir))?;
        let name = format!("centroids_{:06}.npy", ck.iterations);
        npy::write_f32(
            &ck_dir.join(&name),
            &ck.centroids,
            &[k, ck.centroids.len() / k.max(1)],
        )?;
        write_json(
            &state_path,
            &json!({"params": fingerprint, "checkpoint": ck}),
        )?;
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
    let iters = params.iters;
    let km = algo::train_sharded(
        x.as_slice(),
        x.dim(),
        &cfg,
        comm,
        resume,
        &mut |it, _| r.advance("kmeans", it + 1, iters),
        &mut save,
    )?;
    r.end("kmeans");
    let train_s = t.elapsed().as_secs_f64();
    let (labels, dist) = km.assign(x.as_slice())?;
    // The outputs cover every row: this rank's part gathered in rank order (= row order).
    let lab: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let lab = comm.all_gather_i64(&lab)?;
    let dist = comm.all_gather_f32(&dist)?;
    let objective: f64 = dist.iter().map(|&v| v as f64).sum();
    if lead {
        npy::write_f32(&out.join("centroids.npy"), &km.centroids, &[km.k, km.d])?;
        npy::write_i64(&out.join("assignment.npy"), &lab, &[lab.len()])?;
        npy::write_f32(&out.join("distances.npy"), &dist, &[dist.len()])?;
        write_rows(out, rows)?;
    }
    let s = KmeansSummary {
        k: km.k,
        d: km.d,
        n,
        iterations: km.iterations,
        objective_history: km.objective_history,
        objective,
        config: cfg,
        resumed_from_iteration: resumed_from,
        train_seconds: train_s,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok(s)
}
