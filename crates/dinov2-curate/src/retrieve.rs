//! Retrieval of pool images for curated query sets (DINOv2 section 3 / appendix A.4): sample-based (k nearest
//! pool images per query, with collision statistics) and cluster-based (pool k-means clusters hit by more than
//! `min_queries` queries contribute `per_cluster` images each, capped per dataset).

use std::collections::HashMap;

use rand::seq::index::sample;
use rand::SeedableRng;

use crate::dedup::Searcher;
use crate::error::{invalid, Result};
use dinov2_dist::{shard_range, Communicator, SingleProcess};

/// Output of a retrieval (the ids are not serialised: they go to an `.npy` file).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Retrieval {
    /// Retrieved pool row ids: ascending and unique when de-duplicated, else every hit (query order, repeats kept).
    #[serde(skip)]
    pub ids: Vec<i64>,
    /// Queries.
    pub n_queries: usize,
    /// Hits before de-duplication (`n_queries * k` for sample-based when the pool is large enough).
    pub n_hits: usize,
    /// Distinct pool rows hit.
    pub n_unique: usize,
    /// Pool rows hit by more than one query.
    pub n_collided: usize,
    /// Most queries hitting one pool row.
    pub max_hits: usize,
    /// `hit_histogram[h]` = pool rows hit exactly `h` times (index 0 unused), truncated at 64 (last bin = 64+).
    pub hit_histogram: Vec<usize>,
    /// Cluster-based only: clusters selected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_clusters_selected: Option<usize>,
    /// Cluster-based only: whether the cap was applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capped: Option<bool>,
}

fn stats(hits: &[i64]) -> (usize, usize, usize, Vec<usize>) {
    let mut c: HashMap<i64, usize> = HashMap::new();
    hits.iter().for_each(|&i| *c.entry(i).or_insert(0) += 1);
    let mut hist = vec![0usize; 65];
    for &v in c.values() {
        hist[v.min(64)] += 1;
    }
    while hist.len() > 2 && hist.last() == Some(&0) {
        hist.pop();
    }
    (
        c.len(),
        c.values().filter(|&&v| v > 1).count(),
        c.values().copied().max().unwrap_or(0),
        hist,
    )
}

/// Sample-based retrieval: the `k` nearest pool rows of every query (`queries` L2-normalised, `d` columns).
/// `dedup_union` returns the distinct ids (ascending) instead of every hit.
///
/// ```
/// use dinov2_curate::{dedup::Searcher, retrieve::sample_based};
/// let pool = [1.0, 0.0, 0.0, 1.0, 0.7071, 0.7071];
/// let r = sample_based(&[1.0, 0.0, 0.9, 0.1], &Searcher::Exact { base: &pool }, 2, 1, true).unwrap();
/// assert_eq!(r.ids, vec![0]);
/// assert_eq!(r.n_collided, 1);
/// ```
pub fn sample_based(
    queries: &[f32],
    pool: &Searcher<'_>,
    d: usize,
    k: usize,
    dedup_union: bool,
) -> Result<Retrieval> {
    sample_based_sharded(queries, pool, d, k, dedup_union, &SingleProcess)
}

/// [`sample_based`] by the ranks of `comm` together, each passing all the queries and a searcher over the whole
/// pool: each rank searches a contiguous part of the queries, the hits are gathered in query order, and every rank
/// returns what [`sample_based`] returns.
pub fn sample_based_sharded(
    queries: &[f32],
    pool: &Searcher<'_>,
    d: usize,
    k: usize,
    dedup_union: bool,
    comm: &dyn Communicator,
) -> Result<Retrieval> {
    let nq = queries.len() / d.max(1);
    let part = shard_range(nq, comm.world_size(), comm.rank());
    let mut hits = Vec::with_capacity(part.len() * k);
    const CHUNK: usize = 65536;
    for q in queries[part.start * d..part.end * d].chunks(CHUNK * d.max(1)) {
        let r = pool.search(q, d, k, None)?;
        hits.extend(r.ids.iter().copied().filter(|&i| i >= 0));
    }
    if comm.world_size() > 1 {
        hits = comm.all_gather_i64(&hits)?;
    }
    let (n_unique, n_collided, max_hits, hit_histogram) = stats(&hits);
    let n_hits = hits.len();
    if dedup_union {
        hits.sort_unstable();
        hits.dedup();
    }
    Ok(Retrieval {
        ids: hits,
        n_queries: nq,
        n_hits,
        n_unique,
        n_collided,
        max_hits,
        hit_histogram,
        n_clusters_selected: None,
        capped: None,
    })
}

