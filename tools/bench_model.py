#!/usr/bin/env python3
"""Backbone forward benchmark: dinov2-model vs timm vs the official DINOv2 code, side by side in one run.

Run from the repository root, with $PYTHON a Python environment from tools/requirements.txt and $DINOV2_SRC a
checkout of facebookresearch/dinov2 (cargo builds the Rust benchmark target when needed):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/bench_model.py --markdown /tmp/bench-model.md

Smoke test (1 round, 2 timed forwards per process; numbers are not a measurement):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/bench_model.py --quick

What it does:
* Rows (default, `--rows` to choose): ViT-S/14 at 224 batch 1, ViT-S/14 at 224 batch 16, ViT-S/14 at 518 batch 1,
  ViT-B/14 at 224 batch 16. Spelled `arch:size:batch`, e.g. `--rows s:224:1,b:224:16`.
* Three implementations, each in its own fresh process, f32 on the CPU, random weights (no downloads), 2 threads:
    - `ours`: `crates/dinov2-model/benches/bench_forward.rs` (official architecture, random weights,
      `forward_features`), built with `cargo build --profile bench-release -p dinov2-model --bench bench_forward`
      into `--target-dir` (default: the repository's `target/`; a no-op when up to date) unless `--bin PATH` is
      given. `RAYON_NUM_THREADS=2`.
    - `timm`: `timm.create_model("vit_{small,base,large}_patch14_dinov2", pretrained=False, img_size=<size>)`,
      `forward_features` (its position embedding is made for <size>: no interpolation at run time).
    - `official`: `dinov2.models.vision_transformer.vit_{small,base,large}(patch_size=14, img_size=518, init_values=1.0,
      block_chunks=0)`, `forward_features` (interpolates its 37x37 position embedding on every call when the
      grid differs; ours caches the interpolated table per grid). Imported from `--dinov2-src` / `$DINOV2_SRC`,
      else the installed `dinov2` package; `XFORMERS_DISABLED=1` (plain PyTorch
      attention via SDPA).
  PyTorch workers: `torch.set_num_threads(2)`, `OMP_NUM_THREADS=MKL_NUM_THREADS=2`, `eval()`, `inference_mode`.
  Every process runs `warmup` untimed forwards then N timed ones, each timed forward ending with a scalar read of
  the class token (forces the result for all three); start-up, imports and weight init are not timed.
* For each row, `--rounds` rounds (default 5); in each round the three run one after the other, the order rotating
  from round to round. Per process: the median seconds per forward. Per implementation: the median over rounds of
  images/s (batch / seconds) and of the process's peak RSS (`ru_maxrss` from `os.wait4`, the whole process: for the
  PyTorch workers it includes the interpreter + torch/timm imports). Ratios are images/s of ours divided by the
  reference's (> 1: ours is faster).
* N: `--iters` if given; otherwise round 1 uses `--min-iters` (3) and the later rounds use
  clamp(`--target-seconds` (4) / median-of-round-1, `--min-iters`, `--max-iters`), the same N for all three.
* `--omp-wait-policy PASSIVE|ACTIVE` sets `OMP_WAIT_POLICY` for the workers (default: inherited, normally unset,
  i.e. libgomp's spin-then-sleep). On an oversubscribed machine PyTorch's OpenMP barriers with the default policy
  make 2-thread forwards several times slower than 1-thread ones; measure on a quiet machine (or say which policy).
* Prints the machine load (`os.getloadavg()`) at start and end, the versions, and a Markdown table (also written
  atomically to `--markdown FILE`; raw per-process data to `--json FILE`).
"""

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cargo_bench import CargoError, bench_executable  # noqa: E402
IMPLS = ("ours", "timm", "official", "base")
DEFAULT_IMPLS = "ours,timm,official"
DEFAULT_ROWS = "s:224:1,s:224:16,s:518:1,b:224:16"
ARCH_NAMES = {"s": "ViT-S/14", "b": "ViT-B/14", "l": "ViT-L/14"}


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------------
# Worker side (runs in a fresh process: `bench_model.py --worker timm|official ...`)
# --------------------------------------------------------------------------------------------------------------------


def import_official(src):
    """Returns the official `dinov2.models.vision_transformer` module, or raises with a clear message."""
    if src:
        sys.path.insert(0, src)
    try:
        import dinov2.models.vision_transformer as vt
    except ImportError as e:
        raise BenchError(f"cannot import the official dinov2 code (src={src!r}): {e}; pass --dinov2-src PATH "
                         "or set DINOV2_SRC to a checkout of facebookresearch/dinov2") from e
    return vt


