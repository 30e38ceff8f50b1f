//! Exact blocked k-nearest-neighbour search by inner product (= cosine on L2-normalised rows) and threshold
//! (range) queries: GEMM on blocks of queries x base rows, then a per-query bounded heap.

use rayon::prelude::*;

use crate::error::{check_rows, Result};
use crate::linalg::{matmul_abt, threads};

/// Query rows per block.
const QB: usize = 512;
/// Base rows per block.
const BB: usize = 2048;

/// Result of a k-NN search: for each query `k` neighbours sorted by decreasing similarity (ties: smaller id first).
/// Missing neighbours (fewer than `k` candidates) have id `-1` and similarity `-inf`.
#[derive(Debug, Clone, PartialEq)]
pub struct KnnResult {
    /// Neighbours per query.
    pub k: usize,
    /// `nq x k` neighbour ids (base row numbers).
    pub ids: Vec<i64>,
    /// `nq x k` similarities.
    pub sims: Vec<f32>,
}

impl KnnResult {
    /// Number of queries.
    pub fn len(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }

    /// True when there are no queries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Neighbour ids of query `q`.
    pub fn ids_of(&self, q: usize) -> &[i64] {
        &self.ids[q * self.k..(q + 1) * self.k]
    }

    /// Similarities of query `q`.
    pub fn sims_of(&self, q: usize) -> &[f32] {
        &self.sims[q * self.k..(q + 1) * self.k]
    }
}

/// A bounded min-heap holding the best `k` (similarity, id) pairs of one query.
#[derive(Debug)]
pub(crate) struct TopK<'a> {
    sims: &'a mut [f32],
    ids: &'a mut [i64],
    len: usize,
}

#[inline]
fn worse(s1: f32, i1: i64, s2: f32, i2: i64) -> bool {
    s1 < s2 || (s1 == s2 && i1 > i2)
}

impl<'a> TopK<'a> {
    pub(crate) fn new(sims: &'a mut [f32], ids: &'a mut [i64]) -> Self {
        Self { sims, ids, len: 0 }
    }

