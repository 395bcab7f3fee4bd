"""Reference for the fused attention input projection (SPEC §2.2, §2.3), in plain PyTorch.

    qkv = x @ W^T + bias                      W (3C, C): rows q | k | v, head-major
    q, k, v = split into H heads of D = C / H, layout (B, H, L, D)
    if qk_l2norm:  q, k = q / max(||q||, 1e-12), k / max(||k||, 1e-12)   (per head)
    if q_scale:    q = q * q_scale[h]
    if rope:       q, k = rotate(q, k)  (SPEC §2.3, after the norm, like Infinity), by
                   angles (coords x freqs) or per-token cos/sin tables; with rotary_dim r
                   only dims [0, r) rotate, as a head of size r (apply_rope's rotary_dim)

The GEMM runs in the input dtype (like ``F.linear``); normalisation, scale and
rotation run in fp32 and the results are cast back to the input dtype. Autocast is
handled by the caller (``posenc_fast.ops.qkv_proj`` casts the inputs like
``F.linear`` does and calls this with autocast off).

With ``kv_cache=(k_cache, v_cache)`` (B, H, L_max, D), k and v are written into the
rows [cache_start, cache_start + L) of the caches and the views
``cache[:, :, :cache_start + L]`` are returned in their place.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .rope import apply_rope, apply_rope_table

L2_EPS = 1e-12


def qkv_proj(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
             num_heads: int, qk_l2norm: bool = False, q_scale: Optional[torch.Tensor] = None,
             coords: Optional[torch.Tensor] = None, freqs: Optional[torch.Tensor] = None,
             pairing: str = "interleaved", kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             cache_start: int = 0, cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
             rotary_dim: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, L, C), weight (3C, C), bias (3C,) or None, q_scale (H,) or None,
    coords (L, A) or (B, L, A) with freqs (A, r/2) or (H, A, r/2), or tables cos and
    sin (L, r/2) or (B, L, r/2), or no rotation; r = rotary_dim (default D).
    Returns contiguous q, k, v (B, H, L, D) in x's dtype; with ``kv_cache``, q and
    the caches' views up to cache_start + L."""
    B, L, C = x.shape
    H = num_heads
    D = C // H
    qkv = F.linear(x, weight, bias)
    q, k, v = qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    rotate = coords is not None or cos is not None
    if qk_l2norm or q_scale is not None or rotate:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        q, k = q.to(acc), k.to(acc)
        if qk_l2norm:
            q = F.normalize(q, dim=-1, eps=L2_EPS)
            k = F.normalize(k, dim=-1, eps=L2_EPS)
        if q_scale is not None:
            q = q * q_scale.to(acc).view(1, H, 1, 1)
        if rotate:
            r = D if rotary_dim is None else rotary_dim
            qr, kr = q[..., :r], k[..., :r]
            if cos is not None:
                qr, kr = apply_rope_table(qr, kr, cos, sin, pairing=pairing)
            else:
                qr, kr = apply_rope(qr, kr, coords, freqs, pairing=pairing)
            q, k = torch.cat((qr, q[..., r:]), dim=-1), torch.cat((kr, k[..., r:]), dim=-1)
        q, k = q.to(x.dtype), k.to(x.dtype)
    if kv_cache is None:
        return q.contiguous(), k.contiguous(), v.contiguous()
    k_cache, v_cache = kv_cache
    end = cache_start + L
    k_cache[:, :, cache_start:end] = k
    v_cache[:, :, cache_start:end] = v
    return q.contiguous(), k_cache[:, :, :end], v_cache[:, :, :end]
