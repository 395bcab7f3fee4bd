"""Fused self-attention for VAR-family models (SPEC §2.2, §2.3).

``FusedSelfAttention`` has the parameter names of VAR's ``SelfAttention``
(``mat_qkv``, ``q_bias``, ``v_bias``, the ``zero_k_bias`` buffer, ``scale_mul_1H11``,
``proj``), so VAR and Infinity checkpoints load into it unchanged. q, k and v come
from one ``qkv_proj`` call (GEMM + bias + l2 norm + per-head scale + optional 2D RoPE
+ head layout); attention is ``scaled_dot_product_attention``. ``patch_var`` runs the
same computation on the attention modules of an unmodified VAR model
(``self_attention_forward``).

KV cache (scale-by-scale sampling): one (k, v) pair of (B, H, L_max, D) buffers per
module, allocated at the first cached call of a sampling run (B from that call,
L_max the whole pyramid) and kept until ``kv_caching(False)``. Each scale's
``qkv_proj`` writes its k, v into the rows after the cached ones, and attention runs
on the views ``cache[:, :, :start + n]`` (SDPA without a mask: a query scale sees
every cached key, which is VAR's block-causal mask). So no scale copies the cache
(VAR's ``torch.cat`` re-copies it at every scale), and every scale's step has the
same shapes and addresses in every run, which CUDA graphs need. (The alternative,
attending over all L_max rows with a mask, would give one shape for all scales but
make the coarse scales read the whole cache; per-scale shapes are what capture needs.)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks
from ..ops.qkv_proj import _autocast_dtype, qkv_proj
from ..reference.rope import PAIRINGS, axial_rope_freqs, normalize_scales, pyramid_coords


def block_causal_bias(patch_nums: Sequence, *, dtype: torch.dtype = torch.float32,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """VAR's training mask (1, 1, L, L): 0 where the key's scale is not finer than the
    query's, -inf elsewhere. ``patch_nums``: ``[pn]`` or ``[(h, w)]``, coarse to fine."""
    scales = normalize_scales(patch_nums)
    level = torch.cat([torch.full((h * w,), s, device=device) for s, (h, w) in enumerate(scales)])
    visible = level[:, None] >= level[None, :]
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(visible, zero, torch.full((), -math.inf, dtype=dtype, device=device))[None, None]


_PARAMS_CACHE = "_posenc_fast_qkv_params"  # instance attribute: (key, q_scale, bias)
KV_CACHE = "_posenc_fast_kv_cache"  # instance attribute: (k_cache, v_cache) of the sampling run
KV_LEN = "_posenc_fast_kv_len"  # instance attribute: L_max, the tokens of the whole pyramid


def _projection_params(attn: nn.Module, l2_norm: Optional[bool] = None):
    """qkv_proj's q_scale (clamped exp of ``scale_mul_1H11``, or None) and packed
    q | 0 | v bias. Without autograd (sampling) they are cached on the module until a
    parameter changes (in-place update, load, move: its version or address changes),
    which saves the host four small ops per block and scale. ``l2_norm``: cosine
    attention on (default: ``attn.attn_l2_norm``, VAR's name; Infinity's is ``cos_attn``)."""
    l2_norm = attn.attn_l2_norm if l2_norm is None else l2_norm
    params = (attn.q_bias, attn.zero_k_bias, attn.v_bias) + ((attn.scale_mul_1H11,) if l2_norm else ())
    key = None
    if not torch.is_grad_enabled():
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        cached = attn.__dict__.get(_PARAMS_CACHE)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
    q_scale = None
    if l2_norm:
        q_scale = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp().reshape(attn.num_heads)
    bias = torch.cat(params[:3])
    if key is not None:
        attn.__dict__[_PARAMS_CACHE] = (key, q_scale, bias)
    return q_scale, bias


def _kv_buffers(attn: nn.Module, x: torch.Tensor, start: int):
    """The module's (k_cache, v_cache): allocated at the first scale of a sampling run,
    (B, H, L_max, D) in qkv_proj's output dtype; reused while they fit."""
    kv = attn.__dict__.get(KV_CACHE)
    if start > 0:
        return kv
    B = x.shape[0]
    H = attn.num_heads
    dtype = _autocast_dtype(x.device.type) or x.dtype
    L_max = attn.__dict__.get(KV_LEN)
    if L_max is None:
        raise ValueError(f"{type(attn).__name__}: KV caching needs the cache length: patch the model with "
                         f"patch_var, or call FusedSelfAttention.kv_caching(True, max_len=...)")
    shape = (B, H, L_max, attn.head_dim)
    if kv is None or kv[0].shape != shape or kv[0].dtype != dtype or kv[0].device != x.device:
        attn.__dict__[KV_CACHE] = None  # free the old pair before allocating the new one
        kv = tuple(torch.empty(shape, dtype=dtype, device=x.device) for _ in range(2))
        attn.__dict__[KV_CACHE] = kv
    return kv