    /// Current admission threshold: a candidate must beat it.
    #[inline]
    pub(crate) fn threshold(&self) -> f32 {
        if self.len < self.sims.len() {
            f32::NEG_INFINITY
        } else {
            self.sims[0]
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, s: f32, id: i64) {
        let k = self.sims.len();
        if k == 0 {
            return;
        }
        if self.len < k {
            let mut i = self.len;
            self.len += 1;
            while i > 0 {
                let p = (i - 1) / 2;
                if worse(s, id, self.sims[p], self.ids[p]) {
                    self.sims[i] = self.sims[p];
                    self.ids[i] = self.ids[p];
                    i = p;
                } else {
                    break;
                }
            }
            self.sims[i] = s;
            self.ids[i] = id;
            return;
        }
        if !worse(self.sims[0], self.ids[0], s, id) {
            return;
        }
        let mut i = 0;
        loop {
            let l = 2 * i + 1;
            if l >= k {
                break;
            }
            let r = l + 1;
            let c = if r < k && worse(self.sims[r], self.ids[r], self.sims[l], self.ids[l]) {
                r
            } else {
                l
            };
            if worse(self.sims[c], self.ids[c], s, id) {
                self.sims[i] = self.sims[c];
                self.ids[i] = self.ids[c];
                i = c;
            } else {
                break;
            }
        }
        self.sims[i] = s;
        self.ids[i] = id;
    }

    /// Sorts into decreasing similarity and pads the tail with `(-inf, -1)`.
    pub(crate) fn finish(self) {
        let n = self.len;
        let mut v: Vec<(f32, i64)> = (0..n).map(|i| (self.sims[i], self.ids[i])).collect();
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (i, (s, id)) in v.into_iter().enumerate() {
            self.sims[i] = s;
            self.ids[i] = id;
        }
        for i in n..self.sims.len() {
            self.sims[i] = f32::NEG_INFINITY;
            self.ids[i] = -1;
        }
    }
}

fn check(q: &[f32], b: &[f32], d: usize) -> Result<(usize, usize)> {
    Ok((
        check_rows("k-NN queries", q.len(), d)?,
        check_rows("k-NN base", b.len(), d)?,
    ))
}

/// Exact k-NN of every row of `queries` among the rows of `base` (both row-major, `d` columns), by inner product.
///
/// `self_offset = Some(o)` declares that query `i` is base row `o + i` and excludes that pair (self-search on a
/// contiguous shard of rows).
///
/// ```
/// use dinov2_curate::knn::exact_knn;
/// let base = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8];
/// let r = exact_knn(&[0.8, 0.6], &base, 2, 2, None).unwrap();
/// assert_eq!(r.ids, vec![2, 0]); // cosines 0.96 and 0.8
/// ```
pub fn exact_knn(
    queries: &[f32],
    base: &[f32],
    d: usize,
    k: usize,
    self_offset: Option<usize>,
) -> Result<KnnResult> {
    let (nq, nb) = check(queries, base, d)?;
    let mut ids = vec![-1i64; nq * k];
    let mut sims = vec![f32::NEG_INFINITY; nq * k];
    if k == 0 || nq == 0 {
        return Ok(KnnResult { k, ids, sims });
    }
    let nthreads = threads();
    let qb = QB.min(nq.div_ceil(nthreads)).max(1);
    let n_chunks = nq.div_ceil(qb);
    let inner_parallel = n_chunks < nthreads;
    let work = |(ci, (sims_c, ids_c)): (usize, (&mut [f32], &mut [i64]))| -> Result<()> {
        let q0 = ci * qb;
        let m = sims_c.len() / k;
        let qs = &queries[q0 * d..(q0 + m) * d];
        let mut heaps: Vec<TopK> = sims_c
            .chunks_mut(k)
            .zip(ids_c.chunks_mut(k))
            .map(|(s, i)| TopK::new(s, i))
            .collect();
        scan_blocks(
            qs,
            q0,
            base,
            nb,
            d,
            self_offset,
            inner_parallel,
            |qi, row, b0, skip| {
                let heap = &mut heaps[qi];
                let mut thr = heap.threshold();
                for (j, &s) in row.iter().enumerate() {
                    if s > thr && b0 + j != skip {
                        heap.push(s, (b0 + j) as i64);
                        thr = heap.threshold();
                    }
                }
            },
        )?;
        heaps.into_iter().for_each(TopK::finish);
        Ok(())
    };
    if inner_parallel {
        sims.chunks_mut(qb * k)
            .zip(ids.chunks_mut(qb * k))
            .enumerate()
            .try_for_each(work)?;
    } else {
        sims.par_chunks_mut(qb * k)
            .zip(ids.par_chunks_mut(qb * k))
            .enumerate()
            .try_for_each(work)?;
    }
    Ok(KnnResult { k, ids, sims })
}

/// Inner products of the query rows `qs` (the first one is query `q0` overall) with every base row, one block of
/// `BB` base rows at a time: `visit(query in chunk, similarities to the block, first base row of the block, base
/// row to skip)`, where the skipped row is the query's own row under `self_offset` (`usize::MAX`: none).
#[allow(clippy::too_many_arguments)]
fn scan_blocks(
    qs: &[f32],
    q0: usize,
    base: &[f32],
    nb: usize,
    d: usize,
    self_offset: Option<usize>,
    inner_parallel: bool,
    mut visit: impl FnMut(usize, &[f32], usize, usize),
) -> Result<()> {
    let m = qs.len() / d;
    let bb = BB.min(nb).max(1);
    let mut buf = vec![0f32; m * bb];
    let mut b0 = 0;
    while b0 < nb {
        let n = bb.min(nb - b0);
        matmul_abt(
            qs,
            m,
            &base[b0 * d..(b0 + n) * d],
            n,
            d,
            &mut buf[..m * n],
            inner_parallel,
        )?;
        for qi in 0..m {
            let skip = self_offset.map(|o| o + q0 + qi).unwrap_or(usize::MAX);
            visit(qi, &buf[qi * n..(qi + 1) * n], b0, skip);
        }
        b0 += n;
    }
    Ok(())
}

/// Neighbours above a similarity threshold, in CSR form: query `q` owns `ids[offsets[q]..offsets[q + 1]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeResult {
    /// `nq + 1` offsets.
    pub offsets: Vec<usize>,
    /// Neighbour ids, per query in increasing id order.
    pub ids: Vec<i64>,
    /// Similarities matching `ids`.
    pub sims: Vec<f32>,
}

