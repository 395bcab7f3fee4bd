"""``PyramidRoPE``: 2D rotary position embedding of a scale pyramid as a module."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..ops.rope import apply_rope, apply_rope_
from ..reference.rope import (COORD_MODES, PAIRINGS, Scale, axial_rope_freqs, normalize_scales, pyramid_coords,
                              rope_mixed_freqs, scale_offsets)

Schedule = Tuple[Tuple[int, int], ...]


class PyramidRoPE(nn.Module):
    """Rotates q and k of the tokens of a scale pyramid (Infinity, STAR, HART) or of
    one grid (ViTs: a one-scale schedule).

    Args:
        head_dim: D (a multiple of 4).
        scales: the default schedule, coarse to fine: ``[pn]``, ``[(h, w)]`` or
            Infinity's ``[(1, h, w)]``.
        mode: coordinate mode of ``pyramid_coords`` (Infinity ships ``"round"``).
        final: grid the coordinates map to (default: the last scale); Infinity maps
            every schedule of an aspect ratio onto its largest one.
        corner_scale: normaliser of ``mode="corner"``.
        base: frequency base of the axial layout.
        first: the axis of the first quarter of the pairs in the axial layout: "row"
            (Infinity) or "col" (RoPE-ViT's axial variant).
        num_heads: with ``mixed=True``, the number of heads of the learnable per-head
            frequencies (RoPE-Mixed, initialised by ``rope_mixed_freqs``).
        mixed_theta: magnitude base of RoPE-Mixed.
        prefix_tokens: tokens before the pyramid (e.g. a class token) that get position
            (0, 0), i.e. are not rotated.
        pairing: ``"interleaved"`` (Infinity) or ``"half"``.
        backend: default backend of this module's calls.

    ``forward(q, k, scale_index=None, scales=None, inplace=False)``: q (B, Hq, n, D),
    k (B, Hk, n, D) or None. ``scale_index=None`` rotates the whole sequence
    (training, n = L); ``scale_index=s`` rotates the tokens of scale s only at their
    absolute positions ``begin_s ...`` (KV-cached inference; any batch, e.g. doubled
    for classifier-free guidance). ``scales`` selects another schedule (dynamic
    resolution); its coordinates are built once per schedule and device.

    State dict: nothing for the fixed axial frequencies and nothing for coordinates
    (both are rebuilt from the arguments); RoPE-Mixed's ``freqs`` parameter.
    """

    def __init__(self, head_dim: int, scales: Sequence[Scale], *, mode: str = "round",
                 final: Optional[Scale] = None, corner_scale: Union[None, float, Tuple[float, float]] = None,
                 base: float = 10000.0, num_heads: Optional[int] = None, mixed: bool = False,
                 mixed_theta: float = 10.0, prefix_tokens: int = 0, pairing: str = "interleaved",
                 first: str = "row", backend: Optional[str] = None, device=None) -> None:
        super().__init__()
        if mode not in COORD_MODES:
            raise ValueError(f"mode must be one of {COORD_MODES}, got {mode!r}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be a non-negative int, got {prefix_tokens!r}")
        self.head_dim = head_dim
        self.mode = mode
        self.final = final
        self.corner_scale = corner_scale
        self.prefix_tokens = prefix_tokens
        self.pairing = pairing
        self.backend = backend
        self.mixed = mixed
        self.base = base
        self.first = first
        if mixed and first != "row":
            raise ValueError("first chooses the axial layout; RoPE-Mixed (mixed=True) learns its own directions")
        if mixed:
            if num_heads is None:
                raise ValueError("mixed=True needs num_heads (the frequencies are learned per head)")
            self.freqs = nn.Parameter(rope_mixed_freqs(num_heads, head_dim, theta=mixed_theta).to(device))
        else:
            self.register_buffer("freqs", self._axial_freqs().to(device), persistent=False)
        self.scales: Schedule = normalize_scales(scales)
        self.register_buffer("coords", self._build(self.scales, device), persistent=False)
        self._extra: Dict[Tuple[Schedule, torch.device], torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        # Positions and fixed frequencies stay fp32 whatever dtype the model is cast
        # to (a bf16 model would otherwise round theta and the coordinates).
        super()._apply(fn, recurse)
        if self.coords.dtype != torch.float32:
            self.coords = self._build(self.scales, self.coords.device)
        if not self.mixed and self.freqs.dtype != torch.float32:
            self.freqs = self._axial_freqs().to(self.freqs.device)
        return self

    def _axial_freqs(self) -> torch.Tensor:
        return axial_rope_freqs(self.head_dim, base=self.base, first=self.first)

    def _build(self, scales: Schedule, device) -> torch.Tensor:
        coords = pyramid_coords(scales, mode=self.mode, final=self.final, corner_scale=self.corner_scale)
        if self.prefix_tokens:
            coords = torch.cat([coords.new_zeros(self.prefix_tokens, 2), coords])
        return coords.to(device)

    def coords_for(self, scales: Optional[Sequence[Scale]] = None) -> Tuple[torch.Tensor, Schedule]:
        """(L, 2) coordinates of a schedule (default: the module's) on the module's device."""
        if scales is None:
            return self.coords, self.scales
        sched = normalize_scales(scales)
        if sched == self.scales:
            return self.coords, sched
        key = (sched, self.coords.device)
        if key not in self._extra:
            self._extra[key] = self._build(sched, self.coords.device)
        return self._extra[key], sched

    def forward(self, q: torch.Tensor, k: Optional[torch.Tensor], scale_index: Optional[int] = None,
                scales: Optional[Sequence[Scale]] = None,
                inplace: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        coords, sched = self.coords_for(scales)
        if scale_index is not None:
            S = len(sched)
            if isinstance(scale_index, bool) or not isinstance(scale_index, int) or not 0 <= scale_index < S:
                raise ValueError(f"scale_index must be an int in [0, {S}), got {scale_index!r}")
            offsets = scale_offsets(sched)
            # The prefix tokens travel with the first scale.
            begin = 0 if scale_index == 0 else self.prefix_tokens + offsets[scale_index]
            end = self.prefix_tokens + offsets[scale_index + 1]
            coords = coords[begin:end]
        fn = apply_rope_ if inplace else apply_rope
        return fn(q, k, coords, self.freqs, pairing=self.pairing, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, scales={len(self.scales)} ({self.coords.shape[0]} tokens), "
                f"mode={self.mode!r}, pairing={self.pairing!r}, mixed={self.mixed}")
