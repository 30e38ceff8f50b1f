//! k-means: greedy k-means++ initialisation (`2 + ln k` local trials, float64 potentials), Lloyd iterations with
//! GEMM assignment and float64 accumulation, empty-cluster splitting, early stop and optional subsampling.
//!
//! Distances are squared L2. Centroid updates group rows by cluster and sum them in row order in f64, so results
//! are deterministic for a given seed whatever the thread count.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{check_rows, invalid, Error, Result};
use crate::linalg::{matmul_abt_packed, pack_rows, sq_norm, sq_norms, threads};
use dinov2_dist::{gather_counts as gather_row_counts, Communicator, SingleProcess};

/// Initialisation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Init {
    /// Greedy k-means++ (scikit-learn / ssl-data-curation flavour).
    KMeansPlusPlus,
    /// `k` distinct rows drawn uniformly (faiss's default).
    Random,
}

/// k-means parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KMeansConfig {
    /// Number of clusters.
    pub k: usize,
    /// Maximum number of Lloyd iterations.
    pub n_iter: usize,
    /// Initialisation.
    pub init: Init,
    /// Candidates per greedy k-means++ step (default `2 + floor(ln k)`).
    pub n_local_trials: Option<usize>,
    /// Random seed.
    pub seed: u64,
    /// Train on at most `k * max_points_per_centroid` random rows (faiss uses 256); `None` = all rows.
    pub max_points_per_centroid: Option<usize>,
    /// Stop early when the relative objective decrease falls below this (assignments unchanged always stops).
    pub tol: f64,
}

impl KMeansConfig {
    /// Defaults: k-means++, 50 iterations (as ssl-data-curation), seed 0, no subsampling, `tol = 1e-6`.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            n_iter: 50,
            init: Init::KMeansPlusPlus,
            n_local_trials: None,
            seed: 0,
            max_points_per_centroid: None,
            tol: 1e-6,
        }
    }
}

/// Trained k-means model.
#[derive(Debug, Clone)]
pub struct KMeans {
    /// Number of clusters.
    pub k: usize,
    /// Dimension.
    pub d: usize,
    /// `k x d` centroids, row-major.
    pub centroids: Vec<f32>,
    /// Sum of squared distances of the training rows to their centroid at each iteration's assignment step.
    pub objective_history: Vec<f64>,
    /// Lloyd iterations run.
    pub iterations: usize,
}

/// Nearest centroid of every row: `(labels, squared distances)`.
pub fn assign(x: &[f32], d: usize, centroids: &[f32]) -> Result<(Vec<u32>, Vec<f32>)> {
    let n = check_rows("k-means assignment", x.len(), d)?;
    let k = check_rows("k-means assignment centroids", centroids.len(), d)?;
    if k == 0 {
        return Err(invalid("centroids", "no centroids to assign to"));
    }
    let cn = sq_norms(centroids, d);
    let packed = pack_rows(centroids, k, d)?;
    let mut labels = vec![0u32; n];
    let mut dist = vec![0f32; n];
    // Rows per GEMM (a multiple of the 64-row AVX-512 micro-kernel): the score block (rows x k, ~4 MB) stays in
    // the last-level cache for the argmin, and the packed centroids are reused over enough rows; one
    // buffer per thread, reused across chunks.
    let cb = ASSIGN_SCORE_BYTES / (4 * k);
    let cb = (cb / 64 * 64)
        .clamp(64, 4096)
        .min(n.div_ceil(threads()).max(1));
    let inner = n.div_ceil(cb) < threads();
    let work = |buf: &mut Vec<f32>, ((xs, ls), ds): ((&[f32], &mut [u32]), &mut [f32])| {
        let m = ls.len();
        buf.resize(m * k, 0.0);
        matmul_abt_packed(xs, m, &packed, buf, inner)?;
        for (i, (l, dd)) in ls.iter_mut().zip(ds.iter_mut()).enumerate() {
            let (j, best) = nearest_shifted(&buf[i * k..(i + 1) * k], &cn);
            *l = j as u32;
            *dd = (best + sq_norm(&xs[i * d..(i + 1) * d])).max(0.0);
        }
        Ok::<(), Error>(())
    };
    if inner {
        let mut buf = Vec::new();
        x.chunks(cb * d)
            .zip(labels.chunks_mut(cb))
            .zip(dist.chunks_mut(cb))
            .try_for_each(|c| work(&mut buf, c))?;
    } else {
        x.par_chunks(cb * d)
            .zip(labels.par_chunks_mut(cb))
            .zip(dist.par_chunks_mut(cb))
            .try_for_each_init(Vec::new, work)?;
    }
    Ok((labels, dist))
}

