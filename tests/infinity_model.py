"""An Infinity-shaped self-attention for the integration tests.

The tests must not import FoundationVision/Infinity, so this file re-states its
``SelfAttention`` from the behaviour ``patch_infinity`` must reproduce: the attribute
names and parameter shapes of Infinity's module (``mat_qkv``, ``q_bias``, ``v_bias``,
the ``zero_k_bias`` buffer, ``scale_mul_1H11`` as (1, H, 1, 1), or (1, 1, H, 1) in a
customised-flash build, ``proj``, the KV cache, ``pad_to_multiplier``,
``rope2d_normalized_by_hw``, ``use_flex_attn``), its forward signature, cosine
attention computed in fp32, and the 2D RoPE from a per-schedule cos/sin table
(2, 1, 1, 1, S, D/2) whose rows [start, start + n) rotate the pairs (2j, 2j + 1).

``rope_tables`` builds such tables for Infinity's three ``rope2d_normalized_by_hw``
modes from their definitions: 0 raw grid positions; 2 positions rounded onto the last
scale of the reference schedule; 1 the (row, column) angle grid of that last scale's
extent bilinearly resampled (align_corners) to each scale, so its cos/sin are not a
rotation by any angle.

``flash_attn_func`` stands in for the customised flash attention of a flash build
((B, L, H, D) tensors; training passes the per-query count of visible keys as
``VAR_visible_kvlen``): the patched module must call the module's own function.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, VAR_visible_kvlen=None, VAR_invisible_qlen=None):
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = None
    if VAR_visible_kvlen is not None:
        keys = torch.arange(kh.shape[2], device=q.device)
        mask = torch.where(keys[None, :] < VAR_visible_kvlen[:, None], 0.0, -math.inf).to(q.dtype)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


class InfinitySelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, *, cos_attn: bool = True, using_flash: bool = False,
                 use_flex_attn: bool = False, pad_to_multiplier: int = 1, rope2d_normalized_by_hw: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.cos_attn, self.using_flash, self.use_flex_attn = cos_attn, using_flash, use_flex_attn
        self.pad_to_multiplier, self.rope2d_normalized_by_hw = pad_to_multiplier, rope2d_normalized_by_hw
        if cos_attn:
            self.scale = 1
            shape = (1, 1, num_heads, 1) if using_flash else (1, num_heads, 1, 1)
            self.scale_mul_1H11 = nn.Parameter(torch.full(shape, 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 1 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool):
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind=0):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        if self.using_flash:
            q, k, v = qkv.unbind(2)
            seq_dim = 1
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            seq_dim = 2
        if self.cos_attn:
            gain = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1, eps=1e-12).mul(gain)
            k = F.normalize(k, dim=-1, eps=1e-12)
        if rope2d_freqs_grid is not None:
            table = rope2d_freqs_grid[str(tuple(scale_schedule))]
            start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind])
            with torch.autocast(x.device.type, enabled=False):
                pair = torch.stack((q, k)).float().unflatten(-1, (-1, 2))
                rows = table[:, :, :, :, start:start + pair.shape[3]]
                c, s = rows[0], rows[1]
                pair = torch.stack((c * pair[..., 0] - s * pair[..., 1], s * pair[..., 0] + c * pair[..., 1]), -1)
                q, k = pair.flatten(-2).unbind(0)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=seq_dim)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=seq_dim)
        if self.using_flash:
            kw = {} if attn_bias_or_two_vector is None else dict(VAR_visible_kvlen=attn_bias_or_two_vector[0],
                                                                VAR_invisible_qlen=attn_bias_or_two_vector[1])
            out = flash_attn_func(q.to(v.dtype), k.to(v.dtype), v, dropout_p=0, softmax_scale=self.scale, **kw)
            out = out.reshape(B, L, C)
        elif self.use_flex_attn and attn_fn is not None:
            out = attn_fn(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, L, C)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_or_two_vector, scale=self.scale)
            out = out.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out))


class InfinityBlockStack(nn.Module):
    """A few blocks holding Infinity attentions under ``.attn`` (and one under ``.sa``,
    as Infinity's cross-attention blocks name theirs), for patching a whole model."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int = 2, **kw):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(depth):
            block = nn.Module()
            setattr(block, "sa" if i % 2 else "attn", InfinitySelfAttention(embed_dim, num_heads, **kw))
            self.blocks.append(block)

    def attentions(self):
        return [getattr(b, "sa", None) or b.attn for b in self.blocks]

    def forward(self, x, mask, schedule, tables, scale_ind=0):
        for a in self.attentions():
            x = x + a(x, mask, scale_schedule=schedule, rope2d_freqs_grid=tables, scale_ind=scale_ind)
        return x


def rope_tables(head_dim: int, schedule: Sequence[Tuple[int, int, int]], mode: int, *, max_side: int = 64,
                base: float = 10000.0, reference: Optional[Sequence[Tuple[int, int, int]]] = None
                ) -> Dict[str, torch.Tensor]:
    """{str(schedule): (2, 1, 1, 1, L, D/2) cos/sin} for one (1, h, w) schedule;
    ``reference``: the schedule whose last scale modes 1 and 2 map onto (default: itself)."""
    half = head_dim // 2
    theta = base ** -(torch.arange(0, half, 2, dtype=torch.float32) / half)  # D/4 frequencies
    _, H, W = (reference or schedule)[-1]
    grid_r = torch.arange(max_side, dtype=torch.float32)[:, None] * theta  # (max_side, D/4)
    angles_grid = torch.cat([grid_r[:, None, :].expand(-1, max_side, -1),
                             grid_r[None, :, :].expand(max_side, -1, -1)], dim=-1)  # (row, col, D/2)
    cs_grid = torch.stack([angles_grid.cos(), angles_grid.sin()])  # (2, row, col, D/2)
    parts = []
    for _, h, w in schedule:
        if mode == 0:
            part = cs_grid[:, :h, :w]
        elif mode == 2:
            r = torch.round(torch.arange(h) * (H / h)).long()
            c = torch.round(torch.arange(w) * (W / w)).long()
            part = cs_grid[:, r][:, :, c]
        elif mode == 1:
            ext_h, ext_w = (max_side, int(max_side / H * W)) if H >= W else (int(max_side / W * H), max_side)
            src = cs_grid[:, :ext_h, :ext_w].permute(0, 3, 1, 2)
            part = F.interpolate(src, size=(h, w), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
        else:
            raise ValueError(mode)
        parts.append(part.reshape(2, h * w, -1))
    table = torch.cat(parts, dim=1)[:, None, None, None]
    return {str(tuple(schedule)): table}
