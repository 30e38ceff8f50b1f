"""Stand-ins for what the official DINOv2 training code imports but a single CPU process without xformers, fvcore
or a process group lacks; shared by the tools/ scripts that run `SSLMetaArch` (make_loss_fixtures.py,
official_train.py).

`import_official(src)` installs the stubs, puts the checkout `src` (or, when None, the installed `dinov2`
package) on the path and returns the official `dinov2.train.ssl_meta_arch` module. It must run before anything
else imports `dinov2` (the layers read `XFORMERS_DISABLED` and import xformers when they are first imported).

The xformers stubs follow xformers' documented semantics in plain torch:
* `fmha.BlockDiagonalMask`: `from_seqlens(seqlens)`, `from_tensor_list(tensors)` (concatenate [b_i, n_i, ...]
  tensors as [1, sum b_i n_i, ...], batch sizes remembered), `split(x)` (the inverse: [b_i, n_i, ...] pieces),
  `materialize(shape)` (a dense additive bias: 0 inside the diagonal blocks, -inf elsewhere).
* `memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None)` on [B, N, H, C]:
  softmax(q k^T * scale + bias) v with scale = C^-0.5. A `BlockDiagonalMask` bias (B must be 1) runs torch SDPA
  per run of consecutive equal-length blocks, batched, which equals the masked dense attention.
* `unbind` = `torch.unbind`; `index_select_cat(sources, indices)` = the flat concatenation of
  `source[index]`; `scaled_index_add(input, index, source, scaling, alpha)` =
  `torch.index_add(input, 0, index, source * scaling, alpha=alpha)` (out of place; xformers writes into `input`).
* `cross_entropy` and `SwiGLU` are left out on purpose: `iBOTPatchLoss` then uses its own torch `lossfunc` (the
  official comment says it computes the same value) and `SwiGLUFFNFused` its torch `SwiGLUFFN`.

Other glue: `fvcore` checkpointers are inert classes; `torch.distributed.all_reduce` is the identity (the sum over
one rank; `iBOTPatchLoss.sinkhorn_knopp_teacher` calls it unconditionally); `ssl_meta_arch.reshard_fsdp_model` is a
no-op; `Tensor.cuda` returns the tensor; `ssl_meta_arch.get_fsdp_modules(m)` returns one object whose `params` are
`m.parameters()`, so the official `SSLMetaArch.update_teacher` runs unchanged over plain modules.
"""

import os
import sys
import types

import torch
import torch.nn.functional as F


def stub_module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


class _Anything:
    def __init__(self, *a, **k):
        pass


