#!/usr/bin/env python3
"""1 vs 2 ranks on one machine: `dinov2 curate kmeans|dedup` as one process (1 and 2 threads) and as
`mpirun -np 2` (1 thread per rank), interleaved, repeated; prints medians and ratios (docs/scale.md).

    cargo build --release --features mpi --bin dinov2
    python3 tools/bench_scale.py [--bin target/release/dinov2] [--reps 3] [--only dedup]

Needs numpy and Open MPI's mpirun (Debian: openmpi-bin). The pool is random clustered data made here (seeded).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np


def pool(path, n, d, centres, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(path, x)


def run(cmd, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release/dinov2"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="run the stages whose name contains this")
    a = ap.parse_args()
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    os.environ.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    tmp = tempfile.mkdtemp()
    try:
        km, dd = os.path.join(tmp, "km.npy"), os.path.join(tmp, "dd.npy")
        pool(km, 100_000, 384, 300, 1)
        pool(dd, 30_000, 384, 300, 2)
        stages = {
            "kmeans (100k x 384, k=512, 5 iterations)": ["curate", "kmeans", "--embeddings", km, "--k", "512",
                                                        "--iters", "5", "--tol", "0", "--checkpoint-every", "0"],
            "dedup exact (30k x 384, k=64)": ["curate", "dedup", "--embeddings", dd, "--k", "64",
                                             "--threshold", "0.9", "--index", "exact", "--recall-sample", "0"],
            "dedup IVF (30k x 384, k=64, 173 lists, nprobe 16)": [
                "curate", "dedup", "--embeddings", dd, "--k", "64", "--threshold", "0.9", "--index", "ivf",
                "--nlist", "173", "--nprobe", "16", "--recall-sample", "500"],
        }
        setups = [("1 rank, 1 thread", [], 1), ("1 rank, 2 threads", [], 2), ("2 ranks (mpirun), 1 thread each", mpirun, 1)]
        results = {}
        same = {}
        for name, args in stages.items():
            if a.only not in name:
                continue
            times = {s[0]: [] for s in setups}
            for rep in range(a.reps):
                outs = []
                for label, pre, threads in setups:  # interleaved
                    out = os.path.join(tmp, f"out-{rep}-{len(times[label])}-{threads}-{len(pre)}")
                    times[label].append(run(pre + [a.bin] + args + ["--output", out], threads))
                    outs.append(out)
                # outputs of 1 rank and 2 ranks
                files = ["assignment.npy"] if "kmeans" in name else ["keep.npy", "components.npy"]
                eq = all(open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[2], f), "rb").read()
                         for f in files)
                summ = [json.load(open(os.path.join(o, "summary.json"))) for o in (outs[0], outs[2])]
                same[name] = {"identical " + "+".join(files): eq,
                              "edge_recall": [x.get("edge_recall") for x in summ],
                              "objective": [x.get("objective") for x in summ]}
                for o in outs:
                    shutil.rmtree(o)
            results[name] = {k: statistics.median(v) for k, v in times.items()}
            results[name]["all"] = times
        base = "1 rank, 1 thread"
        print(f"| stage | {' | '.join(s[0] for s in setups)} | speed-up 2 ranks / 1 rank 1 thread | 2 ranks / 1 rank 2 threads |")
        print("|---|" + "---|" * (len(setups) + 2))
        for name, r in results.items():
            cells = " | ".join(f"{r[s[0]]:.2f} s" for s in setups)
            two = r["2 ranks (mpirun), 1 thread each"]
            print(f"| {name} | {cells} | {r[base] / two:.2f}x | {r['1 rank, 2 threads'] / two:.2f}x |")
        print(json.dumps({k: v["all"] for k, v in results.items()}))
        print(json.dumps(same))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
