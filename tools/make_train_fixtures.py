#!/usr/bin/env python3
"""Golden fixtures for the `dinov2-train` crate: four iterations of the official DINOv2 training loop.

Run (from the repository root; CPU only, a few seconds):

    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/make_train_fixtures.py [--check-determinism]

with $PYTHON a Python environment from tools/requirements.txt and $DINOV2_SRC a checkout of
facebookresearch/dinov2. Output: `crates/dinov2-train/tests/fixtures/{step_centering,step_sk}.safetensors` and a
generated `README.md` there listing every key, shape and the metadata; committed so CI never needs torch.
Deterministic (seeded); `--check-determinism` builds everything twice in fresh processes and compares the bytes.

The loop is `tools/official_train.py` (the official `SSLMetaArch`, AdamW param groups, schedules, collate; see
its doc for the glue). Two variants of a tiny config: `centering` (shared DINO/iBOT head) and `sinkhorn_knopp`
(separate iBOT head with another prototype count). The student's initial state is the official init moved off it
(see `perturb_student`) so that the step is well conditioned for an independent implementation.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_train as ot  # noqa: E402

OUT_DEFAULT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates",
                                            "dinov2-train", "tests", "fixtures"))
N_STEPS = 4
B = 2
N_PATCHES = 9  # 42 / 14 = 3 -> 3x3
N_LOCAL = 2

COMMON = [
    "student.arch=vit_test", "student.patch_size=14", "student.drop_path_rate=0.0", "student.layerscale=1.0e-05",
    "student.ffn_layer=mlp", "student.qkv_bias=true", "student.proj_bias=true", "student.ffn_bias=true",
    "student.num_register_tokens=0", "student.block_chunks=0",
    "crops.global_crops_size=42", "crops.local_crops_size=28", f"crops.local_crops_number={N_LOCAL}",
    f"train.batch_size_per_gpu={B}", "train.OFFICIAL_EPOCH_LENGTH=2",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "dino.head_nlayers=3",
    "dino.koleo_loss_weight=0.1",
    "optim.epochs=4", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=1", "optim.base_lr=0.05",
    "optim.layerwise_decay=0.9", "optim.patch_embed_lr_mult=0.2", "optim.weight_decay=0.04",
    "optim.weight_decay_end=0.4", "optim.clip_grad=CLIP",
    "teacher.momentum_teacher=0.992", "teacher.final_momentum_teacher=1.0", "teacher.warmup_teacher_temp_epochs=1",
]
VARIANTS = {
    "step_centering": dict(seed=0, data_seed=100, clip=10.0, overrides=[
        "train.centering=centering", "ibot.separate_head=false"]),
    "step_sk": dict(seed=1, data_seed=200, clip=10.0, overrides=[
        "train.centering=sinkhorn_knopp", "ibot.separate_head=true", "ibot.head_n_prototypes=48",
        "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16", "ibot.head_nlayers=3"]),
}

# Masked patches of the 2B = 4 global crops (crop-major: crop 0 of images 0, 1, then crop 1 of images 0, 1) on
# the 3x3 grid, per step. At most upperbound = 6 masked in all (the official collate's buffer size for 4 crops,
# mask_sample_probability 0.5, ratios 0.1-0.5 of 9 patches: int(9*0.3) + int(9*0.5)).
MASKS = [
    [[0, 1, 3], [], [4, 5], []],          # 5 masked (one padding row), counts 3/0/2/0
    [[], [2, 5], [], [0, 1, 2, 3]],       # 6 masked (buffer full), counts 0/2/0/4
    [[8], [], [], [3, 4, 6]],             # 4 masked, counts 1/0/0/3
    [[4], [0, 8], [7], [3, 4]],           # 6 masked, every crop masked, counts 1/2/1/2
]


def masks_tensor(spec):
    m = torch.zeros(2 * B, N_PATCHES, dtype=torch.bool)
    for crop, idx in enumerate(spec):
        m[crop, idx] = True
    return m


def perturb_student(student, g):
    """Moves the official init off its symmetric point (same generator order every run):
    LayerScale gammas 0.1 + 0.03 N(0,1) (official 1e-5), LayerNorm weights 1 + 0.1 N, every bias 0.02 N (LayerNorm
    biases 0.05 N), cls_token and mask_token 0.02 N (official ~0 and 0); the DINO/iBOT heads as the loss fixtures
    (`make_loss_fixtures.perturb_head`). Weights keep their official init. Reason: at the official init (LayerScale
    1e-5) the CLS tokens of different crops agree to ~1e-7 (tens of f32 ulps), so KoLeo's -log(distance) and its
    gradient (norm ~4000) amplify rounding to ~1e-2 relative: no independent implementation could match it to 1e-4."""
    from make_loss_fixtures import perturb_head

    for name, p in student.backbone.named_parameters():
        if name.endswith(".gamma"):
            p.copy_(0.1 + 0.03 * torch.randn(p.shape, generator=g))
        elif "norm" in name and name.endswith(".weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif "norm" in name and name.endswith(".bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias") or name in ("cls_token", "mask_token"):
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    for key in ("dino_head", "ibot_head"):
        if key in student:
            perturb_head(student[key], g)


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def i64(v):
    return torch.tensor([int(v)], dtype=torch.int64)


def f64(v):
    return torch.tensor([float(v)], dtype=torch.float64)


def build_variant(name, spec):
    cfg = ot.make_config([o.replace("CLIP", str(spec["clip"])) for o in COMMON] + spec["overrides"])
    g = torch.Generator().manual_seed(spec["seed"] + 1000)
    trainer = ot.OfficialTrainer(cfg, seed=spec["seed"], init_fn=lambda s: perturb_student(s, g))
    model = trainer.model
    out = {}
    names = [n for n, _ in trainer.named_student_parameters()]
    for k, m in model.student.items():
        for key, t in m.state_dict().items():
            out[f"init.{k}.{key}"] = f32(t)
    assert sorted(names) == sorted(k[len("init."):] for k in out)
    data = torch.Generator().manual_seed(spec["data_seed"])
    steps_meta = []
    for s in range(N_STEPS):
        gc = torch.randn(2 * B, 3, 42, 42, generator=data)
        lc = torch.randn(N_LOCAL * B, 3, 28, 28, generator=data)
        masks = masks_tensor(MASKS[s])
        batch = ot.collate(cfg, gc, lc, masks)
        assert torch.equal(batch["collated_masks"], masks)
        rec = trainer.step(batch)
        p = f"step{s}"
        out[f"{p}.global_crops"] = f32(batch["collated_global_crops"])
        out[f"{p}.local_crops"] = f32(batch["collated_local_crops"])
        out[f"{p}.masks"] = batch["collated_masks"].to(torch.uint8)
        out[f"{p}.mask_indices"] = batch["mask_indices_list"].to(torch.int64).contiguous()
        out[f"{p}.masks_weight"] = f32(batch["masks_weight"])
        out[f"{p}.n_masked_patches"] = batch["n_masked_patches"].to(torch.int64).contiguous()
        out[f"{p}.upperbound"] = i64(batch["upperbound"])
        for key in ("lr", "wd", "mom", "teacher_temp", "last_layer_lr"):
            out[f"{p}.{key}"] = f64(rec[key])
        for key, v in rec["loss_dict"].items():
            out[f"{p}.loss.{key}"] = f32(v.reshape(1))
        out[f"{p}.loss.total"] = f32(rec["total"].reshape(1))
        for key, v in rec["grad_norms"].items():
            out[f"{p}.grad_norm.{key}"] = torch.tensor([v], dtype=torch.float32)
        for k, m in model.student.items():
            for key, t in m.state_dict().items():
                out[f"{p}.student.{k}.{key}"] = f32(t)
        for k, m in model.teacher.items():
            for key, t in m.state_dict().items():
                out[f"{p}.teacher.{k}.{key}"] = f32(t)
        state = trainer.adam_state()
        assert sorted(state) == sorted(names), "every student parameter has optimizer state"
        for key, st in state.items():
            out[f"{p}.exp_avg.{key}"] = f32(st["exp_avg"])
            out[f"{p}.exp_avg_sq.{key}"] = f32(st["exp_avg_sq"])
            out[f"{p}.adam_step.{key}"] = i64(float(st["step"]))
        for key, loss in (("dino_center", model.dino_loss), ("ibot_center", model.ibot_patch_loss)):
            out[f"{p}.{key}_used"] = f32(loss.center)
            pending = copy.deepcopy(loss)
            pending.apply_center_update()
            out[f"{p}.{key}"] = f32(pending.center)
        steps_meta.append({
            "iteration": rec["iteration"], **{k: rec[k] for k in ("lr", "wd", "mom", "teacher_temp", "last_layer_lr")},
            "n_masked_patches": int(batch["n_masked_patches"]), "upperbound": int(batch["upperbound"]),
            "masked_per_crop": [int(c) for c in masks.sum(-1)],
            "grad_norms": rec["grad_norms"],
            "clipped": {k: v > cfg.optim.clip_grad for k, v in rec["grad_norms"].items()},
            "loss_dict": {k: v.item() for k, v in rec["loss_dict"].items()}, "total": rec["total"].item(),
        })
    from omegaconf import OmegaConf

    fixture = {
        "format": "dinov2-train step fixture 1",
        "generator": f"tools/make_train_fixtures.py, torch {torch.__version__}",
        "variant": cfg.train.centering,
        "n_steps": N_STEPS,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "param_names": names,
        "param_groups": trainer.param_groups_by_name(),
        "steps": steps_meta,
    }
    # one metadata key: safetensors writes the metadata map in hash order, several keys would change the bytes
    meta = {"fixture": json.dumps(fixture, sort_keys=True)}
    return out, meta


def save_atomic(out, meta, path):
    tmp = path + ".tmp"
    save_file(out, tmp, metadata=meta)
    os.replace(tmp, path)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def dtype_name(t):
    return {torch.float32: "f32", torch.float64: "f64", torch.int64: "i64", torch.uint8: "u8"}[t.dtype]


def readme(results):
    first = next(iter(results.values()))
    lines = [
        "# dinov2-train fixtures",
        "",
        "Generated by `tools/make_train_fixtures.py` (do not edit): four iterations (0..3) of the official DINOv2",
        "training loop (`dinov2/train/train.py` around the unchanged official `SSLMetaArch`, AdamW param groups,",
        "schedules and collate; `tools/official_train.py` documents the glue) on the CPU in f32, one process, no grad",
        "scaler, no FSDP. Regenerate:",
        "",
        "    DINOV2_SRC=$DINOV2_SRC $PYTHON tools/make_train_fixtures.py --check-determinism",
        "",
        "## Files and configuration",
        "",
        "| file | `train.centering` | iBOT head | K (DINO) | K (iBOT) | clip_grad | init seed |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, spec in VARIANTS.items():
        cfg = json.loads(results[name][1]["fixture"])["config"]
        lines.append(f"| `{name}.safetensors` | {cfg['train']['centering']} | "
                     f"{'separate' if cfg['ibot']['separate_head'] else 'shared (dino_head)'} | "
                     f"{cfg['dino']['head_n_prototypes']} | "
                     f"{cfg['ibot']['head_n_prototypes'] if cfg['ibot']['separate_head'] else cfg['dino']['head_n_prototypes']}"
                     f" | {cfg['optim']['clip_grad']} | {spec['seed']} |")
    cfg = json.loads(first[1]["fixture"])["config"]
    lines += [
        "",
        "Common (the official defaults otherwise; the whole resolved config is the metadata key `config`):",
        f"student `vit_test` (DinoVisionTransformer, embed_dim 32, depth 2, heads 2, mlp_ratio 4, patch 14, MLP FFN,",
        f"qkv/proj/ffn bias, LayerScale, 0 registers, drop_path_rate 0, `MemEffAttention` + `NestedTensorBlock`),",
        f"img_size = global_crops_size 42 (3x3 patches), local_crops_size 28 (2x2), local_crops_number 2,",
        f"batch_size_per_gpu B = 2; DINO head hidden 32, bottleneck 16, nlayers 3 (iBOT head likewise); KoLeo 0.1;",
        f"OFFICIAL_EPOCH_LENGTH 2, epochs 4, warmup_epochs 1, freeze_last_layer_epochs 1,",
        f"warmup_teacher_temp_epochs 1 (0.04 -> 0.07), base_lr 0.05 -> lr = 0.05 * sqrt(2/1024) = {cfg['optim']['lr']!r},",
        "min_lr 1e-6, layerwise_decay 0.9, patch_embed_lr_mult 0.2, weight_decay 0.04 -> 0.4, momentum 0.992 -> 1,",
        "AdamW betas (0.9, 0.999), eps 1e-8.",
        "",
        "Consequences of the official schedules worth knowing: iteration 0 has lr = 0 (the warmup starts at 0), so",
        "`step0.student.*` equals `init.*` bit for bit and only the AdamW moments, the teacher (EMA of two equal",
        "states) and the centres move; `last_layer_lr` is 0 at iterations 0 and 1 (frozen last layer: both heads'",
        "`last_layer.weight_g/weight_v` keep their values, but their moments still update and the weight decay",
        "term is lr * wd = 0).",
        "",
        "Initial state: the official init (global seed = init seed, `fix_random_seeds`) moved off it by",
        "`perturb_student` (LayerScale gammas 0.1 + 0.03 N, LayerNorm weights 1 + 0.1 N, biases 0.02 N (LayerNorm",
        "biases 0.05 N), cls/mask tokens 0.02 N; heads: biases 0.1 N, weight_g 1 + 0.2 N, other weights + 0.05 N).",
        "At the official init (LayerScale 1e-5) the crops' CLS tokens agree to ~1e-7, and KoLeo amplifies f32",
        "rounding to ~1e-2 relative, which no independent implementation could reproduce. The teacher starts as",
        "a copy of this state (as `prepare_for_distributed_training`).",
        "",
        "Inputs per step: distinct seeded N(0,1) pixels (crop-major: `global_crops[c*B + i]` is global crop c of",
        "image i; locals likewise), fixed masks (below) through the official `collate_data_and_cast` (its mask",
        "generator hands out these masks in order, no shuffle), which computes `mask_indices`, `masks_weight`,",
        "`n_masked_patches` and `upperbound` (6 for 4 crops of 9 patches at ratio 0.1-0.5, probability 0.5).",
        "",
        "| step | masked patches per global crop | n_masked | padding rows (upperbound - n_masked) |",
        "|---:|---|---:|---:|",
    ]
    for s, spec in enumerate(MASKS):
        n = sum(len(x) for x in spec)
        lines.append(f"| {s} | {' / '.join(str(x) for x in spec)} | {n} | {6 - n} |")
    lines += [
        "",
        "## Keys",
        "",
        "`<name>` is a student parameter as `<submodule>.<state_dict key>`, submodule `backbone`, `dino_head` or",
        "`ibot_head` (the official student `ModuleDict` keys; the weight-normed last layer is",
        "`last_layer.weight_g` [K,1] / `last_layer.weight_v` [K,bottleneck]). The list and order is the metadata",
        "`param_names`; shapes in the parameter table below. Scalars are 1-element tensors. `s` = 0..3.",
        "",
        "| key | dtype | shape | meaning |",
        "|---|---|---|---|",
        "| `init.<name>` | f32 | param | student (= teacher) state before iteration 0 |",
        "| `step{s}.global_crops` | f32 | [2B,3,42,42] = [4,3,42,42] | collated global crops |",
        "| `step{s}.local_crops` | f32 | [2B,3,28,28] = [4,3,28,28] | collated local crops (n_local*B) |",
        "| `step{s}.masks` | u8 | [4,9] | collated_masks (1 = masked) |",
        "| `step{s}.mask_indices` | i64 | [n_masked] | mask_indices_list (flat indices into [4*9]) |",
        "| `step{s}.masks_weight` | f32 | [n_masked] | 1 / (masked count of the patch's crop) |",
        "| `step{s}.n_masked_patches` | i64 | [1] | |",
        "| `step{s}.upperbound` | i64 | [1] | rows of the iBOT buffers (6) |",
        "| `step{s}.lr` `.wd` `.mom` `.teacher_temp` `.last_layer_lr` | f64 | [1] | schedule values at "
        "iteration s (exact, as the Python floats used) |",
        "| `step{s}.loss.dino_local_crops_loss` | f32 | [1] | loss_dict value (already / (2 + 2*n_local)) |",
        "| `step{s}.loss.dino_global_crops_loss` | f32 | [1] | loss_dict value (x 2 / (2 + 2*n_local)) |",
        "| `step{s}.loss.koleo_loss` | f32 | [1] | loss_dict value = **half** the KoLeo term added to the loss "
        "(0.1 * sum over the 2 global chunks, / 2 for display) |",
        "| `step{s}.loss.ibot_loss` | f32 | [1] | loss_dict value = **half** the iBOT term added to the loss "
        "(the term is forward_masked * 2 * 0.5; logged / 2) |",
        "| `step{s}.loss.total` | f32 | [1] | the loss that was backpropagated = dino_local + dino_global + "
        "2 * koleo_loss + 2 * ibot_loss |",
        "| `step{s}.grad_norm.<submodule>` | f32 | [1] | 2-norm of the submodule's gradients **before** "
        "clipping (returned by clip_grad_norm_; clipped when > clip_grad) |",
        "| `step{s}.student.<name>` | f32 | param | student after the step (after optimizer.step) |",
        "| `step{s}.teacher.<name>` | f32 | param | teacher after the step's EMA update |",
        "| `step{s}.exp_avg.<name>` | f32 | param | AdamW first moment after the step |",
        "| `step{s}.exp_avg_sq.<name>` | f32 | param | AdamW second moment after the step |",
        "| `step{s}.adam_step.<name>` | i64 | [1] | AdamW step count after the step (s + 1) |",
        "| `step{s}.dino_center` | f32 | [1,K] | DINO centre after the step's update is applied (what step s+1 "
        "centres with) |",
        "| `step{s}.dino_center_used` | f32 | [1,K] | the `center` buffer after the step: the centre step s used "
        "(the official update is lazy: applied at the start of the next softmax_center_teacher) |",
        "| `step{s}.ibot_center`, `step{s}.ibot_center_used` | f32 | [1,1,K_ibot] | the same for iBOT |",
        "",
        "Under `sinkhorn_knopp` the centres are never updated: all centre keys are zeros. Only submodules that exist",
        "have `grad_norm`/param keys (`ibot_head` only in `step_sk`).",
        "",
        "## Metadata",
        "",
        "The safetensors `__metadata__` holds one key, `fixture`: a JSON object (keys sorted) with",
        "",
        "| key | value |",
        "|---|---|",
        "| `format` | `\"dinov2-train step fixture 1\"` |",
        "| `generator` | script and torch version |",
        "| `variant` | `\"centering\"` or `\"sinkhorn_knopp\"` (= `config.train.centering`) |",
        "| `n_steps` | 4 |",
        "| `config` | the resolved official config (OmegaConf container, the YAML's nesting: `config.optim.lr` is the "
        "lr after the scaling rule, `config.optim.clip_grad`, `config.dino.head_n_prototypes`, ...; "
        "`compute_precision.grad_scaler` false) |",
        "| `param_names` | list of `<name>` in the official parameter order (per submodule, named_parameters) |",
        "| `param_groups` | object `<name>` -> `{\"lr_multiplier\": f64, \"wd_multiplier\": f64, "
        "\"is_last_layer\": bool}` from the official `get_params_groups_with_decay` of each student submodule |",
        "| `steps` | list, per step: `iteration`, `lr`, `wd`, `mom`, `teacher_temp`, `last_layer_lr`, "
        "`n_masked_patches`, `upperbound`, `masked_per_crop` [4], `grad_norms` {submodule: f}, `clipped` "
        "{submodule: bool}, `loss_dict` {key: f}, `total` |",
        "",
        "Per iteration the official loop does: param group lr = (last_layer_lr if is_last_layer else lr) *",
        "lr_multiplier, weight_decay = wd * wd_multiplier; zero_grad; forward_backward(teacher_temp); per student",
        "submodule clip_grad_norm_(clip_grad) (coefficient min(1, clip / (norm + 1e-6)), applied even when 1);",
        "AdamW step (torch, foreach); teacher EMA `_foreach_mul_(t, mom)` then `_foreach_add_(t, s, alpha=1 - mom)`",
        "(torch rounds the f64 scalars `mom` and `1 - mom` to f32 for f32 tensors).",
        "",
        "## Tolerances",
        "",
        "The generator replays each file from its `init.*`, inputs and `config` alone: in f32 it reproduces every",
        "stored output bit for bit (nothing hidden: no RNG draw, fresh optimizer and centres), and in f64 it measures",
        "how far exact arithmetic is from the stored f32 values (tables below): loss terms, gradient norms, centres,",
        "AdamW moments and teacher within ~1e-5 relative, the student within ~1e-5 **except the key third of every",
        "`attn.qkv.bias`** (`[dim:2*dim]`). Its exact gradient is zero (adding a constant to all keys' bias shifts",
        "each query's logits by a constant, which softmax ignores), so the stored gradient there is f32 rounding",
        "noise, which AdamW normalises into updates of about +-lr; another implementation gets other noise (or",
        "exact zeros). Those entries influence nothing else, so compare them loosely (|d| <= (s + 1) * lr) or skip",
        "them. Suggested: per-tensor max|ours - ref| / max|ref| <= 1e-4 for every other key at every step.",
        "",
    ]
    for name, (out, meta, path, cond) in results.items():
        fx = json.loads(meta["fixture"])
        steps, groups = fx["steps"], fx["param_groups"]
        lines += [f"## `{name}.safetensors`", "",
                  f"{len(out)} tensors, {os.path.getsize(path) / 1024:.0f} KiB.", "",
                  "| step | lr | wd | mom | teacher_temp | last_layer_lr | grad norms (pre-clip; * = clipped) | "
                  "total loss |", "|---:|---:|---:|---:|---:|---:|---|---:|"]
        for st in steps:
            norms = ", ".join(f"{k} {v:.4g}{'*' if st['clipped'][k] else ''}" for k, v in st["grad_norms"].items())
            lines.append(f"| {st['iteration']} | {st['lr']:.6g} | {st['wd']:.6g} | {st['mom']:.6g} | "
                         f"{st['teacher_temp']:.6g} | {st['last_layer_lr']:.6g} | {norms} | {st['total']:.6g} |")
        fams = ["loss", "grad_norm", "student", "teacher", "exp_avg", "exp_avg_sq", "dino_center", "ibot_center"]
        lines += ["", "Conditioning: relative error of the stored f32 values against an f64 replay (max over tensors of "
                  "max|f32 - f64| / max|f64|, key third of `qkv.bias` left out; last column: the student key biases' "
                  "largest absolute difference):", "",
                  "| step | " + " | ".join(fams) + " | key bias (abs) |", "|---:|" + "---:|" * (len(fams) + 1)]
        for s, (fam, kb) in enumerate(cond):
            lines.append(f"| {s} | " + " | ".join(f"{fam[f]:.1e}" for f in fams) + f" | {kb:.1e} |")
        lines += ["", "| `<name>` | shape | lr_multiplier | wd_multiplier | is_last_layer |", "|---|---|---:|---:|---|"]
        for pname in fx["param_names"]:
            gr = groups[pname]
            lines.append(f"| `{pname}` | {list(out['init.' + pname].shape)} | {gr['lr_multiplier']:.6g} | "
                         f"{gr['wd_multiplier']:g} | {str(gr['is_last_layer']).lower()} |")
        per_step = sorted({k.split(".", 1)[1].split(".")[0] for k in out if k.startswith("step0.")})
        lines += ["", f"Per-step key families present: {', '.join(f'`{k}`' for k in per_step)}.", ""]
        assert all(dtype_name(t) for t in out.values())
    return "\n".join(lines)


def build(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name, spec in VARIANTS.items():
        out, meta = build_variant(name, spec)
        path = os.path.join(out_dir, f"{name}.safetensors")
        save_atomic(out, meta, path)
        print(f"{path}: {len(out)} tensors, {os.path.getsize(path) / 1024:.0f} KiB")
        for st in json.loads(meta["fixture"])["steps"]:
            print(f"  iteration {st['iteration']}: total {st['total']:.6f}, grad norms {st['grad_norms']}, "
                  f"clipped {st['clipped']}")
        cond = conditioning(path)
        print("  f32 replay identical; f32 vs f64 replay: " + "; ".join(
            f"step {s}: {max(fam.values()):.1e} (key bias {kb:.1e} abs)" for s, (fam, kb) in enumerate(cond)))
        results[name] = (out, meta, path, cond)
    readme_path = os.path.join(out_dir, "README.md")
    write_atomic(readme_path, readme(results) + "\n" + other_fixtures(readme_path))


# The README's sections about fixtures other scripts or tests write start at this line; regenerating keeps them.
OTHER_FIXTURES = "<!-- fixtures not written by make_train_fixtures.py -->"


def other_fixtures(readme_path):
    try:
        with open(readme_path) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    i = text.find(OTHER_FIXTURES)
    return "" if i < 0 else "\n" + text[i:]


def check_determinism(src):
    files = {}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        for d in (a, b):
            cmd = [sys.executable, os.path.abspath(__file__), "--out", d] + (["--dinov2-src", src] if src else [])
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        for f in sorted(os.listdir(a)):
            with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
                files[f] = fa.read() == fb.read()
    bad = [f for f, same in files.items() if not same]
    if bad:
        sys.exit(f"not deterministic: {bad}")
    print(f"deterministic: {len(files)} files identical across two fresh runs")


def replay(path, dtype):
    """Re-runs the loop from a fixture file's `init.*`, inputs and `config` alone (fresh optimizer, centres, no
    generator draws) in `dtype`; returns {key: tensor} for the per-step outputs stored in the file."""
    from omegaconf import OmegaConf
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    fx = json.loads(meta["fixture"])
    cfg = OmegaConf.create(fx["config"])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        trainer = ot.OfficialTrainer(cfg)
        model = trainer.model
        for mods in (model.student, model.teacher):
            for k, m in mods.items():
                m.load_state_dict({key: t[f"init.{k}.{key}"].to(dtype) for key in m.state_dict()})
        out = {}
        for s in range(fx["n_steps"]):
            p = f"step{s}"
            batch = ot.collate(cfg, t[f"{p}.global_crops"].to(dtype), t[f"{p}.local_crops"].to(dtype),
                               t[f"{p}.masks"].bool(), dtype=dtype)
            rec = trainer.step(batch)
            for key, v in rec["loss_dict"].items():
                out[f"{p}.loss.{key}"] = v.detach().reshape(1)
            out[f"{p}.loss.total"] = rec["total"].reshape(1)
            for key, v in rec["grad_norms"].items():
                out[f"{p}.grad_norm.{key}"] = torch.tensor([v], dtype=torch.float64)
            for prefix, mods in (("student", model.student), ("teacher", model.teacher)):
                for k, m in mods.items():
                    for key, v in m.state_dict().items():
                        out[f"{p}.{prefix}.{k}.{key}"] = v.detach().clone()
            for key, st in trainer.adam_state().items():
                out[f"{p}.exp_avg.{key}"] = st["exp_avg"].clone()
                out[f"{p}.exp_avg_sq.{key}"] = st["exp_avg_sq"].clone()
            for key, loss in (("dino_center", model.dino_loss), ("ibot_center", model.ibot_patch_loss)):
                out[f"{p}.{key}_used"] = loss.center.clone()
                pending = copy.deepcopy(loss)
                pending.apply_center_update()
                out[f"{p}.{key}"] = pending.center.clone()
    finally:
        torch.set_default_dtype(prev)
    return t, out


def key_bias_split(key, a, b):
    """For an `attn.qkv.bias` key: (a, b) without the key third, and the key thirds; else (a, b), None."""
    if not key.endswith("attn.qkv.bias"):
        return (a, b), None
    d = a.shape[0] // 3
    return (torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])), (a[d:2 * d], b[d:2 * d])


def conditioning(path):
    """Replays `path` in f32 (must reproduce every stored output bit for bit: the file is self-contained) and in
    f64. Returns, per step, {family: max over tensors of max|f32 - f64| / max|f64|} with the key third of every
    `attn.qkv.bias` left out, and the largest |f32 - f64| of the student's key biases."""
    stored, same = replay(path, torch.float32)
    bad = [k for k, v in same.items() if not torch.equal(v.to(stored[k].dtype), stored[k])]
    if bad:
        sys.exit(f"{path}: the f32 replay differs from the stored values at {bad[:5]} ({len(bad)} keys)")
    _, ref = replay(path, torch.float64)
    rows = []
    for s in range(N_STEPS):
        fam, key_bias = {}, 0.0
        for k, v in ref.items():
            if not k.startswith(f"step{s}."):
                continue
            family = k.split(".")[1]
            (a, b), kb = key_bias_split(k, stored[k].double(), v.double())
            scale = float(b.abs().max())
            err = float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())
            fam[family] = max(fam.get(family, 0.0), err)
            if kb is not None and family == "student":
                key_bias = max(key_bias, float((kb[0] - kb[1]).abs().max()))
        rows.append((fam, key_bias))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"))
    ap.add_argument("--out", default=OUT_DEFAULT)
    ap.add_argument("--check-determinism", action="store_true",
                    help="also build twice in fresh processes (temp dirs) and compare the bytes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ot.import_official(args.dinov2_src)
    ot.register_arch("vit_test", embed_dim=32, depth=2, num_heads=2, mlp_ratio=4)
    build(args.out)
    if args.check_determinism:
        check_determinism(args.dinov2_src)


if __name__ == "__main__":
    main()
