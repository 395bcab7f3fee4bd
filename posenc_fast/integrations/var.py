"""Drop-in acceleration of FoundationVision/VAR models: ``patch_var(model)``.

``patch_var`` rebinds, on the given instances only, two methods of a VAR model:

* ``VAR.forward`` (teacher forcing): the position + level embedding
  ``x += lvl_embed(lvl_1L) + pos_1LC`` becomes one ``pyramid_pos_level_add``;
* ``SelfAttention.forward`` of every block: q, k, v come from one ``qkv_proj``
  (q/v bias, zero k bias, l2 norm with the clamped per-head scale or VAR's
  ``0.25 / sqrt(D)`` score scale), attention is ``scaled_dot_product_attention``
  with VAR's block-causal mask in training and VAR's KV cache in sampling;
* ``SelfAttention.kv_caching``: the KV cache becomes one (B, H, L, D) buffer pair
  per block, allocated at the first scale of a sampling run (L = the model's
  pyramid) and written in place by ``qkv_proj`` at every scale instead of growing
  by ``torch.cat``; ``kv_caching(False)`` frees it.

Everything else (parameters, buffers, ``state_dict`` keys, the modules, dropout,
train/eval, ``autoregressive_infer_cfg``) is the model's own. The model is
recognised by its attributes; no VAR code is imported. ``unpatch_var`` puts the
original methods back.
"""

from __future__ import annotations

import types
from typing import List, Optional

import torch
import torch.nn as nn

from .. import _backends
from ..nn.attention import _PARAMS_CACHE, KV_CACHE, KV_LEN, reset_kv_cache, self_attention_forward
from ..ops.pyramid import pyramid_pos_level_add

# The patch bookkeeping lives on the instances (deep copies of a patched model stay
# patched and can be unpatched); plain attributes, not parameters, buffers or modules.
_STATE = "_posenc_fast_var_patch"  # on the model: [(module, {method: its previous instance attribute})]
_BACKEND = "_posenc_fast_backend"  # on every patched module: the backend of its fused ops

_VAR_ATTRS = ("patch_nums", "L", "first_l", "begin_ends", "prog_si", "num_classes", "cond_drop_rate",
              "class_emb", "pos_start", "pos_1LC", "lvl_embed", "lvl_1L", "word_embed", "shared_ada_lin",
              "blocks", "attn_bias_for_masking", "get_logits", "autoregressive_infer_cfg")
_ATTN_METHODS = ("forward", "kv_caching")
_ATTN_ATTRS = ("mat_qkv", "q_bias", "v_bias", "zero_k_bias", "num_heads", "head_dim", "attn_l2_norm", "scale",
               "caching", "cached_k", "cached_v", "kv_caching", "proj", "proj_drop", "attn_drop")


def _not_var(model, why: str) -> TypeError:
    return TypeError(f"patch_var: {type(model).__name__} is not recognised as a FoundationVision/VAR `VAR` "
                     f"model: {why}")


def _check_var(model) -> List[nn.Module]:
    """Raises TypeError unless ``model`` has the structure of VAR; returns its attention modules."""
    if not isinstance(model, nn.Module):
        raise _not_var(model, "it is not an nn.Module")
    missing = [a for a in _VAR_ATTRS if not hasattr(model, a)]
    if missing:
        raise _not_var(model, f"missing attribute(s) {', '.join(missing)}")
    lvl = getattr(model.lvl_embed, "weight", None)
    C = model.pos_1LC.shape[-1]
    S = len(model.patch_nums)
    if not isinstance(lvl, torch.Tensor) or tuple(lvl.shape) != (S, C):
        raise _not_var(model, f"lvl_embed.weight must be ({S}, {C}) (one row per scale of patch_nums)")
    if tuple(model.pos_1LC.shape) != (1, model.L, C):
        raise _not_var(model, f"pos_1LC must be (1, L={model.L}, C), got {tuple(model.pos_1LC.shape)}")
    attns = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if attn is None:
            raise _not_var(model, f"blocks[{i}] has no .attn")
        missing = [a for a in _ATTN_ATTRS if not hasattr(attn, a)]
        if getattr(attn, "attn_l2_norm", False):
            missing += [a for a in ("scale_mul_1H11", "max_scale_mul") if not hasattr(attn, a)]
        if missing:
            raise _not_var(model, f"blocks[{i}].attn is missing attribute(s) {', '.join(missing)}")
        if attn.num_heads * attn.head_dim != C or tuple(attn.mat_qkv.weight.shape) != (3 * C, C):
            raise _not_var(model, f"blocks[{i}].attn: mat_qkv.weight must be (3C, C) = ({3 * C}, {C}) with "
                                  f"num_heads * head_dim = C")
        attns.append(attn)
    return attns


