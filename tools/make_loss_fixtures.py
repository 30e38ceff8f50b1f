#!/usr/bin/env python3
"""Golden fixtures for the `dinov2-loss` crate, computed with the official DINOv2 code.

Run (from the repository root; CPU only, a few seconds):

    DINOV2_SRC=$DINOV2_SRC XFORMERS_DISABLED=1 $PYTHON tools/make_loss_fixtures.py

with $PYTHON a Python environment from tools/requirements.txt and $DINOV2_SRC a checkout of
facebookresearch/dinov2.

`DINOV2_SRC` (or `--dinov2-src`) points at a checkout of facebookresearch/dinov2; without it the pip `dinov2`
package is imported. Output: `crates/dinov2-loss/tests/fixtures/{head,dino,ibot,koleo,ssl,checkpoint}.safetensors`
(f32, plus small int tensors for configs/masks) and `teacher_checkpoint.pth` (a tiny checkpoint in the official
`{"teacher": state_dict}` layout), committed so CI never needs torch. Deterministic (seeded).

What is reference and what is glue:
* `DINOHead`, `DINOLoss`, `iBOTPatchLoss`, `KoLeoLoss` and `SSLMetaArch.forward_backward` are the official
  objects/functions, called unchanged.
* Single process: `torch.distributed` is not initialised; `torch.distributed.all_reduce` is replaced by a no-op
  (the sum over one rank), because `iBOTPatchLoss.sinkhorn_knopp_teacher` calls it unconditionally.
* `SSLMetaArch.forward_backward` runs on a stub `self`: the backbones are stubs that return fixed (leaf)
  `x_norm_clstoken` / `x_norm_patchtokens` tensors, the heads are real `DINOHead`s. Modules the training
  package imports but the loss path does not use are stubbed by `tools/official_stubs.py` (xformers'
  `fmha.BlockDiagonalMask` by its documented semantics: concatenate `[1, n_i, D]` inputs along dim 1, split the
  output back; `fvcore` checkpointers; FSDP resharding is a no-op; `Tensor.cuda` returns the tensor). The xformers
  fused cross-entropy is therefore not used: `iBOTPatchLoss` falls back to its own torch `lossfunc`, which the
  official comment says computes the same value.
"""

import argparse
import os
import sys
import types

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_stubs  # noqa: E402


def import_official(src):
    ssl_meta_arch = official_stubs.import_official(src)
    from dinov2.layers import DINOHead
    from dinov2.loss import DINOLoss, iBOTPatchLoss, KoLeoLoss

    return ssl_meta_arch, DINOHead, DINOLoss, iBOTPatchLoss, KoLeoLoss


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def i64(v):
    return torch.tensor(v, dtype=torch.int64)


