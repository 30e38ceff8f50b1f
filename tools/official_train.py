"""The official DINOv2 training loop (`dinov2/train/train.py: do_train`) on the CPU, in f32, in one process.

An importable module for the tools/ scripts (make_train_fixtures.py, bench_train.py); it needs the official code
(a checkout of facebookresearch/dinov2 given as `src` / $DINOV2_SRC, else the installed `dinov2` package).

    import official_train as ot
    ot.import_official(os.environ.get("DINOV2_SRC"))   # before anything else imports dinov2
    ot.register_arch("vit_test", embed_dim=32, depth=2, num_heads=2)
    cfg = ot.make_config(["student.arch=vit_test", "student.patch_size=14", ...])
    trainer = ot.OfficialTrainer(cfg)                    # seeds, builds SSLMetaArch, optimizer, schedules
    batch = ot.collate(cfg, global_crops, local_crops, masks)   # official collate_data_and_cast, given masks
    record = trainer.step(batch)                         # one iteration of the official loop

What is official and what is glue:
* Official and unchanged: the config defaults (`ssl_default_config.yaml`) and `apply_scaling_rules_to_cfg`,
  `fix_random_seeds`, `SSLMetaArch` (`__init__`, `forward_backward`, `get_params_groups`, `update_teacher`,
  `train`), the models, heads and losses, `build_optimizer`, `build_schedulers`, `apply_optim_scheduler`,
  `collate_data_and_cast`, `MaskingGenerator`.
* Glue: the xformers / fvcore / FSDP stand-ins of `official_stubs.py` (xformers is required by the student's list
  forward, so `XFORMERS_DISABLED` is removed from the environment before the import). `prepare_for_distributed_training`
  is replaced by what it does without FSDP: the teacher loads the student's state dict. No grad scaler
  (`compute_precision.grad_scaler` is forced to false: f32 throughout, inputs stay f32 instead of the official fp16),
  the FSDP stream synchronisation is skipped. `FSDP.clip_grad_norm_` of each student submodule is
  `torch.nn.utils.clip_grad_norm_` over that submodule's parameters (the same formula: total 2-norm,
  coefficient min(1, max_norm / (norm + 1e-6))). `update_teacher` runs unchanged over plain modules (its FSDP
  module list yields one entry holding all parameters of the submodule): `_foreach_mul_(teacher, m)` then
  `_foreach_add_(teacher, student, alpha=1 - m)`.
* `register_arch` adds a ViT of any width/depth to the official `vision_transformer` namespace (same class and block
  as `vit_small`: `DinoVisionTransformer` with `NestedTensorBlock` + `MemEffAttention`), for tiny test configs.
"""

import math
import os
import sys
import types
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_stubs  # noqa: E402

_OFFICIAL = None


def import_official(src=None):
    """Imports the official modules once (see the module doc); returns a namespace of them."""
    global _OFFICIAL
    if _OFFICIAL is not None:
        return _OFFICIAL
    if "dinov2" in sys.modules:
        raise RuntimeError("official_train.import_official must run before anything imports dinov2")
    os.environ.pop("XFORMERS_DISABLED", None)  # the student's list forward needs (stubbed) xformers
    ssl_meta_arch = official_stubs.import_official(src)
    import dinov2.data.collate as collate_mod
    import dinov2.models.vision_transformer as vits
    import dinov2.train.train as train_mod
    import dinov2.utils.config as config_mod
    import dinov2.utils.param_groups as param_groups
    import dinov2.utils.utils as utils
    from dinov2.configs import dinov2_default_config
    from dinov2.data.masking import MaskingGenerator
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    _OFFICIAL = types.SimpleNamespace(
        ssl_meta_arch=ssl_meta_arch, train=train_mod, vits=vits, config=config_mod, utils=utils,
        param_groups=param_groups, collate=collate_mod, MaskingGenerator=MaskingGenerator,
        default_config=dinov2_default_config, Block=NestedTensorBlock, MemEffAttention=MemEffAttention,
    )
    return _OFFICIAL


def _official():
    if _OFFICIAL is None:
        raise RuntimeError("call official_train.import_official(src) first")
    return _OFFICIAL


