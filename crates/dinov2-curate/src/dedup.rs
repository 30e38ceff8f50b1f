//! Deduplication as in DINOv2 (appendix A.3): k-NN graph, edges above a cosine threshold, connected components
//! with a union-find, one deterministic representative (the smallest row id) per component; and relative dedup
//! that drops every pool component touching a reference set.

use crate::error::{check_rows, invalid, Error, Result};
use crate::ivf::IvfFlat;
use crate::knn::{exact_knn, KnnResult};
use dinov2_dist::{gather_counts as gather_row_counts, Communicator, SingleProcess};

/// Disjoint-set forest with union by size and path halving.
#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    /// `n` singletons (`n < 2^32`).
    pub fn new(n: usize) -> Result<Self> {
        if n > u32::MAX as usize {
            return Err(invalid(
                "n",
                format!("{n} nodes exceed the u32 union-find (at most 2^32 - 1)"),
            ));
        }
        Ok(Self {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        })
    }

    /// Root of `x`'s set.
    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] as usize != x {
            let gp = self.parent[self.parent[x] as usize];
            self.parent[x] = gp;
            x = gp as usize;
        }
        x
    }

    /// Merges the sets of `a` and `b`; true if they were different.
    pub fn union(&mut self, a: usize, b: usize) -> bool {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        if self.size[ra] < self.size[rb] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb] = ra as u32;
        self.size[ra] += self.size[rb];
        true
    }

    /// Canonical labels: component ids numbered by their smallest member, in increasing order; also returns the
    /// representatives (smallest member of each component, ascending).
    pub fn labels(&mut self) -> (Vec<i64>, Vec<i64>) {
        let n = self.parent.len();
        let mut label_of_root = vec![-1i64; n];
        let mut labels = vec![0i64; n];
        let mut reps = Vec::new();
        #[allow(clippy::needless_range_loop)]
        for i in 0..n {
            let r = self.find(i);
            if label_of_root[r] < 0 {
                label_of_root[r] = reps.len() as i64;
                reps.push(i as i64);
            }
            labels[i] = label_of_root[r];
        }
        (labels, reps)
    }
}

/// How neighbours are searched.
#[derive(Debug, Clone)]
pub enum Searcher<'a> {
    /// Exact blocked GEMM search over `base`.
    Exact {
        /// Base rows.
        base: &'a [f32],
    },
    /// IVF-Flat search.
    Ivf {
        /// The index over the base rows.
        index: &'a IvfFlat,
        /// Lists probed per query.
        nprobe: usize,
    },
}

impl Searcher<'_> {
    /// Number of base rows searched (`d` = dimension).
    pub fn base_rows(&self, d: usize) -> usize {
        match self {
            Searcher::Exact { base } => base.len() / d.max(1),
            Searcher::Ivf { index, .. } => index.len(),
        }
    }

    /// k-NN of `queries` (`self_offset`: query `i` is base row `o + i`, excluded).
    pub fn search(
        &self,
        queries: &[f32],
        d: usize,
        k: usize,
        self_offset: Option<usize>,
    ) -> Result<KnnResult> {
        match self {
            Searcher::Exact { base } => exact_knn(queries, base, d, k, self_offset),
            Searcher::Ivf { index, nprobe } => index.search(queries, k, *nprobe, self_offset),
        }
    }
}

/// Edges `(query row + query_offset, neighbour id)` of a k-NN result with similarity `> threshold`.
pub fn threshold_edges(knn: &KnnResult, query_offset: usize, threshold: f32) -> Vec<(i64, i64)> {
    let mut e = Vec::new();
    for q in 0..knn.len() {
        for (&id, &s) in knn.ids_of(q).iter().zip(knn.sims_of(q)) {
            if id >= 0 && s > threshold {
                e.push(((q + query_offset) as i64, id));
            }
        }
    }
    e
}

/// Result of a deduplication (the id lists are not serialised: they go to `.npy` files).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DedupResult {
    /// Kept row ids, ascending.
    #[serde(skip)]
    pub keep: Vec<i64>,
    /// Component id of every row (numbered by smallest member).
    #[serde(skip)]
    pub components: Vec<i64>,
    /// Number of rows.
    pub n_rows: usize,
    /// Number of kept rows.
    pub n_kept: usize,
    /// Number of components.
    pub n_components: usize,
    /// Size of the largest component.
    pub largest_component: usize,
    /// Number of (directed) edges above the threshold.
    pub n_edges: usize,
}

/// Components of an `n`-node graph given its edges.
pub fn components(n: usize, edges: &[(i64, i64)]) -> Result<UnionFind> {
    let mut uf = UnionFind::new(n)?;
    for &(a, b) in edges {
        let (a, b) = (a as usize, b as usize);
        if a >= n || b >= n {
            return Err(invalid(
                "edges",
                format!("edge ({a}, {b}) is outside the {n} nodes"),
            ));
        }
        uf.union(a, b);
    }
    Ok(uf)
}

