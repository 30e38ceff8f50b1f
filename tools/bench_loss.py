#!/usr/bin/env python3
"""Side-by-side benchmark: dinov2-loss (Rust/candle) vs the official PyTorch DINO head + losses.

One step = teacher DINO head (no grad) on the 2B global CLS + M masked patch tokens, centering of both
targets, student DINO head on the n_local·B local CLS + 2B global CLS + M masked patch tokens (one packed call,
as SSLMetaArch), DINO local + DINO global + KoLeo + iBOT losses with the official weights, and backward to the
head parameters and the backbone outputs. Defaults: K=65536, ViT-S (D=384), B=4, 2+8 crops, 256 patches per
global crop, 4 of 8 global crops masked at 15/25/35/45 % (M=305).

Run from the repository root, with $PYTHON a Python environment from tools/requirements.txt and $DINOV2_SRC a
checkout of facebookresearch/dinov2 (2 threads on each side):

    DINOV2_SRC=$DINOV2_SRC XFORMERS_DISABLED=1 $PYTHON tools/bench_loss.py --reps 10

The Rust side is the benchmark target `crates/dinov2-loss/benches/bench_loss.rs`; the script builds it first with
`cargo build --profile release -p dinov2-loss --bench bench_loss` (into $CARGO_TARGET_DIR, or target/) and asks
cargo for the executable; `--rust-bin PATH` runs a given build instead. The same program by hand:

    printf 'step\nstep\nquit\n' | RAYON_NUM_THREADS=2 cargo bench -p dinov2-loss --bench bench_loss -- --k 65536

The two implementations run interleaved in one process tree (the Rust side is a long-lived subprocess driven
over stdin, one `step` at a time; the order alternates every repetition), after warm-up steps; medians are
reported per phase with the ratio Rust/PyTorch (< 1 means Rust is faster).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cargo_bench import CargoError, bench_executable  # noqa: E402

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "2"

import torch  # noqa: E402


def make_masks(b, n_patches):
    masks = torch.zeros(2 * b, n_patches, dtype=torch.bool)
    for j, ratio in enumerate([0.15, 0.25, 0.35, 0.45]):
        img = (2 * j) % (2 * b)
        for p in range(int(n_patches * ratio)):
            masks[img, (p * 7) % n_patches] = True
    return masks


class TorchStep:
    def __init__(self, k, b, n_local, d, n_patches):
        from dinov2.layers import DINOHead
        from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss

        self.k, self.b, self.n_local, self.d, self.n_patches = k, b, n_local, d, n_patches
        self.s_head = DINOHead(d, k)
        self.t_head = DINOHead(d, k)
        for p in self.t_head.parameters():
            p.requires_grad = False
        self.dino = DINOLoss(k)
        self.ibot = iBOTPatchLoss(k)
        self.koleo = KoLeoLoss()
        self.masks = make_masks(b, n_patches)
        self.idx = self.masks.flatten().nonzero().flatten()
        self.m = int(self.idx.shape[0])
        self.mw = (1 / self.masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(self.masks)[self.masks]

    def step(self):
        b, d, k, m = self.b, self.d, self.k, self.m
        t_cls = torch.randn(2 * b, d)
        t_patch = torch.randn(2 * b * self.n_patches, d)
        g_cls = torch.randn(2 * b, d, requires_grad=True)
        g_patch = torch.randn(2 * b * self.n_patches, d, requires_grad=True)
        l_cls = torch.randn(self.n_local * b, d, requires_grad=True)
        for p in self.s_head.parameters():
            p.grad = None
        t0 = time.perf_counter()
        with torch.no_grad():
            t_cls_sw = torch.cat((t_cls[b:], t_cls[:b]))
            t_out = self.t_head(torch.cat([t_cls_sw, t_patch[self.idx]]))
        t1 = time.perf_counter()
        with torch.no_grad():
            tg_dino = self.dino.softmax_center_teacher(t_out[: 2 * b], teacher_temp=0.07).view(2, b, k)
            self.dino.update_center(t_out[: 2 * b])
            t_m = t_out[2 * b :].unsqueeze(0)
            tg_ibot = self.ibot.softmax_center_teacher(t_m, teacher_temp=0.07).squeeze(0)
            self.ibot.update_center(t_m)
        t2 = time.perf_counter()
        s_out = self.s_head(torch.cat([l_cls, g_cls, g_patch[self.idx]]))
        nl = self.n_local * b
        s_local, s_global, s_masked = s_out[:nl], s_out[nl : nl + 2 * b], s_out[nl + 2 * b :]
        t3 = time.perf_counter()
        denom = 2 + max(self.n_local * 2, 1)
        dl = self.dino(list(s_local.chunk(self.n_local)), list(tg_dino)) / denom
        dg = self.dino([s_global], [tg_dino.flatten(0, 1)]) * 2 / denom
        koleo = 0.1 * sum(self.koleo(p) for p in g_cls.chunk(2))
        ib = self.ibot.forward_masked(s_masked, tg_ibot, student_masks_flat=self.masks, n_masked_patches=m,
                                      masks_weight=self.mw) * 2 * 0.5
        total = dl + dg + koleo + ib
        value = float(total)
        t4 = time.perf_counter()
        total.backward()
        t5 = time.perf_counter()
        return dict(total_ms=(t5 - t0) * 1e3, teacher_head_ms=(t1 - t0) * 1e3, targets_ms=(t2 - t1) * 1e3,
                    student_head_ms=(t3 - t2) * 1e3, loss_ms=(t4 - t3) * 1e3, backward_ms=(t5 - t4) * 1e3,
                    loss=value)


class RustStep:
    def __init__(self, binary, k, b, n_local, d, n_patches):
        env = dict(os.environ, RAYON_NUM_THREADS="2")
        self.proc = subprocess.Popen(
            [binary, "--k", str(k), "--b", str(b), "--n-local", str(n_local), "--d", str(d),
             "--patches", str(n_patches)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"bench_loss did not start: {line!r}")

    def step(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench_loss exited")
        return json.loads(line)

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def build_rust(target_dir, profile):
    """Builds the bench_loss benchmark target and returns its executable."""
    try:
        return str(bench_executable("dinov2-loss", "bench_loss", profile, target_dir))
    except CargoError as e:
        sys.exit(str(e))


PHASES = ["total_ms", "teacher_head_ms", "targets_ms", "student_head_ms", "loss_ms", "backward_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rust-bin", help="a built bench_loss executable (default: build it with cargo)")
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(REPO / "target")),
                    help="cargo target dir for the build (default: $CARGO_TARGET_DIR or target/)")
    ap.add_argument("--profile", default="release", help="cargo profile of the build (default: release)")
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--k", type=int, default=65536)
    ap.add_argument("--b", type=int, default=4)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--json", help="also write raw samples here")
    args = ap.parse_args()
    if args.dinov2_src:
        sys.path.insert(0, args.dinov2_src)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    shape = (args.k, args.b, args.n_local, args.d, args.patches)
    ours = RustStep(args.rust_bin or build_rust(args.target_dir, args.profile), *shape)
    ref = TorchStep(*shape)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; M={ref.m}; "
          f"K={args.k} B={args.b} locals={args.n_local} D={args.d}", flush=True)
    for _ in range(args.warmup):
        ours.step()
        ref.step()
    samples = {"rust": [], "torch": []}
    for rep in range(args.reps):
        order = [("rust", ours), ("torch", ref)] if rep % 2 == 0 else [("torch", ref), ("rust", ours)]
        for name, impl in order:
            samples[name].append(impl.step())
        print(f"rep {rep}: rust {samples['rust'][-1]['total_ms']:.0f} ms, "
              f"torch {samples['torch'][-1]['total_ms']:.0f} ms", flush=True)
    ours.close()
    print(f"\n| phase | dinov2-loss (ms, median) | PyTorch (ms, median) | ratio rust/torch |")
    print("|---|---:|---:|---:|")
    for ph in PHASES:
        r = statistics.median(s[ph] for s in samples["rust"])
        t = statistics.median(s[ph] for s in samples["torch"])
        print(f"| {ph[:-3]} | {r:.1f} | {t:.1f} | {r / t:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f)


if __name__ == "__main__":
    main()