class BlockDiagonalMask:
    """xformers' `fmha.BlockDiagonalMask` (square blocks: queries and keys share the sequence lengths)."""

    def __init__(self, seqlens):
        self.seqlens = [int(n) for n in seqlens]
        self._batch_sizes = None

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        if kv_seqlen is not None and list(kv_seqlen) != list(q_seqlen):
            raise NotImplementedError("the stub supports kv_seqlen == q_seqlen only")
        return cls(q_seqlen)

    @classmethod
    def from_tensor_list(cls, tensors):
        batch_sizes = [t.shape[0] for t in tensors]
        seqlens = [t.shape[1] for t in tensors for _ in range(t.shape[0])]
        mask = cls(seqlens)
        mask._batch_sizes = batch_sizes
        return mask, torch.cat([t.reshape([1, -1, *t.shape[2:]]) for t in tensors], dim=1)

    def split(self, x):
        if x.shape[0] != 1 or x.shape[1] != sum(self.seqlens):
            raise ValueError(f"split expects [1, {sum(self.seqlens)}, ...], got {list(x.shape)}")
        batch_sizes = self._batch_sizes or [1] * len(self.seqlens)
        chunks, i = [], 0
        for b in batch_sizes:
            chunks.append(sum(self.seqlens[i:i + b]))
            i += b
        return [t.reshape([b, -1, *t.shape[2:]]) for b, t in zip(batch_sizes, x.split(chunks, dim=1))]

    def materialize(self, shape, dtype=torch.float32, device="cpu"):
        n = sum(self.seqlens)
        if tuple(shape[-2:]) != (n, n):
            raise ValueError(f"materialize: the last two dims must be ({n}, {n}), got {tuple(shape)}")
        bias = torch.full((n, n), float("-inf"), dtype=dtype, device=device)
        start = 0
        for s in self.seqlens:
            bias[start:start + s, start:start + s] = 0
            start += s
        return bias.expand(shape)

    def runs(self):
        """(start, block length, number of blocks) for each run of consecutive equal-length blocks."""
        out, start, i = [], 0, 0
        while i < len(self.seqlens):
            j = i
            while j < len(self.seqlens) and self.seqlens[j] == self.seqlens[i]:
                j += 1
            out.append((start, self.seqlens[i], j - i))
            start += self.seqlens[i] * (j - i)
            i = j
        return out


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
    """xformers' `memory_efficient_attention` on [B, N, H, C] tensors (no dropout)."""
    if p != 0.0:
        raise NotImplementedError("the stub has no attention dropout")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, N, C]
    if attn_bias is None or isinstance(attn_bias, torch.Tensor):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
        return out.transpose(1, 2)
    if not isinstance(attn_bias, BlockDiagonalMask):
        raise NotImplementedError(f"attention bias {type(attn_bias).__name__}")
    if query.shape[0] != 1:
        raise ValueError("a BlockDiagonalMask needs batch 1")
    pieces = []
    for start, length, count in attn_bias.runs():
        end = start + length * count

        def fold(t):  # [1, H, count*length, C] -> [count, H, length, C]
            h, c = t.shape[1], t.shape[3]
            return t[:, :, start:end].reshape(h, count, length, c).transpose(0, 1)

        o = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), scale=scale)  # [count, H, length, C]
        pieces.append(o.permute(0, 2, 1, 3).reshape(1, count * length, o.shape[1], o.shape[3]))
    return torch.cat(pieces, dim=1)


def index_select_cat(sources, indices):
    return torch.cat([s.index_select(0, i).flatten() for s, i in zip(sources, indices)])


def scaled_index_add(input, index, source, scaling=None, alpha=1.0):
    src = source if scaling is None else source * scaling
    return torch.index_add(input, 0, index, src, alpha=alpha)


class _OneFsdpModule:
    def __init__(self, module):
        self.params = list(module.parameters())


def import_official(src=None):
    """Installs the stubs and returns the official `dinov2.train.ssl_meta_arch` module (see the module doc)."""
    if src:
        sys.path.insert(0, src)
    stub_module("xformers")
    stub_module(
        "xformers.ops",
        fmha=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask),
        memory_efficient_attention=memory_efficient_attention,
        unbind=torch.unbind,
        index_select_cat=index_select_cat,
        scaled_index_add=scaled_index_add,
    )
    stub_module("fvcore")
    stub_module("fvcore.common")
    stub_module("fvcore.common.checkpoint", Checkpointer=_Anything, PeriodicCheckpointer=_Anything)
    import dinov2

    # Import dinov2.train.* without running dinov2/train/__init__.py (which imports the training script).
    pkg = types.ModuleType("dinov2.train")
    pkg.__path__ = [os.path.join(os.path.dirname(dinov2.__file__), "train")]
    sys.modules["dinov2.train"] = pkg
    import dinov2.train.ssl_meta_arch as ssl_meta_arch

    # single process: all_reduce over one rank is the identity
    torch.distributed.all_reduce = lambda t, *a, **k: None
    assert not torch.distributed.is_initialized()
    ssl_meta_arch.reshard_fsdp_model = lambda m: None
    ssl_meta_arch.get_fsdp_modules = lambda m: [_OneFsdpModule(m)]
    torch.Tensor.cuda = lambda self, *a, **k: self
    return ssl_meta_arch
