//! k-means: greedy k-means++ initialisation (`2 + ln k` local trials, float64 potentials), Lloyd iterations with
//! GEMM assignment and float64 accumulation, empty-cluster splitting, early stop and optional subsampling.
//!
//! Distances are squared L2. Centroid updates group rows by cluster and sum them in row order in f64, so results
//! are deterministic for a given seed whatever the thread count.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{CurateError, Result};
use crate::linalg::{matmul_abt, sq_norms, threads};

/// Initialisation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Init {
    /// Greedy k-means++ (scikit-learn / ssl-data-curation flavour).
    KMeansPlusPlus,
    /// `k` distinct rows drawn uniformly (faiss's default).
    Random,
}

/// k-means parameters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    if d == 0 || x.len() % d != 0 || centroids.len() % d != 0 || centroids.is_empty() {
        return Err(CurateError::Shape(format!(
            "assign: {} values / {} centroid values, dim {d}",
            x.len(),
            centroids.len()
        )));
    }
    let n = x.len() / d;
    let k = centroids.len() / d;
    let cn = sq_norms(centroids, d);
    let mut labels = vec![0u32; n];
    let mut dist = vec![0f32; n];
    let cb = (1 << 22) / k.max(1); // ~16 MB of scores per chunk
    let cb = cb.clamp(16, 4096).min(n.div_ceil(threads()).max(1));
    let inner = n.div_ceil(cb) < threads();
    let work = |((xs, ls), ds): ((&[f32], &mut [u32]), &mut [f32])| -> Result<()> {
        let m = ls.len();
        let mut buf = vec![0f32; m * k];
        matmul_abt(xs, m, centroids, k, d, &mut buf, inner)?;
        for i in 0..m {
            let xn: f32 = xs[i * d..(i + 1) * d].iter().map(|v| v * v).sum();
            let row = &buf[i * k..(i + 1) * k];
            let mut best = f32::INFINITY;
            let mut bi = 0usize;
            for (j, (&ip, &c)) in row.iter().zip(cn.iter()).enumerate() {
                let dd = c - 2.0 * ip;
                if dd < best {
                    best = dd;
                    bi = j;
                }
            }
            ls[i] = bi as u32;
            ds[i] = (best + xn).max(0.0);
        }
        Ok(())
    };
    if inner {
        x.chunks(cb * d)
            .zip(labels.chunks_mut(cb))
            .zip(dist.chunks_mut(cb))
            .try_for_each(work)?;
    } else {
        x.par_chunks(cb * d)
            .zip(labels.par_chunks_mut(cb))
            .zip(dist.par_chunks_mut(cb))
            .try_for_each(work)?;
    }
    Ok((labels, dist))
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