def register_arch(name, embed_dim, depth, num_heads, mlp_ratio=4.0):
    """Adds `name` (e.g. "vit_test") to the official `vision_transformer` namespace, built like `vit_small`."""
    o = _official()

    def build(patch_size=16, num_register_tokens=0, **kwargs):
        return o.vits.DinoVisionTransformer(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            block_fn=partial(o.Block, attn_class=o.MemEffAttention), num_register_tokens=num_register_tokens,
            **kwargs,
        )

    setattr(o.vits, name, build)


def make_config(overrides=()):
    """The official default config merged with `key=value` overrides (OmegaConf dotlist), after the official
    `apply_scaling_rules_to_cfg` (lr = base_lr * sqrt(batch_size_per_gpu / 1024) on one process).
    `compute_precision.grad_scaler` is forced to false (f32, no loss scaling)."""
    from omegaconf import OmegaConf

    o = _official()
    cfg = OmegaConf.merge(OmegaConf.create(o.default_config), OmegaConf.from_dotlist(list(overrides)))
    cfg.compute_precision.grad_scaler = False
    return o.config.apply_scaling_rules_to_cfg(cfg)


def collate(cfg, global_crops, local_crops, masks, dtype=torch.float32):
    """The official `collate_data_and_cast` (crops cast to `dtype`) on crops given crop-major (`global_crops` [2B,3,H,W] as
    crop 0 of images 0..B-1, then crop 1; `local_crops` [n_local*B,3,h,w] likewise) with the given boolean
    `masks` [2B, N] in place of the random ones: the mask generator hands them out in order, the mask-ratio draws
    are ignored and the shuffle is off. Everything else (`mask_indices_list`, `masks_weight`, `n_masked_patches`,
    `upperbound` from `ibot.mask_ratio_min_max` / `mask_sample_probability`) is the official computation."""
    o = _official()
    n_global, n_local = 2, cfg.crops.local_crops_number
    b = global_crops.shape[0] // n_global
    samples = [({"global_crops": [global_crops[c * b + i] for c in range(n_global)],
                 "local_crops": [local_crops[c * b + i] for c in range(n_local)]}, ()) for i in range(b)]
    queue = iter(masks.to(torch.bool))
    real_random = o.collate.random
    o.collate.random = types.SimpleNamespace(uniform=real_random.uniform, shuffle=lambda x: None)
    try:
        return o.collate.collate_data_and_cast(
            samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
            mask_probability=cfg.ibot.mask_sample_probability, dtype=dtype,
            n_tokens=masks.shape[1], mask_generator=lambda n: next(queue).numpy())
    finally:
        o.collate.random = real_random


def random_batch(cfg, generator):
    """A batch as the official loader + collate make it, with random-normal pixels instead of augmented images:
    the official `collate_data_and_cast` with the official `MaskingGenerator` (as in `do_train`; its draws come
    from Python's `random`, seed it for reproducibility)."""
    o = _official()
    b, n_local = cfg.train.batch_size_per_gpu, cfg.crops.local_crops_number
    gs, ls, ps = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    samples = [({"global_crops": [torch.randn(3, gs, gs, generator=generator) for _ in range(2)],
                 "local_crops": [torch.randn(3, ls, ls, generator=generator) for _ in range(n_local)]}, ())
               for _ in range(b)]
    grid = gs // ps
    mask_generator = o.MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * gs // ps * gs // ps)
    return o.collate.collate_data_and_cast(
        samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32, n_tokens=grid * grid,
        mask_generator=mask_generator)


