#!/usr/bin/env python3
"""Builds the fuzzers' seed corpora, fuzz/seeds/<target>/, from the test fixtures plus a few small files made here
(a tiny ViT as .pth and as safetensors with its configuration in the metadata, .npy files of every supported
dtype and version, tar shards with GNU long names, pax records and base-256 sizes, configuration snippets).

    /work/pyenv/bin/python tools/make_fuzz_seeds.py     (torch, numpy, safetensors)

Deterministic: running it again gives the same files (up to the order of safetensors metadata keys).
"""
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
MAX_SEED = 64 * 1024  # keep the corpora small: big seeds slow every mutation


def copy(target, paths):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    for p in paths:
        p = ROOT / p
        if p.stat().st_size <= MAX_SEED:
            shutil.copyfile(p, d / p.name.replace("/", "_"))


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def tiny_vit(dim=8, depth=1, patch=2, grid=2, regs=0, hidden=16):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02
    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    if regs:
        sd["register_tokens"] = r(1, regs, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": torch.ones(dim), b + "norm1.bias": torch.zeros(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "ls1.gamma": torch.ones(dim),
            b + "norm2.weight": torch.ones(dim), b + "norm2.bias": torch.zeros(dim),
            b + "mlp.fc1.weight": r(hidden, dim), b + "mlp.fc1.bias": r(hidden),
            b + "mlp.fc2.weight": r(dim, hidden), b + "mlp.fc2.bias": r(dim),
            b + "ls2.gamma": torch.ones(dim),
        })
    cfg = {
        "img_size": patch * grid, "patch_size": patch, "in_chans": 3, "embed_dim": dim, "depth": depth,
        "num_heads": 2, "mlp_ratio": hidden / dim, "ffn": "mlp", "qkv_bias": True, "proj_bias": True,
        "ffn_bias": True, "layer_scale_init": 1.0, "num_register_tokens": regs,
        "interpolation": {"offset": 0.1, "antialias": False}, "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0, "drop_path_uniform": False,
    }
    return sd, cfg


def weights():
    copy("weights", [
        "crates/dinov2-model/tests/fixtures/plain/lc1_head.pth",
        "crates/dinov2-model/tests/fixtures/plain/lc1_head.safetensors",
        "crates/dinov2-loss/tests/fixtures/checkpoint.safetensors",
        "crates/dinov2-loss/tests/fixtures/teacher_checkpoint.pth",
    ])
    sd, cfg = tiny_vit()
    tmp = SEEDS / "weights"
    save_file(sd, str(tmp / "tiny_config.safetensors"), metadata={"format": "pt", "dinov2_config": json.dumps(cfg)})
    sd_r, cfg_r = tiny_vit(regs=2)
    save_file(sd_r, str(tmp / "tiny_reg_config.safetensors"),
              metadata={"format": "pt", "dinov2_config": json.dumps(cfg_r)})
    torch.save(sd, tmp / "tiny_official.pth")
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}}, tmp / "tiny_train_ckpt.pth")
    torch.save({"model": {"student.backbone." + k: v for k, v in sd.items()}}, tmp / "tiny_model_ckpt.pth")
    # The timm and transformers layouts by name only (their conversion paths), in bf16 and f16 too.
    save_file({"model.cls_token": sd["cls_token"].to(torch.bfloat16), "embeddings.cls_token": sd["cls_token"].half()},
              str(tmp / "dtypes.safetensors"))


def npy():
    copy("npy", [
        "crates/dinov2-curate/tests/fixtures/qknn_sims.npy",
        "crates/dinov2-curate/tests/fixtures/qknn_ids.npy",
    ])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4))
    for dt in ["<f4", "<f8", "<f2", "<i8", "<i4", "<u4", "<u8"]:
        buf = io.BytesIO()
        np.save(buf, x.astype(dt) if dt[1] == "f" else (x * 10).astype(dt))
        write("npy", f"m_{dt[1:]}.npy", buf.getvalue())
    for version in [(2, 0), (3, 0)]:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, x.astype("<f4"), version=version)
        write("npy", f"v{version[0]}.npy", buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.zeros((0, 4), "<f4"))
    write("npy", "empty_rows.npy", buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.arange(5, dtype="<i8"))
    write("npy", "ids.npy", buf.getvalue())