def reset_kv_cache(attn: nn.Module, enable: bool) -> None:
    """``kv_caching(enable)``: VAR's flags; the buffers stay allocated while caching
    stays on (a new run rewinds to row 0) and are freed by ``kv_caching(False)``."""
    attn.caching, attn.cached_k, attn.cached_v = enable, None, None
    if not enable:
        attn.__dict__.pop(KV_CACHE, None)


def attention_qkv(attn: nn.Module, x: torch.Tensor, *, coords: Optional[torch.Tensor] = None,
                  freqs: Optional[torch.Tensor] = None, pairing: str = "interleaved",
                  backend: Optional[str] = None):
    """q, k, v (B, H, *, D) of a module with VAR's ``SelfAttention`` attributes. While
    caching, ``qkv_proj`` writes this scale's k, v into the module's (B, H, L_max, D)
    buffers (``attn.__dict__[KV_LEN]`` gives L_max) and k, v are the views of the rows
    so far, kept as ``cached_k`` / ``cached_v``. Caching has no backward: sample under
    ``torch.no_grad()``."""
    q_scale, bias = _projection_params(attn)
    kv, start = None, 0
    if attn.caching:
        start = 0 if attn.cached_k is None else attn.cached_k.shape[2]
        kv = _kv_buffers(attn, x, start)
    q, k, v = qkv_proj(x, attn.mat_qkv.weight, bias, num_heads=attn.num_heads, qk_l2norm=attn.attn_l2_norm,
                       q_scale=q_scale, coords=coords, freqs=freqs, pairing=pairing, kv_cache=kv,
                       cache_start=start, backend=backend)
    if attn.caching:
        attn.cached_k, attn.cached_v = k, v
    return q, k, v


def self_attention_forward(attn: nn.Module, x: torch.Tensor, attn_bias: Optional[torch.Tensor], *,
                           coords: Optional[torch.Tensor] = None, freqs: Optional[torch.Tensor] = None,
                           pairing: str = "interleaved", backend: Optional[str] = None) -> torch.Tensor:
    """VAR's attention forward on a module with VAR's ``SelfAttention`` attributes.

    x (B, L, C); attn_bias: the block-causal additive mask in training, None when the
    KV cache is on (a query scale then sees every cached key, which is the same mask).
    The cache holds post-norm (and rotated) k and raw v (``attention_qkv``).
    """
    B, L, C = x.shape
    q, k, v = attention_qkv(attn, x, coords=coords, freqs=freqs, pairing=pairing, backend=backend)
    dropout_p = attn.attn_drop if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=attn.scale)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, L, C)))


