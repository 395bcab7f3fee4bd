"""Fused self-attention for VAR-family models (SPEC §2.2, §2.3).

``FusedSelfAttention`` has the parameter names of VAR's ``SelfAttention``
(``mat_qkv``, ``q_bias``, ``v_bias``, the ``zero_k_bias`` buffer, ``scale_mul_1H11``,
``proj``), so VAR and Infinity checkpoints load into it unchanged. q, k and v come
from one ``qkv_proj`` call (GEMM + bias + l2 norm + per-head scale + optional 2D RoPE
+ head layout); attention is ``scaled_dot_product_attention``. ``patch_var`` runs the
same computation on the attention modules of an unmodified VAR model
(``self_attention_forward``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks
from ..ops.qkv_proj import qkv_proj
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


def _projection_params(attn: nn.Module):
    """qkv_proj's q_scale (clamped exp of ``scale_mul_1H11``, or None) and packed
    q | 0 | v bias. Without autograd (sampling) they are cached on the module until a
    parameter changes (in-place update, load, move: its version or address changes),
    which saves the host four small ops per block and scale."""
    params = (attn.q_bias, attn.zero_k_bias, attn.v_bias) + (
        (attn.scale_mul_1H11,) if attn.attn_l2_norm else ())
    key = None
    if not torch.is_grad_enabled():
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        cached = attn.__dict__.get(_PARAMS_CACHE)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
    q_scale = None
    if attn.attn_l2_norm:
        q_scale = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp().reshape(attn.num_heads)
    bias = torch.cat(params[:3])
    if key is not None:
        attn.__dict__[_PARAMS_CACHE] = (key, q_scale, bias)
    return q_scale, bias


def self_attention_forward(attn: nn.Module, x: torch.Tensor, attn_bias: Optional[torch.Tensor], *,
                           coords: Optional[torch.Tensor] = None, freqs: Optional[torch.Tensor] = None,
                           pairing: str = "interleaved", backend: Optional[str] = None) -> torch.Tensor:
    """VAR's attention forward on a module with VAR's ``SelfAttention`` attributes.

    x (B, L, C); attn_bias: the block-causal additive mask in training, None when the
    KV cache is on (a query scale then sees every cached key, which is the same mask).
    The cache holds post-norm (and rotated) k and raw v, (B, H, L, D), appended per scale.
    """
    B, L, C = x.shape
    H = attn.num_heads
    q_scale, bias = _projection_params(attn)
    q, k, v = qkv_proj(x, attn.mat_qkv.weight, bias, num_heads=H, qk_l2norm=attn.attn_l2_norm,
                       q_scale=q_scale, coords=coords, freqs=freqs, pairing=pairing, backend=backend)
    if attn.caching:
        if attn.cached_k is not None:
            k = torch.cat((attn.cached_k, k), dim=2)
            v = torch.cat((attn.cached_v, v), dim=2)
        attn.cached_k, attn.cached_v = k, v
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
    ``kv_caching(True)`` starts scale-by-scale sampling: each call appends its k, v.

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

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

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
