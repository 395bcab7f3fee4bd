"""Drop-in acceleration of FoundationVision/Infinity's self-attention: ``patch_infinity(module)``.

``patch_infinity`` rebinds, on the given instances only, the ``forward`` of every
Infinity ``SelfAttention`` found in ``module`` (a whole Infinity model, a block, or one
attention module). The patched forward keeps Infinity's signature
``(x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
scale_ind=0)`` and behaviour:

* q, k, v come from one ``qkv_proj`` (the QKV GEMM, q/v bias and zero k bias, with
  cosine attention the q/k L2 norm and the clamped ``exp(scale_mul_1H11)`` on q --
  both the (1, H, 1, 1) and the flash-attention (1, 1, H, 1) layouts -- the 2D RoPE
  and the head layout), instead of Infinity's linear + view + permute + normalize +
  mul chain and its separate rotation;
* the 2D RoPE uses the module's own ``rope2d_freqs_grid`` cos/sin tables exactly as
  Infinity does (rows ``[start, start + L)`` of the schedule's table, the pairs of
  dims (2j, 2j + 1), fp32 with autocast off), so all three ``rope2d_normalized_by_hw``
  modes work, mode 1's interpolated tables included: the tables go to ``qkv_proj``
  (``cos``/``sin``), whose epilogue rotates q and k after the norm, in the same
  kernel. A customised-flash build keeps Infinity's own eager rotation after the
  projection, whose (B, L, H, D) layout makes it index the table by head;
* sampling (``kv_caching(True)``): with SDPA, k and v are appended by ``qkv_proj``
  into one (B, H, L, D) buffer pair per run (L: the schedule's tokens), k already
  rotated, so no ``torch.cat`` re-copies the cache at each scale and no second
  launch touches it; ``cached_k`` / ``cached_v`` are views of the rows so far, and
  ``kv_caching(False)`` frees the buffers (a customised-flash build keeps Infinity's
  cat);
* the block-wise mask (an additive bias for SDPA, or the module's own
  ``flash_attn_func`` with ``VAR_visible_kvlen`` / ``VAR_invisible_qlen`` for a
  customised-flash build), ``attn_fn`` (flex attention) and ``proj`` are Infinity's.

Parameters, buffers and ``state_dict`` are untouched. The modules are recognised by
their attributes; no Infinity code is imported. ``unpatch_infinity`` restores them.
"""

from __future__ import annotations

import types
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backends
from ..nn.attention import _PARAMS_CACHE, KV_CACHE, KV_LEN, _kv_buffers, _projection_params, reset_kv_cache
from ..ops.qkv_proj import qkv_proj

_STATE = "_posenc_fast_infinity_patch"  # on the patched root: [(attention module, {method: previous})]
_METHODS = ("forward", "kv_caching")
_BACKEND = "_posenc_fast_backend"

_ATTRS = ("mat_qkv", "q_bias", "v_bias", "zero_k_bias", "num_heads", "head_dim", "cos_attn", "scale", "caching",
          "cached_k", "cached_v", "kv_caching", "proj", "proj_drop", "using_flash", "pad_to_multiplier",
          "rope2d_normalized_by_hw", "use_flex_attn")


def _is_infinity_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in _ATTRS) and isinstance(getattr(m, "mat_qkv", None), nn.Linear)


def _check(m: nn.Module, where: str) -> None:
    C = m.num_heads * m.head_dim
    if tuple(m.mat_qkv.weight.shape) != (3 * C, C):
        raise TypeError(f"patch_infinity: {where}: mat_qkv.weight must be (3C, C) = ({3 * C}, {C}) with "
                        f"num_heads * head_dim = C, got {tuple(m.mat_qkv.weight.shape)}")
    if m.cos_attn:
        missing = [a for a in ("scale_mul_1H11", "max_scale_mul") if not hasattr(m, a)]
        if missing:
            raise TypeError(f"patch_infinity: {where}: cos_attn=True but missing {', '.join(missing)}")
        if m.scale_mul_1H11.numel() != m.num_heads:
            raise TypeError(f"patch_infinity: {where}: scale_mul_1H11 must hold num_heads = {m.num_heads} values")
    if m.using_flash and "flash_attn_func" not in getattr(type(m).forward, "__globals__", {}):
        raise TypeError(f"patch_infinity: {where}: a customised-flash build (using_flash=True) whose forward "
                        f"has no flash_attn_func to call")


def _table_rows(table: torch.Tensor, start: int, n: int):
    if start + n > table.shape[4]:
        raise ValueError(f"patch_infinity: tokens [{start}, {start + n}) exceed the {table.shape[4]} rows of "
                         f"this schedule's rope table")
    return table[0, 0, 0, 0, start:start + n], table[1, 0, 0, 0, start:start + n]  # (n, D/2) each


def _rotate_flash_layout(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor, start: int):
    """Infinity's rotation of (B, L, H, D) tensors: table rows [start, start + n) along
    dim 2, pairs (2j, 2j + 1), in fp32, as its code does it for that layout."""
    with torch.autocast(q.device.type if q.device.type in ("cuda", "cpu") else "cpu", enabled=False):
        cos, sin = _table_rows(table, start, q.shape[2])

        def rot(t):
            t = t.float().unflatten(-1, (-1, 2))
            t0, t1 = t[..., 0], t[..., 1]
            return torch.stack((cos * t0 - sin * t1, sin * t0 + cos * t1), dim=-1).flatten(-2)

        return rot(q), rot(k)


