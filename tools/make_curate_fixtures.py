#!/usr/bin/env python3
"""Golden fixtures for `dinov2-curate` (numpy brute force + faiss-cpu oracle).

Run from the repository root:

    $PYTHON tools/make_curate_fixtures.py [--out crates/dinov2-curate/tests/fixtures]

Needs numpy and faiss-cpu (1.15.x). Writes small `.npy` arrays and `expected.json` into the output directory:

- `data.npy`: 1,200 x 32 f32 rows, L2-normalised, drawn around 60 Gaussian centres with a few planted
  near-duplicate groups (clustered like real embeddings, but tiny).
- `queries.npy`: 80 x 32 query rows (for retrieval / non-self k-NN), `reference.npy`: 25 reference rows for
  relative dedup (perturbed copies of some pool rows plus unrelated rows).
- `knn_ids.npy`, `knn_sims.npy`: exact self k-NN (k = 10, the row itself excluded) by brute force in float64,
  cross-checked against faiss `IndexFlatIP`.
- `qknn_ids.npy`, `qknn_sims.npy`: exact k-NN (k = 10) of the queries among the pool.
- `dedup_components.npy`, `dedup_keep.npy`: self-dedup, k = 64 neighbours (excluding self), cosine > 0.6,
  union-find components labelled by smallest member, keep = smallest member of each component.
- `relative_keep.npy`, `relative_components.npy`: relative dedup at cosine > 0.55 (the paper uses 0.45 on SSCD
  descriptors; at 0.45 this small synthetic pool chains into one component) with the references, edges = pool
  k-NN among pool, pool k-NN among references, reference k-NN among pool (k = 64), every component holding a
  reference dropped.
- `expected.json`: faiss k-means objective (k = 20, 20 iterations, no subsampling) evaluated with the final
  centroids on all rows, and water-filling cases (capacities, budget, cap level and base allocation).
"""
import argparse
import json
import os

import numpy as np


