#!/usr/bin/env python3
"""The PyTorch rows of tools/gpu_check.sh section c: images/s of timm's DINOv2 ViT-S/B/L/14 (SDPA attention,
bf16 weights, random initialisation: speed does not depend on the values) at 224 and 518, timed as
crates/dinov2-model/benches/gpu_check.rs times ours (2 warm-up calls, then the median of 5 groups of calls lasting
about 2 s together, synchronised). One JSON object per line.

    python3 tools/gpu_bench_torch.py --models s,b,l --round 0
"""
import argparse
import json
import time

import timm
import torch

NAMES = {"s": "vit_small_patch14_dinov2", "b": "vit_base_patch14_dinov2", "l": "vit_large_patch14_dinov2"}
ROWS = [(224, 64), (518, 8)]


def timed(fn, min_secs=2.0):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t, 1e-6)
    per_group = max(1, int(min_secs / 5 / once + 0.999))
    groups = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(per_group):
            fn()
        torch.cuda.synchronize()
        groups.append((time.perf_counter() - t) / per_group)
    return sorted(groups)[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="s,b,l")
    ap.add_argument("--round", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    for arch in args.models.split(","):
        for img, batch in ROWS:
            model = timm.create_model(NAMES[arch], pretrained=False, img_size=img, num_classes=0)
            model = model.to(dev, torch.bfloat16).eval()
            x = torch.randn(batch, 3, img, img, device=dev, dtype=torch.bfloat16)

            @torch.inference_mode()
            def run():
                model.forward_features(x)

            secs = timed(run)
            print(json.dumps({
                "section": "c", "impl": f"timm {timm.__version__} / torch {torch.__version__} (SDPA)",
                "round": args.round, "arch": arch, "img": img, "batch": batch, "dtype": "BF16",
                "fused_attn": bool(getattr(model.blocks[0].attn, "fused_attn", False)),
                "ms": round(secs * 1e3, 3), "images_per_s": round(batch / secs, 1),
            }), flush=True)
            del model, x
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