def submodule_grad_norm(module):
    """The 2-norm of all gradients of `module` (as clip_grad_norm_ computes it)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0))


class OfficialTrainer:
    """`SSLMetaArch` + optimizer + schedules as `train.py: main / do_train` set them up (see the module doc)."""

    def __init__(self, cfg, seed=0, init_fn=None):
        """Seeds the global RNGs with `seed` (official `fix_random_seeds`), builds `SSLMetaArch(cfg)`, then calls
        `init_fn(model.student)` if given (to move the student off its init) before the teacher copies it."""
        o = _official()
        self.cfg = cfg
        o.utils.fix_random_seeds(seed)  # as default_setup: seed + rank
        model = o.ssl_meta_arch.SSLMetaArch(cfg)
        assert model.fp16_scaler is None
        if init_fn is not None:
            with torch.no_grad():
                init_fn(model.student)
        # prepare_for_distributed_training without FSDP: the teacher starts as a copy of the student
        if o.utils.has_batchnorms(model.student):
            raise NotImplementedError
        for k in model.student.keys():
            model.teacher[k].load_state_dict(model.student[k].state_dict())
        model.need_to_synchronize_fsdp_streams = False  # no FSDP streams on the CPU
        self._total = None
        official_backprop = model.backprop_loss

        def backprop(loss):
            self._total = loss.detach().clone()
            official_backprop(loss)

        model.backprop_loss = backprop
        model.train()
        self.model = model
        self.optimizer = o.train.build_optimizer(cfg, model.get_params_groups())
        (self.lr_schedule, self.wd_schedule, self.momentum_schedule, self.teacher_temp_schedule,
         self.last_layer_lr_schedule) = o.train.build_schedulers(cfg)
        self.iteration = 0

    def named_student_parameters(self):
        """(`<submodule>.<name>`, parameter) in the order of the official param-group construction."""
        for k, m in self.model.student.items():
            for name, p in m.named_parameters():
                yield f"{k}.{name}", p

    def param_groups_by_name(self):
        """{`<submodule>.<name>`: {lr_multiplier, wd_multiplier, is_last_layer}} from the official
        `get_params_groups_with_decay` of each student submodule (what `get_params_groups` fuses)."""
        o = _official()
        out = {}
        for k, m in self.model.student.items():
            for d in o.param_groups.get_params_groups_with_decay(
                    model=m, lr_decay_rate=self.cfg.optim.layerwise_decay,
                    patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult):
                out[f"{k}.{d['name']}"] = {"lr_multiplier": float(d["lr_multiplier"]),
                                           "wd_multiplier": float(d["wd_multiplier"]),
                                           "is_last_layer": bool(d["is_last_layer"])}
        return out

    def schedule(self, iteration):
        return {"lr": float(self.lr_schedule[iteration]), "wd": float(self.wd_schedule[iteration]),
                "mom": float(self.momentum_schedule[iteration]),
                "teacher_temp": float(self.teacher_temp_schedule[iteration]),
                "last_layer_lr": float(self.last_layer_lr_schedule[iteration])}

    def step(self, data):
        """One iteration of `do_train` on a collated batch. Returns {iteration, schedule values, loss_dict (the
        official dict's tensors), total (the loss that was backpropagated), grad_norms (per student submodule,
        before clipping)}."""
        o = _official()
        cfg, model, it = self.cfg, self.model, self.iteration
        lr = self.lr_schedule[it]
        wd = self.wd_schedule[it]
        mom = self.momentum_schedule[it]
        teacher_temp = self.teacher_temp_schedule[it]
        last_layer_lr = self.last_layer_lr_schedule[it]
        o.train.apply_optim_scheduler(self.optimizer, lr, wd, last_layer_lr)

        self.optimizer.zero_grad(set_to_none=True)
        loss_dict = model.forward_backward(data, teacher_temp=teacher_temp)

        grad_norms = {}
        for k, v in model.student.items():
            if cfg.optim.clip_grad:
                grad_norms[k] = float(torch.nn.utils.clip_grad_norm_(v.parameters(), cfg.optim.clip_grad))
            else:
                grad_norms[k] = submodule_grad_norm(v)
        self.optimizer.step()
        model.update_teacher(mom)

        values = {k: v.detach().item() for k, v in loss_dict.items()}
        if math.isnan(sum(values.values())):
            raise FloatingPointError(f"NaN loss at iteration {it}: {values}")
        self.iteration += 1
        return {"iteration": it, **self.schedule(it), "loss_dict": loss_dict, "total": self._total,
                "grad_norms": grad_norms}

    def adam_state(self):
        """{`<submodule>.<name>`: the optimizer's state dict entry (exp_avg, exp_avg_sq, step)}."""
        return {name: self.optimizer.state[p] for name, p in self.named_student_parameters()
                if p in self.optimizer.state}