/// Target size of one thread's block of assignment scores.
const ASSIGN_SCORE_BYTES: usize = 4 << 20;

/// `(j, v)`: the first index of the smallest `v = cn[j] - 2 ip[j]` (`(0, inf)` if none is below infinity), the
/// result of a sequential scan with strict `<`. Two vectorised passes: the smallest value (8 interleaved lanes),
/// then the first position holding it.
#[inline]
fn nearest_shifted(ip: &[f32], cn: &[f32]) -> (usize, f32) {
    const L: usize = 8;
    let n = ip.len().min(cn.len());
    let (ip, cn) = (&ip[..n], &cn[..n]);
    let full = n / L * L;
    let mut lanes = [f32::INFINITY; L];
    for (ips, cs) in ip[..full].chunks_exact(L).zip(cn[..full].chunks_exact(L)) {
        for l in 0..L {
            let v = cs[l] - 2.0 * ips[l];
            lanes[l] = if v < lanes[l] { v } else { lanes[l] };
        }
    }
    let mut best = f32::INFINITY;
    for v in lanes
        .into_iter()
        .chain((full..n).map(|j| cn[j] - 2.0 * ip[j]))
    {
        if v < best {
            best = v;
        }
    }
    if best == f32::INFINITY {
        return (0, best);
    }
    (first_equal_shifted(ip, cn, best), best)
}

/// First `j` with `cn[j] - 2 ip[j] == target` (`0` if none), four lanes at a time with SSE2 (always present on
/// x86_64); the arithmetic is the same as the scalar expression, so the values compare exactly.
#[cfg(target_arch = "x86_64")]
fn first_equal_shifted(ip: &[f32], cn: &[f32], target: f32) -> usize {
    use std::arch::x86_64::{
        _mm_cmpeq_ps, _mm_loadu_ps, _mm_movemask_ps, _mm_mul_ps, _mm_set1_ps, _mm_sub_ps,
    };
    let n = ip.len().min(cn.len());
    let mut j = 0;
    // SAFETY: SSE2 is part of the x86_64 baseline; every load reads 4 floats at j..j + 4 <= n of both slices.
    unsafe {
        let t = _mm_set1_ps(target);
        let two = _mm_set1_ps(2.0);
        while j + 4 <= n {
            let v = _mm_sub_ps(
                _mm_loadu_ps(cn.as_ptr().add(j)),
                _mm_mul_ps(two, _mm_loadu_ps(ip.as_ptr().add(j))),
            );
            let mask = _mm_movemask_ps(_mm_cmpeq_ps(v, t));
            if mask != 0 {
                return j + mask.trailing_zeros() as usize;
            }
            j += 4;
        }
    }
    (j..n).find(|&j| cn[j] - 2.0 * ip[j] == target).unwrap_or(0)
}

/// First `j` with `cn[j] - 2 ip[j] == target` (`0` if none).
#[cfg(not(target_arch = "x86_64"))]
fn first_equal_shifted(ip: &[f32], cn: &[f32], target: f32) -> usize {
    (0..ip.len().min(cn.len()))
        .find(|&j| cn[j] - 2.0 * ip[j] == target)
        .unwrap_or(0)
}

/// Rows of each cluster, in increasing row order (counting sort): `(offsets (k + 1), row ids)`.
pub fn group_by_label(labels: &[u32], k: usize) -> (Vec<usize>, Vec<usize>) {
    let mut offsets = vec![0usize; k + 1];
    for &l in labels {
        offsets[l as usize + 1] += 1;
    }
    for j in 0..k {
        offsets[j + 1] += offsets[j];
    }
    let mut pos = offsets.clone();
    let mut rows = vec![0usize; labels.len()];
    for (i, &l) in labels.iter().enumerate() {
        rows[pos[l as usize]] = i;
        pos[l as usize] += 1;
    }
    (offsets, rows)
}