def _var_forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
    """VAR.forward (teacher forcing) with the embedding add fused; the same random
    draws, dtypes and outputs as the original."""
    bg, ed = self.begin_ends[self.prog_si] if self.prog_si >= 0 else (0, self.L)
    B = x_BLCv_wo_first_l.shape[0]
    with torch.autocast("cuda", enabled=False):  # VAR keeps the embeddings in fp32 under AMP
        drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
        label_B = torch.where(drop, self.num_classes, label_B)
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        if self.prog_si == 0:
            x_BLC = sos
        else:
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        if x_BLC.shape[1] != ed:
            raise ValueError(f"VAR.forward: the first scale plus x_BLCv_wo_first_l hold {x_BLC.shape[1]} tokens, "
                             f"but the trained scales (prog_si={self.prog_si}) need {ed}")
        x_BLC = pyramid_pos_level_add(x_BLC, self.pos_1LC, self.lvl_embed.weight, self.patch_nums,
                                      backend=getattr(self, _BACKEND))
    attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
    cond_BD_or_gss = self.shared_ada_lin(cond_BD)
    probe = x_BLC.new_ones(8, 8)
    main_type = torch.matmul(probe, probe).dtype  # the autocast compute dtype, if any
    x_BLC = x_BLC.to(dtype=main_type)
    cond_BD_or_gss = cond_BD_or_gss.to(dtype=main_type)
    attn_bias = attn_bias.to(dtype=main_type)
    for block in self.blocks:
        x_BLC = block(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=attn_bias)
    x_BLC = self.get_logits(x_BLC.float(), cond_BD)
    if self.prog_si == 0:
        # Only the first scale trains: keep word_embed in the graph (DDP needs every
        # parameter to receive a gradient).
        if isinstance(self.word_embed, nn.Linear):
            x_BLC[0, 0, 0] += self.word_embed.weight[0, 0] * 0 + self.word_embed.bias[0] * 0
        else:
            s = 0
            for p in self.word_embed.parameters():
                if p.requires_grad:
                    s += p.view(-1)[0] * 0
            x_BLC[0, 0, 0] += s
    return x_BLC


def _attn_forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
    return self_attention_forward(self, x, attn_bias, backend=getattr(self, _BACKEND))


def _attn_kv_caching(self, enable: bool) -> None:
    reset_kv_cache(self, enable)


def _bind(module: nn.Module, backend: Optional[str], **methods) -> None:
    # Methods bound to the instance (no closure, no partial): copy.deepcopy rebinds
    # them to the copy and torch.compile traces them like class-defined ones.
    module.__dict__[_BACKEND] = backend
    for name, fn in methods.items():
        setattr(module, name, types.MethodType(fn, module))


def patch_var(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Makes a FoundationVision/VAR ``VAR`` model use posenc_fast's fused kernels, in place.

    Rebinds ``model.forward`` (the embedding add becomes ``pyramid_pos_level_add``)
    and the ``forward`` and ``kv_caching`` of every ``model.blocks[i].attn``
    (``qkv_proj`` + SDPA with VAR's mask; in sampling a KV cache of the model's L
    tokens allocated once per run and appended to in place) on these instances. Parameters, buffers, ``state_dict``,
    modules, dropout and train/eval state are untouched, so checkpoints load as
    before and ``autoregressive_infer_cfg`` works unchanged. Patch before wrapping the
    model (DDP, FSDP, ``torch.compile``). Patching a patched model only changes its
    backend.

    Args:
        model: a VAR model (recognised by its attributes, e.g. ``VAR`` or ``VARHF``).
        backend: backend of the fused ops: None (the global choice: ``use_backend``,
            ``POSENC_FAST_BACKEND``, else auto), "auto", "cuda", "triton" or "reference".

    Returns the same model. Raises TypeError for a model that is not VAR-shaped.
    """
    if backend is not None:
        _backends._check_name(backend, "backend")
    attns = _check_var(model)
    if _STATE not in model.__dict__:
        model.__dict__[_STATE] = [(m, {name: m.__dict__.get(name) for name in names})
                                  for m, names in [(model, ("forward",))] + [(a, _ATTN_METHODS) for a in attns]]
    _bind(model, backend, forward=_var_forward)
    for attn in attns:
        _bind(attn, backend, forward=_attn_forward, kv_caching=_attn_kv_caching)
        attn.__dict__[KV_LEN] = model.L
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch_var`` has been applied to ``model`` (and not undone)."""
    return _STATE in getattr(model, "__dict__", {})


def unpatch_var(model: nn.Module) -> nn.Module:
    """Restores the methods ``patch_var`` replaced; returns the same model.
    Raises ValueError when ``model`` is not patched."""
    saved = getattr(model, "__dict__", {}).pop(_STATE, None)
    if saved is None:
        raise ValueError(f"unpatch_var: this {type(model).__name__} is not patched by patch_var")
    for module, methods in saved:
        for attr in (_BACKEND, _PARAMS_CACHE, KV_CACHE, KV_LEN):
            module.__dict__.pop(attr, None)
        for name, previous in methods.items():
            if previous is None:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, previous)
    return model
