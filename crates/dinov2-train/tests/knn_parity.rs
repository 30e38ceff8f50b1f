//! `knn_evaluate` against the official `eval/knn.py` (`KnnModule` + torchmetrics top-k accuracy) on clustered
//! random features: `tools/make_knn_fixtures.py` wrote `tests/fixtures/knn.safetensors`.

use candle_core::{Device, Tensor};
use dinov2_train::eval::knn::{knn_accuracy, knn_evaluate, TEMPERATURE};

fn fixture() -> std::collections::HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/knn.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn usizes(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| usize::try_from(v).unwrap())
        .collect()
}

#[test]
fn accuracies_match_the_official_knn_for_every_k() {
    let f = fixture();
    let (train, test) = (&f["train"], &f["test"]);
    let (train_labels, test_labels) = (usizes(&f["train_labels"]), usizes(&f["test_labels"]));
    let ks = usizes(&f["ks"]);
    let top1 = f["top1"].to_vec1::<f64>().unwrap();
    let top5 = f["top5"].to_vec1::<f64>().unwrap();
    let top5_stable = f["top5_stable"].to_vec1::<f64>().unwrap();
    let ours = knn_evaluate(train, &train_labels, test, &test_labels, &ks, TEMPERATURE).unwrap();
    let m = test_labels.len() as f64;
    let mut same_top5 = 0;
    for (i, r) in ours.iter().enumerate() {
        assert_eq!(r.k, ks[i]);
        // accuracies are counts over m rows: compare in whole rows
        let rows = |percent: f64| (percent / 100.0 * m).round();
        assert_eq!(rows(r.top1), (top1[i] * m).round(), "top-1, k = {}", r.k);
        assert_eq!(
            rows(r.top5),
            (top5_stable[i] * m).round(),
            "top-5, k = {}",
            r.k
        );
        if rows(r.top5) == (top5[i] * m).round() {
            same_top5 += 1;
        }
        // one k at a time gives the same top-1 (the softmax is over max(ks) or k: the argmax is the same)
        let single =
            knn_accuracy(train, &train_labels, test, &test_labels, r.k, TEMPERATURE).unwrap();
        assert_eq!(rows(r.top1), (single * m).round(), "k = {}", r.k);
    }
    // the official top-5 differs only where torch.topk broke ties among classes of score 0 (small k)
    assert!(
        same_top5 >= ks.len() - 2,
        "{same_top5} of {} k agree",
        ks.len()
    );
    assert!(
        top1.iter().all(|&a| a > 0.3 && a < 0.95),
        "a useful fixture"
    );
}
