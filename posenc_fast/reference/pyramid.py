"""Reference for the pyramid position + level embedding (SPEC §2.1), in plain PyTorch.

A VAR pyramid is a list of scales, coarse to fine, each a grid of h x w tokens in
raster order; token l lies in scale ``level(l)``. The op adds to the tokens
``[start, start + n)`` of the pyramid

    out[b, i] = x[b, i] + lvl[level(start + i)]
              + pos_weight * pos[start + i] + sincos_weight * sincos[start + i]

with the sum accumulated in fp32 (float64 for float64 inputs) and the result in the
dtype that eager PyTorch gives ``x + pos + lvl``. ``sincos`` is the fixed pyramid
table: per scale a 2D sinusoidal grid whose channels [0, C/2) encode the row and
[C/2, C) the column, each half a 1D sinusoid with interleaved sin/cos,
``pe[2i] = sin(p w_i)``, ``pe[2i+1] = cos(p w_i)``, ``w_i = 10000^(-2i/(C/2))``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

Scale = Union[int, Tuple[int, int]]


def normalize_scales(patch_nums: Sequence[Scale]) -> Tuple[Tuple[int, int], ...]:
    """``[pn]`` or ``[(h, w)]`` -> ``((h, w), ...)``; ValueError/TypeError when malformed."""
    if isinstance(patch_nums, (str, bytes)) or not hasattr(patch_nums, "__iter__"):
        raise TypeError(f"patch_nums must be a sequence of ints or (h, w) pairs, got {patch_nums!r}")
    scales = []
    for i, s in enumerate(patch_nums):
        if isinstance(s, (tuple, list)):
            if len(s) != 2:
                raise ValueError(f"patch_nums[{i}] must be an int or an (h, w) pair, got {s!r}")
            h, w = s
        else:
            h = w = s
        for v in (h, w):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"patch_nums[{i}] must hold ints, got {s!r}")
            if v < 1:
                raise ValueError(f"patch_nums[{i}] must be positive, got {s!r}")
        scales.append((int(h), int(w)))
    if not scales:
        raise ValueError("patch_nums must name at least one scale")
    return tuple(scales)


def pyramid_length(patch_nums: Sequence[Scale]) -> int:
    """L = sum of h * w over the scales."""
    return sum(h * w for h, w in normalize_scales(patch_nums))


def token_table(patch_nums: Sequence[Scale], *, device=None) -> torch.Tensor:
    """(L, 3) int64 tensor of (level, row, col) for every pyramid token, coarse scale
    first, raster order within a scale."""
    scales = normalize_scales(patch_nums)
    level = torch.cat([torch.full((h * w,), s, dtype=torch.long, device=device) for s, (h, w) in enumerate(scales)])
    row = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in scales])
    col = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in scales])
    return torch.stack([level, row, col], dim=1)


def sincos_pyramid_table(patch_nums: Sequence[Scale], embed_dim: int, *,
                         dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The fixed (L, C) pyramid table, computed in float64 and cast to ``dtype``."""
    if embed_dim % 2:
        raise ValueError(f"the sincos table needs an even embed_dim, got {embed_dim}")
    half = embed_dim // 2
    meta = token_table(patch_nums, device=device).to(torch.float64)
    k = torch.arange(half, dtype=torch.float64, device=device)
    w = torch.exp(-(2 * torch.div(k, 2, rounding_mode="floor")) / half * math.log(10000.0))
    is_sin = (torch.arange(half, device=device) % 2) == 0

    def axis(p: torch.Tensor) -> torch.Tensor:
        angle = p[:, None] * w[None, :]
        return torch.where(is_sin, torch.sin(angle), torch.cos(angle))

    return torch.cat([axis(meta[:, 1]), axis(meta[:, 2])], dim=1).to(dtype)


def output_dtype(x: torch.Tensor, pos: Optional[torch.Tensor], lvl: torch.Tensor) -> torch.dtype:
    """The dtype eager PyTorch gives ``x + pos + lvl`` (``x + lvl`` without pos)."""
    dt = torch.promote_types(x.dtype, lvl.dtype)
    return dt if pos is None else torch.promote_types(dt, pos.dtype)


def pyramid_pos_level_add(x: torch.Tensor, pos: Optional[torch.Tensor], lvl: torch.Tensor,
                          patch_nums: Sequence[Scale], *, start: int = 0, pos_weight: float = 1.0,
                          sincos_weight: float = 0.0) -> torch.Tensor:
    """Reference implementation; see the module docstring. Gradients flow to x, pos, lvl."""
    n, C = x.shape[1], x.shape[2]
    meta = token_table(patch_nums, device=x.device)[start:start + n]
    pos2d = None if pos is None else pos.reshape(pos.shape[-2], pos.shape[-1])
    out_dtype = output_dtype(x, pos2d, lvl)
    acc = torch.promote_types(out_dtype, torch.float32)
    emb = lvl.to(acc)[meta[:, 0]]
    if pos2d is not None:
        emb = emb + pos_weight * pos2d.to(acc)[start:start + n]
    if sincos_weight != 0.0:
        emb = emb + sincos_weight * sincos_pyramid_table(patch_nums, C, dtype=acc, device=x.device)[start:start + n]
    return (x.to(acc) + emb).to(out_dtype)