/// Per-cluster means of the rows grouped by [`group_by_label`] over all workers, and the global cluster sizes.
///
/// Each worker sums its members in row order in f64; the sums (in blocks of clusters, at most ~64 MB of f64 at a
/// time) and the counts are all-reduced, then divided. Empty clusters keep `prev`. With one worker this is the plain
/// row-order f64 mean.
fn update_centroids(
    x: &[f32],
    d: usize,
    offsets: &[usize],
    rows: &[usize],
    prev: &[f32],
    coll: &dyn Communicator,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let k = offsets.len() - 1;
    let mut counts: Vec<f64> = offsets.windows(2).map(|w| (w[1] - w[0]) as f64).collect();
    coll.all_reduce_sum_f64(&mut counts)?;
    let mut c = vec![0f32; k * d];
    let block = ((8usize << 20) / d.max(1)).clamp(1, k.max(1));
    let mut sums = vec![0f64; block * d];
    for j0 in (0..k).step_by(block) {
        let j1 = (j0 + block).min(k);
        let sums = &mut sums[..(j1 - j0) * d];
        sums.par_chunks_mut(d).enumerate().for_each(|(jj, acc)| {
            acc.iter_mut().for_each(|a| *a = 0.0);
            let j = j0 + jj;
            for &r in &rows[offsets[j]..offsets[j + 1]] {
                for (a, &v) in acc.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                    *a += v as f64;
                }
            }
        });
        coll.all_reduce_sum_f64(sums)?;
        c[j0 * d..j1 * d]
            .par_chunks_mut(d)
            .zip(sums.par_chunks(d))
            .enumerate()
            .for_each(|(jj, (cj, acc))| {
                let j = j0 + jj;
                if counts[j] == 0.0 {
                    cj.copy_from_slice(&prev[j * d..(j + 1) * d]);
                    return;
                }
                let inv = 1.0 / counts[j];
                for (o, &a) in cj.iter_mut().zip(acc) {
                    *o = (a * inv) as f32;
                }
            });
    }
    Ok((c, counts.into_iter().map(|v| v as usize).collect()))
}

/// faiss-style empty-cluster repair: each empty cluster takes a copy of a cluster drawn with probability
/// proportional to `size - 1`, and the two are pushed apart symmetrically by a relative `1/1024`.
fn split_empty(centroids: &mut [f32], counts: &mut [usize], d: usize, rng: &mut impl Rng) -> usize {
    const EPS: f32 = 1.0 / 1024.0;
    let k = counts.len();
    let mut n_split = 0;
    for ci in 0..k {
        if counts[ci] != 0 {
            continue;
        }
        let total: usize = counts.iter().map(|&c| c.saturating_sub(1)).sum();
        if total == 0 {
            break;
        }
        let mut r = rng.random_range(0..total);
        let mut cj = 0;
        for (j, &c) in counts.iter().enumerate() {
            let w = c.saturating_sub(1);
            if r < w {
                cj = j;
                break;
            }
            r -= w;
        }
        for p in 0..d {
            let v = centroids[cj * d + p];
            let (a, b) = if p % 2 == 0 {
                (v * (1.0 + EPS), v * (1.0 - EPS))
            } else {
                (v * (1.0 - EPS), v * (1.0 + EPS))
            };
            centroids[ci * d + p] = a;
            centroids[cj * d + p] = b;
        }
        counts[ci] = counts[cj] / 2;
        counts[cj] -= counts[ci];
        n_split += 1;
    }
    n_split
}

/// Greedy k-means++ seeding on `x` (`n x d`), returning `k x d` centroids.
pub fn kmeans_plus_plus(
    x: &[f32],
    d: usize,
    k: usize,
    n_local_trials: Option<usize>,
    rng: &mut impl Rng,
) -> Result<Vec<f32>> {
    kmeans_plus_plus_sharded(x, d, k, n_local_trials, rng, &SingleProcess)
}

/// The rows of `x` (this worker's contiguous part of the pool, `d` columns) whose global indices are `ids`
/// (ascending), gathered from all workers in that order. `row_offsets[r]` = first global row of worker `r`.
fn gather_rows(
    x: &[f32],
    d: usize,
    ids: &[usize],
    row_offsets: &[usize],
    coll: &dyn Communicator,
) -> Result<Vec<f32>> {
    Ok(coll.all_gather_f32(&owned_rows(x, d, ids, row_offsets[coll.rank()]))?)
}