/// Self-dedup result from the edges of an `n`-row pool: keeps the smallest row of each component.
pub fn self_dedup_from_edges(n: usize, edges: &[(i64, i64)]) -> Result<DedupResult> {
    let mut uf = components(n, edges)?;
    let (labels, reps) = uf.labels();
    let mut sizes = vec![0usize; reps.len()];
    labels.iter().for_each(|&l| sizes[l as usize] += 1);
    Ok(DedupResult {
        n_rows: n,
        n_kept: reps.len(),
        n_components: reps.len(),
        largest_component: sizes.iter().copied().max().unwrap_or(0),
        n_edges: edges.len(),
        keep: reps,
        components: labels,
    })
}

/// Self-dedup of the rows of `x` (L2-normalised, `d` columns): `k` neighbours each (excluding itself), edges with
/// cosine `> threshold`, one representative per component. Queries run in chunks of `chunk` rows.
///
/// ```
/// use dinov2_curate::dedup::{self_dedup, Searcher};
/// let x = [1.0, 0.0, 0.99, 0.141, 0.0, 1.0];
/// let r = self_dedup(&x, 2, 64, 0.6, &Searcher::Exact { base: &x }, 1024).unwrap();
/// assert_eq!(r.keep, vec![0, 2]);
/// assert_eq!(r.components, vec![0, 0, 1]);
/// ```
pub fn self_dedup(
    x: &[f32],
    d: usize,
    k: usize,
    threshold: f32,
    searcher: &Searcher<'_>,
    chunk: usize,
) -> Result<DedupResult> {
    self_dedup_sharded(x, d, k, threshold, searcher, chunk, &SingleProcess)
}

/// [`self_dedup`] with the queries split by rows between the workers of `coll`: `x` holds this worker's
/// contiguous rows (rank 0 the first ones) and `searcher` covers the whole pool. Each worker searches its own rows;
/// the above-threshold edges are gathered and every worker builds the same components.
///
/// Two workers in one process, holding rows `0` and `1..3` of a 3-row pool:
///
/// ```
/// use dinov2_dist::{Communicator, ThreadGroup};
/// use dinov2_curate::dedup::{self_dedup_sharded, Searcher};
/// let x = [1.0, 0.0, 0.99, 0.141, 0.0, 1.0];
/// let searcher = Searcher::Exact { base: &x };
/// let ranks = ThreadGroup::new(2).unwrap();
/// let keeps: Vec<Vec<i64>> = std::thread::scope(|s| {
///     let hs: Vec<_> = ranks
///         .into_iter()
///         .map(|r| {
///             let (x, searcher) = (&x, &searcher);
///             s.spawn(move || {
///                 let rows = if r.rank() == 0 { &x[..2] } else { &x[2..] };
///                 self_dedup_sharded(rows, 2, 64, 0.6, searcher, 1024, &r).unwrap().keep
///             })
///         })
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(keeps, vec![vec![0, 2], vec![0, 2]]);
/// ```
pub fn self_dedup_sharded(
    x: &[f32],
    d: usize,
    k: usize,
    threshold: f32,
    searcher: &Searcher<'_>,
    chunk: usize,
    coll: &dyn Communicator,
) -> Result<DedupResult> {
    let n_local = check_rows("self-dedup", x.len(), d)?;
    let counts = gather_row_counts(coll, n_local)?;
    let offset: usize = counts[..coll.rank()].iter().sum();
    let n: usize = counts.iter().sum();
    if searcher.base_rows(d) != n {
        return Err(Error::Shape {
            op: "self-dedup",
            reason: format!(
                "the workers hold {n} rows but the searcher covers {}",
                searcher.base_rows(d)
            ),
        });
    }
    let mut edges = Vec::new();
    let chunk = chunk.max(1);
    let mut s = 0;
    while s < n_local {
        let e = (s + chunk).min(n_local);
        let r = searcher.search(&x[s * d..e * d], d, k, Some(offset + s))?;
        edges.extend(threshold_edges(&r, offset + s, threshold));
        s = e;
    }
    if coll.world_size() > 1 {
        let flat: Vec<i64> = edges.iter().flat_map(|&(a, b)| [a, b]).collect();
        edges = coll
            .all_gather_i64(&flat)?
            .chunks_exact(2)
            .map(|p| (p[0], p[1]))
            .collect();
    }
    self_dedup_from_edges(n, &edges)
}

/// Result of a relative dedup (the id lists are not serialised: they go to `.npy` files).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RelativeResult {
    /// Pool rows kept (components touching no reference), ascending.
    #[serde(skip)]
    pub keep: Vec<i64>,
    /// Component id of every pool row (components of the pool+reference graph, numbered by smallest pool row).
    #[serde(skip)]
    pub components: Vec<i64>,
    /// Pool rows.
    pub n_rows: usize,
    /// Reference rows.
    pub n_reference: usize,
    /// Pool rows kept.
    pub n_kept: usize,
    /// Pool rows dropped.
    pub n_dropped: usize,
    /// Components (over pool rows) that touch a reference and were dropped.
    pub n_dropped_components: usize,
    /// Edges above threshold (pool-pool, pool-ref, ref-pool).
    pub n_edges: usize,
}

