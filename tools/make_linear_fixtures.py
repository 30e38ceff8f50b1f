#!/usr/bin/env python3
"""Golden fixture for `dinov2_train::eval::linear`, computed with the official `eval/linear.py`.

Run (from the repository root; CPU only, a few seconds):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/make_linear_fixtures.py

with $PYTHON a Python environment from tools/requirements.txt and $DINOV2_SRC a checkout of
facebookresearch/dinov2. Everything is seeded: re-running writes the same tensors.

Output: `crates/dinov2-train/tests/fixtures/linear.safetensors` (about 200 KB) with

| key | dtype | shape | meaning |
|---|---|---|---|
| `backbone.<name>` | f32 | param | a tiny random official `DinoVisionTransformer` (embed_dim 16, depth 5, 2 heads, patch 8, img_size 24, 2 registers, MLP FFN, LayerScale); its Rust `VitConfig` is the metadata `vit_config` |
| `images` | f32 | [12, 3, 24, 24] | seeded N(0, 1) pixels (already "preprocessed") |
| `labels` | i64 | [12] | classes 0..3 |
| `input.{n}_{avgpool}` | f32 | [12, dim] | official `create_linear_input(features, n, avgpool)` for n in {1, 4}, avgpool in {False, True}: dims 16, 32, 64, 80 |
| `batches` | i64 | [6, 4] | the minibatch (row indices) of each SGD step |
| `scaled_lrs` | f64 | [H] | each head's learning rate after `scale_lr` (batch 4, one process) |
| `init.{h}.weight`, `init.{h}.bias` | f32 | [3, dim], [3] | head h as created by the official `LinearClassifier` (N(0, 0.01), bias 0) |
| `final.{h}.weight`, `final.{h}.bias` | f32 | [3, dim], [3] | head h after the 6 steps |
| `losses` | f32 | [6] | the summed loss of each step (before its update) |

Metadata: `vit_config` (JSON), `head_names` (JSON list, the official names in the official order), `batch_size`,
`max_iter`, `learning_rates` (JSON list, before scaling), `n_last_blocks` (JSON list).

What is reference and what is glue:
* Features: the official `ModelWithIntermediateLayers(model, 4, autocast_ctx)` (autocast replaced by a no-op
  context: f32) on all 12 images at once, then the official `create_linear_input`.
* Heads, optimiser and schedule: the official `setup_linear_classifiers` (heads in the official order and
  names; `.cuda()` made a no-op), `torch.optim.SGD(param_groups, momentum=0.9, weight_decay=0)` and
  `CosineAnnealingLR(optimizer, max_iter, eta_min=0)` exactly as `run_eval_linear` builds them.
* The step: the body of the official `eval_linear` loop (per-head `nn.CrossEntropyLoss`, summed, `zero_grad`,
  `backward`, `optimizer.step()`, `scheduler.step()`), with each minibatch's features indexed out of the
  features computed once (the official loop recomputes them from augmented images every step; the Rust side
  caches them, which is what is compared). The learning rates are above the official grid's (0.5 and 2, scaled
  by 4/256) so that six steps move the weights well beyond the comparison tolerance.
* fvcore (checkpointers, unused here) is stubbed when it is not installed (tools/official_stubs.py).
"""

import argparse
import json
import os
import sys
from contextlib import nullcontext

