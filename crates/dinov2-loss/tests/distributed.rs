//! Global-batch semantics of centering and Sinkhorn-Knopp with two simulated ranks ([`ThreadGroup`]),
//! against one rank holding the whole batch (or the official per-rank formula where the official
//! definition is not a global-batch statistic).
//!
//! Tolerances. The teacher logits are seeded and lie on the grid of multiples of 1/64, so every centre
//! statistic is an exact sum (a few f32 values of ≤ 11 significant bits, accumulated in f64 and rounded
//! back without loss, then added across ranks without loss) and the rank counts are powers of two where a
//! per-rank mean is taken: both sides then do the same roundings on the same numbers, and centres and
//! centred targets are compared for equality. Sinkhorn-Knopp sums `exp` values, which are not exact: the
//! sides sum the same positive terms in a different order (two rank-partial sums, then their sum), so
//! each all-reduced sum of `n` terms differs by at most `2·sum_error(n, U32)` (relative, no cancellation
//! among positive terms); the total is normalised away by the first prototype normalisation and every
//! later normalisation can at most double an inherited relative difference before dividing it out again,
//! so `2·(2·n_iterations + 1)` such sums bound the difference of the output ([`sinkhorn_tol`]).

mod common;

use std::sync::Arc;
use std::thread;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, sum_error, SeededRng, U32};
use dinov2_loss::{
    Communicator, DinoLoss, DinoLossConfig, IbotLossConfig, IbotPatchLoss, ThreadGroup,
};

const CPU: Device = Device::Cpu;

/// Seeded N(0, std²) teacher logits rounded to multiples of 1/64 (f32).
fn grid_logits(rng: &mut SeededRng, shape: &[usize], std: f64) -> Tensor {
    let t = rng.normal(shape, 0.0, std, DType::F32);
    ((t * 64.0).unwrap().round().unwrap() / 64.0).unwrap()
}

/// Bound on the relative difference of Sinkhorn-Knopp outputs computed from the same logits with
/// rank-split and whole-batch sums of at most `n` terms (see the module docs).
fn sinkhorn_tol(n: usize, n_iterations: usize) -> f64 {
    2.0 * (2 * n_iterations + 1) as f64 * 2.0 * sum_error(n, U32)
}

/// Runs `f(rank_communicator, rank)` on every rank of a 2-rank thread group, returning results by rank.
fn on_two_ranks<T: Send + 'static>(
    f: impl Fn(Arc<dyn Communicator>, usize) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let ranks = ThreadGroup::new(2).unwrap();
    let handles: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let f = f.clone();
            thread::spawn(move || f(Arc::new(r), i))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn dino_centre_and_sinkhorn_are_global_batch_statistics() {
    let k = 16;
    let mut rng = SeededRng::new(11);
    // two steps of teacher logits, 6 rows each (3 per rank)
    let steps: Vec<Tensor> = (0..2)
        .map(|_| grid_logits(&mut rng, &[6, k], 0.5))
        .collect();

    // one rank with the whole batch
    let mut single = DinoLoss::new(DinoLossConfig::new(k), &CPU).unwrap();
    let mut single_targets = vec![];
    for t in &steps {
        single_targets.push(single.softmax_center_teacher(t, 0.04).unwrap());
        single.update_center(t).unwrap();
    }
    single.center_mut().apply_pending().unwrap();
    let single_sk = single.sinkhorn_knopp_teacher(&steps[0], 0.05, 3).unwrap();

    let steps2 = steps.clone();
    let results = on_two_ranks(move |comm, rank| {
        let mut loss = DinoLoss::new(DinoLossConfig::new(k), &CPU)
            .unwrap()
            .with_communicator(comm);
        let mut targets = vec![];
        for t in &steps2 {
            let local = t.narrow(0, 3 * rank, 3).unwrap();
            targets.push(loss.softmax_center_teacher(&local, 0.04).unwrap());
            loss.update_center(&local).unwrap();
        }
        loss.center_mut().apply_pending().unwrap();
        let local = steps2[0].narrow(0, 3 * rank, 3).unwrap();
        let sk = loss.sinkhorn_knopp_teacher(&local, 0.05, 3).unwrap();
        (loss.center().tensor().clone(), targets, sk)
    });
    for (rank, (center, targets, sk)) in results.iter().enumerate() {
        assert_close(center, single.center().tensor(), 0.0, "centre");
        for (t, st) in targets.iter().zip(&single_targets) {
            let st = st.narrow(0, 3 * rank, 3).unwrap();
            assert_close(t, &st, 0.0, "centred targets");
        }
        let single_sk = single_sk.narrow(0, 3 * rank, 3).unwrap();
        assert_close(sk, &single_sk, sinkhorn_tol(6 * k, 3), "sinkhorn");
    }
}

