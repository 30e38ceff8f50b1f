#!/usr/bin/env python3
"""Checkpoint-loading benchmark: dinov2-model's `weights::load_weights` vs the PyTorch-side equivalents.

Run from the repository root (needs the Python env with torch + safetensors, and cargo):

    RAYON_NUM_THREADS=2 $PYTHON tools/bench_weights.py --arch b --reps 5

What it does, in ONE run:
1. Writes random weights of an official architecture (`--arch s|b|l`, ViT-B by default: 86 M parameters,
   344 MB in f32) to a temp dir in three layouts: official `.pth` (torch.save of the state dict), official
   `.safetensors`, and a `transformers` directory (`config.json` + `model.safetensors`, Hub key names).
2. Builds a tiny driver program (source embedded below) against `crates/dinov2-model` in a scratch Cargo project
   (dev profile, dependencies at opt-level 3 as in the workspace; all the work is in std/candle/safetensors/zip code).
   `--target-dir` (default `$CARGO_TARGET_DIR` or the repository's `target/`) is reused so candle is not rebuilt.
3. Interleaves, `--reps` times: the Rust loader on each layout and the Python reference on the same file, each in
   a fresh process that times only the load itself (start-up and imports excluded; both pay the first-touch page
   faults of new memory, as a real program loading its weights once does):
     * `.pth`: `torch.load(path, map_location="cpu", weights_only=True)`
     * `.safetensors`: `safetensors.torch.load_file(path)` + `.clone()` of every tensor (`load_file` alone only maps
       the file and reads nothing: ~0.01 s for ViT-B)
     * transformers dir: `load_file(model.safetensors)` + renaming to official names with `torch.cat` of q/k/v
       (what our loader does; `from_pretrained` would also build the model, so it is not comparable).
   Files are read once before timing (warm page cache for both sides).
4. Prints medians and ratios (ours / reference) as a Markdown table.

The Rust side does more than the references: it also infers the configuration and checks every shape.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DRIVER = r'''
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let t = Instant::now();
    let w = dinov2_model::weights::load_weights(&path).expect("load");
    let s = t.elapsed().as_secs_f64();
    let n: usize = w.state_dict.iter().map(|(_, t)| t.elem_count()).sum();
    println!("{{\"seconds\": {s}, \"params\": {n}, \"format\": \"{:?}\"}}", w.format);
}
'''

ARCHS = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}


def official_state_dict(arch: str):
    import torch

    d, depth, _ = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1370, d), "mask_token": r(1, d),
          "patch_embed.proj.weight": r(d, 3, 14, 14), "patch_embed.proj.bias": r(d)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(d), p + "norm1.bias": r(d), p + "attn.qkv.weight": r(3 * d, d),
                   p + "attn.qkv.bias": r(3 * d), p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d),
                   p + "ls1.gamma": r(d), p + "norm2.weight": r(d), p + "norm2.bias": r(d),
                   p + "mlp.fc1.weight": r(4 * d, d), p + "mlp.fc1.bias": r(4 * d),
                   p + "mlp.fc2.weight": r(d, 4 * d), p + "mlp.fc2.bias": r(d), p + "ls2.gamma": r(d)})
    sd["norm.weight"], sd["norm.bias"] = r(d), r(d)
    return sd


def to_hf(sd, arch):
    d, depth, heads = ARCHS[arch]
    out = {}
    simple = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
              "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
              "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
              "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        i, rest = k[len("blocks."):].split(".", 1)
        h = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            wb = rest.rsplit(".", 1)[1]
            for j, n in enumerate(["query", "key", "value"]):
                out[h + f"attention.attention.{n}.{wb}"] = v[j * d:(j + 1) * d].clone()
        else:
            rest = (rest.replace("attn.proj", "attention.output.dense").replace("ls1.gamma", "layer_scale1.lambda1")
                    .replace("ls2.gamma", "layer_scale2.lambda1"))
            out[h + rest] = v
    cfg = {"architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": d, "num_hidden_layers": depth,
           "num_attention_heads": heads, "mlp_ratio": 4, "image_size": 518, "patch_size": 14, "num_channels": 3,
           "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "qkv_bias": True, "use_swiglu_ffn": False}
    return out, cfg


def hf_reference_load(dirpath: Path):
    import torch
    from safetensors.torch import load_file

    raw = load_file(dirpath / "model.safetensors")
    out, qkv = {}, {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
              "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for k, v in raw.items():
        if k in simple:
            out[simple[k]] = v
            continue
        i, rest = k[len("encoder.layer."):].split(".", 1)
        if rest.startswith("attention.attention."):
            n, wb = rest[len("attention.attention."):].split(".")
            qkv.setdefault((i, wb), {})[n] = v
            continue
        rest = (rest.replace("attention.output.dense", "attn.proj").replace("layer_scale1.lambda1", "ls1.gamma")
                .replace("layer_scale2.lambda1", "ls2.gamma"))
        out[f"blocks.{i}.{rest}"] = v
    for (i, wb), p in qkv.items():
        out[f"blocks.{i}.attn.qkv.{wb}"] = torch.cat([p["query"], p["key"], p["value"]], 0)
    return out


def reference_cases():
    import torch
    from safetensors.torch import load_file

    return {
        "official .pth": ("official.pth", lambda p: torch.load(p, map_location="cpu", weights_only=True),
                          "torch.load"),
        # load_file maps the file lazily (nothing is read yet): materialise the tensors to compare like for like.
        "official .safetensors": ("official.safetensors", lambda p: {k: v.clone() for k, v in load_file(p).items()},
                                  "load_file + clone"),
        "transformers dir": ("hf", hf_reference_load, "load_file + rename/cat"),
    }


def run_reference(case: str, path: str) -> int:
    import torch

    torch.set_num_threads(2)
    fn = reference_cases()[case][1]
    t = time.perf_counter()
    obj = fn(Path(path))
    s = time.perf_counter() - t
    print(json.dumps({"seconds": s, "params": sum(v.numel() for v in obj.values())}))
    return 0


def build_driver(target_dir: str) -> Path:
    proj = Path(tempfile.mkdtemp(prefix="bench-weights-driver-"))
    (proj / "src").mkdir()
    (proj / "src" / "main.rs").write_text(DRIVER)
    (proj / "Cargo.toml").write_text(f'''[package]
name = "bench-weights-driver"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
dinov2-model = {{ path = "{REPO / 'crates' / 'dinov2-model'}" }}

[workspace]

[profile.dev]
opt-level = 1
debug = "line-tables-only"

[profile.dev.package."*"]
opt-level = 3
debug = false
''')
    shutil.copy(REPO / "Cargo.lock", proj / "Cargo.lock")
    env = dict(os.environ, CARGO_TARGET_DIR=target_dir)
    subprocess.run(["cargo", "build", "--offline", "--manifest-path", str(proj / "Cargo.toml")], check=True, env=env)
    return Path(target_dir) / "debug" / "bench-weights-driver"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="b", choices=sorted(ARCHS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(REPO / "target")))
    ap.add_argument("--ref-case", help=argparse.SUPPRESS)
    ap.add_argument("--ref-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ref_case:
        return run_reference(args.ref_case, args.ref_path)

    os.environ.setdefault("RAYON_NUM_THREADS", "2")
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(v, "2")
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    driver = build_driver(args.target_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        sd = official_state_dict(args.arch)
        nparams = sum(v.numel() for v in sd.values())
        torch.save(sd, work / "official.pth")
        save_file(sd, work / "official.safetensors", metadata={"format": "pt"})
        hf, cfg = to_hf(sd, args.arch)
        (work / "hf").mkdir()
        save_file(hf, work / "hf" / "model.safetensors", metadata={"format": "pt"})
        (work / "hf" / "config.json").write_text(json.dumps(cfg))
        del sd, hf

        cases = [(name, work / f, fn, ref) for name, (f, fn, ref) in reference_cases().items()]
        times = {name: ([], []) for name, *_ in cases}

        def rust(path):
            out = subprocess.run([str(driver), str(path)], check=True, capture_output=True, text=True,
                                 env=os.environ).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            assert rec["params"] == nparams, rec
            return rec["seconds"]

        def python(case, path):
            # A fresh process too, so both sides pay for first-touch page faults of new memory.
            out = subprocess.run([sys.executable, __file__, "--ref-case", case, "--ref-path", str(path)],
                                 check=True, capture_output=True, text=True, env=os.environ).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            assert rec["params"] == nparams, rec
            return rec["seconds"]

        for name, path, _, _ in cases:  # warm the page cache for both sides
            rust(path)
            python(name, path)
        for _ in range(args.reps):
            for name, path, _, _ in cases:
                times[name][0].append(rust(path))
                times[name][1].append(python(name, path))

        print(f"\nViT-{args.arch.upper()}/14 random weights, {nparams / 1e6:.1f} M params "
              f"({nparams * 4 / 1e6:.0f} MB f32), {args.reps} interleaved reps, medians\n")
        floor = []
        for _ in range(args.reps):
            t = time.perf_counter()
            (work / "official.safetensors").read_bytes()
            floor.append(time.perf_counter() - t)
        print(f"I/O floor: reading the .safetensors file's bytes (Python read_bytes): median {statistics.median(floor):.3f} s\n")
        print("| layout | ours (s) | reference | reference (s) | ours / reference |")
        print("|---|---|---|---|---|")
        for name, _, _, ref in cases:
            a, b = statistics.median(times[name][0]), statistics.median(times[name][1])
            print(f"| {name} | {a:.3f} | {ref} | {b:.3f} | {a / b:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