def run_worker(args) -> int:
    os.environ.setdefault("XFORMERS_DISABLED", "1")  # before importing the official code
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = {"s": "small", "b": "base", "l": "large"}[args.arch]
    if args.worker == "timm":
        import timm
    else:
        vt = import_official(args.dinov2_src)
    # Peak RSS of the bare runtime (interpreter + imports), before any model exists.
    print(json.dumps({"import_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}), flush=True)
    if args.worker == "timm":
        model = timm.create_model(f"vit_{arch}_patch14_dinov2", pretrained=False, img_size=args.size)

        def forward(x):
            return model.forward_features(x)[:, 0].sum().item()
    else:
        model = getattr(vt, f"vit_{arch}")(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)

        def forward(x):
            return model.forward_features(x)["x_norm_clstoken"].sum().item()

    model.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        for _ in range(args.warmup):
            forward(x)
        for _ in range(args.iters):
            t = time.perf_counter()
            forward(x)
            print(json.dumps({"seconds": time.perf_counter() - t}), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------------------------


def parse_rows(spec: str):
    rows = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in ARCH_NAMES:
            raise BenchError(f"bad row {item!r}: expected arch:size:batch with arch in {sorted(ARCH_NAMES)}")
        try:
            size, batch = int(parts[1]), int(parts[2])
        except ValueError as e:
            raise BenchError(f"bad row {item!r}: size and batch must be integers") from e
        if size <= 0 or size % 14 or batch <= 0:
            raise BenchError(f"bad row {item!r}: size must be a positive multiple of 14, batch positive")
        rows.append((parts[0], size, batch))
    return rows


def given_or_built(given, flag, package, bench, profile, target_dir, hint) -> Path:
    """The executable `given` with `flag` (checked), else the benchmark target `bench` of `package` built by cargo;
    `hint` is appended to a build error."""
    if given:
        b = Path(given)
        if not b.is_file():
            raise BenchError(f"{flag} {b} does not exist")
        return b
    try:
        return bench_executable(package, bench, profile, Path(target_dir))
    except CargoError as e:
        raise BenchError(f"{e} ({hint})") from e


def ensure_binary(args) -> Path:
    return given_or_built(args.bin, "--bin", "dinov2-model", "bench_forward", "bench-release", args.target_dir,
                          "fat LTO build: takes minutes the first time")


def resolve_dinov2_src(arg):
    """The directory to put on PYTHONPATH for the official worker (None: the installed `dinov2` package)."""
    if arg:
        if not (Path(arg) / "dinov2" / "models" / "vision_transformer.py").is_file():
            raise BenchError(f"--dinov2-src / DINOV2_SRC {arg!r} holds no dinov2/models/vision_transformer.py")
        return str(Path(arg).resolve())
    try:
        import importlib.util

        if importlib.util.find_spec("dinov2") is not None:
            return None
    except (ImportError, ValueError):
        pass
    raise BenchError("the official dinov2 code is not importable: pass --dinov2-src PATH or set DINOV2_SRC")


def child_env(threads: int, omp_wait_policy):
    env = dict(os.environ)
    for v in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[v] = str(threads)
    env["XFORMERS_DISABLED"] = "1"
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def run_process(cmd, env, timeout: float, label: str):
    """Runs one benchmark process.

    Returns (seconds of each timed forward, peak RSS in MiB, wall seconds, peak RSS after imports in MiB or None).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        try:
            p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        except OSError as e:
            raise BenchError(f"{label}: cannot start {cmd[0]}: {e}") from e
        status = ru = None
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            if time.monotonic() - t0 > timeout:
                p.kill()
                os.wait4(p.pid, 0)
                p.returncode = -9
                raise BenchError(f"{label}: timed out after {timeout:.0f} s (raise --timeout or run fewer iterations); "
                                 f"command: {shlex.join(map(str, cmd))}")
            time.sleep(0.02)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"{label}: exit status {p.returncode}; command: {shlex.join(map(str, cmd))}\n"
                         f"stderr (tail):\n{stderr[-3000:]}")
    secs, import_rss = [], None
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                if "import_rss_mib" in obj:
                    import_rss = float(obj["import_rss_mib"])
                else:
                    secs.append(float(obj["seconds"]))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BenchError(f"{label}: unparsable output line {line!r}") from e
    if not secs:
        raise BenchError(f"{label}: no timing lines in the output; stderr (tail):\n{stderr[-3000:]}")
    return secs, ru.ru_maxrss / 1024.0, wall, import_rss  # ru_maxrss is in KiB on Linux


def build_command(impl, arch, size, batch, iters, warmup, args, binary, dinov2_src):
    if impl in ("ours", "base"):
        exe = binary if impl == "ours" else args.base_bin
        return [str(exe), arch, str(size), str(batch), str(iters), str(warmup)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--arch", arch, "--size", str(size),
           "--batch", str(batch), "--iters", str(iters), "--warmup", str(warmup), "--threads", str(args.threads)]
    if impl == "official" and dinov2_src:
        cmd += ["--dinov2-src", dinov2_src]
    return cmd


def official_src_desc(impls, dinov2_src):
    if "official" not in impls:
        return "not run"
    return dinov2_src or "installed dinov2 package"


def fmt_load(la):
    return " / ".join(f"{x:.2f}" for x in la)


def git_head(crate="crates/dinov2-model"):
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                           timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", crate], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + (f" ({crate} modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions():
    code = "import torch, timm; print(torch.__version__, timm.__version__)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        tv, mv = r.stdout.split()
        return tv, mv
    except (OSError, subprocess.SubprocessError, ValueError):
        return "?", "?"


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_atomic(path: Path, text: str):
    path = path.resolve()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"arch:size:batch list (default {DEFAULT_ROWS})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, help="timed forwards per process (default: automatic, see above)")
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--target-seconds", type=float, default=4.0, help="timed seconds per process (automatic N)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per process before it is killed")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, 1 warmup + 1 timed forward")
    ap.add_argument("--impls", help=f"subset of {','.join(IMPLS)} (default {DEFAULT_IMPLS}, plus base with --base-bin)")
    ap.add_argument("--base-bin", help="a bench_forward binary of another build (e.g. the previous commit), run as "
                                       "the `base` implementation: ours/base compares two versions of ours")
    ap.add_argument("--bin", help="prebuilt bench_forward binary (default: build/use the one in --target-dir)")
    ap.add_argument("--target-dir", default=str(REPO / "target"), help="cargo target dir (default: repo target/)")
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"),
                    help="checkout of facebookresearch/dinov2 (default $DINOV2_SRC)")
    ap.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"],
                    help="set OMP_WAIT_POLICY for the workers (default: inherited / unset)")
    ap.add_argument("--markdown", help="also write the result table (Markdown) to this file")
    ap.add_argument("--json", help="also write the raw per-process data to this file")
    # worker mode (internal)
    ap.add_argument("--worker", choices=["timm", "official"], help=argparse.SUPPRESS)
    ap.add_argument("--arch", choices=sorted(ARCH_NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    return dispatch(args, run_worker, drive)


def dispatch(args, worker, driver) -> int:
    """Runs `worker(args)` when `args.worker` is set, else `driver(args)`; BenchError and Ctrl-C become an exit
    status with a message."""
    try:
        if args.worker:
            return worker(args)
        return driver(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def drive(args) -> int:
    if args.quick:
        args.rounds, args.iters, args.warmup = 1, 1, 1
    if args.rounds < 1 or (args.iters is not None and args.iters < 1) or args.min_iters < 1 \
            or args.max_iters < args.min_iters or args.warmup < 0 or args.threads < 1:
        raise BenchError("need rounds >= 1, iters >= 1, 1 <= min-iters <= max-iters, warmup >= 0, threads >= 1")
    if args.impls is None:
        args.impls = DEFAULT_IMPLS + (",base" if args.base_bin else "")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or any(i not in IMPLS for i in impls) or len(set(impls)) != len(impls):
        raise BenchError(f"--impls must be a subset of {','.join(IMPLS)}")
    if "base" in impls and not (args.base_bin and Path(args.base_bin).is_file()):
        raise BenchError("the base implementation needs --base-bin PATH to an existing bench_forward binary")
    rows = parse_rows(args.rows)
    binary = ensure_binary(args) if "ours" in impls else None
    dinov2_src = resolve_dinov2_src(args.dinov2_src) if "official" in impls else None
    env = child_env(args.threads, args.omp_wait_policy)
    torch_v, timm_v = versions() if {"timm", "official"} & set(impls) else ("not run", "not run")

    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    header = [
        f"started {started}; load average (1/5/15 min) at start: {fmt_load(load_start)}; "
        f"{os.cpu_count()} logical CPUs ({cpu_name()})",
        f"dinov2-rs {git_head()}; ours: {binary or 'not run'}"
        + (f" (built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(binary.stat().st_mtime))})" if binary else "")
        + (f"; base: {args.base_bin}" if "base" in impls else ""),
        f"torch {torch_v}, timm {timm_v}, official code: {official_src_desc(impls, dinov2_src)}; "
        f"{args.threads} threads each; rounds {args.rounds}; warmup {args.warmup}; "
        f"N {'= ' + str(args.iters) if args.iters else 'automatic'}; "
        f"OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset (libgomp default)')}",
    ]
    for line in header:
        print(line, flush=True)

    results = []  # one dict per row
    for arch, size, batch in rows:
        name = f"{ARCH_NAMES[arch]} {size} b{batch}"
        per = {i: {"sec": [], "rss": [], "ips": []} for i in impls}
        iters_used = []
        for r in range(args.rounds):
            if args.iters:
                iters = args.iters
            elif r == 0:
                iters = args.min_iters
            else:
                first = statistics.median(per[i]["sec"][0] for i in impls)
                iters = max(args.min_iters, min(args.max_iters, math.ceil(args.target_seconds / first)))
            iters_used.append(iters)
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for impl in order:
                cmd = build_command(impl, arch, size, batch, iters, args.warmup, args, binary, dinov2_src)
                secs, rss, wall, import_rss = run_process(cmd, env, args.timeout, f"{name} round {r + 1} {impl}")
                med = statistics.median(secs)
                per[impl]["sec"].append(med)
                per[impl]["rss"].append(rss)
                per[impl]["ips"].append(batch / med)
                if import_rss is not None:
                    per[impl].setdefault("import_rss", []).append(import_rss)
                per[impl].setdefault("raw", []).append(secs)
                print(f"  {name} round {r + 1}/{args.rounds} {impl:8s} N={iters:<3d} {med * 1e3:9.1f} ms/forward "
                      f"{batch / med:8.2f} img/s  peak RSS {rss:7.0f} MiB"
                      + (f" (after imports {import_rss:.0f})" if import_rss is not None else "")
                      + f"  (process {wall:.1f} s)", flush=True)
        summary = {i: {"ips": statistics.median(per[i]["ips"]), "rss": statistics.median(per[i]["rss"]),
                       "ms": statistics.median(per[i]["sec"]) * 1e3} for i in impls}
        results.append({"arch": arch, "size": size, "batch": batch, "name": name, "iters": iters_used,
                        "summary": summary, "per_round": per})

    load_end = os.getloadavg()
    footer = (f"finished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average at end: "
              f"{fmt_load(load_end)}")
    table = markdown_table(results, impls)
    envs = [f"{v}={os.environ[v]}" for v in ("DINOV2_SRC", "OMP_WAIT_POLICY") if v in os.environ]
    cmdline = shlex.join(envs + [sys.executable] + sys.argv)
    text = "\n".join([f"Command: `{cmdline}`", ""] + [f"- {h}" for h in header] + [f"- {footer}", "", table])
    print()
    print(text)
    if args.markdown:
        write_atomic(Path(args.markdown), text + "\n")
    if args.json:
        payload = {"command": cmdline, "header": header, "footer": footer, "load_start": load_start,
                   "load_end": load_end, "rows": results}
        write_atomic(Path(args.json), json.dumps(payload, indent=1) + "\n")
    return 0


def markdown_table(results, impls):
    cols = ["row", "N x rounds"] + [f"{i} img/s" for i in impls]
    refs = [i for i in impls if i != "ours"] if "ours" in impls else []
    cols += [f"ours/{i}" for i in refs]
    cols += [f"{i} peak RSS (MiB)" for i in impls]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for res in results:
        s = res["summary"]
        n = sorted(set(res["iters"]))
        ns = "/".join(map(str, n)) + f" x {len(res['iters'])}"
        cells = [res["name"], ns] + [f"{s[i]['ips']:.2f}" for i in impls]
        for ref in refs:
            ratio = s["ours"]["ips"] / s[ref]["ips"]
            per_round = [a / b for a, b in zip(res["per_round"]["ours"]["ips"], res["per_round"][ref]["ips"])]
            rng = f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
            cells.append(f"{ratio:.2f}{rng}")
        cells += [f"{s[i]['rss']:.0f}" for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    base = {i: statistics.median(x for res in results for x in res["per_round"][i].get("import_rss", []))
            for i in impls if any(res["per_round"][i].get("import_rss") for res in results)}
    if base:
        lines.append("")
        lines.append("Peak RSS of the PyTorch workers after their imports, before building the model (median): "
                     + ", ".join(f"{i} {v:.0f} MiB" for i, v in base.items()) + ".")
    lines.append("")
    lines.append("img/s: median over rounds of batch / (median seconds per forward of the process); ratios: ours "
                 "img/s / reference img/s (> 1: ours faster), in brackets the range of the per-round ratios; peak "
                 "RSS: median over rounds of the process's ru_maxrss (whole process, Python workers include "
                 "the interpreter and torch/timm imports).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
