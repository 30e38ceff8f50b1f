#!/usr/bin/env python3
"""Training-step benchmark: dinov2-train (Rust/candle) vs the official PyTorch DINOv2 step, interleaved processes.

Run from the repository root, with $PYTHON a Python environment from tools/requirements.txt and $DINOV2_SRC a
checkout of facebookresearch/dinov2 (cargo builds the Rust benchmark target when needed):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/bench_train.py --markdown /tmp/bench-train.md

The PyTorch side alone (no cargo):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/bench_train.py --only-reference --rounds 1

The step (both sides): ViT-S/14 student + EMA teacher, batch 4 images, 2 global crops of 224 + 8 local crops of
98, shared DINO/iBOT head with 65,536 prototypes (hidden 2048, bottleneck 256), centering, drop path 0.3
(uniform), LayerScale 1e-5, KoLeo, AdamW with the official parameter groups, per-submodule gradient clipping at
3.0, EMA update; f32 on the CPU, 2 threads each. One timed step = schedules + zero_grad + forward/backward +
clipping + optimizer step + teacher update (the batch is made before the clock starts).

* `reference`: `tools/official_train.py` (the official `SSLMetaArch` and train.py loop with the xformers/FSDP
  stand-ins of `tools/official_stubs.py`, no grad scaler: f32), the official config defaults with the overrides
  above, random-normal pixels through the official `collate_data_and_cast` with the official `MaskingGenerator`
  (mask ratio 0.1-0.5 on half the global crops), seeded. `torch.set_num_threads(2)`.
* `ours`: the benchmark target `crates/dinov2-train/benches/bench_step.rs`, built with
  `cargo build --profile bench-release -p dinov2-train --bench bench_step` into `--target-dir` (a no-op when up to
  date) unless `--ours-bin PATH` is given, and run as
  `bench_step --arch vit_small --batch 4 --global-size 224 --local-size 98 --local-crops 8 --prototypes 65536
  --drop-path 0.3 --threads 2 --warmup W --steps N`, the same as
  `cargo bench -p dinov2-train --bench bench_step -- <those arguments>`. Contract: it prints one JSON line per
  timed step, `{"step": i, "seconds": s}` (other lines are ignored). `RAYON_NUM_THREADS=2`.

Each of `--rounds` rounds runs both, each as a fresh process doing `--warmup` untimed and `--steps` timed steps,
the order alternating from round to round. Reported: all per-step times, per implementation the median over all
timed steps and the range of the per-process medians, the ratio ours/PyTorch of the medians (< 1: ours faster),
and the peak RSS of each process (`ru_maxrss` from `os.wait4`, whole process; the Python worker's includes the
interpreter and the torch import, printed separately). Markdown to stdout and `--markdown FILE` (atomic), raw data
to `--json FILE`. The load average is printed: on a busy machine the numbers are not a measurement (there,
`--omp-wait-policy PASSIVE` keeps PyTorch's OpenMP barriers from spinning against the other processes).
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import (BenchError, child_env, cpu_name, dispatch, fmt_load, git_head,  # noqa: E402
                         given_or_built, resolve_dinov2_src, run_process, write_atomic)

SHAPE = dict(arch="vit_small", batch=4, global_size=224, local_size=98, local_crops=8, prototypes=65536,
             drop_path=0.3)


def reference_overrides(shape):
    return [
        f"student.arch={shape['arch']}", "student.patch_size=14", f"student.drop_path_rate={shape['drop_path']}",
        f"crops.global_crops_size={shape['global_size']}", f"crops.local_crops_size={shape['local_size']}",
        f"crops.local_crops_number={shape['local_crops']}", f"train.batch_size_per_gpu={shape['batch']}",
        f"dino.head_n_prototypes={shape['prototypes']}", "ibot.separate_head=false", "train.centering=centering",
    ]


def run_reference_worker(args) -> int:
    import random

    import torch

    torch.set_num_threads(args.threads)
    import official_train as ot

    ot.import_official(args.dinov2_src)
    print(json.dumps({"import_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}), flush=True)
    cfg = ot.make_config(reference_overrides(SHAPE))
    trainer = ot.OfficialTrainer(cfg, seed=0)
    random.seed(0)  # the MaskingGenerator's and collate's draws
    gen = torch.Generator().manual_seed(0)
    for i in range(args.warmup + args.steps):
        batch = ot.random_batch(cfg, gen)
        t = time.perf_counter()
        rec = trainer.step(batch)
        dt = time.perf_counter() - t
        if i >= args.warmup:
            print(json.dumps({"step": i - args.warmup, "seconds": dt, "loss": rec["total"].item(),
                              "n_masked": int(batch["n_masked_patches"])}), flush=True)
    return 0


def ours_command(binary, args):
    return [str(binary), "--arch", SHAPE["arch"], "--batch", str(SHAPE["batch"]), "--global-size",
            str(SHAPE["global_size"]), "--local-size", str(SHAPE["local_size"]), "--local-crops",
            str(SHAPE["local_crops"]), "--prototypes", str(SHAPE["prototypes"]), "--drop-path", str(SHAPE["drop_path"]),
            "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps)]


def reference_command(args, dinov2_src):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "reference", "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    return cmd + (["--dinov2-src", dinov2_src] if dinov2_src else [])


def ours_binary(args):
    return given_or_built(args.ours_bin, "--ours-bin", "dinov2-train", "bench_step", args.profile, args.target_dir,
                          "or pass --ours-bin PATH, or --only-reference")


def torch_version_of(python):
    """torch's version, asked in a subprocess: the driver must not import torch (see `driver_rss_note`)."""
    try:
        r = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                           timeout=120)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def driver_rss_note():
    """Linux carries a process's peak RSS over fork and exec, so every child's ru_maxrss is at least the driver's
    own peak: the driver stays small (no torch import) and says how small."""
    mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return (f"Peak RSS of this driver process: {mib:.0f} MiB (a floor under every process's figure: Linux carries the "
            "parent's peak over fork/exec into the child's ru_maxrss).")


