"""Reference implementation of the rotary family (SPEC §2.3): pyramid coordinates,
frequency layouts and the rotation itself, in plain PyTorch.

Angles are ``angle[l, j] = sum_a coords[l, a] * freqs[a, j]`` in fp32 (optionally per
head), so one apply function covers 1D RoPE (one axis), axial 2D RoPE (Infinity),
M-RoPE (three axes, disjoint sections), InfinityStar's 3D RoPE (``infinitystar_*``)
and RoPE-Mixed (dense learnable freqs). HART's 2D embedding gives the two elements of
a pair different angles, is not a rotation, and has its own ``hart_rope``.

Conventions (each one is a way to silently differ from the models, SPEC §2.4):

* coordinates are (row, col) per token, rows in raster order, scale after scale;
* ``axial_rope_freqs``: pairs [0, D/4) rotate with the row, [D/4, D/2) with the
  column, ``theta_j = base^(-4j/D)`` computed like Infinity (``1 / base**(2j/(D/2))``
  in fp32);
* pairing ``interleaved``: pair j = dims (2j, 2j+1); ``half``: pair j = dims
  (j, j + D/2); rotation ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)``;
* all math in fp32 with autocast off, outputs cast back to the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .pyramid import Scale
from .pyramid import normalize_scales as _normalize_pyramid

PAIRINGS = ("interleaved", "half")
COORD_MODES = ("raw", "round", "fractional", "corner")


def normalize_scales(scales: Sequence[Scale]) -> Tuple[Tuple[int, int], ...]:
    """``[pn]``, ``[(h, w)]`` or Infinity's ``[(1, h, w)]`` -> tuple of (h, w)."""
    if isinstance(scales, (list, tuple)):
        stripped = []
        for i, s in enumerate(scales):
            if isinstance(s, (tuple, list)) and len(s) == 3:
                if s[0] != 1:  # Infinity's (t, h, w) schedule entries, images only
                    raise ValueError(f"scales[{i}]: (t, h, w) entries need t == 1, got {s!r}")
                s = tuple(s[1:])
            stripped.append(s)
        scales = stripped
    return _normalize_pyramid(scales)


def scale_offsets(scales: Sequence[Scale]) -> Tuple[int, ...]:
    """begin_s of every scale plus the total length L as the last entry."""
    out = [0]
    for h, w in normalize_scales(scales):
        out.append(out[-1] + h * w)
    return tuple(out)


def _axis_coords(n: int, final: int, mode: str, corner_scale: float) -> torch.Tensor:
    """Coordinates of rows 0..n-1 of a side of length n when the final side is ``final``."""
    idx = torch.arange(n, dtype=torch.float64)
    if mode == "raw":
        return idx.float()
    if mode == "round":
        # Infinity: (arange(n) * (final / n)).round() -> the ratio is a Python double
        # that torch multiplies in fp32 with the int row; round() is half-to-even.
        ratio = torch.tensor(final / n, dtype=torch.float32)
        return torch.round(idx.float() * ratio)
    if mode == "fractional":
        return (idx * (final / n)).float()
    # corner: the first and last rows of every scale land on 0 and corner_scale. STAR
    # divides the fp32 index by fp32 (n - 1), then multiplies by the fp32 normaliser;
    # same order here so the coordinates are STAR's bit for bit.
    if n == 1:
        return torch.zeros(1, dtype=torch.float32)
    return idx.float() / float(n - 1) * torch.tensor(corner_scale, dtype=torch.float32)


