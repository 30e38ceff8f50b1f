//! Global-batch semantics of centering and Sinkhorn-Knopp with two simulated ranks ([`ThreadGroup`]),
//! against one rank holding the whole batch (or the official per-rank formula where the official
//! definition is not a global-batch statistic).

mod common;

use std::sync::Arc;
use std::thread;

use candle_core::{Device, Tensor};
use common::assert_close;
use dinov2_loss::{DinoLoss, IbotPatchLoss, Reducer, ThreadGroup};

const CPU: Device = Device::Cpu;
const TOL: f64 = 1e-6;

/// Runs `f(rank_reducer, rank)` on every rank of a 2-rank thread group, returning results by rank.
fn on_two_ranks<T: Send + 'static>(
    f: impl Fn(Arc<dyn Reducer>, usize) -> T + Send + Sync + Clone + 'static,
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
    // two steps of teacher logits, 6 rows each (3 per rank)
    let steps: Vec<Tensor> = (0..2)
        .map(|_| Tensor::randn(0f32, 0.5, (6, k), &CPU).unwrap())
        .collect();

    // one rank with the whole batch
    let mut single = DinoLoss::new(k, &CPU).unwrap();
    let mut single_targets = vec![];
    for t in &steps {
        single_targets.push(single.softmax_center_teacher(t, 0.04).unwrap());
        single.update_center(t).unwrap();
    }
    single.center_mut().apply_pending().unwrap();
    let single_sk = single.sinkhorn_knopp_teacher(&steps[0], 0.05, 3).unwrap();

    let steps2 = steps.clone();
    let results = on_two_ranks(move |reducer, rank| {
        let mut loss = DinoLoss::new(k, &CPU).unwrap().with_reducer(reducer);
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
        assert_close(center, single.center().tensor(), TOL, "centre");
        for (t, st) in targets.iter().zip(&single_targets) {
            assert_close(
                t,
                &st.narrow(0, 3 * rank, 3).unwrap(),
                TOL,
                "centred targets",
            );
        }
        assert_close(
            sk,
            &single_sk.narrow(0, 3 * rank, 3).unwrap(),
            TOL,
            "sinkhorn",
        );
    }
}

#[test]
fn ibot_sinkhorn_is_global_and_centre_averages_rank_means() {
    let k = 12;
    // rank 0 has 2 masked patches, rank 1 has 5
    let all = Tensor::randn(0f32, 0.5, (7, k), &CPU).unwrap();
    let parts = [(0usize, 2usize), (2, 5)];

    let single = IbotPatchLoss::new(k, &CPU).unwrap();
    let single_sk = single.sinkhorn_knopp_teacher(&all, 0.05, 7, 3).unwrap();

    let all2 = all.clone();
    let results = on_two_ranks(move |reducer, rank| {
        let (start, len) = parts[rank];
        let local = all2.narrow(0, start, len).unwrap();
        let mut loss = IbotPatchLoss::new(k, &CPU).unwrap().with_reducer(reducer);
        let sk = loss.sinkhorn_knopp_teacher(&local, 0.05, len, 3).unwrap();
        loss.update_center(&local.unsqueeze(0).unwrap()).unwrap();
        loss.center_mut().apply_pending().unwrap();
        (sk, loss.center().tensor().clone())
    });
    // official iBOT centre: mean over ranks of each rank's mean over its own masked patches
    let rank_mean = |s: usize, l: usize| all.narrow(0, s, l).unwrap().mean_keepdim(0).unwrap();
    let expected_centre = (((rank_mean(0, 2) + rank_mean(2, 5)).unwrap() * 0.5).unwrap() * 0.1)
        .unwrap()
        .reshape((1, 1, k))
        .unwrap();
    for (rank, (sk, centre)) in results.iter().enumerate() {
        let (start, len) = parts[rank];
        assert_close(
            sk,
            &single_sk.narrow(0, start, len).unwrap(),
            TOL,
            "ibot sinkhorn",
        );
        assert_close(centre, &expected_centre, TOL, "ibot centre");
    }
    // with equal counts per rank it is the global patch mean, i.e. the single-rank centre
    let mut single = IbotPatchLoss::new(k, &CPU).unwrap();
    let even = all.narrow(0, 0, 6).unwrap();
    single.update_center(&even.unsqueeze(0).unwrap()).unwrap();
    single.center_mut().apply_pending().unwrap();
    let even2 = even.clone();
    let centres = on_two_ranks(move |reducer, rank| {
        let mut loss = IbotPatchLoss::new(k, &CPU).unwrap().with_reducer(reducer);
        let local = even2.narrow(0, 3 * rank, 3).unwrap().unsqueeze(0).unwrap();
        loss.update_center(&local).unwrap();
        loss.center_mut().apply_pending().unwrap();
        loss.center().tensor().clone()
    });
    for c in &centres {
        assert_close(
            c,
            single.center().tensor(),
            TOL,
            "ibot centre, equal counts",
        );
    }
}