os.environ.setdefault("XFORMERS_DISABLED", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from make_model_fixtures import build_official, rerandomise, rust_config  # noqa: E402
from official_stubs import _Anything, stub_module  # noqa: E402

# a `make_model_fixtures` family (LayerScale 1, MLP FFN, biases), 5 blocks so that "the last 4" is not "all"
FAMILY = dict(embed_dim=16, num_heads=2, ffn="mlp", num_register_tokens=2, offset=0.1, antialias=False)
DEPTH, PATCH, IMG = 5, 8, 24
N_IMAGES, NUM_CLASSES, BATCH, STEPS = 12, 3, 4, 6
LEARNING_RATES = [0.5, 2.0]
N_LAST_BLOCKS = [1, 4]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"))
    ap.add_argument("--out", default="crates/dinov2-train/tests/fixtures/linear.safetensors")
    args = ap.parse_args()
    if args.dinov2_src:
        sys.path.insert(0, args.dinov2_src)
    try:
        import fvcore  # noqa: F401
    except ImportError:
        stub_module("fvcore")
        stub_module("fvcore.common")
        stub_module("fvcore.common.checkpoint", Checkpointer=_Anything, PeriodicCheckpointer=_Anything)
    import dinov2.eval.linear as lin
    import dinov2.models.vision_transformer as vt
    from dinov2.eval.utils import ModelWithIntermediateLayers
    from dinov2.layers import MemEffAttention
    from dinov2.layers.block import Block

    torch.set_num_threads(1)
    nn.Module.cuda = lambda self, *a, **k: self  # setup_linear_classifiers moves the heads to the GPU

    model = build_official(vt, Block, MemEffAttention, FAMILY, img_size=IMG, depth=DEPTH, patch_size=PATCH)
    rerandomise(model, 7)
    model.eval()

    g = torch.Generator().manual_seed(0)
    images = torch.randn(N_IMAGES, 3, IMG, IMG, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (N_IMAGES,), generator=g)
    batches = torch.stack([torch.randperm(N_IMAGES, generator=g)[:BATCH] for _ in range(STEPS)])

    feature_model = ModelWithIntermediateLayers(model, max(N_LAST_BLOCKS), nullcontext)
    # inference tensors cannot be saved for backward: plain copies, as the official loop's features are
    features = [(p.clone(), c.clone()) for p, c in feature_model(images)]

    out = {f"backbone.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out["images"] = images
    out["labels"] = labels.to(torch.int64)
    out["batches"] = batches.to(torch.int64)
    for n in N_LAST_BLOCKS:
        for avgpool in (False, True):
            out[f"input.{n}_{avgpool}"] = lin.create_linear_input(features, n, avgpool).contiguous()

    torch.manual_seed(0)  # the official heads draw their initial weights from the global generator
    sample_output = [(p[:1], c[:1]) for p, c in features]
    classifiers, param_groups = lin.setup_linear_classifiers(
        sample_output, N_LAST_BLOCKS, LEARNING_RATES, BATCH, NUM_CLASSES
    )
    heads = list(classifiers.classifiers_dict.items())
    for h, (_, head) in enumerate(heads):
        out[f"init.{h}.weight"] = head.linear.weight.detach().clone()
        out[f"init.{h}.bias"] = head.linear.bias.detach().clone()
    out["scaled_lrs"] = torch.tensor([grp["lr"] for grp in param_groups], dtype=torch.float64)

    optimizer = torch.optim.SGD(param_groups, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS, eta_min=0)
    losses = []
    for step in range(STEPS):
        idx = batches[step]
        batch_features = [(p[idx], c[idx]) for p, c in features]
        batch_labels = labels[idx]
        outputs = classifiers(batch_features)
        step_losses = {f"loss_{k}": nn.CrossEntropyLoss()(v, batch_labels) for k, v in outputs.items()}
        loss = sum(step_losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
    out["losses"] = torch.tensor(losses, dtype=torch.float32)
    for h, (_, head) in enumerate(heads):
        out[f"final.{h}.weight"] = head.linear.weight.detach().clone()
        out[f"final.{h}.bias"] = head.linear.bias.detach().clone()
        moved = (out[f"final.{h}.weight"] - out[f"init.{h}.weight"]).abs().max().item()
        print(f"{heads[h][0]}: lr {float(out['scaled_lrs'][h]):.6f}, weights moved up to {moved:.4f}")
    print("losses:", ", ".join(f"{v:.5f}" for v in losses))

    metadata = {
        "vit_config": json.dumps(rust_config(FAMILY, img_size=IMG, depth=DEPTH, patch_size=PATCH)),
        "head_names": json.dumps([name for name, _ in heads]),
        "batch_size": str(BATCH),
        "max_iter": str(STEPS),
        "learning_rates": json.dumps(LEARNING_RATES),
        "n_last_blocks": json.dumps(N_LAST_BLOCKS),
    }
    tmp = args.out + ".tmp"
    save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=metadata)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
    main()
