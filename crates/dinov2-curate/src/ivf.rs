//! IVF-Flat index: a k-means coarse quantiser, inverted lists holding full vectors (reordered contiguously), and
//! search that probes the `nprobe` nearest lists, batching the queries of each list into one GEMM.

use std::sync::Mutex;

use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::error::{check_rows, Error, Result};
use crate::kmeans::{self, group_by_label, Init, KMeansConfig};
use crate::knn::{exact_knn, KnnResult, TopK};
use crate::linalg::{matmul_abt, matmul_abt_packed, pack_rows, sq_norms};
use dinov2_dist::{shard_range, Communicator, SingleProcess};

/// IVF construction parameters.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IvfParams {
    /// Number of inverted lists (coarse centroids).
    pub nlist: usize,
    /// Lloyd iterations of the coarse quantiser.
    pub train_iters: usize,
    /// Coarse k-means trains on at most `nlist * max_points_per_centroid` rows.
    pub max_points_per_centroid: usize,
    /// Seed.
    pub seed: u64,
}

impl IvfParams {
    /// `nlist` lists, 10 training iterations, 64 points per centroid, seed 0.
    pub fn new(nlist: usize) -> Self {
        Self {
            nlist,
            train_iters: 10,
            max_points_per_centroid: 64,
            seed: 0,
        }
    }
}

/// IVF-Flat index over inner product (cosine on normalised rows); lists are chosen by L2 to the coarse centroids.
#[derive(Debug, Clone)]
pub struct IvfFlat {
    d: usize,
    centroids: Vec<f32>,
    centroid_norms: Vec<f32>,
    offsets: Vec<usize>,
    ids: Vec<i64>,
    vecs: Vec<f32>,
}

impl IvfFlat {
    /// Trains the coarse quantiser on a subsample of `base` and fills the lists with all of `base`'s rows.
    pub fn build(base: &[f32], d: usize, params: &IvfParams) -> Result<Self> {
        Self::build_sharded(base, d, params, &SingleProcess)
    }

    /// [`IvfFlat::build`] by the ranks of `comm` together, each passing the whole `base`: the coarse quantiser is
    /// trained by [`kmeans::train_sharded`] on the ranks' contiguous shares of the rows and each rank assigns its
    /// share to the lists; the list labels are gathered (one `i64` per row, once), so every rank holds the same
    /// index as [`IvfFlat::build`] up to the order of the f64 additions of the k-means sums.
    pub fn build_sharded(
        base: &[f32],
        d: usize,
        params: &IvfParams,
        comm: &dyn Communicator,
    ) -> Result<Self> {
        let n = check_rows("IVF build", base.len(), d)?;
        let nlist = params.nlist.min(n).max(1);
        let cfg = KMeansConfig {
            k: nlist,
            n_iter: params.train_iters,
            init: Init::Random,
            n_local_trials: None,
            seed: params.seed,
            max_points_per_centroid: Some(params.max_points_per_centroid.max(1)),
            tol: 1e-4,
        };
        let mine = shard_range(n, comm.world_size(), comm.rank());
        let local = &base[mine.start * d..mine.end * d];
        let km =
            kmeans::train_sharded(local, d, &cfg, comm, None, &mut |_, _| {}, &mut |_| Ok(()))?;
        let (local_labels, _) = km.assign(local)?;
        let labels: Vec<u32> = if comm.world_size() == 1 {
            local_labels
        } else {
            let l: Vec<i64> = local_labels.iter().map(|&l| l as i64).collect();
            comm.all_gather_i64(&l)?
                .into_iter()
                .map(|l| l as u32)
                .collect()
        };
        let (offsets, rows) = group_by_label(&labels, nlist);
        let mut vecs = vec![0f32; n * d];
        vecs.par_chunks_mut(d)
            .zip(rows.par_iter())
            .for_each(|(dst, &r)| dst.copy_from_slice(&base[r * d..(r + 1) * d]));
        let ids = rows.iter().map(|&r| r as i64).collect();
        let centroid_norms = sq_norms(&km.centroids, d);
        Ok(Self {
            d,
            centroids: km.centroids,
            centroid_norms,
            offsets,
            ids,
            vecs,
        })
    }

