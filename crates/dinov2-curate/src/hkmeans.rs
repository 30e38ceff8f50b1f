//! Hierarchical k-means with resampling (Vo et al. 2024, "Automatic data curation for self-supervised learning")
//! and balanced hierarchical sampling (water-filling per level, multiplier, `r`/`c` leaf pick).

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

use crate::error::{invalid, Error, Result};
use crate::kmeans::{self, group_by_label, Init, KMeansConfig};
use dinov2_dist::{gather_counts, Communicator, SingleProcess};

/// Which members of a cluster are picked when only some are needed. Serialised as `"c"` / `"r"` (the official
/// strategy letters); parsed from `c`, `closest`, `r` or `random`.
///
/// ```
/// use dinov2_curate::hkmeans::Pick;
/// assert_eq!("closest".parse::<Pick>().unwrap(), Pick::Closest);
/// assert_eq!(serde_json::to_string(&Pick::Random).unwrap(), "\"r\"");
/// assert!("x".parse::<Pick>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pick {
    /// `c`: the members closest to the centroid.
    #[serde(rename = "c", alias = "closest", alias = "Closest")]
    Closest,
    /// `r`: uniformly random members.
    #[serde(rename = "r", alias = "random", alias = "Random")]
    Random,
}

impl std::str::FromStr for Pick {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "c" | "closest" => Ok(Pick::Closest),
            "r" | "random" => Ok(Pick::Random),
            _ => Err(invalid(
                "strategy",
                format!("{s:?} is not a pick strategy: use r (random) or c (closest)"),
            )),
        }
    }
}

/// Parameters of one level.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LevelConfig {
    /// Clusters at this level.
    pub k: usize,
    /// Lloyd iterations of every k-means run of the level.
    pub n_iter: usize,
    /// Resampling steps (0 = plain k-means).
    pub n_resampling_steps: usize,
    /// Points taken from each cluster per resampling step.
    pub sample_size: usize,
    /// How those points are taken.
    pub strategy: Pick,
}

/// One level of the hierarchy.
#[derive(Debug, Clone)]
pub struct Level {
    /// Clusters.
    pub k: usize,
    /// `k x d` centroids.
    pub centroids: Vec<f32>,
    /// Cluster of every row of the level's input (raw rows at level 1, previous centroids above).
    pub assignment: Vec<u32>,
    /// `k + 1` offsets into `members`.
    pub offsets: Vec<usize>,
    /// Members of each cluster (rows of the level input) sorted by increasing distance to the centroid.
    pub members: Vec<usize>,
}

impl Level {
    /// Members of cluster `j`, closest first.
    pub fn cluster(&self, j: usize) -> &[usize] {
        &self.members[self.offsets[j]..self.offsets[j + 1]]
    }
}

fn sorted_clusters(labels: &[u32], dist: &[f32], k: usize) -> (Vec<usize>, Vec<usize>) {
    let (offsets, mut rows) = group_by_label(labels, k);
    for j in 0..k {
        rows[offsets[j]..offsets[j + 1]]
            .sort_by(|&a, &b| dist[a].total_cmp(&dist[b]).then(a.cmp(&b)));
    }
    (offsets, rows)
}

/// Runs one level on `x` (`n x d`).
pub fn run_level(x: &[f32], d: usize, cfg: &LevelConfig, seed: u64) -> Result<Level> {
    run_level_sharded(x, d, cfg, seed, &SingleProcess)
}