class FusedSelfAttention(nn.Module):
    """Self-attention of a VAR-family block with a fused input projection.

    Args:
        embed_dim, num_heads: C and H (head dim D = C / H).
        attn_l2_norm: VAR's / Infinity's cosine attention: q and k l2-normalised, q
            multiplied by ``exp(min(scale_mul_1H11[h], ln 100))``, score scale 1.
        scale: score scale without l2 norm; default VAR's ``0.25 / sqrt(D)``
            (Infinity uses ``1 / sqrt(D)``).
        attn_drop, proj_drop: dropout on the attention weights and on the output.
        rope: 2D RoPE on q and k after the l2 norm (Infinity): axial frequencies
            ``base^(-4j/D)``, pairs [0, D/4) with the row and [D/4, D/2) with the column.
        rope_scales: the pyramid (``[pn]``, ``[(h, w)]`` or ``[(1, h, w)]``) whose
            token coordinates (``pyramid_coords(rope_scales, mode=rope_mode,
            final=rope_final)``) the module uses by itself: rows [0, L) in training,
            the rows after the cached ones in sampling. Without it, pass ``coords``
            to ``forward``.
        rope_final: the grid the coordinates map to (default: the last of
            ``rope_scales``). Infinity maps every schedule of an aspect ratio onto
            the last scale of that ratio's largest ("1M") schedule.
        pairing: "interleaved" (Infinity) or "half".
        backend: backend of ``qkv_proj`` (None: the global choice).

    ``forward(x, attn_bias=None, coords=None)``: x (B, L, C); attn_bias an additive
    (1, 1, L, L) mask (``block_causal_bias``) or None; returns (B, L, C).
    ``kv_caching(True, max_len=None)`` starts scale-by-scale sampling (under
    ``torch.no_grad()``): each call appends its k, v to a cache of ``max_len`` tokens
    (default: the tokens of ``rope_scales``), allocated at the first call from its
    batch, written in place by ``qkv_proj`` (no ``torch.cat``);
    ``kv_caching(False)`` frees it.

    Checkpoints: ``scale_mul_1H11`` is (1, H, 1, 1); Infinity models built with its
    customized flash attention store it as (1, 1, H, 1), which ``load_state_dict``
    accepts and reshapes.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, attn_l2_norm: bool = True,
                 scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rope: bool = False, rope_scales: Optional[Sequence] = None, rope_mode: str = "round",
                 rope_final: Optional[Sequence] = None, rope_base: float = 10000.0, pairing: str = "interleaved",
                 backend: Optional[str] = None):
        super().__init__()
        _checks.check_positive_int("embed_dim", embed_dim)
        _checks.check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if rope_scales is not None and not rope:
            raise ValueError("rope_scales is given but rope=False")
        if rope_final is not None and rope_scales is None:
            raise ValueError("rope_final is given without rope_scales")
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        if rope and self.head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            if scale is not None:
                raise ValueError("scale is fixed to 1 with attn_l2_norm=True (the learned scale_mul_1H11 sets it)")
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100.0)).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim) if scale is None else float(scale)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.attn_drop = float(attn_drop)
        self.rope, self.pairing, self.backend = rope, pairing, backend
        self.rope_base = float(rope_base)
        self.rope_scales = None if rope_scales is None else normalize_scales(rope_scales)
        self.rope_mode = rope_mode
        self.rope_final = rope_final
        # Derived tables, not state: non-persistent, so state_dict keys stay VAR's.
        if rope:
            self.register_buffer("rope_freqs", self._rope_freqs(), persistent=False)
        if self.rope_scales is not None:
            self.register_buffer("rope_coords", self._rope_coords(), persistent=False)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(bf16) would round the rotation tables; rebuild them in fp32
        # on whatever device the module moved to.
        super()._apply(fn, *args, **kwargs)
        if self.rope:
            device = self.rope_freqs.device
            if self.rope_freqs.dtype != torch.float32:
                self.rope_freqs = self._rope_freqs().to(device)
            if self.rope_scales is not None and self.rope_coords.dtype != torch.float32:
                self.rope_coords = self._rope_coords().to(device)
        return self

    def _rope_freqs(self) -> torch.Tensor:
        return axial_rope_freqs(self.head_dim, base=self.rope_base)

    def _rope_coords(self) -> torch.Tensor:
        return pyramid_coords(self.rope_scales, mode=self.rope_mode, final=self.rope_final)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "scale_mul_1H11"
        value = state_dict.get(key)
        H = self.num_heads
        if self.attn_l2_norm and isinstance(value, torch.Tensor) and tuple(value.shape) == (1, 1, H, 1):
            state_dict[key] = value.reshape(1, H, 1, 1)  # Infinity's flash-attention layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kv_caching(self, enable: bool, max_len: Optional[int] = None) -> None:
        if enable:
            if max_len is None:
                if self.rope_scales is None:
                    raise ValueError("kv_caching(True) needs max_len (the tokens of the whole pyramid) for a "
                                     "FusedSelfAttention without rope_scales")
                max_len = self.rope_coords.shape[0]
            self.__dict__[KV_LEN] = _checks.check_positive_int("max_len", max_len)
        reset_kv_cache(self, enable)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, *,
                coords: Optional[torch.Tensor] = None) -> torch.Tensor:
        freqs = None
        if self.rope:
            freqs = self.rope_freqs
            if coords is None:
                if self.rope_scales is None:
                    raise ValueError("this FusedSelfAttention has rope=True but no rope_scales: pass coords (L, 2)")
                first = self.cached_k.shape[2] if (self.caching and self.cached_k is not None) else 0
                if first + x.shape[1] > self.rope_coords.shape[0]:
                    raise ValueError(f"tokens [{first}, {first + x.shape[1]}) exceed the {self.rope_coords.shape[0]} "
                                     f"tokens of rope_scales")
                coords = self.rope_coords[first:first + x.shape[1]]
        elif coords is not None:
            raise ValueError("coords given to a FusedSelfAttention built with rope=False")
        return self_attention_forward(self, x, attn_bias, coords=coords, freqs=freqs, pairing=self.pairing,
                                      backend=self.backend)

    def extra_repr(self) -> str:
        rope = f", rope={self.pairing}" if self.rope else ""
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attn_l2_norm={self.attn_l2_norm}{rope}"