def pyramid_coords(scales: Sequence[Scale], *, mode: str = "raw", final: Optional[Scale] = None,
                   corner_scale: Union[None, float, Tuple[float, float]] = None) -> torch.Tensor:
    """(L, 2) fp32 (row, col) coordinates of the tokens of a scale pyramid.

    ``scales``: ``[pn]`` (square), ``[(h, w)]`` or ``[(1, h, w)]``; tokens are in raster
    order within a scale and scales follow each other coarse to fine. ``final`` is the
    grid the coordinates are mapped to (default: the last scale). ``mode``:

    * ``raw``: (r, c);
    * ``round`` (Infinity's shipped mode): ``round(r * fp32(H/h))``, product in fp32,
      round half to even;
    * ``fractional`` (HART): ``r * H/h`` (exact, then rounded to fp32);
    * ``corner`` (STAR): ``r / (h-1) * n`` (0 when the side is 1) with
      ``n = corner_scale``: a number or a (rows, cols) pair, default (H-1, W-1);
      computed like STAR's ``t / t.max() * rope_norm`` (fp32 quotient, then fp32
      product).
    """
    if mode not in COORD_MODES:
        raise ValueError(f"mode must be one of {COORD_MODES}, got {mode!r}")
    hw = normalize_scales(scales)
    H, W = hw[-1] if final is None else normalize_scales([final])[0]
    if corner_scale is not None and mode != "corner":
        raise ValueError(f"corner_scale is only used by mode='corner', got mode={mode!r}")
    if corner_scale is None:
        n_row, n_col = float(H - 1), float(W - 1)
    elif isinstance(corner_scale, (tuple, list)):
        if len(corner_scale) != 2:
            raise ValueError(f"corner_scale must be a number or a (rows, cols) pair, got {corner_scale!r}")
        n_row, n_col = (float(v) for v in corner_scale)
    else:
        n_row = n_col = float(corner_scale)
    parts = []
    for h, w in hw:
        rows = _axis_coords(h, H, mode, n_row)
        cols = _axis_coords(w, W, mode, n_col)
        # meshgrid 'ij': the row index is the slow one (raster order).
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
        parts.append(grid.reshape(h * w, 2))
    return torch.cat(parts, dim=0).to(torch.float32).contiguous()


def _check_head_dim(head_dim: int, multiple: int = 2) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
    if head_dim <= 0 or head_dim % multiple:
        raise ValueError(f"head_dim must be a positive multiple of {multiple}, got {head_dim}")


def _inv_freq(num: int, denom: int, base: float) -> torch.Tensor:
    """``1 / base**(2i/denom)`` for i < num, in fp32 the way HF / Infinity compute it."""
    if not (isinstance(base, (int, float)) and base > 0):
        raise ValueError(f"base must be a positive number, got {base!r}")
    return 1.0 / (base ** (torch.arange(0, 2 * num, 2, dtype=torch.int64).float() / denom))


AXIAL_FIRST = ("row", "col")