/// Cluster-based retrieval. `pool_labels[i]` is pool row `i`'s cluster among `k` (from k-means over the pool) and
/// `query_labels` the clusters of the queries (their nearest pool centroid). Every cluster hit by more than
/// `min_queries` queries contributes `per_cluster` random members (all if smaller); the union (distinct ids) is
/// subsampled uniformly to `cap` if larger. Returns ascending ids.
pub fn cluster_based(
    pool_labels: &[u32],
    k: usize,
    query_labels: &[u32],
    min_queries: usize,
    per_cluster: usize,
    cap: Option<usize>,
    seed: u64,
) -> Result<Retrieval> {
    if let Some(&bad) = pool_labels
        .iter()
        .chain(query_labels)
        .find(|&&l| l as usize >= k)
    {
        return Err(invalid(
            "labels",
            format!("cluster label {bad} is not below the number of clusters {k}"),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut qcount = vec![0usize; k];
    query_labels.iter().for_each(|&l| qcount[l as usize] += 1);
    let (offsets, rows) = crate::kmeans::group_by_label(pool_labels, k);
    let mut ids = Vec::new();
    let mut selected = 0;
    for j in 0..k {
        if qcount[j] <= min_queries {
            continue;
        }
        selected += 1;
        let members = &rows[offsets[j]..offsets[j + 1]];
        if members.len() <= per_cluster {
            ids.extend(members.iter().map(|&r| r as i64));
        } else {
            ids.extend(
                sample(&mut rng, members.len(), per_cluster)
                    .into_iter()
                    .map(|i| members[i] as i64),
            );
        }
    }
    ids.sort_unstable();
    let n_hits = ids.len();
    let capped = cap.is_some_and(|c| ids.len() > c);
    if let Some(c) = cap.filter(|_| capped) {
        let mut keep: Vec<i64> = sample(&mut rng, ids.len(), c)
            .into_iter()
            .map(|i| ids[i])
            .collect();
        keep.sort_unstable();
        ids = keep;
    }
    let (n_unique, n_collided, max_hits, hit_histogram) = stats(&ids);
    Ok(Retrieval {
        n_queries: query_labels.len(),
        n_hits,
        n_unique,
        n_collided,
        max_hits,
        hit_histogram,
        ids,
        n_clusters_selected: Some(selected),
        capped: Some(capped),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_based_selection_rules() {
        // Pool: cluster 0 has 10 rows, cluster 1 has 3, cluster 2 has 5.
        let pool: Vec<u32> = (0..18)
            .map(|i| {
                if i < 10 {
                    0
                } else if i < 13 {
                    1
                } else {
                    2
                }
            })
            .collect();
        // Queries: 4 in cluster 0 (> 3: selected), 5 in cluster 1 (selected), 3 in cluster 2 (not).
        let q = [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2];
        let r = cluster_based(&pool, 3, &q, 3, 4, None, 0).unwrap();
        assert_eq!(r.n_clusters_selected, Some(2));
        assert_eq!(r.ids.len(), 4 + 3);
        assert_eq!(r.ids.iter().filter(|&&i| i < 10).count(), 4);
        assert!(r.ids.contains(&10) && r.ids.contains(&11) && r.ids.contains(&12));
        assert!(r.ids.iter().all(|&i| i < 13));
        let c = cluster_based(&pool, 3, &q, 3, 4, Some(5), 0).unwrap();
        assert_eq!(c.ids.len(), 5);
        assert_eq!(c.capped, Some(true));
        assert!(c.ids.iter().all(|i| r.ids.contains(i)));
        assert!(cluster_based(&pool, 2, &q, 3, 4, None, 0).is_err());
    }

    #[test]
    fn sample_based_counts_collisions() {
        let pool = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let q = [1.0, 0.1, 1.0, -0.1, 0.1, 1.0];
        let r = sample_based(&q, &Searcher::Exact { base: &pool }, 2, 1, false).unwrap();
        assert_eq!(r.ids, vec![0, 0, 1]);
        assert_eq!(
            (r.n_hits, r.n_unique, r.n_collided, r.max_hits),
            (3, 2, 1, 2)
        );
        assert_eq!(r.hit_histogram, vec![0, 1, 1]);
    }
}