/// Copies of the rows among global indices `ids` that this worker holds (`x` = its rows, the first being global
/// row `lo`), in the order of `ids`; copied in parallel.
fn owned_rows(x: &[f32], d: usize, ids: &[usize], lo: usize) -> Vec<f32> {
    let hi = lo + x.len() / d.max(1);
    let local: Vec<usize> = ids
        .iter()
        .filter(|&&i| (lo..hi).contains(&i))
        .map(|&i| i - lo)
        .collect();
    let mut rows = vec![0f32; local.len() * d];
    rows.par_chunks_mut(d.max(1))
        .zip(&local)
        .for_each(|(dst, &i)| dst.copy_from_slice(&x[i * d..(i + 1) * d]));
    rows
}

/// Exclusive prefix sums: `[0, a0, a0 + a1, ...]` (length `counts.len() + 1`).
fn prefix(counts: &[usize]) -> Vec<usize> {
    let mut p = Vec::with_capacity(counts.len() + 1);
    p.push(0);
    for &c in counts {
        p.push(p[p.len() - 1] + c);
    }
    p
}

/// [`kmeans_plus_plus`] over a pool split by rows between the workers of `coll` (`x` = this worker's rows, in
/// rank order); every worker gets the same `k x d` centroids. `rng` must be seeded identically on every worker.
///
/// D² stays with the worker that owns the rows: per step the workers exchange their D² totals, the owner of each
/// sampled candidate contributes its row, and the candidates' potentials are all-reduced. With one worker this is
/// exactly the single-process algorithm.
pub fn kmeans_plus_plus_sharded(
    x: &[f32],
    d: usize,
    k: usize,
    n_local_trials: Option<usize>,
    rng: &mut impl Rng,
    coll: &dyn Communicator,
) -> Result<Vec<f32>> {
    let n_local = check_rows("k-means++", x.len(), d)?;
    let counts = gather_row_counts(coll, n_local)?;
    let offsets = prefix(&counts);
    let n = offsets[counts.len()];
    if k == 0 || k > n {
        return Err(invalid(
            "k",
            format!("k-means++ needs 1 <= k <= n (the number of rows), got k = {k}, n = {n}"),
        ));
    }
    let trials = n_local_trials
        .unwrap_or(2 + (k as f64).ln().floor() as usize)
        .max(1);
    let me = coll.rank();
    let world = counts.len();
    let xn = sq_norms(x, d);
    let mut centers = Vec::with_capacity(k * d);
    let first = rng.random_range(0..n);
    centers.extend(gather_rows(x, d, &[first], &offsets, coll)?);
    // D^2 of this worker's rows to the nearest chosen centre, in f64.
    let dist_to = |cands: &[f32]| -> Result<Vec<f64>> {
        // n_local x t squared distances, row-major.
        let t = cands.len() / d;
        let cn = sq_norms(cands, d);
        let packed = pack_rows(cands, t, d)?;
        let mut out = vec![0f64; n_local * t];
        if n_local == 0 {
            return Ok(out);
        }
        let cb = 4096usize.min(n_local.div_ceil(threads()).max(1));
        x.par_chunks(cb * d)
            .zip(out.par_chunks_mut(cb * t))
            .zip(xn.par_chunks(cb))
            .try_for_each(|((xs, o), xns)| {
                let m = xns.len();
                let mut buf = vec![0f32; m * t];
                matmul_abt_packed(xs, m, &packed, &mut buf, false)?;
                for i in 0..m {
                    for j in 0..t {
                        o[i * t + j] = ((xns[i] + cn[j] - 2.0 * buf[i * t + j]) as f64).max(0.0);
                    }
                }
                Ok::<(), Error>(())
            })?;
        Ok(out)
    };
    let mut d2 = dist_to(&centers)?;
    let mut cum = vec![0f64; n_local];
    for _ in 1..k {
        let mut acc = 0.0;
        for (c, &v) in cum.iter_mut().zip(&d2) {
            acc += v;
            *c = acc;
        }
        let totals = coll.all_gather_f64(&[acc])?;
        let mut starts = Vec::with_capacity(world + 1);
        starts.push(0.0f64);
        for &t in &totals {
            starts.push(starts[starts.len() - 1] + t);
        }
        let total = starts[world];
        // Per trial: the owning worker and, on the owner, the local row.
        let mut owner = Vec::with_capacity(trials);
        let mut local_ids = Vec::with_capacity(trials);
        for _ in 0..trials {
            if total > 0.0 {
                let r = rng.random::<f64>() * total;
                // The first worker with rows whose D^2 interval reaches past r (the last one with rows if rounding
                // puts r at the very end).
                let w = (0..world)
                    .find(|&w| counts[w] > 0 && starts[w + 1] > r)
                    .or_else(|| (0..world).rev().find(|&w| counts[w] > 0))
                    .unwrap_or(0);
                owner.push(w);
                local_ids.push(if w == me {
                    let rr = r - starts[w];
                    cum.partition_point(|&c| c <= rr).min(n_local - 1)
                } else {
                    0
                });
            } else {
                let g = rng.random_range(0..n);
                let w = offsets.partition_point(|&o| o <= g) - 1;
                owner.push(w);
                local_ids.push(g - offsets[w]);
            }
        }
        let mine: Vec<f32> = (0..trials)
            .filter(|&j| owner[j] == me)
            .flat_map(|j| x[local_ids[j] * d..(local_ids[j] + 1) * d].iter().copied())
            .collect();
        let gathered = coll.all_gather_f32(&mine)?;
        // Gathered rows come grouped by worker; put them back in trial order.
        let mut cands = vec![0f32; trials * d];
        let mut pos = 0;
        for w in 0..world {
            for j in (0..trials).filter(|&j| owner[j] == w) {
                let src = gathered.get(pos * d..(pos + 1) * d).ok_or_else(|| {
                    Error::Dist(dinov2_dist::Error::Mismatch {
                        rank: me,
                        reason: "k-means++: a rank sent too few candidate rows".into(),
                    })
                })?;
                cands[j * d..(j + 1) * d].copy_from_slice(src);
                pos += 1;
            }
        }
        let dc = dist_to(&cands)?;
        let t = trials;
        let mut pots: Vec<f64> = (0..t)
            .into_par_iter()
            .map(|j| {
                d2.iter()
                    .enumerate()
                    .map(|(i, &v)| v.min(dc[i * t + j]))
                    .sum()
            })
            .collect();
        coll.all_reduce_sum_f64(&mut pots)?;
        let mut best = 0;
        for j in 1..t {
            if pots[j] < pots[best] {
                best = j;
            }
        }
        d2.par_iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = v.min(dc[i * t + best]));
        centers.extend_from_slice(&cands[best * d..(best + 1) * d]);
    }
    Ok(centers)
}