def axial_rope_freqs(head_dim: int, *, base: float = 10000.0, first: str = "row") -> torch.Tensor:
    """(2, D/2) fp32 axial 2D frequencies; row 0 multiplies the row coordinate, row 1
    the column coordinate. ``base^(-4j/D)`` sits on pairs [0, D/4) of the axis named
    by ``first`` and on pairs [D/4, D/2) of the other one, zeros elsewhere:
    ``first="row"`` is Infinity's layout, ``first="col"`` RoPE-ViT's axial one (x
    first, with ``base=100``). Needs D % 4 == 0."""
    if first not in AXIAL_FIRST:
        raise ValueError(f"first must be one of {AXIAL_FIRST}, got {first!r}")
    _check_head_dim(head_dim, 4)
    quarter = head_dim // 4
    theta = _inv_freq(quarter, head_dim // 2, base)  # base^(-2i/(D/2)) = base^(-4i/D)
    freqs = torch.zeros(2, head_dim // 2, dtype=torch.float32)
    lead = 0 if first == "row" else 1
    freqs[lead, :quarter] = theta
    freqs[1 - lead, quarter:] = theta
    return freqs


def rope_1d_freqs(head_dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """(1, D/2) fp32 standard 1D RoPE frequencies ``base^(-2j/D)``."""
    _check_head_dim(head_dim)
    return _inv_freq(head_dim // 2, head_dim, base)[None]


def mrope_freqs(head_dim: int, sections: Sequence[int], *, base: float = 10000.0) -> torch.Tensor:
    """(len(sections), D/2) fp32 M-RoPE frequencies (Qwen2-VL): the 1D frequencies
    ``base^(-2j/D)`` split into contiguous sections of pairs, section a rotating with
    axis a (e.g. (t, h, w) with sections (16, 24, 24) for D = 128), zeros elsewhere.
    Use it with ``pairing="half"`` to match Qwen2-VL."""
    _check_head_dim(head_dim)
    sections = tuple(sections)
    if not sections or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sections):
        raise ValueError(f"sections must be non-negative ints, got {sections!r}")
    if sum(sections) != head_dim // 2:
        raise ValueError(f"sections must sum to head_dim // 2 = {head_dim // 2}, got {sections!r} "
                         f"(sum {sum(sections)})")
    inv = _inv_freq(head_dim // 2, head_dim, base)
    freqs = torch.zeros(len(sections), head_dim // 2, dtype=torch.float32)
    start = 0
    for a, s in enumerate(sections):
        freqs[a, start:start + s] = inv[start:start + s]
        start += s
    return freqs


def rope_mixed_freqs(num_heads: int, head_dim: int, *, theta: float = 10.0, rotate: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(H, 2, D/2) fp32 initial RoPE-Mixed frequencies (Heo et al. 2024), axes (row, col).

    Per head a random direction phi (uniform in [0, 2 pi) when ``rotate``, else 0);
    magnitudes ``theta^(-4i/D)`` for i < D/4. Pairs [0, D/4) get direction phi, pairs
    [D/4, D/2) direction phi + pi/2; the column (x) frequency is ``mag * cos(dir)``,
    the row (y) frequency ``mag * sin(dir)``. Learnable: wrap it in an nn.Parameter.

    RoPE-ViT checkpoints hold one block's frequencies as (2, H, D/2) ordered (x, y),
    i.e. (column, row); this layout is ``theirs.flip(0).transpose(0, 1)``."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    _check_head_dim(head_dim, 4)
    quarter = head_dim // 4
    mag = _inv_freq(quarter, head_dim // 2, theta).double()
    if rotate:
        phi = torch.rand(num_heads, 1, generator=generator, dtype=torch.float64) * (2 * math.pi)
    else:
        phi = torch.zeros(num_heads, 1, dtype=torch.float64)
    direction = torch.cat([phi.expand(-1, quarter), (phi + math.pi / 2).expand(-1, quarter)], dim=1)
    mag = torch.cat([mag, mag])
    row = mag * torch.sin(direction)
    col = mag * torch.cos(direction)
    return torch.stack([row, col], dim=1).float()


INFINITYSTAR_TIME = ("frames", "tower")


def infinitystar_rope_freqs(head_dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """(3, D/2) fp32 frequencies of InfinityStar's 3D RoPE, axes (t, h, w); use with
    ``infinitystar_coords`` and ``pairing="interleaved"``.

    ``F = ceil(D/2 / 3)`` frequencies ``base^(-i/F)`` (exponent i/F, not 2i/F) per
    axis; when 3F exceeds D/2 the last frequency of some axes is dropped: by one, t
    loses it; by two, h and w do. The pairs are three contiguous sections
    [t | h | w], each starting at the highest frequency, zeros elsewhere."""
    _check_head_dim(head_dim)
    pairs = head_dim // 2
    num = -(-pairs // 3)
    if not (isinstance(base, (int, float)) and base > 0):
        raise ValueError(f"base must be a positive number, got {base!r}")
    inv = 1.0 / (base ** (torch.arange(num, dtype=torch.int64).float() / num))
    drop = 3 * num - pairs
    sections = {0: (num, num, num), 1: (num - 1, num, num), 2: (num, num - 1, num - 1)}[drop]
    freqs = torch.zeros(3, pairs, dtype=torch.float32)
    start = 0
    for a, n in enumerate(sections):
        freqs[a, start:start + n] = inv[:n]
        start += n
    return freqs


def _check_thw_schedule(schedule) -> Tuple[Tuple[int, int, int], ...]:
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError("schedule must be a non-empty sequence of (t, h, w) triples")
    out = []
    for i, s in enumerate(schedule):
        if (not isinstance(s, (list, tuple)) or len(s) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in s)):
            raise ValueError(f"schedule[{i}] must be a (t, h, w) triple of positive ints, got {s!r}")
        out.append(tuple(s))
    return tuple(out)


def infinitystar_coords(schedule: Sequence[Tuple[int, int, int]], *, time: str = "frames",
                        steps_per_frame: int = 4) -> torch.Tensor:
    """(L, 3) fp32 (t, h, w) coordinates of the tokens of an InfinityStar scale
    schedule ``[(t, h, w), ...]`` (its ``image_scales`` or ``video_scales``), as its
    ``precompute_rope3d_freqs_grid`` with ``rope2d_normalized_by_hw=2`` indexes them.

    Tokens of a scale are in (t, h, w) raster order, scales follow each other. h and w
    are Infinity's ``round`` mode onto the last scale of the schedule (``pyramid_coords``
    mode ``"round"``). The time index, ``time``:

    * ``"frames"``: the frame index 0..t-1 within every scale (an image schedule, all
      t == 1, gets t = 0 everywhere, which is what InfinityStar uses for images);
    * ``"tower"`` (its ``infinity_video_tower`` schedules): one index per scale,
      ``max(ceil((s - s_full) / steps_per_frame), 0)``, s_full the first scale whose
      (h, w) equals the last one's.
    """
    schedule = _check_thw_schedule(schedule)
    if time not in INFINITYSTAR_TIME:
        raise ValueError(f"time must be one of {INFINITYSTAR_TIME}, got {time!r}")
    if isinstance(steps_per_frame, bool) or not isinstance(steps_per_frame, int) or steps_per_frame < 1:
        raise ValueError(f"steps_per_frame must be a positive int, got {steps_per_frame!r}")
    hw_final = schedule[-1][1:]
    s_full = next(s for s, (_, h, w) in enumerate(schedule) if (h, w) == hw_final)
    parts = []
    for s, (t, h, w) in enumerate(schedule):
        if time == "frames":
            frames = torch.arange(t, dtype=torch.float32)
        else:
            frames = torch.full((t,), float(max(-((s_full - s) // steps_per_frame), 0)))
        rows = _axis_coords(h, hw_final[0], "round", 0.0)
        cols = _axis_coords(w, hw_final[1], "round", 0.0)
        grid = torch.stack(torch.meshgrid(frames, rows, cols, indexing="ij"), dim=-1)
        parts.append(grid.reshape(t * h * w, 3))
    return torch.cat(parts, dim=0).contiguous()


def infinitystar_rope4d_freqs(head_dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """(4, D/2) fp32 frequencies of InfinityStar's shipped 4D RoPE
    (``precompute_rope4d_freqs_grid``), axes (scale, t, h, w); use with
    ``infinitystar_coords4d`` / ``infinitystar_text_coords4d`` and
    ``pairing="interleaved"``.

    D/2 must be a multiple of 4 (InfinityStar asserts it): ``F = D/8`` frequencies
    ``base^(-i/F)`` per axis, the pairs four contiguous sections [scale | t | h | w],
    each starting at the highest frequency, zeros elsewhere."""
    _check_head_dim(head_dim, multiple=8)
    if not (isinstance(base, (int, float)) and base > 0):
        raise ValueError(f"base must be a positive number, got {base!r}")
    pairs = head_dim // 2
    num = pairs // 4
    inv = 1.0 / (base ** (torch.arange(num, dtype=torch.int64).float() / num))
    freqs = torch.zeros(4, pairs, dtype=torch.float32)
    for a in range(4):
        freqs[a, a * num:(a + 1) * num] = inv
    return freqs


def _check_nonneg_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return v


def infinitystar_coords4d(scale: Tuple[int, int, int], final: Tuple[int, int, int], *, frames: Sequence[int],
                          scale_index: int, text_maxlen: int) -> torch.Tensor:
    """(t*h*w, 4) fp32 (scale, t, h, w) coordinates of the visual tokens of one
    InfinityStar scale ``(t, h, w)``, as its ``get_visual_rope_embeds`` builds them
    for the 4D cache: every token of the scale has scale coordinate
    ``text_maxlen + scale_index`` (its repeated-scale counter ``real_sid``; the
    scale axis continues after the text positions); frame ``frames[i]`` for the
    i-th frame of the scale (``range(frame_ss, frame_ee)``, or the interactive
    schedules' ``t_list``); h and w in Infinity's ``round`` mode onto ``final``'s
    (h, w). Tokens in (t, h, w) raster order."""
    for name, v in (("scale", scale), ("final", final)):
        if (not isinstance(v, (tuple, list)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v)):
            raise ValueError(f"{name} must be a (t, h, w) triple of positive ints, got {v!r}")
    t, h, w = scale
    frames = [_check_nonneg_int("frames[i]", f) for f in frames]
    if len(frames) != t:
        raise ValueError(f"frames must give one index per frame of the scale (t = {t}), got {len(frames)}")
    s = float(_check_nonneg_int("text_maxlen", text_maxlen) + _check_nonneg_int("scale_index", scale_index))
    grid = torch.stack(torch.meshgrid(torch.full((1,), s), torch.tensor(frames, dtype=torch.float32),
                                      _axis_coords(h, final[1], "round", 0.0),
                                      _axis_coords(w, final[2], "round", 0.0), indexing="ij"), dim=-1)
    return grid.reshape(t * h * w, 4).contiguous()


def infinitystar_text_coords4d(length: int) -> torch.Tensor:
    """(length, 4) fp32 coordinates of InfinityStar's text tokens in the 4D cache
    (``freqs_text``): scale coordinate = the text position 0..length-1, t = h = w = 0."""
    coords = torch.zeros(_check_nonneg_int("length", length), 4, dtype=torch.float32)
    coords[:, 0] = torch.arange(length, dtype=torch.float32)
    return coords


def hart_rope_tables(positions: torch.Tensor, head_dim: int, *,
                     base: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """HART's fp32 per-element cos / sin tables, (L, D) or (B, L, D) like ``positions``
    (row, col): angles ``[row*theta | row*theta | col*theta | col*theta]`` in blocks of
    D/4, ``theta_i = base^(-4i/D)`` computed like HART (``arange(0, D, 4) / D``)."""
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 4:
        raise ValueError(f"head_dim must be a positive multiple of 4, got {head_dim!r}")
    if not isinstance(positions, torch.Tensor) or positions.dim() not in (2, 3) or positions.shape[-1] != 2:
        raise ValueError(f"positions must be (L, 2) or (B, L, 2) (row, col), got "
                         f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions)}")
    if not (isinstance(base, (int, float)) and base > 0):
        raise ValueError(f"base must be a positive number, got {base!r}")
    device_type = positions.device.type if positions.device.type in ("cuda", "cpu", "xpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        theta = 1.0 / (base ** (torch.arange(0, head_dim, 4, dtype=torch.int64).float() / head_dim))
        pos = positions.float()
        theta = theta.to(pos.device)
        row = pos[..., 0:1] * theta  # (..., L, D/4)
        col = pos[..., 1:2] * theta
        emb = torch.cat([row, row, col, col], dim=-1)
        return emb.cos(), emb.sin()


def hart_rope(q: torch.Tensor, k: Optional[torch.Tensor], positions: torch.Tensor, *,
              base: float = 10000.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """HART's 2D "rotary" embedding of its image tokens, reproduced exactly (its torch
    path ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``; the fused CUDA
    ``FusedLlamaRotaryEmbedding2DWithPos`` feeds the same per-element angles to a
    rotate-half kernel).

    q (B, H, L, D), k likewise or None; positions (L, 2) or (B, L, 2) (row, col), e.g.
    ``pyramid_coords(patch_nums, mode="fractional")``. With ``theta_i = base^(-4i/D)``,
    i < D/4, every element d of the head gets its own angle ``e[d]``, in blocks of D/4:
    ``[row*theta | row*theta | col*theta | col*theta]`` (``hart_rope_tables``), and

        out[d]       = x[d]       cos e[d]       - x[d + D/2] sin e[d]        d < D/2
        out[d + D/2] = x[d + D/2] cos e[d + D/2] + x[d]       sin e[d + D/2]

    The two partners of a rotate-half pair get different angles (row vs column), so this
    is not a rotation (the 2x2 map has determinant cos(e[d] - e[d + D/2]); norms are
    not kept and scores are not functions of relative position alone) and no
    ``apply_rope`` (coords, freqs) expresses it; it is one when row == col. Like HART,
    angles and cos / sin are fp32, then cos / sin are rounded to the input's dtype
    and the products are taken in it."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    head_dim = q.shape[-1]
    if head_dim % 4:
        raise ValueError(f"q's head dim must be a multiple of 4, got {head_dim}")
    if k is not None and (k.dim() != 4 or k.shape[-1] != head_dim or k.shape[-2] != q.shape[-2]):
        raise ValueError(f"k must be (B, H, L, {head_dim}) with L = {q.shape[-2]}, got {tuple(k.shape)}")
    if positions.dim() not in (2, 3) or positions.shape[-1] != 2 or positions.shape[-2] != q.shape[-2]:
        raise ValueError(f"positions must be (L, 2) or (B, L, 2) with L = {q.shape[-2]}, "
                         f"got {tuple(positions.shape)}")
    cos, sin = hart_rope_tables(positions, head_dim, base=base)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]  # (B|1, 1, L, D)
    device_type = q.device.type if q.device.type in ("cuda", "cpu", "xpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        def _apply(x: torch.Tensor) -> torch.Tensor:
            half = head_dim // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

        return _apply(q), (None if k is None else _apply(k))


def rope_angles(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """fp32 rotation angles ``sum_a coords[..., l, a] * freqs[..., a, j]``.

    coords (L, A) or (B, L, A); freqs (A, P) or per head (H, A, P). Returns a tensor
    that broadcasts against (B, H, L, P): (1, 1, L, P), (B, 1, L, P), (1, H, L, P)
    or (B, H, L, P). (float64 inputs give float64 angles, for gradcheck.)"""
    dtype = torch.promote_types(torch.promote_types(coords.dtype, freqs.dtype), torch.float32)
    c = coords.to(dtype)
    f = freqs.to(dtype)
    if c.dim() == 2:
        c = c[None]
    c = c[:, None, :, :, None]  # (B|1, 1, L, A, 1)
    f = f[None, None, None] if f.dim() == 2 else f[None, :, None]  # (1, H|1, 1, A, P)
    return (c * f).sum(dim=-2)


def _split_pairs(t: torch.Tensor, pairing: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first and second elements of the pairs of the last dim."""
    if pairing == "interleaved":
        return t[..., 0::2], t[..., 1::2]
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "interleaved") -> torch.Tensor:
    """Rotates the pairs of the last dim of ``x`` (..., D) by angles whose cos / sin
    broadcast against (..., D/2); the result has x's dtype, math in fp32 (or wider).

    Full-width cos / sin (last dim D) give each element its own entry, split into
    pairs like x: ``y0 = x0 cos0 - x1 sin0``, ``y1 = x0 sin1 + x1 cos1`` -- with
    pairing "half" that is HF's ``x * cos + rotate_half(x) * sin``."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    xf = x.to(torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32))
    x0, x1 = _split_pairs(xf, pairing)
    if cos.shape[-1] == x.shape[-1] and x.shape[-1] > 1:
        (c0, c1), (s0, s1) = _split_pairs(cos, pairing), _split_pairs(sin, pairing)
    else:
        c0 = c1 = cos
        s0 = s1 = sin
    y0 = x0 * c0 - x1 * s0
    y1 = x0 * s1 + x1 * c1
    if pairing == "interleaved":
        y = torch.stack([y0, y1], dim=-1).flatten(-2)
    else:
        y = torch.cat([y0, y1], dim=-1)
    return y.to(x.dtype)


def apply_rope(q: torch.Tensor, k: Optional[torch.Tensor], coords: torch.Tensor, freqs: torch.Tensor, *,
               pairing: str = "interleaved") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotates q (B, Hq, L, D) and k (B, Hk, L, D) (or None) by the angles of
    ``rope_angles(coords, freqs)``; per-head freqs (H, A, D/2) need Hq == Hk == H.
    Differentiable in q, k and freqs; outputs in the input dtypes."""
    device_type = q.device.type if q.device.type in ("cuda", "cpu", "xpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        angles = rope_angles(coords, freqs)
        cos, sin = torch.cos(angles), torch.sin(angles)
        q_out = rotate(q, cos, sin, pairing)
        k_out = None if k is None else rotate(k, cos, sin, pairing)
    return q_out, k_out


def apply_rope_table(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, *,
                     pairing: str = "interleaved") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotates q and k by per-token tables instead of angles: pair j of token l
    becomes ``(x0 cos[l, j] - x1 sin[l, j], x0 sin[l, j] + x1 cos[l, j])``. cos and sin
    (L, D/2) or (B, L, D/2), any float dtype, applied in fp32; they need not satisfy
    cos^2 + sin^2 = 1 (Infinity's mode-1 tables are resampled, not rotations).
    Full-width tables (L, D) or (B, L, D) hold one entry per element, split into
    pairs like q (HF-style caches; HART's per-element angles): see ``rotate``.
    Differentiable in q and k."""
    device_type = q.device.type if q.device.type in ("cuda", "cpu", "xpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        wide = torch.promote_types(torch.promote_types(cos.dtype, sin.dtype), torch.float32)
        c, s = cos.to(wide), sin.to(wide)
        c, s = (c[:, None], s[:, None]) if c.dim() == 3 else (c, s)  # (B, 1, L, P) or (L, P)
        q_out = rotate(q, c, s, pairing)
        k_out = None if k is None else rotate(k, c, s, pairing)
    return q_out, k_out
