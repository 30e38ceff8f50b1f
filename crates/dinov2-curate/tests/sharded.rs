//! Sharded runs (several workers, each with a contiguous row range, talking through a `Collective`) give the
//! single-process results.

use std::ops::Range;

use dinov2_curate::collective::{shard_range, Collective, ThreadGroup, ThreadRank};
use dinov2_curate::dedup::{self_dedup, self_dedup_sharded, Searcher};
use dinov2_curate::kmeans::{self, train, train_sharded, Init, KMeans, KMeansConfig};
use dinov2_curate::store::l2_normalize_rows;
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

fn assert_same_model(a: &KMeans, b: &KMeans, x: &[f32]) {
    assert_eq!(a.iterations, b.iterations);
    for (p, q) in a.centroids.iter().zip(&b.centroids) {
        assert!((p - q).abs() < 1e-5, "{p} vs {q}");
    }
    for (p, q) in a.objective_history.iter().zip(&b.objective_history) {
        // f32 distances to centroids that may differ in the last bit (f64 sums added per worker, then rounded).
        assert!((p - q).abs() <= 1e-6 * p.abs().max(1.0), "{p} vs {q}");
    }
    assert_eq!(a.assign(x).unwrap().0, b.assign(x).unwrap().0);
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
