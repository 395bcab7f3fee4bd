"""Reference for the additive position encodings of the wider VAR / ViT family, in plain PyTorch.

Every kind is an embedding made per token from its (scale, row, col) and added to x.
Tokens are those of a pyramid of scales (a flat grid is a pyramid of one scale),
coarse to fine, raster order within a scale, optionally after ``num_prefix_tokens``
prefix tokens (class tokens) that get no embedding (MAE's zero class row). Token
(s, r, c) lies in a scale of h x w tokens; C is the embedding width.

Fixed kinds (no parameters; the kernels generate them, no table in memory):

* ``mae`` -- MAE / DiT / open_clip ``get_2d_sincos_pos_embed``: channels
  [0, C/2) from the column c, [C/2, C) from the row r, each half [sin | cos] of
  ``p * omega_i``, ``omega_i = T^(-i / (C/4))``, i < C/4. C % 4 == 0.
* ``timm`` -- timm ``build_sincos2d_pos_embed``: ``bands_i = T^(-i / (C/4))``;
  axis 0 / axis 1 are (r, c); blocks [sin a0 | sin a1 | cos a0 | cos a1], or with
  ``interleave`` [sin a0 | cos a0 | sin a1 | cos a1]. ``reverse_coord`` builds the
  grid over (w, h) instead: the table row t = r * w + c then has a0 = t // h,
  a1 = t % h (what timm's flattening gives; equal to (r, c) on square grids). C % 4 == 0.
* ``sincos_pyramid`` -- this package's pyramid table (SPEC 2.1): [0, C/2) from the
  row, [C/2, C) from the column, each half interleaved ``pe[2i] = sin(p w_i)``,
  ``pe[2i+1] = cos(p w_i)``, ``w_i = T^(-2i / (C/2))``. C even.
* ``sincos_1d`` -- Vaswani et al.: position p = index of the token among the
  non-prefix tokens (the pyramid flattened), ``w_i = T^(-2i / C)``; ``interleave``:
  ``pe[2i] = sin, pe[2i+1] = cos``; else [sin | cos] blocks. C even.
* ``detr`` -- DETR ``PositionEmbeddingSine`` with C = 2 * num_pos_feats: 1-based
  coordinates y = r + 1, x = c + 1 (the cumulative sums of the not-padding mask,
  per image when ``mask`` is given); ``normalize``: ``y / (y_last + 1e-6) * scale``;
  ``dim_t[k] = T^(2 (k // 2) / (C/2))``; channels [0, C/2) from y, [C/2, C) from x,
  ``sin(p / dim_t[k])`` on even k and ``cos`` on odd k. C % 4 == 0.
* ``sam`` -- SAM ``PositionEmbeddingRandom``: u = (c + 0.5) / w, v = (r + 0.5) / h,
  mapped to [-1, 1]; ``a_j = 2 pi (x G[0, j] + y G[1, j])`` with the Gaussian matrix
  G (2, C/2); channels [sin a | cos a].

Learned kinds (gradients flow to the tables):

* ``flexvar`` -- FlexVAR: a grid (1, C, Gh, Gw) resized per scale with
  ``F.interpolate(mode="area")`` (adaptive average pooling) and added.
* ``navit`` -- NaViT factorized: ``row[r] + col[c]`` with tables (max_h, C),
  (max_w, C); ``fractional`` (the NaViT paper's fractional coordinates r / h scaled
  to the table): indices ``floor(r * max_h / h)``, ``floor(c * max_w / w)`` computed
  exactly in integers, which equals the fp32 ``(r / h * max_len).floor()`` of float
  implementations for every side up to 64 and max_len 16, 32, 64 (tested).
* ``pix2struct`` -- Pix2Struct: ``row[r + 1] + col[c + 1]`` (1-based ids; 0 is the
  padding id of the image processor).

``T`` is ``temperature`` (10000 by default). The op adds the table rows of tokens
``[start, start + n)`` to x (B, n, C), summing in fp32 (float64 for float64 input);
the result has x's dtype promoted with the learned tables' dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .pyramid import Scale, normalize_scales

FIXED_KINDS = ("mae", "timm", "sincos_pyramid", "sincos_1d", "detr", "sam")
LEARNED_KINDS = ("flexvar", "navit", "pix2struct")
KINDS = FIXED_KINDS + LEARNED_KINDS
# How many tables each learned kind takes, and what they are called in errors.
TABLE_NAMES = {"flexvar": ("grid",), "navit": ("row_table", "col_table"), "pix2struct": ("row_table", "col_table")}


def scale_tokens(h: int, w: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, col) int64 of the h * w tokens of one scale, raster order."""
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    return r, c