def drive(args) -> int:
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        raise BenchError("need rounds >= 1, steps >= 1, warmup >= 0, threads >= 1")
    impls = ["reference"] if args.only_reference else ["reference", "ours"]
    dinov2_src = resolve_dinov2_src(args.dinov2_src)
    binary = ours_binary(args) if "ours" in impls else None
    env = child_env(args.threads, args.omp_wait_policy)
    torch_version = torch_version_of(sys.executable)

    header = [
        f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average (1/5/15 min) at start: "
        f"{fmt_load(os.getloadavg())}; {os.cpu_count()} logical CPUs ({cpu_name()})",
        f"dinov2-rs {git_head('crates/dinov2-train')}; ours: {binary or 'not run'}; torch {torch_version}; "
        f"official code: {dinov2_src or 'installed dinov2 package'}",
        f"ViT-S/14 student + EMA teacher, batch {SHAPE['batch']}, 2x{SHAPE['global_size']} + "
        f"{SHAPE['local_crops']}x{SHAPE['local_size']} crops, {SHAPE['prototypes']} prototypes (shared head), "
        f"drop path {SHAPE['drop_path']}, centering, f32; {args.threads} threads each; rounds {args.rounds}, "
        f"warmup {args.warmup}, timed steps {args.steps} per process; "
        f"OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset (libgomp default)')}",
    ]
    for line in header:
        print(line, flush=True)
    per = {i: {"steps": [], "medians": [], "rss": [], "import_rss": []} for i in impls}
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            cmd = reference_command(args, dinov2_src) if impl == "reference" else ours_command(binary, args)
            secs, rss, wall, import_rss = run_process(cmd, env, args.timeout, f"round {r + 1} {impl}")
            per[impl]["steps"].append(secs)
            per[impl]["medians"].append(statistics.median(secs))
            per[impl]["rss"].append(rss)
            if import_rss is not None:
                per[impl]["import_rss"].append(import_rss)
            print(f"  round {r + 1}/{args.rounds} {impl:9s} steps " + " ".join(f"{s:.3f}" for s in secs)
                  + f" s; median {statistics.median(secs):.3f} s; peak RSS {rss:.0f} MiB"
                  + (f" (after imports {import_rss:.0f})" if import_rss is not None else "")
                  + f"; process {wall:.0f} s", flush=True)
    footer = (f"finished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average at end: "
              f"{fmt_load(os.getloadavg())}")
    names = {"reference": "PyTorch (official)", "ours": "dinov2-train"}
    lines = ["| implementation | median step (s) | per-process medians (s) | peak RSS (MiB) |", "|---|---:|---|---:|"]
    med = {}
    for impl in impls:
        p = per[impl]
        med[impl] = statistics.median(s for secs in p["steps"] for s in secs)
        lines.append(f"| {names[impl]} | {med[impl]:.3f} | " + ", ".join(f"{m:.3f}" for m in p["medians"])
                     + f" | {max(p['rss']):.0f} |")
    lines.append("")
    if "ours" in impls:
        rounds = [o / t for o, t in zip(per["ours"]["medians"], per["reference"]["medians"])]
        lines.append(f"Ratio ours / PyTorch (median step time): **{med['ours'] / med['reference']:.2f}** "
                     f"(per round {min(rounds):.2f}-{max(rounds):.2f}); < 1: ours faster.")
        lines.append("")
    if per["reference"]["import_rss"]:
        lines.append(f"The PyTorch worker's peak RSS after its imports, before building the model: "
                     f"{statistics.median(per['reference']['import_rss']):.0f} MiB.")
        lines.append("")
    lines.append("Median step: over all timed steps of all processes; peak RSS: the largest ru_maxrss over the "
                 "processes (whole process).")
    lines.append(driver_rss_note())
    envs = [f"{v}={os.environ[v]}" for v in ("DINOV2_SRC",) if v in os.environ]
    cmdline = shlex.join(envs + [sys.executable] + sys.argv)
    text = "\n".join([f"Command: `{cmdline}`", ""] + [f"- {h}" for h in header] + [f"- {footer}", ""] + lines)
    print()
    print(text)
    if args.markdown:
        write_atomic(Path(args.markdown), text + "\n")
    if args.json:
        write_atomic(Path(args.json), json.dumps({"command": cmdline, "header": header, "footer": footer,
                                                  "shape": SHAPE, "results": per}, indent=1) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per process before it is killed")
    ap.add_argument("--only-reference", action="store_true", help="run the PyTorch side only (no cargo)")
    ap.add_argument("--ours-bin", help="a built bench_step executable (default: build it with cargo)")
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(REPO / "target")),
                    help="cargo target dir for the build (default: $CARGO_TARGET_DIR or target/)")
    ap.add_argument("--profile", default="bench-release", help="cargo profile of the build (default: bench-release)")
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"),
                    help="checkout of facebookresearch/dinov2 (default $DINOV2_SRC)")
    ap.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"],
                    help="set OMP_WAIT_POLICY for both sides (default: inherited / unset)")
    ap.add_argument("--markdown", help="also write the result (Markdown) to this file")
    ap.add_argument("--json", help="also write the raw per-step data to this file")
    ap.add_argument("--worker", choices=["reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    return dispatch(args, run_reference_worker, drive)


if __name__ == "__main__":
    sys.exit(main())
