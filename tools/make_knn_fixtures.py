#!/usr/bin/env python3
"""Golden fixture for `dinov2_train::eval::knn::knn_evaluate`, computed with the official `eval/knn.py`.

Run (from the repository root; CPU only, a few seconds):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/make_knn_fixtures.py

with $PYTHON a Python environment from tools/requirements.txt (plus `torchmetrics`, which the official metrics
use) and $DINOV2_SRC a checkout of facebookresearch/dinov2.

Output: `crates/dinov2-train/tests/fixtures/knn.safetensors` with clustered random features (`train` [N, D],
`test` [M, D], raw: the Rust side L2-normalises them itself), their labels (i64), the k list, and the official
top-1 / top-5 accuracies for each k (f64 fractions), and `top5_stable`: top-5 from the official class scores
with exact ties ranked lower class first (torch.topk orders ties arbitrarily: with k = 1, say, every class but
one has score 0, and which zeros make the top 5 is torch's choice).

What is reference and what is glue:
* `KnnModule` (neighbour search, softmax over the max-k neighbours, per-k class scores) is the official class,
  called unchanged; it needs `torch.distributed`, so a one-process gloo group is initialised.
* Features are L2-normalised with `F.normalize` before the module, as the official `ModelWithNormalize` does.
* Accuracies come from the official `build_topk_accuracy_metric` (torchmetrics `MulticlassAccuracy`, micro
  average) on the module's per-k class scores.
"""

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"))
    ap.add_argument("--out", default="crates/dinov2-train/tests/fixtures/knn.safetensors")
    args = ap.parse_args()
    if args.dinov2_src:
        sys.path.insert(0, args.dinov2_src)
    from dinov2.eval.knn import KnnModule
    from dinov2.eval.metrics import AccuracyAveraging, build_topk_accuracy_metric

    with tempfile.TemporaryDirectory() as d:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{d}/store", rank=0, world_size=1
        )
        g = torch.Generator().manual_seed(0)
        num_classes, dim, n, m = 12, 16, 240, 90
        centres = torch.randn(num_classes, dim, generator=g)
        train_labels = torch.randint(0, num_classes, (n,), generator=g)
        test_labels = torch.randint(0, num_classes, (m,), generator=g)
        # noisy clusters of different scales: accuracy well away from 0 and 100
        train = centres[train_labels] + 1.3 * torch.randn(n, dim, generator=g)
        test = centres[test_labels] + 1.3 * torch.randn(m, dim, generator=g)
        train = train * torch.rand(n, 1, generator=g).add(0.5)
        test = test * torch.rand(m, 1, generator=g).add(0.5)
        ks = [1, 5, 10, 20, 100, 200]
        module = KnnModule(
            F.normalize(train, dim=1), train_labels, ks, 0.07, torch.device("cpu"), num_classes
        )
        probas = module(F.normalize(test, dim=1))
        top1, top5, top5_stable = [], [], []
        for k in ks:
            # torch.topk breaks exact ties (classes of score 0 when fewer than 5 received votes) in no documented
            # order; the same ranking with ties to the lower class index, the rule of the Rust side:
            order = torch.argsort(-probas[k], dim=1, stable=True)[:, :5]
            top5_stable.append(float((order == test_labels[:, None]).any(1).double().mean()))
            metric = build_topk_accuracy_metric(AccuracyAveraging.MEAN_ACCURACY, num_classes)
            metric.update(probas[k], test_labels)
            r = metric.compute()
            top1.append(float(r["top-1"]))
            top5.append(float(r["top-5"]))
            print(f"k={k}: top-1 {top1[-1]:.4f} top-5 {top5[-1]:.4f} (ties to the lower class: {top5_stable[-1]:.4f})")
        torch.distributed.destroy_process_group()
    save_file(
        {
            "train": train.contiguous(),
            "test": test.contiguous(),
            "train_labels": train_labels.to(torch.int64),
            "test_labels": test_labels.to(torch.int64),
            "ks": torch.tensor(ks, dtype=torch.int64),
            "top1": torch.tensor(top1, dtype=torch.float64),
            "top5": torch.tensor(top5, dtype=torch.float64),
            "top5_stable": torch.tensor(top5_stable, dtype=torch.float64),
        },
        args.out,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