def normalize(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_knn(q, b, k, exclude_self):
    s = q.astype(np.float64) @ b.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    # Sort by decreasing similarity, ties by increasing id (stable sort on -s).
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(s, order, axis=1)


class UF:
    def __init__(self, n):
        self.p = list(range(n))

    def find(self, x):
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def edges_from(ids, sims, thr, qoff=0, boff=0):
    out = []
    for q in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if sims[q, j] > thr:
                out.append((q + qoff, int(ids[q, j]) + boff))
    return out


def canonical(uf, n_nodes, n_label):
    labels, root_label, reps = [], {}, []
    for i in range(n_label):
        r = uf.find(i)
        if r not in root_label:
            root_label[r] = len(root_label)
            reps.append(i)
        labels.append(root_label[r])
    return np.array(labels, np.int64), np.array(reps, np.int64)


def water_fill_base(caps, budget):
    if budget >= sum(caps):
        return None, list(caps)
    c = 0
    while sum(min(s, c + 1) for s in caps) <= budget:
        c += 1
    return c, [min(s, c) for s in caps]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="crates/dinov2-curate/tests/fixtures")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import faiss

    rng = np.random.default_rng(20240527)
    n, d, nc = 1200, 32, 60
    centres = rng.normal(size=(nc, d))
    lab = rng.integers(0, nc, size=n)
    x = centres[lab] + rng.normal(size=(n, d)) * rng.uniform(1.4, 2.4, size=(n, 1))
    # Planted near-duplicates: 40 rows copied with small noise onto other slots.
    src = rng.choice(n, 40, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 40, replace=False)
    x[dst] = x[src] + rng.normal(size=(40, d)) * 0.15
    x = normalize(x)
    queries = normalize(centres[rng.integers(0, nc, 80)] + rng.normal(size=(80, d)) * 0.9)
    ref_src = rng.choice(n, 15, replace=False)
    reference = normalize(np.concatenate([x[ref_src] + rng.normal(size=(15, d)).astype(np.float32) * 0.05,
                                          rng.normal(size=(10, d))]))

    k = 10
    ids, sims = brute_knn(x, x, k, True)
    index = faiss.IndexFlatIP(d)
    index.add(x)
    fs, fi = index.search(x, k + 1)
    # faiss includes the row itself; compare the similarity profile after dropping it.
    for q in range(n):
        row = [(s, i) for s, i in zip(fs[q], fi[q]) if i != q][:k]
        assert np.allclose([s for s, _ in row], sims[q], atol=1e-5), q
    qids, qsims = brute_knn(queries, x, k, False)

    # Self-dedup.
    kd, thr = 64, 0.6
    did, dsim = brute_knn(x, x, kd, True)
    uf = UF(n)
    for a, b in edges_from(did, dsim, thr):
        uf.union(a, b)
    comp, keep = canonical(uf, n, n)
    # Relative dedup.
    rthr = 0.55  # the paper's 0.45 chains this small synthetic pool into one component
    nr = reference.shape[0]
    pp_i, pp_s = brute_knn(x, x, kd, True)
    pr_i, pr_s = brute_knn(x, reference, min(kd, nr), False)
    rp_i, rp_s = brute_knn(reference, x, kd, False)
    uf2 = UF(n + nr)
    for a, b in edges_from(pp_i, pp_s, rthr) + edges_from(pr_i, pr_s, rthr, 0, n) + edges_from(rp_i, rp_s, rthr, n, 0):
        uf2.union(a, b)
    touched = {uf2.find(n + r) for r in range(nr)}
    rkeep = np.array([i for i in range(n) if uf2.find(i) not in touched], np.int64)
    rcomp, _ = canonical(uf2, n + nr, n)

    # faiss k-means: objective of the final centroids on all rows.
    km = faiss.Kmeans(d, 20, niter=20, seed=1234, max_points_per_centroid=100000, min_points_per_centroid=1)
    km.train(x)
    flat = faiss.IndexFlatL2(d)
    flat.add(km.centroids)
    dist, _ = flat.search(x, 1)
    kmeans_obj = float(dist.astype(np.float64).sum())

    wf_cases = []
    for caps, budget in [([5, 100, 30, 1, 64, 64, 7], 120), ([10] * 9 + [3], 41), ([0, 9, 2, 50], 1000),
                         (list(rng.integers(0, 500, 40)), 3000)]:
        caps = [int(c) for c in caps]
        c, base = water_fill_base(caps, budget)
        wf_cases.append({"caps": caps, "budget": budget, "cap_level": c, "base": base})

    np.save(os.path.join(args.out, "data.npy"), x)
    np.save(os.path.join(args.out, "queries.npy"), queries)
    np.save(os.path.join(args.out, "reference.npy"), reference)
    np.save(os.path.join(args.out, "knn_ids.npy"), ids)
    np.save(os.path.join(args.out, "knn_sims.npy"), sims.astype(np.float32))
    np.save(os.path.join(args.out, "qknn_ids.npy"), qids)
    np.save(os.path.join(args.out, "qknn_sims.npy"), qsims.astype(np.float32))
    np.save(os.path.join(args.out, "dedup_components.npy"), comp)
    np.save(os.path.join(args.out, "dedup_keep.npy"), keep)
    np.save(os.path.join(args.out, "relative_keep.npy"), rkeep)
    np.save(os.path.join(args.out, "relative_components.npy"), rcomp)
    exp = {"n": n, "d": d, "knn_k": k, "dedup_k": kd, "dedup_threshold": thr, "relative_threshold": rthr,
           "kmeans": {"k": 20, "niter": 20, "faiss_objective": kmeans_obj, "faiss_version": faiss.__version__},
           "water_fill": wf_cases,
           "dedup_stats": {"kept": int(len(keep)), "largest": int(np.bincount(comp).max())},
           "relative_stats": {"kept": int(len(rkeep))}}
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1)
    print(json.dumps({k: v for k, v in exp.items() if k != "water_fill"}))


if __name__ == "__main__":
    main()