/// Per-cluster means (f64 accumulation) of the rows grouped by [`group_by_label`]; empty clusters keep `prev`.
fn update_centroids(
    x: &[f32],
    d: usize,
    offsets: &[usize],
    rows: &[usize],
    prev: &[f32],
) -> Vec<f32> {
    let k = offsets.len() - 1;
    let mut c = vec![0f32; k * d];
    c.par_chunks_mut(d).enumerate().for_each(|(j, cj)| {
        let members = &rows[offsets[j]..offsets[j + 1]];
        if members.is_empty() {
            cj.copy_from_slice(&prev[j * d..(j + 1) * d]);
            return;
        }
        let mut acc = vec![0f64; d];
        for &r in members {
            for (a, &v) in acc.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                *a += v as f64;
            }
        }
        let inv = 1.0 / members.len() as f64;
        for (o, a) in cj.iter_mut().zip(acc) {
            *o = (a * inv) as f32;
        }
    });
    c
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
    let n = x.len() / d.max(1);
    if k == 0 || k > n {
        return Err(CurateError::InvalidArgument(format!(
            "k-means++ needs 1 <= k <= n, got k={k}, n={n}"
        )));
    }
    let trials = n_local_trials
        .unwrap_or(2 + (k as f64).ln().floor() as usize)
        .max(1);
    let xn = sq_norms(x, d);
    let mut centers = Vec::with_capacity(k * d);
    let first = rng.random_range(0..n);
    centers.extend_from_slice(&x[first * d..(first + 1) * d]);
    // D^2 to the nearest chosen centre, in f64.
    let dist_to = |cands: &[f32]| -> Result<Vec<f64>> {
        // n x t squared distances, row-major.
        let t = cands.len() / d;
        let cn = sq_norms(cands, d);
        let mut out = vec![0f64; n * t];
        let cb = 4096usize.min(n.div_ceil(threads()).max(1));
        x.par_chunks(cb * d)
            .zip(out.par_chunks_mut(cb * t))
            .zip(xn.par_chunks(cb))
            .try_for_each(|((xs, o), xns)| {
                let m = xns.len();
                let mut buf = vec![0f32; m * t];
                matmul_abt(xs, m, cands, t, d, &mut buf, false)?;
                for i in 0..m {
                    for j in 0..t {
                        o[i * t + j] = ((xns[i] + cn[j] - 2.0 * buf[i * t + j]) as f64).max(0.0);
                    }
                }
                Ok::<(), CurateError>(())
            })?;
        Ok(out)
    };
    let mut d2 = dist_to(&centers)?;
    let mut cum = vec![0f64; n];
    for _ in 1..k {
        let mut acc = 0.0;
        for (c, &v) in cum.iter_mut().zip(&d2) {
            acc += v;
            *c = acc;
        }
        let mut cand_ids = Vec::with_capacity(trials);
        for _ in 0..trials {
            let id = if acc > 0.0 {
                let r = rng.random::<f64>() * acc;
                cum.partition_point(|&c| c <= r).min(n - 1)
            } else {
                rng.random_range(0..n)
            };
            cand_ids.push(id);
        }
        let cands: Vec<f32> = cand_ids
            .iter()
            .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
            .collect();
        let dc = dist_to(&cands)?;
        let t = trials;
        let pots: Vec<f64> = (0..t)
            .into_par_iter()
            .map(|j| {
                d2.iter()
                    .enumerate()
                    .map(|(i, &v)| v.min(dc[i * t + j]))
                    .sum()
            })
            .collect();
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
    if d == 0 || x.len() % d != 0 {
        return Err(CurateError::Shape(format!(
            "{} values are not rows of dim {d}",
            x.len()
        )));
    }
    let n = x.len() / d;
    let k = cfg.k;
    if k == 0 || k > n {
        return Err(CurateError::InvalidArgument(format!(
            "k-means needs 1 <= k <= n, got k={k}, n={n}"
        )));
    }
    if let Some(c) = &resume {
        if c.centroids.len() != k * d {
            return Err(CurateError::Shape(format!(
                "checkpoint has {} centroid values, expected {k} x {d}",
                c.centroids.len()
            )));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let sub: Option<Vec<f32>> = match cfg.max_points_per_centroid {
        Some(m) if n > k.saturating_mul(m) => {
            let mut idx = sample(&mut rng, n, k * m).into_vec();
            idx.sort_unstable();
            Some(
                idx.iter()
                    .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
                    .collect(),
            )
        }
        _ => None,
    };
    let xt: &[f32] = sub.as_deref().unwrap_or(x);
    let nt = xt.len() / d;
    let (start, mut history, resumed) = match resume {
        Some(c) => (c.iterations, c.objective_history, Some(c.centroids)),
        None => (0, Vec::new(), None),
    };
    let mut centroids = match (resumed, cfg.init) {
        (Some(c), _) => c,
        (None, Init::KMeansPlusPlus) => kmeans_plus_plus(xt, d, k, cfg.n_local_trials, &mut rng)?,
        (None, Init::Random) => {
            let mut idx = sample(&mut rng, nt, k).into_vec();
            idx.sort_unstable();
            idx.iter()
                .flat_map(|&i| xt[i * d..(i + 1) * d].iter().copied())
                .collect()
        }
    };
    let mut prev_labels: Option<Vec<u32>> = None;
    let mut iterations = start;
    for it in start..cfg.n_iter {
        let (labels, dist) = assign(xt, d, &centroids)?;
        let obj: f64 = dist.iter().map(|&v| v as f64).sum();
        progress(it, obj);
        let unchanged = prev_labels.as_ref().is_some_and(|p| *p == labels);
        let small = history
            .last()
            .is_some_and(|&last: &f64| last > 0.0 && (last - obj) / last < cfg.tol);
        history.push(obj);
        if unchanged || small {
            break;
        }
        let (offsets, rows) = group_by_label(&labels, k);
        centroids = update_centroids(xt, d, &offsets, &rows, &centroids);
        let mut counts: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
        let mut it_rng = rand::rngs::StdRng::seed_from_u64(
            cfg.seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(it as u64 + 1),
        );
        split_empty(&mut centroids, &mut counts, d, &mut it_rng);
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