/// Trains k-means on the rows of `x` (`n x d`).
///
/// ```
/// use dinov2_curate::kmeans::{train, KMeansConfig};
/// let x = [0.0, 0.0, 0.1, 0.0, 10.0, 10.0, 10.1, 10.0];
/// let km = train(&x, 2, &KMeansConfig::new(2)).unwrap();
/// let (labels, _) = dinov2_curate::kmeans::assign(&x, 2, &km.centroids).unwrap();
/// assert_eq!(labels[0], labels[1]);
/// assert_ne!(labels[0], labels[2]);
/// ```
pub fn train(x: &[f32], d: usize, cfg: &KMeansConfig) -> Result<KMeans> {
    train_with_progress(x, d, cfg, &mut |_, _| {})
}

/// [`train`] with a callback `(iteration, objective)` after every Lloyd assignment step.
pub fn train_with_progress(
    x: &[f32],
    d: usize,
    cfg: &KMeansConfig,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<KMeans> {
    train_resumable(x, d, cfg, None, progress, &mut |_| Ok(()))
}

/// State after a Lloyd iteration, enough to resume training.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KMeansCheckpoint {
    /// Centroids after `iterations` updates (`k x d`).
    #[serde(skip)]
    pub centroids: Vec<f32>,
    /// Lloyd iterations completed.
    pub iterations: usize,
    /// Objective at each completed assignment step.
    pub objective_history: Vec<f64>,
}

/// [`train_with_progress`] that can start from a checkpoint and reports one after every iteration
/// (`on_iter`; an error there aborts training). The subsample and the per-iteration randomness (empty-cluster
/// splits) depend only on the seed and the iteration number, so a resumed run ends with the same centroids as an
/// uninterrupted one.
pub fn train_resumable(
    x: &[f32],
    d: usize,
    cfg: &KMeansConfig,
    resume: Option<KMeansCheckpoint>,
    progress: &mut dyn FnMut(usize, f64),
    on_iter: &mut dyn FnMut(&KMeansCheckpoint) -> Result<()>,
) -> Result<KMeans> {
    train_sharded(x, d, cfg, &SingleProcess, resume, progress, on_iter)
}

