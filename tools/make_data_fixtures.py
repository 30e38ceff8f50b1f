#!/usr/bin/env python3
"""Golden fixtures for crates/dinov2-data (pixel parity of transforms, decoding, masking, collate).

Run (from the repository root), with $PYTHON a Python that has torch, torchvision, Pillow, numpy and safetensors:

    DINOV2_SRC=$DINOV2_SRC XFORMERS_DISABLED=1 $PYTHON tools/make_data_fixtures.py [parts]

where parts is any of `transforms decode masking` (default: all three; `masking` needs the official dinov2 code and
takes about a minute).

DINOV2_SRC is a checkout of facebookresearch/dinov2 (put on sys.path); leave it unset when the `dinov2` package is
installed. Output: crates/dinov2-data/tests/fixtures/ (small, committed; CI never runs this).
References: PIL + torchvision (the libraries the official DataAugmentationDINO uses) and the official
dinov2.data.{masking,collate} modules. Everything is seeded, so re-running gives the same files.
"""
import io
import math
import os
import random
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
import torchvision.transforms as T
import torchvision.transforms.functional as F

if os.environ.get("DINOV2_SRC"):
    sys.path.insert(0, os.environ["DINOV2_SRC"])

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "dinov2-data", "tests", "fixtures")


def synth(w, h, seed):
    """A deterministic 'natural-looking' test image: gradients, waves, hard edges, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin(x / (w / 7.3) + 0.3) * np.cos(y / (h / 3.1))
    g = 255 * (x / w) * 0.6 + 90 * ((x // 13 + y // 11) % 2)
    b = 200 * np.exp(-(((x - w * 0.6) / (w / 4)) ** 2 + ((y - h * 0.4) / (h / 5)) ** 2)) + 30
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    img[h // 3 : h // 3 + 5, :, :] = [250, 10, 5]  # a saturated stripe (exercise clipping)
    img[:, w // 5 : w // 5 + 3, :] = [3, 3, 3]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def arr(img):
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def transforms_fixtures():
    big = synth(320, 240, 1)
    small = synth(61, 47, 2)
    big.save(os.path.join(OUT, "src_320x240.png"))
    small.save(os.path.join(OUT, "src_61x47.png"))
    t = {}
    # official eval transform, before ToTensor/Normalize
    ev = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    t["eval_256_224"] = arr(ev(big))
    # tall variant via transpose (different rounding in center crop)
    # tall odd-sized variant of the small image (other center-crop rounding), resize 40 / crop 33
    tall = small.transpose(Image.Transpose.TRANSPOSE)
    evt = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(33)])
    t["eval_tall_40_33"] = arr(evt(tall))
    # full eval pipeline on the small image, normalised (float32)
    evn = T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(28), T.ToTensor(),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    t["eval_norm_32_28"] = evn(small).numpy().astype(np.float32)
    # plain resizes (down, up, one axis)
    for (w, h) in [(23, 17), (97, 131), (61, 20), (5, 47), (1, 1)]:
        t[f"resize_{w}x{h}"] = arr(small.resize((w, h), Image.BICUBIC))
    # RandomResizedCrop with a fixed box: F.resized_crop(img, top, left, height, width, size)
    for (top, left, hh, ww, s) in [(3, 5, 30, 41, 24), (0, 0, 47, 61, 96), (10, 20, 9, 7, 32), (100, 37, 130, 250, 96)]:
        src = big if top + hh > 47 or left + ww > 61 else small
        name = "big" if src is big else "small"
        t[f"rcrop_{name}_{top}_{left}_{hh}_{ww}_{s}"] = arr(
            F.resized_crop(src, top, left, hh, ww, [s, s], interpolation=T.InterpolationMode.BICUBIC)
        )
    t["hflip"] = arr(F.hflip(small))
    for f in [0.6, 0.77, 1.3, 1.4]:
        t[f"brightness_{f}"] = arr(F.adjust_brightness(small, f))
        t[f"contrast_{f}"] = arr(F.adjust_contrast(small, f))
    for f in [0.8, 0.93, 1.11, 1.2]:
        t[f"saturation_{f}"] = arr(F.adjust_saturation(small, f))
    for f in [-0.1, -0.037, 0.0, 0.05, 0.1]:
        t[f"hue_{f}"] = arr(F.adjust_hue(small, f))
    t["grayscale"] = arr(F.rgb_to_grayscale(small, num_output_channels=3))
    for s in [0.1, 0.7, 1.3, 2.0]:
        t[f"blur_{s}"] = arr(F.gaussian_blur(small, kernel_size=9, sigma=s))
    t["solarize_128"] = arr(F.solarize(small, 128))
    # a whole fixed ColorJitter chain in a fixed order (brightness, contrast, saturation, hue), as torchvision does
    x = small
    for fn, f in [(F.adjust_contrast, 1.2), (F.adjust_hue, -0.05), (F.adjust_brightness, 0.8), (F.adjust_saturation, 1.1)]:
        x = fn(x, f)
    t["jitter_chain_c1.2_h-0.05_b0.8_s1.1"] = arr(x)
    save_file(t, os.path.join(OUT, "transforms.safetensors"))


def decode_fixtures():
    d = os.path.join(OUT, "decode")
    os.makedirs(d, exist_ok=True)
    img = synth(40, 30, 3)
    ref = {}
    img.save(os.path.join(d, "rgb.jpg"), quality=90)
    ref["rgb_jpg"] = arr(Image.open(os.path.join(d, "rgb.jpg")).convert("RGB"))
    img.convert("CMYK").save(os.path.join(d, "cmyk.jpg"), quality=95)
    ref["cmyk_jpg"] = arr(Image.open(os.path.join(d, "cmyk.jpg")).convert("RGB"))
    img.convert("CMYK").save(os.path.join(d, "cmyk.tif"))
    ref["cmyk_tif"] = arr(Image.open(os.path.join(d, "cmyk.tif")).convert("RGB"))
    img.save(os.path.join(d, "rgb.webp"), lossless=True)
    img.save(os.path.join(d, "rgb.bmp"))
    img.convert("L").save(os.path.join(d, "grey.png"))
    ref["grey_png"] = arr(Image.open(os.path.join(d, "grey.png")).convert("RGB"))
    img.convert("RGBA").save(os.path.join(d, "rgba.png"))
    # GIF, two frames: the first one must be taken
    f1 = img.quantize(64)
    f2 = Image.new("RGB", img.size, (255, 0, 0)).quantize(4)
    f1.save(os.path.join(d, "anim.gif"), save_all=True, append_images=[f2], duration=100, loop=0)
    ref["anim_gif"] = arr(Image.open(os.path.join(d, "anim.gif")).convert("RGB"))
    ref["rgb"] = arr(img)
    # EXIF orientation 6 (rotate 90 CW to display): the stored pixels are the transposed image
    ex = Image.Exif()
    ex[0x0112] = 6
    img.save(os.path.join(d, "exif6.jpg"), quality=95, exif=ex.tobytes())
    from PIL import ImageOps
    ref["exif6_jpg"] = arr(ImageOps.exif_transpose(Image.open(os.path.join(d, "exif6.jpg"))).convert("RGB"))
    # 16-bit grey PNG
    g16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(os.path.join(d, "grey16.png"))
    ref["grey16_png_as8"] = arr(img.convert("L"))
    # broken files
    jpg = open(os.path.join(d, "rgb.jpg"), "rb").read()
    open(os.path.join(d, "truncated.jpg"), "wb").write(jpg[:100])
    open(os.path.join(d, "empty.jpg"), "wb").write(b"")
    open(os.path.join(d, "notanimage.png"), "wb").write(b"this is a text file, not a PNG\n")
    save_file(ref, os.path.join(d, "reference.safetensors"))


def masking_fixtures():
    """Statistics of the official MaskingGenerator and the structure of the official collate."""
    from dinov2.data.masking import MaskingGenerator
    from dinov2.data.collate import collate_data_and_cast

    out = {}
    for img, patch in [(224, 14), (224, 16)]:
        g = img // patch
        gen = MaskingGenerator(input_size=(g, g), max_num_patches=0.5 * img // patch * img // patch)
        random.seed(1234)
        n = g * g
        targets = [0, 4, int(n * 0.1), int(n * 0.2), int(n * 0.3), int(n * 0.4), int(n * 0.5)]
        means, stds = [], []
        for t in targets:
            c = np.array([gen(t).sum() for _ in range(4000)], dtype=np.float64)
            means.append(c.mean())
            stds.append(c.std())
        out[f"mask{g}_targets"] = np.array(targets, dtype=np.int64)
        out[f"mask{g}_count_mean"] = np.array(means)
        out[f"mask{g}_count_std"] = np.array(stds)
        # single block sizes on an empty mask with the full budget
        d = np.array([gen._mask(np.zeros((g, g), dtype=bool), gen.max_num_patches) for _ in range(20000)], dtype=np.float64)
        out[f"mask{g}_block_mean"] = np.array([d.mean()])
        out[f"mask{g}_block_std"] = np.array([d.std()])
        out[f"mask{g}_block_zero_frac"] = np.array([(d == 0).mean()])
    # collate: crops carry their (sample, crop) identity as a constant value
    B, n_local = 3, 4
    samples = []
    for b in range(B):
        samples.append(({
            "global_crops": [torch.full((3, 2, 2), float(100 * b + c)) for c in range(2)],
            "local_crops": [torch.full((3, 1, 1), float(100 * b + 10 + c)) for c in range(n_local)],
        }, ()))
    gen = MaskingGenerator(input_size=(16, 16), max_num_patches=0.5 * 224 // 14 * 224 // 14)
    random.seed(7)
    col = collate_data_and_cast(samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32,
                                n_tokens=256, mask_generator=gen)
    out["collate_global_ids"] = col["collated_global_crops"][:, 0, 0, 0].numpy().astype(np.int64)
    out["collate_local_ids"] = col["collated_local_crops"][:, 0, 0, 0].numpy().astype(np.int64)
    out["collate_masks"] = col["collated_masks"].numpy().astype(np.uint8)
    out["collate_mask_indices"] = col["mask_indices_list"].numpy().astype(np.int64)
    out["collate_masks_weight"] = col["masks_weight"].numpy().astype(np.float32)
    out["collate_n_masked"] = col["n_masked_patches"].numpy().astype(np.int64)
    out["collate_upperbound"] = np.array([col["upperbound"]], dtype=np.int64)
    # upperbound for several batch sizes (deterministic given B and N)
    ubs = []
    bs = [1, 2, 3, 5, 8, 32, 64]
    for bsz in bs:
        sm = [({"global_crops": [torch.zeros(1), torch.zeros(1)], "local_crops": [torch.zeros(1)]}, ()) for _ in range(bsz)]
        for n_tok in (256, 196):
            ubs.append(collate_data_and_cast(sm, (0.1, 0.5), 0.5, torch.float32, n_tokens=n_tok,
                                             mask_generator=lambda k: np.zeros((1, n_tok), dtype=bool))["upperbound"])
    out["upperbound_batch_sizes"] = np.array(bs, dtype=np.int64)
    out["upperbound_256_196"] = np.array(ubs, dtype=np.int64).reshape(len(bs), 2)
    save_file(out, os.path.join(OUT, "masking.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    what = sys.argv[1:] or ["transforms", "decode", "masking"]
    if "transforms" in what:
        transforms_fixtures()
    if "decode" in what:
        decode_fixtures()
    if "masking" in what:
        masking_fixtures()
    print("fixtures written to", os.path.normpath(OUT))