def image():
    copy("image", [f"crates/dinov2-data/tests/fixtures/decode/{n}" for n in [
        "anim.gif", "cmyk.jpg", "cmyk.tif", "exif6.jpg", "grey.png", "grey16.png", "rgb.bmp", "rgb.jpg",
        "rgb.webp", "rgba.png", "truncated.jpg"]] + ["crates/dinov2-data/tests/fixtures/src_61x47.png"])
    write("image", "p6.ppm", b"P6\n3 2\n255\n" + bytes(range(18)))


def member(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def tar():
    png = (ROOT / "crates/dinov2-data/tests/fixtures/decode/grey.png").read_bytes()
    for fmt, tag in [(tarfile.USTAR_FORMAT, "ustar"), (tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            member(tf, "shard/000.png", png)
            member(tf, "shard/000.cls", b"7\n")
            if fmt != tarfile.USTAR_FORMAT:
                member(tf, "shard/" + "long_name_" * 12 + ".png", png)
            member(tf, "prefix_dir_" * 8 + "/x/001.png", png)
        write("tar", f"{tag}.tar", buf.getvalue())
    # A base-256 (GNU) size field for a small member.
    buf = bytearray(SEEDS.joinpath("tar/gnu.tar").read_bytes())
    hdr = buf[:512]
    size = len(png).to_bytes(11, "big")
    hdr[124:136] = b"\x80" + size
    hdr[148:156] = b" " * 8
    hdr[148:156] = (b"%06o\0 " % sum(hdr))
    write("tar", "base256.tar", bytes(hdr) + bytes(buf[512:]))


def config():
    copy("config", ["examples/pretrain_tiny.yaml", "examples/distill_tiny.yaml",
                    "crates/dinov2-model/tests/fixtures/reg/config.json"])
    _, cfg = tiny_vit()
    write("config", "vit.json", json.dumps(cfg).encode())
    write("config", "override.txt", b"ibot.mask_ratio_min_max=[0.1,0.4]")
    write("config", "sections.yaml", b"student:\n  arch: vit_small\n  patch_size: 14\ncrops:\n  local_crops_number: 2\n"
          b"optim:\n  epochs: 2\n  warmup_epochs: 1\n")


def hf_config():
    for v in ["plain", "reg", "swiglu", "plain/hf_classifier"]:
        src = ROOT / f"crates/dinov2-model/tests/fixtures/{v}" / ("" if "/" in v else "hf") / "config.json"
        write("hf_config", v.replace("/", "_") + ".json", src.read_bytes())


def text():
    write("text", "list.txt", b"# images\nimg/a.jpg 3\nimg/b.png\n\n/abs/c.webp\t7\n")
    write("text", "list.csv", b"path,label\nimg/a.jpg,3\n\"img/b,c.jpg\",\nimg/d.jpg,-1\n")
    write("text", "paths.txt", b"pool/000.jpg\npool/001.jpg\n")
    # A training run's metrics: losses, the learning rate and a k-NN line (tools/make_fuzz_seeds.py made it
    # from the first lines of a real run's training_metrics.jsonl).
    write("text", "metrics.jsonl", b'{"iteration": 0, "total_loss": 11.2, "dino_local_crops_loss": 9.1, '
          b'"ibot_loss": 1.1, "koleo_loss": -0.2, "lr": 0.0}\n{"iteration": 10, "total_loss": 10.9, '
          b'"dino_local_crops_loss": 8.8, "ibot_loss": NaN, "koleo_loss": -0.3, "lr": 1e-5}\n'
          b'{"iteration": 20, "knn": {"20": {"top1": 31.5, "top5": 80.0}}}\n{"iteration": 30, "total_loss": 1e308}\n')


if __name__ == "__main__":
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    for f in [weights, npy, image, tar, config, hf_config, text]:
        f()
    for d in sorted(SEEDS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} seeds, {sum(p.stat().st_size for p in files)} bytes")