def _sinusoid_1d(p: torch.Tensor, freqs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    a = p[:, None] * freqs[None, :]
    return torch.sin(a), torch.cos(a)


def _interleave(s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.stack([s, c], dim=-1).flatten(-2)


def _fixed_scale(kind: str, h: int, w: int, C: int, first: int, opts: dict, gaussian, device) -> torch.Tensor:
    """The (h * w, C) float64 table of one scale; ``first`` = flat index of its first token."""
    f64 = torch.float64
    T = float(opts["temperature"])
    r, c = scale_tokens(h, w, device)
    r, c = r.to(f64), c.to(f64)
    if kind == "mae":
        omega = T ** (-torch.arange(C // 4, dtype=f64, device=device) / (C // 4))
        sc, cc = _sinusoid_1d(c, omega)
        sr, cr = _sinusoid_1d(r, omega)
        return torch.cat([sc, cc, sr, cr], dim=1)
    if kind == "timm":
        bands = T ** (-torch.arange(C // 4, dtype=f64, device=device) / (C // 4))
        if opts["reverse_coord"]:
            t = r * w + c
            a0, a1 = torch.div(t, h, rounding_mode="floor"), torch.remainder(t, h)
        else:
            a0, a1 = r, c
        s0, c0 = _sinusoid_1d(a0, bands)
        s1, c1 = _sinusoid_1d(a1, bands)
        parts = [s0, c0, s1, c1] if opts["interleave"] else [s0, s1, c0, c1]
        return torch.cat(parts, dim=1)
    if kind == "sincos_pyramid":
        # Channel k of a half: sin (k even) or cos (k odd) of p * w_(k // 2); C/2 may be odd.
        half = C // 2
        k = torch.arange(half, device=device)
        w_k = T ** (-2 * torch.div(k, 2, rounding_mode="floor").to(f64) / half)
        even = k % 2 == 0

        def axis(p):
            a = p[:, None] * w_k
            return torch.where(even, torch.sin(a), torch.cos(a))

        return torch.cat([axis(r), axis(c)], dim=1)
    if kind == "sincos_1d":
        p = first + torch.arange(h * w, dtype=f64, device=device)
        w_i = T ** (-2 * torch.arange(C // 2, dtype=f64, device=device) / C)
        s, co = _sinusoid_1d(p, w_i)
        return _interleave(s, co) if opts["interleave"] else torch.cat([s, co], dim=1)
    if kind == "detr":
        y, x = r + 1, c + 1
        if opts["normalize"]:
            y = y / (h + 1e-6) * opts["scale"]
            x = x / (w + 1e-6) * opts["scale"]
        return _detr_channels(y, x, C, T)
    assert kind == "sam"
    x = 2 * ((c + 0.5) / w) - 1
    y = 2 * ((r + 0.5) / h) - 1
    a = 2 * math.pi * (x[:, None] * gaussian[0].to(f64) + y[:, None] * gaussian[1].to(f64))
    return torch.cat([torch.sin(a), torch.cos(a)], dim=1)


def _detr_channels(y: torch.Tensor, x: torch.Tensor, C: int, T: float) -> torch.Tensor:
    """DETR's channels from coordinate vectors (any leading shape)."""
    npf = C // 2
    k = torch.arange(npf, dtype=torch.float64, device=y.device)
    dim_t = T ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)
    even = (torch.arange(npf, device=y.device) % 2) == 0

    def axis(p):
        a = p[..., None] / dim_t
        return torch.where(even, torch.sin(a), torch.cos(a))

    return torch.cat([axis(y), axis(x)], dim=-1)


def _learned_scale(kind: str, h: int, w: int, tables: Sequence[torch.Tensor], opts: dict, dtype) -> torch.Tensor:
    """The (h * w, C) table of one scale, differentiable in the tables."""
    if kind == "flexvar":
        grid = tables[0].to(dtype)
        grid = grid.reshape(1, *grid.shape[-3:])
        return F.interpolate(grid, size=(h, w), mode="area")[0].flatten(1).t()
    row, col = (t.to(dtype) for t in tables)
    r, c = scale_tokens(h, w, row.device)
    if kind == "pix2struct":
        r, c = r + 1, c + 1
    elif opts["fractional"]:
        r = torch.div(r * row.shape[0], h, rounding_mode="floor")
        c = torch.div(c * col.shape[0], w, rounding_mode="floor")
    return row[r] + col[c]


def pos_embed_table(kind: str, patch_nums: Sequence[Scale], embed_dim: int, *,
                    tables: Sequence[torch.Tensor] = (), gaussian: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None, num_prefix_tokens: int = 0,
                    temperature: float = 10000.0, interleave: bool = False, reverse_coord: bool = False,
                    normalize: bool = False, scale: float = 2 * math.pi, fractional: bool = False,
                    dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
    """The (P + L, C) table of ``kind`` (see the module docstring), prefix rows zero;
    (B, P + L, C) for ``detr`` with a padding ``mask`` (B, h, w) (True = padding).

    Fixed kinds are computed in float64 and cast to ``dtype`` (default float32);
    learned kinds in the tables' dtype (or ``dtype``), differentiable in the tables.
    Arguments are assumed valid (``posenc_fast.pos_embed_table`` checks them)."""
    scales = normalize_scales(patch_nums)
    opts = dict(temperature=temperature, interleave=interleave, reverse_coord=reverse_coord,
                normalize=normalize, scale=scale, fractional=fractional)
    if kind in LEARNED_KINDS:
        dtype = dtype or torch.promote_types(tables[0].dtype, tables[-1].dtype)
        device = tables[0].device
        parts = [_learned_scale(kind, h, w, tables, opts, dtype) for h, w in scales]
    elif kind == "detr" and mask is not None:
        valid = (~mask).to(torch.float64)
        y, x = valid.cumsum(1), valid.cumsum(2)
        if normalize:
            y = y / (y[:, -1:, :] + 1e-6) * scale
            x = x / (x[:, :, -1:] + 1e-6) * scale
        table = _detr_channels(y.flatten(1), x.flatten(1), embed_dim, float(temperature))
        pad = table.new_zeros(table.shape[0], num_prefix_tokens, embed_dim)
        return torch.cat([pad, table], dim=1).to(dtype or torch.float32)
    else:
        if gaussian is not None and device is None:
            device = gaussian.device
        parts, first = [], 0
        for h, w in scales:
            parts.append(_fixed_scale(kind, h, w, embed_dim, first, opts, gaussian, device))
            first += h * w
        dtype = dtype or torch.float32
        parts = [p.to(dtype) for p in parts]
    table = torch.cat(parts, dim=0)
    return torch.cat([table.new_zeros(num_prefix_tokens, table.shape[1]), table], dim=0)


def output_dtype(x: torch.Tensor, tables: Sequence[torch.Tensor]) -> torch.dtype:
    """x's dtype promoted with the learned tables' (fixed kinds keep x's dtype)."""
    dt = x.dtype
    for t in tables:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def pos_embed_add(x: torch.Tensor, kind: str, patch_nums: Sequence[Scale], *, start: int = 0,
                  tables: Sequence[torch.Tensor] = (), gaussian: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None, **opts) -> torch.Tensor:
    """Reference: ``x + table[start:start + n]`` summed in fp32 (float64 for float64)."""
    n, C = x.shape[1], x.shape[2]
    out_dtype = output_dtype(x, tables)
    acc = torch.promote_types(out_dtype, torch.float32)
    table = pos_embed_table(kind, patch_nums, C, tables=tables, gaussian=gaussian, mask=mask, dtype=acc,
                            device=x.device, **opts)
    return (x.to(acc) + table[..., start:start + n, :]).to(out_dtype)
