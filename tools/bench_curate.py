#!/usr/bin/env python3
"""Benchmark dinov2-curate against faiss-cpu in ONE run, interleaved, on the same threads.

Run from the repository root; `$PYTHON` is a Python with numpy and faiss-cpu 1.15.x:

    cargo build --release --bin dinov2                       # for the dedup row (`dinov2 curate dedup`)
    cargo bench -p dinov2-curate --bench bench_ops --no-run  # optional: the script runs it through `cargo bench`
    $PYTHON tools/bench_curate.py --bin ${CARGO_TARGET_DIR:-target}/release \
        --workdir /tmp/curate_bench --threads 2 --reps 3 --n-big 1000000 --dedup-n 1000000

Operations (768-d synthetic clustered rows: 2,000 Gaussian centres + noise, 5 % planted near-duplicates,
L2-normalised; generated in chunks straight into `.npy` files, at most one copy held in memory):
- `knn`:    exact inner-product k-NN (k = 4), 4,096 queries against the first 100k rows (faiss IndexFlatIP);
- `assign`: one assignment pass of `n-big` rows to 1,000 centroids (faiss IndexFlatL2.search(x, 1));
- `kmeans`: k-means `n-big` rows, k = 1,000, 10 iterations, random init, 256 points per centroid subsample
            (faiss.Kmeans with the same settings); objective of the final centroids on all rows is compared;
- `dedup`:  self-dedup end to end, k = 64, cosine > 0.6: ours = `curate dedup --index ivf`, faiss = IVF-Flat
            (same nlist/nprobe, inner product) search + threshold + numpy connected components.
Ours runs as a subprocess (`cargo bench -p dinov2-curate --bench bench_ops -- <op> ...` and `dinov2 curate dedup`;
only the operation is timed), faiss in-process.
Threads: RAYON_NUM_THREADS / OMP_NUM_THREADS / MKL / OpenBLAS = --threads, faiss.omp_set_num_threads(--threads).
Prints per-repetition timings, then medians and ratios (JSON and a markdown table).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True, help="directory holding the release `dinov2` binary (e.g. target/release)")
ap.add_argument("--workdir", default="/tmp/curate_bench")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--n-big", type=int, default=1_000_000)
ap.add_argument("--n-knn", type=int, default=100_000)
ap.add_argument("--nq", type=int, default=4096)
ap.add_argument("--dedup-n", type=int, default=200_000)
ap.add_argument("--dedup-reps", type=int, default=1)
ap.add_argument("--kmeans-reps", type=int, default=None, help="default: --reps")
ap.add_argument("--nprobe", type=int, default=16)
ap.add_argument("--ops", default="knn,assign,kmeans,dedup")
args = ap.parse_args()
args.workdir = os.path.abspath(args.workdir)  # `cargo bench` runs bench_ops in crates/dinov2-curate/

T = str(args.threads)
for v in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"]:
    os.environ[v] = T

import numpy as np  # noqa: E402
import faiss  # noqa: E402

faiss.omp_set_num_threads(args.threads)
D = 768
os.makedirs(args.workdir, exist_ok=True)


def gen(path, n, seed, centres):
    """Writes n clustered, normalised rows (chunked) to an .npy file; reuses an existing file of that shape."""
    if os.path.exists(path):
        x = np.load(path, mmap_mode="r")
        if x.shape == (n, D):
            return
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path + ".tmp.npy", mode="w+", dtype=np.float32, shape=(n, D))
    ch = 50_000
    for s in range(0, n, ch):
        m = min(ch, n - s)
        c = centres[rng.integers(0, len(centres), m)]
        x = c + rng.standard_normal((m, D), dtype=np.float32) * rng.uniform(0.04, 0.07, (m, 1)).astype(np.float32)
        # 5 % planted near-duplicates of earlier rows of the same chunk.
        nd = m // 20
        src = rng.integers(0, m, nd)
        dst = rng.integers(0, m, nd)
        x[dst] = x[src] + rng.standard_normal((nd, D), dtype=np.float32) * 0.01
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    out.flush()
    del out
    os.replace(path + ".tmp.npy", path)


def ours(exe, *a):
    env = dict(os.environ, RAYON_NUM_THREADS=T)
    if exe == "bench_ops":
        cmd = ["cargo", "bench", "-q", "-p", "dinov2-curate", "--bench", "bench_ops", "--"]
    else:
        cmd = [os.path.join(args.bin, exe)]
    r = subprocess.run([*cmd, *map(str, a)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{exe} {a} failed: {r.stderr}")
    return r.stdout


def components(n, a, b):
    """Connected components by min-label propagation + pointer jumping (numpy only)."""
    lab = np.arange(n, dtype=np.int64)
    while True:
        m = np.minimum(lab[a], lab[b])
        new = lab.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:
            j = new[new]
            if np.array_equal(j, new):
                break
            new = j
        if np.array_equal(new, lab):
            return lab
        lab = new


results = {"threads": args.threads, "faiss": faiss.__version__, "rows": []}
rng0 = np.random.default_rng(0)
centres = rng0.standard_normal((2000, D)).astype(np.float32) * (1.0 / np.sqrt(D))
pool = os.path.join(args.workdir, f"pool_{args.n_big}.npy")
t0 = time.time()
gen(pool, args.n_big, 1, centres)
print(f"data ready in {time.time() - t0:.0f}s", flush=True)
X = np.load(pool, mmap_mode="r")
ops = args.ops.split(",")


def record(name, f_vals, o_vals, unit, higher_better, extra=None):
    fm, om = float(np.median(f_vals)), float(np.median(o_vals))
    ratio = (om / fm) if higher_better else (fm / om)
    row = {"op": name, "unit": unit, "faiss": f_vals, "ours": o_vals, "faiss_median": fm, "ours_median": om,
           "ours_speedup": ratio}
    if extra:
        row.update(extra)
    results["rows"].append(row)
    print(json.dumps(row), flush=True)


if "knn" in ops:
    base_p = os.path.join(args.workdir, f"base_{args.n_knn}.npy")
    if not os.path.exists(base_p):
        np.save(base_p, np.ascontiguousarray(X[: args.n_knn]))
    q_p = os.path.join(args.workdir, f"queries_{args.nq}.npy")
    gen(q_p, args.nq, 2, centres)
    base, q = np.load(base_p), np.load(q_p)
    index = faiss.IndexFlatIP(D)
    index.add(base)
    fq, oq = [], []
    for r in range(args.reps):
        t = time.perf_counter()
        _, fi = index.search(q, 4)
        fq.append(args.nq / (time.perf_counter() - t))
        o = json.loads(ours("bench_ops", "knn", base_p, q_p, 4))
        oq.append(o["qps"])
    record(f"exact FlatIP k-NN {args.n_knn // 1000}k x 768, {args.nq} queries, k=4", fq, oq, "queries/s", True)
    del base, q, index

if "assign" in ops or "kmeans" in ops:
    cent_p = os.path.join(args.workdir, "centroids_1000.npy")
    if not os.path.exists(cent_p):
        np.save(cent_p, np.ascontiguousarray(X[np.sort(rng0.choice(args.n_big, 1000, replace=False))]))

if "assign" in ops:
    c = np.load(cent_p)
    fidx = faiss.IndexFlatL2(D)
    fidx.add(c)
    fs, os_ = [], []
    for r in range(args.reps):
        t = time.perf_counter()
        dist, _ = fidx.search(X, 1)
        fs.append(time.perf_counter() - t)
        fobj = float(dist.astype(np.float64).sum())
        del dist
        o = json.loads(ours("bench_ops", "assign", pool, cent_p))
        os_.append(o["seconds"])
    record(f"assignment pass {args.n_big // 1000}k x 768 -> 1,000 centroids", fs, os_, "s", False,
           {"faiss_objective": fobj, "ours_objective": o["objective"]})

if "kmeans" in ops:
    fs, os_, fo, oo, fit, oit = [], [], [], [], [], []
    for r in range(args.kmeans_reps or args.reps):
        km = faiss.Kmeans(D, 1000, niter=10, seed=1234 + r, max_points_per_centroid=256)
        t = time.perf_counter()
        km.train(X)
        fs.append(time.perf_counter() - t)
        fit.append(len(km.obj))
        fidx = faiss.IndexFlatL2(D)
        fidx.add(km.centroids)
        dist, _ = fidx.search(X, 1)
        fo.append(float(dist.astype(np.float64).sum()))
        del dist, km
        o = json.loads(ours("bench_ops", "kmeans", pool, 1000, 10, 1234 + r, "random"))
        os_.append(o["seconds"])
        oo.append(o["objective_full"])
        oit.append(o["iterations"])
    record(f"k-means {args.n_big // 1000}k x 768, k=1,000, 10 iterations (256k subsample)", fs, os_, "s", False,
           {"faiss_objective_full": fo, "ours_objective_full": oo, "faiss_iterations": fit,
            "ours_iterations": oit})

if "dedup" in ops:
    n = args.dedup_n
    dp = pool if n == args.n_big else os.path.join(args.workdir, f"dedup_{n}.npy")
    if not os.path.exists(dp):
        np.save(dp, np.ascontiguousarray(X[:n]))
    Y = np.load(dp, mmap_mode="r")
    nlist = int(round(np.sqrt(n)))
    fs, os_, fk, ok, rec = [], [], [], [], []
    for r in range(args.dedup_reps):
        t = time.perf_counter()
        quant = faiss.IndexFlatIP(D)
        index = faiss.IndexIVFFlat(quant, D, nlist, faiss.METRIC_INNER_PRODUCT)
        tr = np.ascontiguousarray(Y[np.sort(np.random.default_rng(r).choice(n, min(n, 64 * nlist), replace=False))])
        index.train(tr)
        index.add(Y)
        index.nprobe = args.nprobe
        A, B = [], []
        for s in range(0, n, 65536):
            q = np.ascontiguousarray(Y[s:s + 65536])
            sims, ids = index.search(q, 65)
            qi = np.repeat(np.arange(s, s + len(q)), 65).reshape(len(q), 65)
            m = (sims > 0.6) & (ids >= 0) & (ids != qi)
            A.append(qi[m])
            B.append(ids[m])
        lab = components(n, np.concatenate(A), np.concatenate(B))
        fk.append(int(len(np.unique(lab))))
        fs.append(time.perf_counter() - t)
        del index, quant
        with tempfile.TemporaryDirectory(dir=args.workdir) as od:
            ours("dinov2", "curate", "dedup", "--embeddings", dp, "--k", 64, "--threshold", 0.6, "--output", od, "--index", "ivf",
                 "--nlist", nlist, "--nprobe", args.nprobe, "--recall-sample", 200)
            s = json.load(open(os.path.join(od, "summary.json")))
            os_.append(s["seconds"])
            ok.append(s["result"]["n_kept"])
            rec.append((s["recall_at_k"], s["edge_recall"], s["edge_recall_sampled_edges"]))
    record(f"self-dedup {n // 1000}k x 768 end to end (k=64, cos>0.6, IVF{nlist} nprobe {args.nprobe})", fs, os_,
           "s", False, {"faiss_kept": fk, "ours_kept": ok, "ours_recall_at_64_edge_recall_edges_sampled": rec})

print("\n| operation | faiss-cpu | ours | ours vs faiss |\n|---|---|---|---|")
for r in results["rows"]:
    print(f"| {r['op']} | {r['faiss_median']:.4g} {r['unit']} | {r['ours_median']:.4g} {r['unit']} | "
          f"{r['ours_speedup']:.2f}x |")
json.dump(results, open(os.path.join(args.workdir, "results.json"), "w"), indent=1)
