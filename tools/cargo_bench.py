"""Builds a benchmark target of this workspace and returns its executable (shared by the tools/bench_*.py scripts).

Benchmark targets get a hashed file name, so cargo is asked where it put the executable
(`--message-format=json`); the build is a no-op when it is up to date.
"""
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class CargoError(Exception):
    pass


def bench_executable(package: str, bench: str, profile: str, target_dir) -> Path:
    cmd = ["cargo", "build", "--profile", profile, "-p", package, "--bench", bench, "--message-format=json"]
    print(f"building ours: CARGO_TARGET_DIR={target_dir} {' '.join(cmd)}", flush=True)
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise CargoError(f"cargo build failed (exit {r.returncode})")
    exe = None
    for line in r.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == bench:
            exe = msg.get("executable") or exe
    if not exe or not Path(exe).is_file():
        raise CargoError(f"cargo build succeeded but reported no {bench} executable")
    return Path(exe)