/// [`run_level`] by the ranks of `comm` together, each passing its contiguous share of the level's input rows
/// (rank 0 the first rows): every rank returns the same level as [`run_level`] on the whole input, up to the
/// order of the f64 additions of the k-means sums (row numbers in `assignment` and `members` are global).
///
/// Traffic: the sharded k-means ([`kmeans::train_sharded`]); per resampling step the candidates of every cluster
/// (`Closest`: each rank's `sample_size` closest members of each cluster, so at most `k × sample_size` rows per
/// rank; `Random`: every member's distance and id, one `f64` + one `i64` per row, since the draw is over positions
/// in the whole sorted cluster) and the picked rows from their owners; at the end every row's label and distance
/// (the level's outputs).
///
/// ```
/// use dinov2_dist::{shard_range, Communicator, ThreadGroup};
/// use dinov2_curate::hkmeans::{run_level, run_level_sharded, LevelConfig, Pick};
/// let x: Vec<f32> = (0..60).map(|i| ((i * 7919) % 101) as f32 / 101.0).collect(); // 30 rows, d = 2
/// let cfg = LevelConfig { k: 4, n_iter: 5, n_resampling_steps: 1, sample_size: 3, strategy: Pick::Closest };
/// let one = run_level(&x, 2, &cfg, 7).unwrap();
/// let levels: Vec<_> = std::thread::scope(|s| {
///     let hs: Vec<_> = ThreadGroup::new(2).unwrap().into_iter().map(|r| {
///         let (x, cfg) = (&x, &cfg);
///         s.spawn(move || {
///             let rows = shard_range(30, 2, r.rank());
///             run_level_sharded(&x[rows.start * 2..rows.end * 2], 2, cfg, 7, &r).unwrap()
///         })
///     }).collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// for l in &levels {
///     assert_eq!((&l.assignment, &l.members, &l.offsets), (&one.assignment, &one.members, &one.offsets));
/// }
/// ```
pub fn run_level_sharded(
    x: &[f32],
    d: usize,
    cfg: &LevelConfig,
    seed: u64,
    comm: &dyn Communicator,
) -> Result<Level> {
    let n_local = x.len() / d.max(1);
    let counts = gather_counts(comm, n_local)?;
    let offset: usize = counts[..comm.rank()].iter().sum();
    let n: usize = counts.iter().sum();
    let k = cfg.k.min(n);
    if k == 0 {
        return Err(invalid("k", "a level needs k >= 1 and a non-empty input"));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let kcfg = |k: usize, seed: u64| KMeansConfig {
        k,
        n_iter: cfg.n_iter,
        init: Init::KMeansPlusPlus,
        seed,
        ..KMeansConfig::new(k)
    };
    let km = kmeans::train_sharded(
        x,
        d,
        &kcfg(k, rng.random()),
        comm,
        None,
        &mut |_, _| {},
        &mut |_| Ok(()),
    )?;
    let mut centroids = km.centroids;
    let (mut labels, mut dist) = kmeans::assign(x, d, &centroids)?;
    for _ in 0..cfg.n_resampling_steps {
        // Every cluster's members in the order of the whole-input sort (distance, then row), or, for `Closest`,
        // the first `sample_size` of them: one rank has them sorted already; several merge their candidates.
        let (loc_off, loc_members) = sorted_clusters(&labels, &dist, k);
        let clusters: Vec<Vec<usize>> = if comm.world_size() == 1 {
            (0..k)
                .map(|j| loc_members[loc_off[j]..loc_off[j + 1]].to_vec())
                .collect()
        } else {
            // This rank's candidates per cluster: (label, distance, global row), closest first.
            let (mut cl, mut cd, mut cr) = (Vec::new(), Vec::new(), Vec::new());
            for j in 0..k {
                let c = &loc_members[loc_off[j]..loc_off[j + 1]];
                let take = match cfg.strategy {
                    Pick::Closest => cfg.sample_size.min(c.len()),
                    Pick::Random => c.len(),
                };
                for &i in &c[..take] {
                    cl.push(j as i64);
                    cd.push(dist[i] as f64);
                    cr.push((offset + i) as i64);
                }
            }
            let (cl, cd, cr) = (
                comm.all_gather_i64(&cl)?,
                comm.all_gather_f64(&cd)?,
                comm.all_gather_i64(&cr)?,
            );
            let mut by_cluster: Vec<Vec<(f32, usize)>> = vec![Vec::new(); k];
            for ((&l, &dd), &row) in cl.iter().zip(&cd).zip(&cr) {
                by_cluster[l as usize].push((dd as f32, row as usize));
            }
            by_cluster
                .into_iter()
                .map(|mut c| {
                    c.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    c.into_iter().map(|p| p.1).collect()
                })
                .collect()
        };
        let mut picked = Vec::new();
        for c in &clusters {
            let m = cfg.sample_size.min(c.len());
            match cfg.strategy {
                Pick::Closest => picked.extend_from_slice(&c[..m]),
                Pick::Random => {
                    picked.extend(sample(&mut rng, c.len(), m).into_iter().map(|i| c[i]))
                }
            }
        }
        picked.sort_unstable();
        // The picked rows from their owners, in row order (rank order = row order).
        let mine: Vec<f32> = picked
            .iter()
            .filter(|&&g| g >= offset && g < offset + n_local)
            .flat_map(|&g| x[(g - offset) * d..(g - offset + 1) * d].iter().copied())
            .collect();
        let sub = comm.all_gather_f32(&mine)?;
        let kk = k.min(picked.len());
        let km = kmeans::train(&sub, d, &kcfg(kk, rng.random()))?;
        centroids = km.centroids;
        let a = kmeans::assign(x, d, &centroids)?;
        labels = a.0;
        dist = a.1;
    }
    let kk = centroids.len() / d;
    let (all_labels, all_dist) = if comm.world_size() == 1 {
        (labels, dist)
    } else {
        let l: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let all = comm
            .all_gather_i64(&l)?
            .into_iter()
            .map(|l| l as u32)
            .collect();
        (all, comm.all_gather_f32(&dist)?)
    };
    let (offsets, members) = sorted_clusters(&all_labels, &all_dist, kk);
    Ok(Level {
        k: kk,
        centroids,
        assignment: all_labels,
        offsets,
        members,
    })
}

/// The seed of level `t` (0-based) of a hierarchy seeded with `seed` (what [`hierarchical_kmeans`] passes to
/// [`run_level`], so a level can be recomputed on its own).
///
/// ```
/// use dinov2_curate::hkmeans::level_seed;
/// assert_eq!(level_seed(5, 0), 5);
/// assert_ne!(level_seed(5, 1), level_seed(5, 0));
/// ```
pub fn level_seed(seed: u64, t: usize) -> u64 {
    seed.wrapping_add(t as u64 * 7919)
}

/// Hierarchical k-means: level 1 clusters the rows of `x`, level `t + 1` clusters level `t`'s centroids.
pub fn hierarchical_kmeans(
    x: &[f32],
    d: usize,
    levels: &[LevelConfig],
    seed: u64,
) -> Result<Vec<Level>> {
    let mut out: Vec<Level> = Vec::new();
    for (t, cfg) in levels.iter().enumerate() {
        let input: &[f32] = match out.last() {
            Some(l) => &l.centroids,
            None => x,
        };
        let level = run_level(input, d, cfg, level_seed(seed, t))?;
        out.push(level);
    }
    Ok(out)
}

/// Water-filling: splits `budget` over clusters of capacities `caps` as evenly as possible. Finds the largest
/// integer cap `c` with `sum_i min(c, caps_i) <= budget`, gives `min(c, caps_i)` to each cluster and the leftover
/// units (+1 each) to clusters drawn at random among those with `caps_i > c`. If `budget >= sum(caps)` every cluster
/// gets its capacity.
///
/// ```
/// use rand::SeedableRng;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let a = dinov2_curate::hkmeans::water_fill(&[1, 10, 10], 11, &mut rng);
/// assert_eq!(a, vec![1, 5, 5]);
/// ```
pub fn water_fill(caps: &[usize], budget: usize, rng: &mut impl Rng) -> Vec<usize> {
    let total: usize = caps.iter().sum();
    if budget >= total {
        return caps.to_vec();
    }
    let filled = |c: usize| caps.iter().map(|&s| s.min(c)).sum::<usize>();
    let (mut lo, mut hi) = (0usize, caps.iter().copied().max().unwrap_or(0));
    // Invariant: filled(lo) <= budget < filled(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if filled(mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut alloc: Vec<usize> = caps.iter().map(|&s| s.min(lo)).collect();
    let left = budget - alloc.iter().sum::<usize>();
    let above: Vec<usize> = (0..caps.len()).filter(|&i| caps[i] > lo).collect();
    for i in sample(rng, above.len(), left.min(above.len())) {
        alloc[above[i]] += 1;
    }
    alloc
}

/// Number of raw rows below every cluster of every level (`sizes[t][j]`).
pub fn flat_sizes(levels: &[Level]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (t, l) in levels.iter().enumerate() {
        let s = (0..l.k)
            .map(|j| {
                if t == 0 {
                    l.cluster(j).len()
                } else {
                    l.cluster(j).iter().map(|&c| out[t - 1][c]).sum()
                }
            })
            .collect();
        out.push(s);
    }
    out
}

/// Balanced hierarchical sampling of `target` rows from the hierarchy (`multiplier` = most copies of one row,
/// `pick` = leaf strategy). Returns selected raw row ids, ascending (a row appears up to `multiplier` times).
pub fn balanced_sample(
    levels: &[Level],
    target: usize,
    multiplier: usize,
    pick: Pick,
    seed: u64,
) -> Result<Vec<i64>> {
    if levels.is_empty() {
        return Err(invalid(
            "levels",
            "empty hierarchy: give at least one level",
        ));
    }
    let m = multiplier.max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sizes = flat_sizes(levels);
    let t_top = levels.len() - 1;
    let caps: Vec<usize> = sizes[t_top].iter().map(|&s| s * m).collect();
    // (cluster, budget) pairs of the current level.
    let mut current: Vec<(usize, usize)> = water_fill(&caps, target, &mut rng)
        .into_iter()
        .enumerate()
        .filter(|&(_, b)| b > 0)
        .collect();
    for t in (1..=t_top).rev() {
        let mut next = Vec::new();
        for &(j, b) in &current {
            let children = levels[t].cluster(j);
            let caps: Vec<usize> = children.iter().map(|&c| sizes[t - 1][c] * m).collect();
            for (&c, cb) in children.iter().zip(water_fill(&caps, b, &mut rng)) {
                if cb > 0 {
                    next.push((c, cb));
                }
            }
        }
        current = next;
    }
    let mut out = Vec::new();
    for &(j, b) in &current {
        let members = levels[0].cluster(j);
        let s = members.len();
        if s == 0 {
            continue;
        }
        let full = b / s;
        for _ in 0..full {
            out.extend(members.iter().map(|&i| i as i64));
        }
        let r = b % s;
        match pick {
            Pick::Closest => out.extend(members[..r].iter().map(|&i| i as i64)),
            Pick::Random => out.extend(
                sample(&mut rng, s, r)
                    .into_iter()
                    .map(|i| members[i] as i64),
            ),
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Water-filling by definition: scan every integer cap.
    fn fill_def(caps: &[usize], budget: usize) -> (usize, Vec<usize>) {
        let total: usize = caps.iter().sum();
        if budget >= total {
            return (usize::MAX, caps.to_vec());
        }
        let mut c = 0;
        while caps.iter().map(|&s| s.min(c + 1)).sum::<usize>() <= budget {
            c += 1;
        }
        (c, caps.iter().map(|&s| s.min(c)).collect())
    }

    #[test]
    fn water_fill_matches_definition() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for trial in 0..200 {
            let n = 1 + trial % 13;
            let caps: Vec<usize> = (0..n).map(|_| rng.random_range(0..40)).collect();
            let budget = rng.random_range(0..caps.iter().sum::<usize>() + 10);
            let a = water_fill(&caps, budget, &mut rng);
            let (c, base) = fill_def(&caps, budget);
            assert_eq!(a.iter().sum::<usize>(), budget.min(caps.iter().sum()));
            for i in 0..n {
                assert!(
                    a[i] == base[i] || (a[i] == base[i] + 1 && caps[i] > c),
                    "{caps:?} {budget} {a:?}"
                );
                assert!(a[i] <= caps[i]);
            }
        }
    }

    fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Unbalanced: 70% of the rows around one centre.
        (0..n)
            .flat_map(|i| {
                let c = if i % 10 < 7 {
                    0.0
                } else {
                    (i % 10) as f32 * 3.0
                };
                (0..d)
                    .map(|p| if p == 0 { c } else { 0.0 } + rng.random::<f32>())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn hierarchy_is_consistent_and_sampling_counts_follow_water_filling() {
        let (n, d) = (600, 4);
        let x = data(n, d, 9);
        let cfgs = [
            LevelConfig {
                k: 40,
                n_iter: 10,
                n_resampling_steps: 2,
                sample_size: 5,
                strategy: Pick::Closest,
            },
            LevelConfig {
                k: 6,
                n_iter: 10,
                n_resampling_steps: 2,
                sample_size: 3,
                strategy: Pick::Random,
            },
        ];
        let levels = hierarchical_kmeans(&x, d, &cfgs, 3).unwrap();
        assert_eq!(levels[0].assignment.len(), n);
        assert_eq!(levels[1].assignment.len(), levels[0].k);
        let sizes = flat_sizes(&levels);
        assert_eq!(sizes[1].iter().sum::<usize>(), n);
        // Members sorted by distance to their centroid.
        for j in 0..levels[0].k {
            let c = &levels[0].centroids[j * d..(j + 1) * d];
            let dd: Vec<f32> = levels[0]
                .cluster(j)
                .iter()
                .map(|&i| {
                    x[i * d..(i + 1) * d]
                        .iter()
                        .zip(c)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum()
                })
                .collect();
            assert!(dd.windows(2).all(|w| w[0] <= w[1] + 1e-5));
        }
        for (target, mult, pick) in [
            (100, 1, Pick::Random),
            (250, 1, Pick::Closest),
            (900, 2, Pick::Random),
        ] {
            let sel = balanced_sample(&levels, target, mult, pick, 1).unwrap();
            assert_eq!(sel.len(), target.min(n * mult));
            // Count per top-level cluster and compare to the water-filling definition.
            let top_of =
                |i: i64| levels[1].assignment[levels[0].assignment[i as usize] as usize] as usize;
            let mut got = vec![0usize; levels[1].k];
            sel.iter().for_each(|&i| got[top_of(i)] += 1);
            let caps: Vec<usize> = sizes[1].iter().map(|&s| s * mult).collect();
            let (c, base) = fill_def(&caps, target);
            for j in 0..levels[1].k {
                assert!(
                    got[j] == base[j] || (got[j] == base[j] + 1 && caps[j] > c),
                    "{got:?} vs {base:?}"
                );
            }
            // No row more than `mult` times.
            let mut counts = std::collections::HashMap::new();
            sel.iter().for_each(|&i| *counts.entry(i).or_insert(0) += 1);
            assert!(counts.values().all(|&v| v <= mult));
        }
    }
}