#[test]
fn ibot_sinkhorn_is_global_and_centre_averages_rank_means() {
    let k = 12;
    let mut rng = SeededRng::new(12);
    // rank 0 has 2 masked patches, rank 1 has 4
    let all = grid_logits(&mut rng, &[8, k], 0.5);
    let parts = [(0usize, 2usize), (2, 4)];

    let single = IbotPatchLoss::new(IbotLossConfig::new(k), &CPU).unwrap();
    let six = all.narrow(0, 0, 6).unwrap();
    let single_sk = single.sinkhorn_knopp_teacher(&six, 0.05, 6, 3).unwrap();

    let all2 = all.clone();
    let results = on_two_ranks(move |comm, rank| {
        let (start, len) = parts[rank];
        let local = all2.narrow(0, start, len).unwrap();
        let mut loss = IbotPatchLoss::new(IbotLossConfig::new(k), &CPU)
            .unwrap()
            .with_communicator(comm);
        let sk = loss.sinkhorn_knopp_teacher(&local, 0.05, len, 3).unwrap();
        loss.update_center(&local.unsqueeze(0).unwrap()).unwrap();
        loss.center_mut().apply_pending().unwrap();
        (sk, loss.center().tensor().clone())
    });
    // official iBOT centre: mean over ranks of each rank's mean over its own masked patches
    // (exact sums and power-of-two means: only the EMA's product `mean·(1 − 0.9)` rounds, once per side)
    let rank_mean = |s: usize, l: usize| all.narrow(0, s, l).unwrap().mean_keepdim(0).unwrap();
    let expected_centre = (((rank_mean(0, 2) + rank_mean(2, 4)).unwrap() * 0.5).unwrap()
        * (1.0 - 0.9))
        .unwrap()
        .reshape((1, 1, k))
        .unwrap();
    for (rank, (sk, centre)) in results.iter().enumerate() {
        let (start, len) = parts[rank];
        let single_sk = single_sk.narrow(0, start, len).unwrap();
        assert_close(sk, &single_sk, sinkhorn_tol(6 * k, 3), "ibot sinkhorn");
        assert_close(centre, &expected_centre, 0.0, "ibot centre");
    }
    // with equal counts per rank it is the global patch mean, i.e. the single-rank centre
    let mut single = IbotPatchLoss::new(IbotLossConfig::new(k), &CPU).unwrap();
    single.update_center(&all.unsqueeze(0).unwrap()).unwrap();
    single.center_mut().apply_pending().unwrap();
    let all2 = all.clone();
    let centres = on_two_ranks(move |comm, rank| {
        let mut loss = IbotPatchLoss::new(IbotLossConfig::new(k), &CPU)
            .unwrap()
            .with_communicator(comm);
        let local = all2.narrow(0, 4 * rank, 4).unwrap().unsqueeze(0).unwrap();
        loss.update_center(&local).unwrap();
        loss.center_mut().apply_pending().unwrap();
        loss.center().tensor().clone()
    });
    for c in &centres {
        assert_close(
            c,
            single.center().tensor(),
            0.0,
            "ibot centre, equal counts",
        );
    }
}