/// [`train_resumable`] over a pool split by rows between the workers of `coll`: `x` holds this worker's
/// contiguous rows (rank 0 the first ones), every worker calls this with the same `cfg` (and checkpoint), and every
/// worker returns the same model.
///
/// The subsample, the random initial rows and the empty-cluster splits are drawn from the global row numbering,
/// so the model depends on the pool and the seed, not on how it is split (up to the order of the f64 additions:
/// per-cluster sums are added worker by worker). The only cross-worker traffic is through `coll`: row counts,
/// the sampled rows, k-means++ totals and potentials, and per iteration the objective, the number of changed
/// assignments, the cluster sizes and the per-cluster f64 sums.
///
/// ```
/// use dinov2_dist::{shard_range, Communicator, ThreadGroup};
/// use dinov2_curate::kmeans::{train, train_sharded, KMeansConfig};
/// let x: Vec<f32> = (0..40).map(|i| ((i * 7919) % 97) as f32 / 97.0).collect(); // 20 rows, d = 2
/// let cfg = KMeansConfig::new(3);
/// let single = train(&x, 2, &cfg).unwrap();
/// let ranks = ThreadGroup::new(2).unwrap();
/// let models: Vec<_> = std::thread::scope(|s| {
///     let hs: Vec<_> = ranks
///         .into_iter()
///         .map(|r| {
///             let x = &x;
///             let cfg = &cfg;
///             s.spawn(move || {
///                 let rows = shard_range(20, 2, r.rank());
///                 let local = &x[rows.start * 2..rows.end * 2];
///                 train_sharded(local, 2, cfg, &r, None, &mut |_, _| {}, &mut |_| Ok(())).unwrap()
///             })
///         })
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// for m in &models {
///     for (a, b) in m.centroids.iter().zip(&single.centroids) {
///         assert!((a - b).abs() < 1e-6);
///     }
/// }
/// ```
pub fn train_sharded(
    x: &[f32],
    d: usize,
    cfg: &KMeansConfig,
    coll: &dyn Communicator,
    resume: Option<KMeansCheckpoint>,
    progress: &mut dyn FnMut(usize, f64),
    on_iter: &mut dyn FnMut(&KMeansCheckpoint) -> Result<()>,
) -> Result<KMeans> {
    let n_local = check_rows("k-means", x.len(), d)?;
    let counts = gather_row_counts(coll, n_local)?;
    let offsets = prefix(&counts);
    let n = offsets[counts.len()];
    let me = coll.rank();
    let k = cfg.k;
    if k == 0 || k > n {
        return Err(invalid(
            "k",
            format!("k-means needs 1 <= k <= n (the number of rows), got k = {k}, n = {n}"),
        ));
    }
    if let Some(c) = &resume {
        if c.centroids.len() != k * d {
            return Err(Error::Shape {
                op: "k-means resume",
                reason: format!(
                    "the checkpoint has {} centroid values, expected {k} x {d}",
                    c.centroids.len()
                ),
            });
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    // The training rows: all, or a subsample drawn from the global numbering (each worker keeps its own).
    let sub: Option<Vec<f32>> = match cfg.max_points_per_centroid {
        Some(m) if n > k.saturating_mul(m) => {
            let mut idx = sample(&mut rng, n, k * m).into_vec();
            idx.sort_unstable();
            Some(owned_rows(x, d, &idx, offsets[me]))
        }
        _ => None,
    };
    let xt: &[f32] = sub.as_deref().unwrap_or(x);
    let t_counts = if sub.is_some() {
        gather_row_counts(coll, xt.len() / d)?
    } else {
        counts
    };
    let t_offsets = prefix(&t_counts);
    let nt = t_offsets[t_counts.len()];
    let (start, mut history, resumed) = match resume {
        Some(c) => (c.iterations, c.objective_history, Some(c.centroids)),
        None => (0, Vec::new(), None),
    };
    let mut centroids = match (resumed, cfg.init) {
        (Some(c), _) => c,
        (None, Init::KMeansPlusPlus) => {
            kmeans_plus_plus_sharded(xt, d, k, cfg.n_local_trials, &mut rng, coll)?
        }
        (None, Init::Random) => {
            let mut idx = sample(&mut rng, nt, k).into_vec();
            idx.sort_unstable();
            gather_rows(xt, d, &idx, &t_offsets, coll)?
        }
    };
    let mut prev_labels: Option<Vec<u32>> = None;
    let mut iterations = start;
    for it in start..cfg.n_iter {
        let (labels, dist) = assign(xt, d, &centroids)?;
        let changed = prev_labels
            .as_ref()
            .map_or(1, |p| p.iter().zip(&labels).filter(|(a, b)| a != b).count());
        let mut stats = [dist.iter().map(|&v| v as f64).sum::<f64>(), changed as f64];
        coll.all_reduce_sum_f64(&mut stats)?;
        let [obj, changed] = stats;
        progress(it, obj);
        let unchanged = prev_labels.is_some() && changed == 0.0;
        let small = history
            .last()
            .is_some_and(|&last: &f64| last > 0.0 && (last - obj) / last < cfg.tol);
        history.push(obj);
        if unchanged || small {
            break;
        }
        let (offsets, rows) = group_by_label(&labels, k);
        let (new_centroids, mut sizes) =
            update_centroids(xt, d, &offsets, &rows, &centroids, coll)?;
        centroids = new_centroids;
        let mut it_rng = rand::rngs::StdRng::seed_from_u64(
            cfg.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(it as u64 + 1),
        );
        split_empty(&mut centroids, &mut sizes, d, &mut it_rng);
        prev_labels = Some(labels);
        iterations = it + 1;
        on_iter(&KMeansCheckpoint {
            centroids: centroids.clone(),
            iterations,
            objective_history: history.clone(),
        })?;
    }
    Ok(KMeans {
        k,
        d,
        centroids,
        objective_history: history,
        iterations,
    })
}

impl KMeans {
    /// Assigns rows to their nearest centroid (`labels, squared distances`).
    pub fn assign(&self, x: &[f32]) -> Result<(Vec<u32>, Vec<f32>)> {
        assign(x, self.d, &self.centroids)
    }

    /// Sum of squared distances of `x`'s rows to their nearest centroid (f64).
    pub fn objective(&self, x: &[f32]) -> Result<f64> {
        Ok(self.assign(x)?.1.iter().map(|&v| v as f64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n_per: usize, centers: &[[f32; 2]], seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = Vec::new();
        for c in centers {
            for _ in 0..n_per {
                v.push(c[0] + rng.random::<f32>() * 0.1);
                v.push(c[1] + rng.random::<f32>() * 0.1);
            }
        }
        v
    }

    #[test]
    fn nearest_shifted_is_the_first_minimum_of_a_sequential_scan() {
        let scan = |ip: &[f32], cn: &[f32]| {
            let (mut bv, mut bi) = (f32::INFINITY, 0);
            for j in 0..ip.len() {
                let v = cn[j] - 2.0 * ip[j];
                if v < bv {
                    bv = v;
                    bi = j;
                }
            }
            (bi, bv)
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for len in [1usize, 5, 8, 9, 16, 23, 100] {
            for _ in 0..50 {
                // Few distinct values: many ties, across lanes and in the tail.
                let ip: Vec<f32> = (0..len).map(|_| rng.random_range(0..4) as f32).collect();
                let mut cn: Vec<f32> = (0..len).map(|_| rng.random_range(0..3) as f32).collect();
                if len > 3 && rng.random::<bool>() {
                    cn[1] = f32::NAN;
                    cn[2] = f32::INFINITY;
                }
                assert_eq!(nearest_shifted(&ip, &cn), scan(&ip, &cn), "{ip:?} {cn:?}");
            }
        }
        let all_nan = [f32::NAN; 11];
        assert_eq!(nearest_shifted(&all_nan, &all_nan), (0, f32::INFINITY));
    }

    #[test]
    fn assign_matches_brute_force() {
        let x = blobs(50, &[[0.0, 0.0], [1.0, 3.0], [5.0, -1.0]], 1);
        let c = [0.1f32, 0.2, 4.0, -1.0, 1.0, 2.5, -3.0, 0.0];
        let (l, ds) = assign(&x, 2, &c).unwrap();
        for (i, r) in x.chunks(2).enumerate() {
            let dd: Vec<f32> = c
                .chunks(2)
                .map(|cc| (r[0] - cc[0]).powi(2) + (r[1] - cc[1]).powi(2))
                .collect();
            let best = dd.iter().cloned().fold(f32::INFINITY, f32::min);
            assert!((dd[l[i] as usize] - best).abs() < 1e-4);
            assert!((ds[i] - best).abs() < 1e-4);
        }
    }

    #[test]
    fn recovers_separated_blobs_both_inits() {
        let centers = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let x = blobs(100, &centers, 2);
        for init in [Init::KMeansPlusPlus, Init::Random] {
            let cfg = KMeansConfig {
                init,
                seed: 5,
                ..KMeansConfig::new(4)
            };
            let km = train(&x, 2, &cfg).unwrap();
            // Optimal objective: every blob around its own mean.
            let mut opt = 0.0f64;
            for b in x.chunks(200) {
                let m0 = b.chunks(2).map(|r| r[0] as f64).sum::<f64>() / 100.0;
                let m1 = b.chunks(2).map(|r| r[1] as f64).sum::<f64>() / 100.0;
                opt += b
                    .chunks(2)
                    .map(|r| (r[0] as f64 - m0).powi(2) + (r[1] as f64 - m1).powi(2))
                    .sum::<f64>();
            }
            // Objective of the trained centroids, in f64 by definition.
            let obj: f64 = x
                .chunks(2)
                .map(|r| {
                    km.centroids
                        .chunks(2)
                        .map(|c| {
                            (r[0] as f64 - c[0] as f64).powi(2)
                                + (r[1] as f64 - c[1] as f64).powi(2)
                        })
                        .fold(f64::INFINITY, f64::min)
                })
                .sum();
            if init == Init::KMeansPlusPlus {
                assert!((obj - opt).abs() / opt < 1e-3, "{obj} vs {opt}");
            }
            assert!(obj >= opt * (1.0 - 1e-4));
            // Objective never increases across Lloyd iterations.
            for w in km.objective_history.windows(2) {
                assert!(w[1] <= w[0] * (1.0 + 1e-6));
            }
        }
    }

    #[test]
    fn resumed_training_matches_uninterrupted() {
        // Uniform points: Lloyd keeps moving for many iterations.
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let x: Vec<f32> = (0..600).map(|_| rng.random::<f32>()).collect();
        let cfg = KMeansConfig {
            k: 7,
            n_iter: 6,
            tol: 0.0,
            ..KMeansConfig::new(7)
        };
        let full = train(&x, 2, &cfg).unwrap();
        let mut saved = None;
        let short = KMeansConfig {
            n_iter: 3,
            ..cfg.clone()
        };
        train_resumable(&x, 2, &short, None, &mut |_, _| {}, &mut |c| {
            saved = Some(c.clone());
            Ok(())
        })
        .unwrap();
        let ck = saved.unwrap();
        assert_eq!(ck.iterations, 3);
        let resumed =
            train_resumable(&x, 2, &cfg, Some(ck), &mut |_, _| {}, &mut |_| Ok(())).unwrap();
        assert_eq!(resumed.centroids, full.centroids);
        assert_eq!(resumed.iterations, full.iterations);
    }

    #[test]
    fn deterministic_and_handles_empty_clusters() {
        // Duplicated points force empty clusters with random init.
        let mut x: Vec<f32> = std::iter::repeat_n([1.0f32, 2.0], 40).flatten().collect();
        x.extend(std::iter::repeat_n([5.0f32, 3.0], 10).flatten());
        let cfg = KMeansConfig {
            init: Init::Random,
            seed: 1,
            ..KMeansConfig::new(6)
        };
        let a = train(&x, 2, &cfg).unwrap();
        let b = train(&x, 2, &cfg).unwrap();
        assert_eq!(a.centroids, b.centroids);
        assert!(a.centroids.iter().all(|v| v.is_finite()));
        // Both point groups get their own centroid (up to the 1/1024 split perturbation); merged they would cost
        // 40 * 10 / 50 * |(4, 1)|^2 = 136.
        assert!(a.objective(&x).unwrap() < 1e-2, "{:?}", a.centroids);
        assert!(train(&x, 2, &KMeansConfig::new(51)).is_err());
    }
}
