#!/usr/bin/env python3
"""Benchmark: full DINOv2 multi-crop augmentation (decode JPEG -> 2x224 + 8x96 crops -> ToTensor + Normalize),
ours (Rust, rayon, 2 threads) vs the official DataAugmentationDINO (PIL + torchvision) in a torch DataLoader with 2
worker processes, on the same JPEG files, interleaved and repeated in one run; reports medians and the ratio.

Run from the repository root, with $PYTHON a Python that has torch, torchvision and Pillow, and $DINOV2_SRC a
checkout of facebookresearch/dinov2 (or an installed `dinov2` package):

    DINOV2_SRC=$DINOV2_SRC XFORMERS_DISABLED=1 $PYTHON tools/bench_data.py

Ours runs through `cargo bench -p dinov2-data --bench bench_augment -- <dir> 2 <passes>` (the benchmark profile:
release + thin LTO; cargo builds it on the first call, and the program times itself, so cargo's start-up is not
measured). --bin runs an already built benchmark executable instead (the path `cargo bench -p dinov2-data --bench
bench_augment --no-run` prints).

Options: --images N (64), --reps R (5), --passes P (2 passes over the images per measurement), --dir (JPEG folder,
generated if missing; default dinov2_bench_jpegs in the system temporary folder), --bin (see above).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[v] = "2"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

if os.environ.get("DINOV2_SRC"):
    sys.path.insert(0, os.environ["DINOV2_SRC"])


def make_jpegs(d, n):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (640, 480), (500, 333), (800, 600)]
    for i in range(n):
        p = os.path.join(d, f"img_{i:04d}.jpg")
        if os.path.exists(p):
            continue
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([
            127 + 100 * np.sin(x / (20 + i) + y / 37.0),
            127 + 100 * np.cos(y / (15 + i % 7)),
            (x * y / (w * h) * 255.0),
        ], -1)
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(p, quality=90)
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jpg"))[:n]


class Files(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", help="a built bench_augment executable (default: run it through cargo bench)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "dinov2_bench_jpegs"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from dinov2.data.augmentations import DataAugmentationDINO

    files = make_jpegs(a.dir, a.images)
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 96)
    loader = torch.utils.data.DataLoader(Files(files, aug), batch_size=8, num_workers=2, persistent_workers=True,
                                         collate_fn=lambda x: x)
    for _ in loader:  # warm-up: start the workers, fill caches
        pass
    ours_cmd = [a.bin] if a.bin else ["cargo", "bench", "-q", "-p", "dinov2-data", "--bench", "bench_augment", "--"]
    subprocess.run(ours_cmd + [a.dir, "2", "1"], check=True, capture_output=True)  # build, warm-up (page cache)

    ours, ref = [], []
    for rep in range(a.reps):
        out = subprocess.run(ours_cmd + [a.dir, "2", str(a.passes)], check=True, capture_output=True, text=True).stdout
        r = float(out.split("images_per_s=")[1].split()[0])
        t0 = time.perf_counter()
        n = 0
        for _ in range(a.passes):
            for b in loader:
                n += len(b)
        p = n / (time.perf_counter() - t0)
        ours.append(r)
        ref.append(p)
        print(f"rep {rep}: ours {r:.1f} img/s, official {p:.1f} img/s, ratio {r / p:.2f}", flush=True)
    mo, mr = statistics.median(ours), statistics.median(ref)
    ratios = [o / r for o, r in zip(ours, ref)]
    print(f"median: ours {mo:.1f} img/s, official {mr:.1f} img/s, ratio of medians {mo / mr:.2f}x, "
          f"median of per-rep ratios {statistics.median(ratios):.2f}x "
          f"({len(files)} JPEGs x {a.passes} passes, {a.reps} reps, 2 threads / 2 workers)")


if __name__ == "__main__":
    main()