    /// Number of lists.
    pub fn nlist(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Number of indexed vectors.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True if the index holds no vectors.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Sizes of the inverted lists.
    pub fn list_sizes(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Approximate k-NN by inner product, probing the `nprobe` closest lists of each query. `self_offset` as in
    /// [`crate::knn::exact_knn`].
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        nprobe: usize,
        self_offset: Option<usize>,
    ) -> Result<KnnResult> {
        let d = self.d;
        let nq = check_rows("IVF search", queries.len(), d)?;
        let nlist = self.nlist();
        let nprobe = nprobe.clamp(1, nlist);
        let mut res = KnnResult {
            k,
            ids: vec![-1; nq * k],
            sims: vec![f32::NEG_INFINITY; nq * k],
        };
        if nq == 0 || k == 0 {
            return Ok(res);
        }
        for (ci, (sims_c, ids_c)) in res
            .sims
            .chunks_mut(QUERY_CHUNK * k)
            .zip(res.ids.chunks_mut(QUERY_CHUNK * k))
            .enumerate()
        {
            let q0 = ci * QUERY_CHUNK;
            let m = sims_c.len() / k;
            let qs = &queries[q0 * d..(q0 + m) * d];
            // Coarse scores 2 q.c - |c|^2 (larger = closer in L2), top nprobe lists per query; sub-blocks of
            // queries in parallel, each with its own cache-sized score buffer.
            let packed = pack_rows(&self.centroids, nlist, d)?;
            let mut probe_s = vec![0f32; m * nprobe];
            let mut probe_l = vec![0i64; m * nprobe];
            probe_s
                .par_chunks_mut(COARSE_BLOCK * nprobe)
                .zip(probe_l.par_chunks_mut(COARSE_BLOCK * nprobe))
                .enumerate()
                .try_for_each_init(Vec::new, |sc: &mut Vec<f32>, (bi, (ps, pl))| {
                    let mb = ps.len() / nprobe;
                    let qb = &qs[bi * COARSE_BLOCK * d..(bi * COARSE_BLOCK + mb) * d];
                    sc.resize(mb * nlist, 0.0);
                    matmul_abt_packed(qb, mb, &packed, sc, false)?;
                    for (qi, (ps, pl)) in
                        ps.chunks_mut(nprobe).zip(pl.chunks_mut(nprobe)).enumerate()
                    {
                        let mut h = TopK::new(ps, pl);
                        for (j, (&s, &cn)) in sc[qi * nlist..(qi + 1) * nlist]
                            .iter()
                            .zip(&self.centroid_norms)
                            .enumerate()
                        {
                            h.push(2.0 * s - cn, j as i64);
                        }
                    }
                    Ok::<(), Error>(())
                })?;
            // Invert: queries per list.
            let mut counts = vec![0usize; nlist + 1];
            for &l in &probe_l {
                counts[l as usize + 1] += 1;
            }
            for j in 0..nlist {
                counts[j + 1] += counts[j];
            }
            let mut pos = counts.clone();
            let mut by_list = vec![0u32; probe_l.len()];
            for (e, &l) in probe_l.iter().enumerate() {
                by_list[pos[l as usize]] = (e / nprobe) as u32;
                pos[l as usize] += 1;
            }
            let heaps: Vec<Mutex<TopK>> = sims_c
                .chunks_mut(k)
                .zip(ids_c.chunks_mut(k))
                .map(|(s, i)| Mutex::new(TopK::new(s, i)))
                .collect();
            // Tasks = (list, block of its queries): a list probed by many queries (inverted lists of real data
            // are unbalanced, and a few lists are probed by most queries) is split over all threads. Biggest
            // first for load balance.
            let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
            for l in 0..nlist {
                if self.offsets[l + 1] == self.offsets[l] {
                    continue;
                }
                let mut a = counts[l];
                while a < counts[l + 1] {
                    let b = (a + TILE_QUERIES).min(counts[l + 1]);
                    tasks.push((l, a, b));
                    a = b;
                }
            }
            tasks.sort_by_key(|&(l, a, b)| {
                std::cmp::Reverse((b - a) * (self.offsets[l + 1] - self.offsets[l]))
            });
            // Each task's (queries x list rows) scores are computed in cache-sized tiles, in scratch buffers
            // reused by each thread.
            tasks.par_iter().try_for_each_init(
                || (Vec::new(), Vec::new()),
                |(qbuf, buf): &mut (Vec<f32>, Vec<f32>), &(l, qa, qb)| -> Result<()> {
                    let qblock = &by_list[qa..qb];
                    let (a, b) = (self.offsets[l], self.offsets[l + 1]);
                    let mq = qblock.len();
                    qbuf.clear();
                    for &qi in qblock {
                        qbuf.extend_from_slice(&qs[qi as usize * d..(qi as usize + 1) * d]);
                    }
                    for r0 in (a..b).step_by(TILE_ROWS) {
                        let r1 = (r0 + TILE_ROWS).min(b);
                        let nl = r1 - r0;
                        buf.resize(mq * nl, 0.0);
                        matmul_abt(qbuf, mq, &self.vecs[r0 * d..r1 * d], nl, d, buf, false)?;
                        let lid = &self.ids[r0..r1];
                        for (r, &qi) in qblock.iter().enumerate() {
                            let skip = self_offset
                                .map(|o| (o + q0 + qi as usize) as i64)
                                .unwrap_or(-1);
                            let mut h =
                                heaps[qi as usize].lock().unwrap_or_else(|p| p.into_inner());
                            let mut thr = h.threshold();
                            for (&s, &id) in buf[r * nl..(r + 1) * nl].iter().zip(lid) {
                                if s >= thr && id != skip {
                                    h.push(s, id);
                                    thr = h.threshold();
                                }
                            }
                        }
                    }
                    Ok(())
                },
            )?;
            for h in heaps {
                // A poisoned heap only follows a panic in another task, which rayon has re-raised already.
                h.into_inner().unwrap_or_else(|p| p.into_inner()).finish();
            }
        }
        Ok(res)
    }
}

/// Queries searched together (their probes are inverted into per-list query sets).
const QUERY_CHUNK: usize = 65536;
/// Queries per coarse-quantiser GEMM.
const COARSE_BLOCK: usize = 1024;
/// Queries per score tile of a list scan (and per parallel task).
const TILE_QUERIES: usize = 512;
/// List rows per score tile (with [`TILE_QUERIES`]: 4 MB of f32 scores, last-level-cache sized).
const TILE_ROWS: usize = 2048;

/// An approximate search to evaluate: `(queries, self_offset) -> k-NN`.
pub type SearchFn<'a> = dyn Fn(&[f32], Option<usize>) -> Result<KnnResult> + 'a;

/// What [`measure_recall`] samples and compares.
#[derive(Debug, Clone, Copy)]
pub struct RecallSpec {
    /// Neighbours compared.
    pub k: usize,
    /// Queries sampled.
    pub n_sample: usize,
    /// Queries are the base rows themselves (exclude the self match).
    pub self_search: bool,
    /// Sampling seed.
    pub seed: u64,
}

/// Recall of an approximate search against exact search on `n_sample` random queries drawn from `queries`:
/// returns `(recall@k: |approx ∩ exact| / |exact|, recall@1: top-1 found)`. Tied similarities count as found.
pub fn measure_recall(
    approx: &SearchFn<'_>,
    queries: &[f32],
    base: &[f32],
    d: usize,
    spec: &RecallSpec,
) -> Result<(f64, f64)> {
    let RecallSpec {
        k,
        n_sample,
        self_search,
        seed,
    } = *spec;
    let nq = queries.len() / d.max(1);
    let ns = n_sample.min(nq);
    if ns == 0 || k == 0 {
        return Ok((1.0, 1.0));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx = sample(&mut rng, nq, ns).into_vec();
    idx.sort_unstable();
    let (mut found, mut total, mut top1) = (0usize, 0usize, 0usize);
    for &qi in &idx {
        let q = &queries[qi * d..(qi + 1) * d];
        let off = if self_search { Some(qi) } else { None };
        let ex = exact_knn(q, base, d, k, off)?;
        let ap = approx(q, off)?;
        // Everything at least as similar as the exact k-th neighbour counts as a hit (ties).
        let kth = ex
            .sims
            .iter()
            .copied()
            .filter(|s| s.is_finite())
            .fold(f32::INFINITY, f32::min);
        let valid = ex.ids.iter().filter(|&&i| i >= 0).count();
        total += valid;
        found += ap
            .sims
            .iter()
            .zip(&ap.ids)
            .filter(|(&s, &i)| i >= 0 && s >= kth - 1e-6)
            .count()
            .min(valid);
        if valid > 0 && ap.ids[0] >= 0 && ap.sims[0] >= ex.sims[0] - 1e-6 {
            top1 += 1;
        }
    }
    Ok((found as f64 / total.max(1) as f64, top1 as f64 / ns as f64))
}

/// Edge recall for threshold graphs (dedup): over `spec.n_sample` random queries, the fraction of exact
/// `k`-NN neighbours with similarity `> threshold` that the approximate search also returns. Returns
/// `(recall, number of exact edges seen)`; recall is 1 when there are none.
pub fn measure_edge_recall(
    approx: &SearchFn<'_>,
    queries: &[f32],
    base: &[f32],
    d: usize,
    spec: &RecallSpec,
    threshold: f32,
) -> Result<(f64, usize)> {
    let nq = queries.len() / d.max(1);
    let ns = spec.n_sample.min(nq);
    if ns == 0 || spec.k == 0 {
        return Ok((1.0, 0));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut idx = sample(&mut rng, nq, ns).into_vec();
    idx.sort_unstable();
    let (mut found, mut total) = (0usize, 0usize);
    for &qi in &idx {
        let q = &queries[qi * d..(qi + 1) * d];
        let off = if spec.self_search { Some(qi) } else { None };
        let ex = exact_knn(q, base, d, spec.k, off)?;
        let ap = approx(q, off)?;
        for (&id, &s) in ex.ids.iter().zip(&ex.sims) {
            if id >= 0 && s > threshold {
                total += 1;
                if ap.ids.contains(&id) {
                    found += 1;
                }
            }
        }
    }
    Ok((
        if total == 0 {
            1.0
        } else {
            found as f64 / total as f64
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn clustered(n: usize, d: usize, nc: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let cs: Vec<f32> = (0..nc * d).map(|_| rng.random::<f32>() - 0.5).collect();
        let mut x: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = (i * 7919) % nc;
                cs[c * d..(c + 1) * d].to_vec()
            })
            .collect();
        x.iter_mut()
            .for_each(|v| *v += (rng.random::<f32>() - 0.5) * 0.3);
        crate::store::l2_normalize_rows(&mut x, d);
        x
    }

    #[test]
    fn full_probe_equals_exact_and_recall_grows() {
        let (n, d, k) = (3000, 16, 10);
        let x = clustered(n, d, 30, 11);
        let idx = IvfFlat::build(&x, d, &IvfParams::new(20)).unwrap();
        assert_eq!(idx.len(), n);
        assert_eq!(idx.list_sizes().iter().sum::<usize>(), n);
        let q = &x[..200 * d];
        let ex = exact_knn(q, &x, d, k, Some(0)).unwrap();
        let all = idx.search(q, k, 20, Some(0)).unwrap();
        for (a, b) in all.sims.iter().zip(&ex.sims) {
            assert!((a - b).abs() < 1e-5);
        }
        let r = |p: usize| {
            let spec = RecallSpec {
                k,
                n_sample: 200,
                self_search: true,
                seed: 1,
            };
            measure_recall(&|qq, off| idx.search(qq, k, p, off), &x, &x, d, &spec)
                .unwrap()
                .0
        };
        let (r1, r4, r20) = (r(1), r(4), r(20));
        assert!(r1 <= r4 + 1e-9 && r4 <= r20 + 1e-9, "{r1} {r4} {r20}");
        assert!((r20 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn big_lists_split_into_tasks_and_tiles_stay_exact() {
        // 2 lists of ~3,000 rows, all 6,000 rows as queries: each list is scanned by ~12 query blocks (tasks),
        // each in 2 row tiles.
        let (n, d, k) = (6000, 8, 5);
        let x = clustered(n, d, 4, 12);
        let idx = IvfFlat::build(&x, d, &IvfParams::new(2)).unwrap();
        assert!(idx.list_sizes().iter().any(|&s| s > TILE_ROWS));
        let ex = exact_knn(&x, &x, d, k, Some(0)).unwrap();
        let all = idx.search(&x, k, 2, Some(0)).unwrap();
        for (a, b) in all.sims.iter().zip(&ex.sims) {
            assert!((a - b).abs() < 1e-5);
        }
        let same_ids = all.ids.iter().zip(&ex.ids).filter(|(a, b)| a == b).count();
        assert!(same_ids as f64 >= 0.99 * ex.ids.len() as f64, "{same_ids}");
    }
}
