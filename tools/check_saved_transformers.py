#!/usr/bin/env python3
"""Cross-check the files written by dinov2-model's `weights::save_transformers` / `save_safetensors` with Python.

Run (from the repository root):

    # 1. let the Rust fixture test export what it writes (one sub-directory per fixture family)
    DINOV2_WEIGHTS_EXPORT_DIR=/tmp/wexport cargo test -p dinov2-model --test weights_fixtures
    # 2. load those files with transformers and the official code and compare with the committed fixtures
    PYTHONPATH=$DINOV2_SRC XFORMERS_DISABLED=1 $PYTHON \
        tools/check_saved_transformers.py /tmp/wexport

(`--dinov2-src PATH` or env `DINOV2_SRC` instead of PYTHONPATH also works; without the official code the
`official.safetensors` check is skipped.)

Per family (plain, reg, swiglu) it checks, and exits non-zero on any failure:
* `<export>/<family>/hf`: `AutoModel.from_pretrained` gives the class of the fixture (`Dinov2Model` /
  `Dinov2WithRegistersModel`) with no missing, unexpected or mismatched keys, and `last_hidden_state` equal (max abs
  diff 0) to the model loaded from the committed `crates/dinov2-model/tests/fixtures/<family>/hf` on the same random input at 56x56
  and at 28x28.
* `<export>/<family>/official.safetensors`: loads strictly into the official `DinoVisionTransformer` built from the
  family's `config.json`, and `forward_features` equals the one of the model loaded from the committed
  `official.pth` (bitwise).
"""

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "crates" / "dinov2-model" / "tests" / "fixtures"


def check_hf(family: str, saved: Path) -> list:
    from transformers import AutoModel

    errors = []
    ours, info = AutoModel.from_pretrained(saved, output_loading_info=True)
    ref = AutoModel.from_pretrained(FIXTURES / family / "hf")
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            errors.append(f"{family}: {kind}: {info[kind]}")
    if type(ours) is not type(ref):
        errors.append(f"{family}: class {type(ours).__name__} != fixture {type(ref).__name__}")
    ours.eval()
    ref.eval()
    g = torch.Generator().manual_seed(7)
    for h, w in ((56, 56), (28, 28)):
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            a = ours(pixel_values=x).last_hidden_state
            b = ref(pixel_values=x).last_hidden_state
        diff = (a - b).abs().max().item()
        print(f"[{family}] transformers {type(ours).__name__} from our dir: last_hidden_state max|diff| @{h}x{w} = {diff}")
        if diff != 0.0:
            errors.append(f"{family}: last_hidden_state differs by {diff} at {h}x{w}")
    return errors


def check_official(family: str, saved: Path) -> list:
    try:
        from dinov2.layers import MemEffAttention
        from dinov2.layers.block import NestedTensorBlock as Block
        from dinov2.models.vision_transformer import DinoVisionTransformer
    except ImportError as e:  # official code not importable
        print(f"[{family}] official code not importable ({e}); skipping the official.safetensors check")
        return []
    from safetensors.torch import load_file

    cfg = json.loads((FIXTURES / family / "config.json").read_text())

    def build():
        return DinoVisionTransformer(
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            in_chans=cfg["in_chans"],
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_ratio"],
            qkv_bias=cfg["qkv_bias"],
            proj_bias=cfg["proj_bias"],
            ffn_bias=cfg["ffn_bias"],
            init_values=cfg["layer_scale_init"],
            ffn_layer="swiglufused" if cfg["ffn"] == "swiglu" else "mlp",
            block_fn=partial(Block, attn_class=MemEffAttention),
            block_chunks=0,
            num_register_tokens=cfg["num_register_tokens"],
            interpolate_antialias=cfg["interpolation"]["antialias"],
            interpolate_offset=cfg["interpolation"]["offset"],
        ).eval()

    ours, ref = build(), build()
    ours.load_state_dict(load_file(saved), strict=True)
    ref.load_state_dict(torch.load(FIXTURES / family / "official.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a = ours.forward_features(x)["x_prenorm"]
        b = ref.forward_features(x)["x_prenorm"]
    diff = (a - b).abs().max().item()
    print(f"[{family}] official model from our official.safetensors (strict load): x_prenorm max|diff| = {diff}")
    return [] if diff == 0.0 else [f"{family}: official x_prenorm differs by {diff}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path, help="DINOV2_WEIGHTS_EXPORT_DIR of the Rust test run")
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"), help="official dinov2 checkout")
    args = ap.parse_args()
    if args.dinov2_src:
        sys.path.insert(0, args.dinov2_src)
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    torch.set_num_threads(2)
    errors = []
    families = sorted(p.name for p in args.export_dir.iterdir() if p.is_dir())
    if not families:
        print(f"nothing exported under {args.export_dir}")
        return 2
    for fam in families:
        errors += check_hf(fam, args.export_dir / fam / "hf")
        errors += check_official(fam, args.export_dir / fam / "official.safetensors")
    for e in errors:
        print("FAIL:", e)
    print("OK" if not errors else f"{len(errors)} failure(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