def _forward(self, x: torch.Tensor, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
             rope2d_freqs_grid=None, scale_ind: int = 0) -> torch.Tensor:
    B, L, C = x.shape
    H = self.num_heads
    q_scale, bias = _projection_params(self, bool(self.cos_attn))
    backend = self.__dict__[_BACKEND]
    cos = sin = table = None
    start = 0
    if rope2d_freqs_grid is not None:
        key = str(tuple(scale_schedule))
        table = rope2d_freqs_grid[key].to(x.device)
        rope2d_freqs_grid[key] = table  # Infinity moves the cached table to the device the same way
        if scale_ind >= 1:
            start = int(sum(t * h * w for t, h, w in scale_schedule[:scale_ind]))
        if not self.using_flash:  # rotated by qkv_proj's epilogue, after the norm
            cos, sin = _table_rows(table, start, L)
    # Sampling with the SDPA layout: k (rotated) and v go straight into one
    # (B, H, L_max, D) buffer pair per run (qkv_proj's KV-cache append; L_max = the
    # schedule's tokens): no cat re-copying the cache.
    append = self.caching and not self.using_flash and scale_schedule is not None
    kv, cache_start = None, 0
    if append:
        cache_start = 0 if self.cached_k is None else self.cached_k.shape[2]
        self.__dict__[KV_LEN] = int(sum(t * h * w for t, h, w in scale_schedule))
        kv = _kv_buffers(self, x, cache_start)
    q, k, v = qkv_proj(x, self.mat_qkv.weight, bias, num_heads=H, qk_l2norm=bool(self.cos_attn), q_scale=q_scale,
                       cos=cos, sin=sin, kv_cache=kv, cache_start=cache_start, backend=backend)  # (B, H, *, D)
    if self.using_flash:  # Infinity's flash layout: (B, L, H, D), sequence dim 1
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if table is not None:
            q, k = _rotate_flash_layout(q, k, table, start)
    if append:
        self.cached_k, self.cached_v = k, v
    elif self.caching:
        if self.cached_k is None:
            self.cached_k, self.cached_v = k, v
        else:
            seq = 1 if self.using_flash else 2
            k = self.cached_k = torch.cat((self.cached_k, k), dim=seq)
            v = self.cached_v = torch.cat((self.cached_v, v), dim=seq)
    if self.using_flash:
        flash_attn_func = type(self).forward.__globals__["flash_attn_func"]
        kw = {} if attn_bias_or_two_vector is None else dict(VAR_visible_kvlen=attn_bias_or_two_vector[0],
                                                            VAR_invisible_qlen=attn_bias_or_two_vector[1])
        out = flash_attn_func(q.to(v.dtype), k.to(v.dtype), v, dropout_p=0, softmax_scale=self.scale, **kw)
        out = out.reshape(B, L, C)
    elif self.use_flex_attn and attn_fn is not None:
        out = attn_fn(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, L, C)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_or_two_vector, dropout_p=0,
                                             scale=self.scale).transpose(1, 2).reshape(B, L, C)
    return self.proj_drop(self.proj(out))


def _kv_caching(self, enable: bool) -> None:
    """Infinity's kv_caching; ``False`` also frees the run's cache buffers."""
    reset_kv_cache(self, enable)


def patch_infinity(module: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Makes every FoundationVision/Infinity ``SelfAttention`` inside ``module`` (the
    module itself included) use posenc_fast's fused projection, in place.

    Args:
        module: an Infinity model, a block, or one attention module.
        backend: backend of ``qkv_proj``: None (the global choice), "auto", "cuda",
            "triton" or "reference".

    Returns the same module. Raises TypeError when no Infinity self-attention is found
    or one is malformed. Patching again only changes the backend.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"patch_infinity: expected an nn.Module, got {type(module).__name__}")
    if backend is not None:
        _backends._check_name(backend, "backend")
    attns: List[nn.Module] = []
    for name, m in module.named_modules():
        if _is_infinity_attention(m):
            _check(m, name or type(m).__name__)
            attns.append(m)
    if not attns:
        raise TypeError(f"patch_infinity: no FoundationVision/Infinity SelfAttention found in "
                        f"{type(module).__name__} (a module with {', '.join(_ATTRS)})")
    state = module.__dict__.setdefault(_STATE, [])
    known = {id(m) for m, _ in state}
    for m in attns:
        if id(m) not in known:
            state.append((m, {name: m.__dict__.get(name) for name in _METHODS}))
        m.__dict__[_BACKEND] = backend
        m.forward = types.MethodType(_forward, m)
        m.kv_caching = types.MethodType(_kv_caching, m)
    return module


def unpatch_infinity(module: nn.Module) -> nn.Module:
    """Restores the attention forwards ``patch_infinity`` replaced; returns the same
    module. Raises ValueError when ``module`` was not patched by ``patch_infinity``."""
    saved = getattr(module, "__dict__", {}).pop(_STATE, None)
    if saved is None:
        raise ValueError(f"unpatch_infinity: this {type(module).__name__} is not patched by patch_infinity")
    for m, previous in saved:
        m.__dict__.pop(_BACKEND, None)
        for key in (KV_CACHE, KV_LEN, _PARAMS_CACHE):
            m.__dict__.pop(key, None)
        for name, method in previous.items():
            if method is None:
                m.__dict__.pop(name, None)
            else:
                setattr(m, name, method)
    return module
