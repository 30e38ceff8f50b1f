//! Sharded runs (several workers, each with a contiguous row range, talking through a `dinov2_dist::Communicator`) give the
//! single-process results.

use std::ops::Range;

use dinov2_curate::dedup::{self_dedup, self_dedup_sharded, Searcher};
use dinov2_curate::kmeans::{self, train, train_sharded, Init, KMeans, KMeansConfig};
use dinov2_curate::store::l2_normalize_rows;
use dinov2_dist::{shard_range, Communicator, ThreadGroup, ThreadRank};
use rand::{Rng, SeedableRng};

const D: usize = 8;

/// `n` rows around `centres` random centres, plus planted near-duplicates, L2-normalised.
fn clustered(n: usize, centres: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c: Vec<f32> = (0..centres * D)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    let mut x = Vec::with_capacity(n * D);
    for i in 0..n {
        if i > 0 && i % 7 == 0 {
            // near-duplicate of an earlier row
            let src = rng.random_range(0..i);
            for p in 0..D {
                let v = x[src * D + p] + (rng.random::<f32>() - 0.5) * 0.01;
                x.push(v);
            }
        } else {
            let j = rng.random_range(0..centres);
            for p in 0..D {
                x.push(c[j * D + p] + (rng.random::<f32>() - 0.5) * 0.3);
            }
        }
    }
    l2_normalize_rows(&mut x, D);
    x
}

/// Runs `f(worker handle, its rows)` on one thread per range, ranges in rank order.
fn on_workers<T: Send>(
    x: &[f32],
    ranges: &[Range<usize>],
    f: impl Fn(&ThreadRank, &[f32]) -> T + Sync,
) -> Vec<T> {
    let ranks = ThreadGroup::new(ranges.len()).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .zip(ranges)
            .map(|(r, rows)| {
                let f = &f;
                s.spawn(move || f(&r, &x[rows.start * D..rows.end * D]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Largest centroid coordinate difference accepted between a sharded and the single-process model.
const CENTROID_TOL: f32 = 1e-5;

fn assert_same_model(a: &KMeans, b: &KMeans, x: &[f32]) {
    assert_eq!(a.iterations, b.iterations);
    for (p, q) in a.centroids.iter().zip(&b.centroids) {
        assert!((p - q).abs() < CENTROID_TOL, "{p} vs {q}");
    }
    for (p, q) in a.objective_history.iter().zip(&b.objective_history) {
        // f32 distances to centroids that may differ in the last bit (f64 sums added per worker, then rounded).
        assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{p} vs {q}");
    }
    // Comparing assignments exactly is sound only if no row is nearly equidistant from its two nearest centroids:
    // a centroid moved by at most `delta` (within CENTROID_TOL per coordinate) changes a squared distance of unit
    // rows by at most 4 * delta + delta^2, so the gap must exceed twice that.
    let delta = f64::from(CENTROID_TOL) * (D as f64).sqrt();
    let gap = min_assignment_gap(b, x);
    assert!(
        gap > 2.0 * (4.0 * delta + delta * delta),
        "a row is {gap} from a tie"
    );
    assert_eq!(a.assign(x).unwrap().0, b.assign(x).unwrap().0);
}

/// Smallest difference, over rows, between the squared distances to the nearest and second-nearest centroid (f64).
fn min_assignment_gap(m: &KMeans, x: &[f32]) -> f64 {
    let mut gap = f64::INFINITY;
    for r in x.chunks(D) {
        let mut ds: Vec<f64> = m
            .centroids
            .chunks(D)
            .map(|c| {
                r.iter()
                    .zip(c)
                    .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                    .sum()
            })
            .collect();
        ds.sort_by(f64::total_cmp);
        gap = gap.min(ds[1] - ds[0]);
    }
    gap
}

#[test]
fn sharded_kmeans_matches_single_process() {
    let n = 400;
    let x = clustered(n, 6, 1);
    // Uneven shards, one of them empty.
    let ranges = [0..97, 97..97, 97..250, 250..n];
    for init in [Init::KMeansPlusPlus, Init::Random] {
        for subsample in [None, Some(30)] {
            let cfg = KMeansConfig {
                init,
                seed: 3,
                n_iter: 25,
                max_points_per_centroid: subsample,
                ..KMeansConfig::new(8)
            };
            let single = train(&x, D, &cfg).unwrap();
            let sharded = on_workers(&x, &ranges, |r, local| {
                train_sharded(local, D, &cfg, r, None, &mut |_, _| {}, &mut |_| Ok(())).unwrap()
            });
            for m in &sharded {
                assert_same_model(m, &single, &x);
            }
        }
    }
}

#[test]
fn sharded_kmeans_plus_plus_picks_the_same_seeds() {
    let n = 300;
    let x = clustered(n, 5, 2);
    let ranges: Vec<_> = (0..3).map(|r| shard_range(n, 3, r)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let single = kmeans::kmeans_plus_plus(&x, D, 12, None, &mut rng).unwrap();
    let sharded = on_workers(&x, &ranges, |r, local| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        kmeans::kmeans_plus_plus_sharded(local, D, 12, None, &mut rng, r).unwrap()
    });
    for c in sharded {
        // Candidate sampling compares a uniform draw with cumulative D^2 sums that are added per worker, so a
        // draw landing within rounding of a boundary could pick a neighbouring row; on this data it does not.
        assert_eq!(c, single);
    }
}

#[test]
fn sharded_dedup_matches_single_process() {
    let n = 500;
    let x = clustered(n, 40, 4);
    let searcher = Searcher::Exact { base: &x };
    let single = self_dedup(&x, D, 16, 0.95, &searcher, 64).unwrap();
    assert!(
        single.n_kept < n && single.n_components > 1,
        "{}",
        single.n_kept
    );
    let ranges = [0..1, 1..180, 180..181, 181..n];
    let sharded = on_workers(&x, &ranges, |r, local| {
        self_dedup_sharded(local, D, 16, 0.95, &searcher, 64, r).unwrap()
    });
    for s in sharded {
        assert_eq!(s, single);
        assert_eq!(s.keep, single.keep);
        assert_eq!(s.components, single.components);
    }
}

#[test]
fn sharded_inputs_that_do_not_fit_are_errors_on_every_worker() {
    let x = clustered(60, 3, 5);
    // The searcher covers only half of the pool the workers hold.
    let half = Searcher::Exact { base: &x[..30 * D] };
    let ranges = [0..30, 30..60];
    for res in on_workers(&x, &ranges, |r, local| {
        self_dedup_sharded(local, D, 4, 0.9, &half, 16, r).map(|_| ())
    }) {
        match res {
            Err(dinov2_curate::Error::Shape { op, reason }) => {
                assert_eq!(op, "self-dedup");
                assert!(reason.contains("searcher covers 30"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    // k larger than the whole pool.
    for res in on_workers(&x, &ranges, |r, local| {
        train_sharded(
            local,
            D,
            &KMeansConfig::new(61),
            r,
            None,
            &mut |_, _| {},
            &mut |_| Ok(()),
        )
        .map(|_| r.world_size())
    }) {
        match res {
            Err(e @ dinov2_curate::Error::InvalidArgument { name: "k", .. }) => {
                assert!(e.to_string().contains("k = 61, n = 60"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