/// Exact threshold query: every base row with inner product `> threshold` with each query (`self_offset` as in
/// [`exact_knn`]).
pub fn range_search(
    queries: &[f32],
    base: &[f32],
    d: usize,
    threshold: f32,
    self_offset: Option<usize>,
) -> Result<RangeResult> {
    let (nq, nb) = check(queries, base, d)?;
    let qb = QB.min(nq.div_ceil(threads())).max(1);
    type Hits = Vec<Vec<(i64, f32)>>;
    let per_chunk: Vec<Result<Hits>> = queries
        .par_chunks(qb * d)
        .enumerate()
        .map(|(ci, qs)| {
            let m = qs.len() / d;
            let q0 = ci * qb;
            let mut out: Hits = vec![Vec::new(); m];
            scan_blocks(
                qs,
                q0,
                base,
                nb,
                d,
                self_offset,
                false,
                |qi, row, b0, skip| {
                    for (j, &s) in row.iter().enumerate() {
                        if s > threshold && b0 + j != skip {
                            out[qi].push(((b0 + j) as i64, s));
                        }
                    }
                },
            )?;
            Ok(out)
        })
        .collect();
    let mut res = RangeResult {
        offsets: vec![0],
        ids: Vec::new(),
        sims: Vec::new(),
    };
    for c in per_chunk {
        for q in c? {
            for (i, s) in q {
                res.ids.push(i);
                res.sims.push(s);
            }
            res.offsets.push(res.ids.len());
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn brute(q: &[f32], b: &[f32], d: usize, k: usize, off: Option<usize>) -> Vec<Vec<(f32, i64)>> {
        q.chunks(d)
            .enumerate()
            .map(|(qi, qr)| {
                let mut v: Vec<(f32, i64)> = b
                    .chunks(d)
                    .enumerate()
                    .filter(|(j, _)| off.map(|o| o + qi != *j).unwrap_or(true))
                    .map(|(j, br)| (qr.iter().zip(br).map(|(x, y)| x * y).sum::<f32>(), j as i64))
                    .collect();
                v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                v.truncate(k);
                v
            })
            .collect()
    }

    #[test]
    fn exact_matches_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let d = 9;
        // Sizes crossing the block boundaries.
        let nb = BB + 37;
        let nq = 600;
        let b: Vec<f32> = (0..nb * d).map(|_| rng.random::<f32>() - 0.5).collect();
        let q = b[..nq * d].to_vec();
        for (k, off) in [(1, None), (5, Some(0)), (17, None)] {
            let r = exact_knn(&q, &b, d, k, off).unwrap();
            let bf = brute(&q, &b, d, k, off);
            #[allow(clippy::needless_range_loop)]
            for qi in 0..nq {
                for (j, &(s, id)) in bf[qi].iter().enumerate() {
                    // Ties aside: the similarity at each rank must agree; ids agree unless tied.
                    assert!((r.sims_of(qi)[j] - s).abs() < 1e-5);
                    if j + 1 < bf[qi].len()
                        && (bf[qi][j + 1].0 - s).abs() > 1e-5
                        && (j == 0 || (bf[qi][j - 1].0 - s).abs() > 1e-5)
                    {
                        assert_eq!(r.ids_of(qi)[j], id);
                    }
                }
            }
        }
    }

    #[test]
    fn pads_when_fewer_than_k() {
        let r = exact_knn(&[1.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 2, 4, None).unwrap();
        assert_eq!(r.ids, vec![0, 1, -1, -1]);
        assert_eq!(r.sims[3], f32::NEG_INFINITY);
    }

    #[test]
    fn range_matches_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let d = 4;
        let b: Vec<f32> = (0..300 * d).map(|_| rng.random::<f32>() - 0.5).collect();
        let r = range_search(&b, &b, d, 0.2, Some(0)).unwrap();
        for (qi, qr) in b.chunks(d).enumerate() {
            let want: Vec<i64> = b
                .chunks(d)
                .enumerate()
                .map(|(j, br)| (j, qr.iter().zip(br.iter()).map(|(x, y)| x * y).sum::<f32>()))
                .filter(|&(j, s)| j != qi && s > 0.2)
                .map(|(j, _)| j as i64)
                .collect();
            let near = b.chunks(d).any(|br| {
                (qr.iter().zip(br.iter()).map(|(x, y)| x * y).sum::<f32>() - 0.2).abs() < 1e-5
            });
            if !near {
                assert_eq!(&r.ids[r.offsets[qi]..r.offsets[qi + 1]], &want[..]);
            }
        }
    }
}