def perturb_head(head, g):
    """Move the head off its init (non-zero biases, g != 1) so every gradient is non-trivial."""
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("weight_g"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # BatchNorm weight
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def head_fixtures(DINOHead, out):
    g = torch.Generator().manual_seed(1)
    # name: (in_dim, K, use_bn, nlayers, hidden, bottleneck, mlp_bias, x shape)
    cases = {
        "h3": (16, 64, False, 3, 32, 8, True, (5, 16)),
        "h1": (16, 64, False, 1, 32, 8, True, (3, 16)),
        "hbn": (16, 64, True, 2, 24, 8, True, (6, 16)),
        "h4096": (12, 4096, False, 3, 16, 8, False, (2, 2, 12)),
    }
    for name, (din, k, bn, nl, hid, bot, bias, xs) in cases.items():
        head = DINOHead(din, k, use_bn=bn, nlayers=nl, hidden_dim=hid, bottleneck_dim=bot, mlp_bias=bias)
        perturb_head(head, g)
        head.train()
        out[f"{name}.cfg"] = i64([din, k, int(bn), nl, hid, bot, int(bias)])
        for key, t in head.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            out[f"{name}.param.{key}"] = f32(t)
        x = (torch.randn(xs, generator=g) * 2.0).requires_grad_(True)
        y = head(x)
        # random upstream gradient dL/dy = r (not y itself: W^T W h is nearly parallel to h, and the
        # normalisation's backward would cancel most of it, leaving a badly conditioned reference)
        r = torch.randn(y.shape, generator=g)
        (y * r).sum().backward()
        out[f"{name}.r"] = f32(r)
        out[f"{name}.x"] = f32(x)
        out[f"{name}.y"] = f32(y)
        out[f"{name}.grad.x"] = f32(x.grad)
        for key, p in head.named_parameters():
            out[f"{name}.grad.{key}"] = f32(p.grad)
        if bn:
            for key, t in head.state_dict().items():
                if "running" in key:
                    out[f"{name}.after.{key}"] = f32(t)
            head.eval()
            with torch.no_grad():
                out[f"{name}.y_eval"] = f32(head(x))


def dino_fixtures(DINOLoss, out):
    g = torch.Generator().manual_seed(2)
    # name: (K, B, n_students, n_teachers, teacher_temp, student_temp, momentum, steps)
    cases = {
        "d64a": (64, 3, 4, 2, 0.04, 0.1, 0.9, 3),
        "d64b": (64, 5, 1, 1, 0.07, 0.2, 0.8, 3),
        "d4096": (4096, 2, 1, 2, 0.04, 0.1, 0.9, 2),
    }
    for name, (k, b, ns, nt, tt, st, mom, steps) in cases.items():
        loss = DINOLoss(k, student_temp=st, center_momentum=mom)
        out[f"{name}.cfg"] = i64([k, b, ns, nt, steps])
        out[f"{name}.temps"] = torch.tensor([tt, st, mom], dtype=torch.float64)
        targets = None
        for i in range(steps):
            t = torch.randn(nt * b, k, generator=g) * 0.4
            targets = loss.softmax_center_teacher(t, tt)
            loss.update_center(t)
            out[f"{name}.step{i}.t"] = f32(t)
            out[f"{name}.step{i}.center_used"] = f32(loss.center)
            if k <= 64 or i == steps - 1:
                out[f"{name}.step{i}.targets"] = f32(targets)
        loss.apply_center_update()
        out[f"{name}.center_final"] = f32(loss.center)
        s = (torch.randn(ns * b, k, generator=g) * 0.5).requires_grad_(True)
        value = loss(list(s.chunk(ns)), list(targets.view(nt, b, k)))
        value.backward()
        out[f"{name}.s"] = f32(s)
        out[f"{name}.loss"] = f32(value.reshape(1))
        out[f"{name}.grad.s"] = f32(s.grad)
        t0 = out[f"{name}.step0.t"]
        for iters in ([3, 1, 5] if k <= 64 else [3]):
            out[f"{name}.sk{iters}"] = f32(loss.sinkhorn_knopp_teacher(t0, tt, n_iterations=iters))


def collate_masks_weight(masks):
    return (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]


def ibot_fixtures(iBOTPatchLoss, out):
    g = torch.Generator().manual_seed(3)
    # K=64: 4 global crops of 6 patches, two steps with different masks (one image unmasked)
    k = 64
    loss = iBOTPatchLoss(k, student_temp=0.1, center_momentum=0.9)
    masks_steps = [
        torch.tensor([[1, 1, 0, 1, 0, 0], [0] * 6, [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool),
        torch.tensor([[0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 1], [0] * 6, [0] * 6], dtype=torch.bool),
    ]
    tt = 0.07
    targets = None
    for i, masks in enumerate(masks_steps):
        m = int(masks.sum())
        t = torch.randn(m, k, generator=g) * 0.4
        t3 = t.unsqueeze(0)
        targets = loss.softmax_center_teacher(t3[:, :m], teacher_temp=tt).squeeze(0)
        loss.update_center(t3[:m])
        out[f"i64.step{i}.masks"] = masks.to(torch.uint8)
        out[f"i64.step{i}.t"] = f32(t)
        out[f"i64.step{i}.targets"] = f32(targets)
        out[f"i64.step{i}.center_used"] = f32(loss.center)
    loss.apply_center_update()
    out["i64.center_final"] = f32(loss.center)
    masks = masks_steps[-1]
    m = int(masks.sum())
    mw = collate_masks_weight(masks)
    out["i64.masks_weight"] = f32(mw)
    # padded student/teacher rows (the official upperbound buffer) + n_masked_patches truncation
    pad = 3
    s = (torch.randn(m + pad, k, generator=g) * 0.5).requires_grad_(True)
    t_pad = torch.cat([targets, torch.softmax(torch.randn(pad, k, generator=g), -1)])
    value = loss.forward_masked(s, t_pad, student_masks_flat=masks, n_masked_patches=m, masks_weight=mw)
    value.backward()
    out["i64.s_pad"] = f32(s)
    out["i64.t_pad"] = f32(t_pad)
    out["i64.loss_pad"] = f32(value.reshape(1))
    out["i64.grad.s_pad"] = f32(s.grad)
    # masks_weight computed inside forward_masked (None), exact rows
    s2 = s.detach()[:m].clone().requires_grad_(True)
    value2 = loss.forward_masked(s2, targets, student_masks_flat=masks)
    value2.backward()
    out["i64.loss_noweight"] = f32(value2.reshape(1))
    out["i64.grad.s_noweight"] = f32(s2.grad)
    t_last = out["i64.step1.t"]
    for iters in (3, 1):
        out[f"i64.sk{iters}"] = f32(
            loss.sinkhorn_knopp_teacher(t_last, tt, torch.full((1,), m, dtype=torch.long), n_iterations=iters)
        )
    # dense forward: [B, N, K], one image without masked patch (clamp path)
    b, n = 3, 4
    sd = (torch.randn(b, n, k, generator=g) * 0.5).requires_grad_(True)
    td = torch.softmax(torch.randn(b, n, k, generator=g) / 0.3, -1)
    md = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    vd = loss.forward(sd, td, md)
    vd.backward()
    out["idense.s"] = f32(sd)
    out["idense.t"] = f32(td)
    out["idense.masks"] = md.to(torch.uint8)
    out["idense.loss"] = f32(vd.reshape(1))
    out["idense.grad.s"] = f32(sd.grad)

    # K=4096: 2 global crops of 4 patches, 2 masked patches
    k = 4096
    loss = iBOTPatchLoss(k, student_temp=0.1, center_momentum=0.9)
    masks = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    m = int(masks.sum())
    t = torch.randn(m, k, generator=g) * 0.4
    targets = loss.softmax_center_teacher(t.unsqueeze(0), teacher_temp=0.04).squeeze(0)
    loss.update_center(t.unsqueeze(0))
    loss.apply_center_update()
    s = (torch.randn(m, k, generator=g) * 0.5).requires_grad_(True)
    mw = collate_masks_weight(masks)
    value = loss.forward_masked(s, targets, student_masks_flat=masks, n_masked_patches=m, masks_weight=mw)
    value.backward()
    out["i4096.masks"] = masks.to(torch.uint8)
    out["i4096.t"] = f32(t)
    out["i4096.targets"] = f32(targets)
    out["i4096.center_final"] = f32(loss.center)
    out["i4096.s"] = f32(s)
    out["i4096.loss"] = f32(value.reshape(1))
    out["i4096.grad.s"] = f32(s.grad)
    out["i4096.sk3"] = f32(loss.sinkhorn_knopp_teacher(t, 0.04, torch.full((1,), m, dtype=torch.long)))


def koleo_fixtures(KoLeoLoss, out):
    g = torch.Generator().manual_seed(4)
    koleo = KoLeoLoss()
    cases = {"k2": (2, 8), "k3": (3, 8), "k8": (8, 384), "k16": (16, 32)}
    for name, shape in cases.items():
        x = (torch.randn(shape, generator=g) * 1.5).requires_grad_(True)
        v = koleo(x)
        v.backward()
        out[f"{name}.x"] = f32(x)
        out[f"{name}.loss"] = f32(v.reshape(1))
        out[f"{name}.grad.x"] = f32(x.grad)
    # a zero row: F.normalize's eps path (x / eps = 0)
    x = torch.randn(4, 8, generator=g)
    x[2] = 0.0
    x.requires_grad_(True)
    v = koleo(x)
    v.backward()
    out["kzero.x"] = f32(x)
    out["kzero.loss"] = f32(v.reshape(1))
    out["kzero.grad.x"] = f32(x.grad)


def ssl_fixtures(ssl_meta_arch, DINOHead, DINOLoss, iBOTPatchLoss, KoLeoLoss, out):
    """SSLMetaArch.forward_backward on stub backbones with real heads and losses."""
    g = torch.Generator().manual_seed(5)

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.outputs = None

        def forward(self, x, masks=None, is_training=False):
            return self.outputs

    def run_case(name, centering, separate_head, b, n_local, d, n_patches, k, k_ibot, steps):
        head_kw = dict(nlayers=3, hidden_dim=32, bottleneck_dim=8)
        s_head, t_head = DINOHead(d, k, **head_kw), DINOHead(d, k, **head_kw)
        perturb_head(s_head, g)
        perturb_head(t_head, g)
        student = torch.nn.ModuleDict(dict(backbone=Backbone(), dino_head=s_head))
        teacher = torch.nn.ModuleDict(dict(backbone=Backbone(), dino_head=t_head))
        if separate_head:
            s_ih, t_ih = DINOHead(d, k_ibot, **head_kw), DINOHead(d, k_ibot, **head_kw)
            perturb_head(s_ih, g)
            perturb_head(t_ih, g)
            student["ibot_head"], teacher["ibot_head"] = s_ih, t_ih
        captured = {}

        def backprop(loss):
            captured["total"] = loss.detach().clone()
            loss.backward()

        arch = types.SimpleNamespace(
            cfg=types.SimpleNamespace(
                crops=types.SimpleNamespace(local_crops_number=n_local),
                train=types.SimpleNamespace(centering=centering),
                dino=types.SimpleNamespace(koleo_loss_weight=0.1),
            ),
            do_dino=True, do_ibot=True, do_koleo=True, ibot_separate_head=separate_head,
            dino_loss_weight=1.0, ibot_loss_weight=1.0,
            dino_loss=DINOLoss(k), ibot_patch_loss=iBOTPatchLoss(k_ibot if separate_head else k),
            koleo_loss=KoLeoLoss(), student=student, teacher=teacher,
            backprop_loss=backprop, fsdp_synchronize_streams=lambda: None,
        )
        out[f"{name}.cfg"] = i64([b, n_local, d, n_patches, k, k_ibot if separate_head else k, steps,
                                  int(separate_head), int(centering == "sinkhorn_knopp")])
        for prefix, mod in (("student", student), ("teacher", teacher)):
            for key, t in mod.state_dict().items():
                out[f"{name}.{prefix}.{key}"] = f32(t)
        for step in range(steps):
            masks = torch.rand(2 * b, n_patches, generator=g) < 0.4
            masks[1] = False  # an unmasked global crop
            masks[0, 0] = True
            idx = masks.flatten().nonzero().flatten()
            m = idx.shape[0]
            upperbound = m + 2  # a padded buffer, as the collate's upper bound
            t_cls = torch.randn(2 * b, d, generator=g)
            t_patch = torch.randn(2 * b, n_patches, d, generator=g)
            g_cls = torch.randn(2 * b, d, generator=g).requires_grad_(True)
            g_patch = torch.randn(2 * b, n_patches, d, generator=g).requires_grad_(True)
            l_cls = torch.randn(n_local * b, d, generator=g).requires_grad_(True)
            teacher.backbone.outputs = dict(x_norm_clstoken=t_cls, x_norm_patchtokens=t_patch)
            student.backbone.outputs = [
                dict(x_norm_clstoken=g_cls, x_norm_patchtokens=g_patch),
                dict(x_norm_clstoken=l_cls, x_norm_patchtokens=None),
            ]
            for p in student.parameters():
                p.grad = None
            images = dict(
                collated_global_crops=torch.zeros(1), collated_local_crops=torch.zeros(1),
                collated_masks=masks, mask_indices_list=idx,
                n_masked_patches=torch.full((1,), m, dtype=torch.long), upperbound=upperbound,
                masks_weight=collate_masks_weight(masks),
            )
            loss_dict = ssl_meta_arch.SSLMetaArch.forward_backward(arch, images, teacher_temp=0.05)
            p = f"{name}.step{step}"
            out[f"{p}.masks"] = masks.to(torch.uint8)
            for key, t in dict(t_cls=t_cls, t_patch=t_patch, g_cls=g_cls, g_patch=g_patch, l_cls=l_cls).items():
                out[f"{p}.{key}"] = f32(t)
            for key in ("g_cls", "g_patch", "l_cls"):
                out[f"{p}.grad.{key}"] = f32(locals()[key].grad)
            for key, prm in student.named_parameters():
                if not key.startswith("backbone"):
                    out[f"{p}.grad.{key}"] = f32(prm.grad)
            # logged values: ibot and koleo are logged divided by 2
            out[f"{p}.dino_local"] = f32(loss_dict["dino_local_crops_loss"].reshape(1))
            out[f"{p}.dino_global"] = f32(loss_dict["dino_global_crops_loss"].reshape(1))
            out[f"{p}.koleo_logged"] = f32(loss_dict["koleo_loss"].reshape(1))
            out[f"{p}.ibot_logged"] = f32(loss_dict["ibot_loss"].reshape(1))
            out[f"{p}.total"] = f32(captured["total"].reshape(1))
        if centering == "centering":
            arch.dino_loss.apply_center_update()
            arch.ibot_patch_loss.apply_center_update()
            out[f"{name}.dino_center_final"] = f32(arch.dino_loss.center)
            out[f"{name}.ibot_center_final"] = f32(arch.ibot_patch_loss.center)

    run_case("ssl_c", "centering", False, b=2, n_local=8, d=16, n_patches=6, k=64, k_ibot=64, steps=2)
    run_case("ssl_sk", "sinkhorn_knopp", True, b=3, n_local=2, d=16, n_patches=5, k=64, k_ibot=32, steps=1)


def checkpoint_fixture(DINOHead, outdir):
    """A tiny `teacher_checkpoint.pth` laid out as the official trainer writes it (`{"teacher": state_dict}`
    with `backbone.*` / `dino_head.*` keys), and the head's output on a fixed input."""
    g = torch.Generator().manual_seed(6)
    head = DINOHead(16, 64, nlayers=3, hidden_dim=32, bottleneck_dim=8)
    perturb_head(head, g)
    sd = {"backbone.cls_token": torch.zeros(1, 1, 16)}
    sd.update({f"dino_head.{k}": v.clone() for k, v in head.state_dict().items()})
    tmp = os.path.join(outdir, "teacher_checkpoint.pth.tmp")
    torch.save({"teacher": sd}, tmp)
    os.replace(tmp, os.path.join(outdir, "teacher_checkpoint.pth"))
    x = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        y = head(x)
    return {"x": f32(x), "y": f32(y)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dinov2-src", default=os.environ.get("DINOV2_SRC"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "crates", "dinov2-loss",
                                                  "tests", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)  # DINOHead's own init draws from the global RNG
    ssl_meta_arch, DINOHead, DINOLoss, iBOTPatchLoss, KoLeoLoss = import_official(args.dinov2_src)
    os.makedirs(args.out, exist_ok=True)
    meta = {"generator": f"tools/make_loss_fixtures.py, torch {torch.__version__}"}  # one key: stable bytes
    for fname, fn in (
        ("head", lambda o: head_fixtures(DINOHead, o)),
        ("dino", lambda o: dino_fixtures(DINOLoss, o)),
        ("ibot", lambda o: ibot_fixtures(iBOTPatchLoss, o)),
        ("koleo", lambda o: koleo_fixtures(KoLeoLoss, o)),
        ("ssl", lambda o: ssl_fixtures(ssl_meta_arch, DINOHead, DINOLoss, iBOTPatchLoss, KoLeoLoss, o)),
        ("checkpoint", lambda o: o.update(checkpoint_fixture(DINOHead, args.out))),
    ):
        out = {}
        fn(out)
        path = os.path.join(args.out, f"{fname}.safetensors")
        tmp = path + ".tmp"
        save_file(out, tmp, metadata=meta)
        os.replace(tmp, path)
        print(f"{path}: {len(out)} tensors, {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