/// Relative dedup from graph edges. Node ids: pool rows `0..n_pool`, reference rows `n_pool..n_pool + n_ref`.
/// Every component containing a reference node is dropped entirely; all other pool rows are kept.
pub fn relative_dedup_from_edges(
    n_pool: usize,
    n_ref: usize,
    edges: &[(i64, i64)],
) -> Result<RelativeResult> {
    let mut uf = components(n_pool + n_ref, edges)?;
    let mut touched = vec![false; n_pool + n_ref];
    for r in n_pool..n_pool + n_ref {
        let root = uf.find(r);
        touched[root] = true;
    }
    let mut label_of_root = vec![-1i64; n_pool + n_ref];
    let mut components = vec![0i64; n_pool];
    let mut keep = Vec::new();
    let mut n_labels = 0i64;
    let mut dropped_components = 0;
    #[allow(clippy::needless_range_loop)]
    for i in 0..n_pool {
        let root = uf.find(i);
        if label_of_root[root] < 0 {
            label_of_root[root] = n_labels;
            n_labels += 1;
            if touched[root] {
                dropped_components += 1;
            }
        }
        components[i] = label_of_root[root];
        if !touched[root] {
            keep.push(i as i64);
        }
    }
    Ok(RelativeResult {
        n_rows: n_pool,
        n_reference: n_ref,
        n_kept: keep.len(),
        n_dropped: n_pool - keep.len(),
        n_dropped_components: dropped_components,
        n_edges: edges.len(),
        keep,
        components,
    })
}

/// Relative dedup of `pool` against `reference` (both L2-normalised): the graph has the `k`-NN edges above
/// `threshold` of pool rows among the pool, of pool rows among the references and of reference rows among the
/// pool; every component that contains a reference is dropped.
pub fn relative_dedup(
    pool: &[f32],
    reference: &[f32],
    d: usize,
    k: usize,
    threshold: f32,
    pool_searcher: &Searcher<'_>,
    chunk: usize,
) -> Result<RelativeResult> {
    let n = pool.len() / d.max(1);
    let nr = reference.len() / d.max(1);
    let chunk = chunk.max(1);
    let mut edges = Vec::new();
    let refs = Searcher::Exact { base: reference };
    let mut s = 0;
    while s < n {
        let e = (s + chunk).min(n);
        let q = &pool[s * d..e * d];
        edges.extend(threshold_edges(
            &pool_searcher.search(q, d, k, Some(s))?,
            s,
            threshold,
        ));
        let r = refs.search(q, d, k, None)?;
        edges.extend(
            threshold_edges(&r, s, threshold)
                .into_iter()
                .map(|(a, b)| (a, b + n as i64)),
        );
        s = e;
    }
    let r = pool_searcher.search(reference, d, k, None)?;
    edges.extend(threshold_edges(&r, n, threshold));
    relative_dedup_from_edges(n, nr, &edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_find_labels_are_canonical() {
        let mut uf = UnionFind::new(6).unwrap();
        uf.union(4, 1);
        uf.union(5, 3);
        uf.union(3, 1);
        let (labels, reps) = uf.labels();
        assert_eq!(reps, vec![0, 1, 2]);
        assert_eq!(labels, vec![0, 1, 2, 1, 1, 1]);
    }

    #[test]
    fn relative_drops_whole_components() {
        // Pool 0..5, refs 5..7. 0-1-2 chain touches ref 5; 3 alone; 4 touches ref 6.
        let edges = [(0, 1), (1, 2), (5, 2), (4, 6)];
        let r = relative_dedup_from_edges(5, 2, &edges).unwrap();
        assert_eq!(r.keep, vec![3]);
        assert_eq!(r.n_dropped_components, 2);
        assert_eq!(r.components, vec![0, 0, 0, 1, 2]);
    }

    #[test]
    fn self_dedup_exact_vs_definition() {
        // Rows at angles; neighbours within ~53 degrees (cos > 0.6) chain together.
        let angles = [0.0f32, 0.5, 1.0, 2.5, 4.0, 4.3];
        let x: Vec<f32> = angles.iter().flat_map(|a| [a.cos(), a.sin()]).collect();
        let r = self_dedup(&x, 2, 64, 0.6, &Searcher::Exact { base: &x }, 2).unwrap();
        // Pairs with cos > 0.6: (0,0.5), (0.5,1.0), (0,1.0)? cos(1.0)=0.54 no; (4.0,4.3).
        assert_eq!(r.components, vec![0, 0, 0, 1, 2, 2]);
        assert_eq!(r.keep, vec![0, 3, 4]);
    }
}
