"""``PyramidPosLevelEmbedding``: VAR's pyramid position + level embedding as a module."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _checks
from ..ops.pyramid import pyramid_pos_level_add
from ..reference.pyramid import Scale, normalize_scales, pyramid_length

TABLES = ("learned", "sincos", "mixed")


class PyramidPosLevelEmbedding(nn.Module):
    """Adds the pyramid position and level embeddings to VAR token embeddings.

    State dict keys match VAR: ``pos_1LC`` (1, L, C) and ``lvl_embed.weight`` (S, C),
    both initialised trunc-normal with std sqrt(1 / (3C)) as in VAR, so VAR
    checkpoints load as they are.

    Args:
        embed_dim: C.
        patch_nums: the scales, coarse to fine (``[pn]`` or ``[(h, w)]``).
        table: ``"learned"`` (VAR: ``pos_1LC``), ``"sincos"`` (the fixed 2D sinusoidal
            pyramid table, generated inside the kernels: no table in memory and no
            ``pos_1LC`` parameter) or ``"mixed"`` (``mix_alpha * learned +
            (1 - mix_alpha) * fixed``).
        mix_alpha: weight of the learned table in ``mixed``.
        backend: default backend of this module's calls (None: the global choice).

    ``forward(x, start=0)``: x (B, n, C) holds pyramid tokens ``[start, start + n)``:
    the whole pyramid in training, one scale (``start = begin_s``) in inference.
    """

    def __init__(self, embed_dim: int, patch_nums: Sequence[Scale], table: str = "learned",
                 mix_alpha: float = 0.7, *, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        _checks.check_positive_int("embed_dim", embed_dim)
        if table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, got {table!r}")
        if not 0.0 <= mix_alpha <= 1.0:
            raise ValueError(f"mix_alpha must lie in [0, 1], got {mix_alpha}")
        if table != "learned" and embed_dim % 2:
            raise ValueError(f"table={table!r} needs an even embed_dim, got {embed_dim}")
        self.embed_dim = embed_dim
        self.patch_nums = normalize_scales(patch_nums)
        self.table = table
        self.mix_alpha = float(mix_alpha)
        self.backend = backend
        L, S = pyramid_length(self.patch_nums), len(self.patch_nums)
        factory = {"device": device, "dtype": dtype}
        if table == "sincos":
            self.register_parameter("pos_1LC", None)
        else:
            self.pos_1LC = nn.Parameter(torch.empty(1, L, embed_dim, **factory))
        self.lvl_embed = nn.Embedding(S, embed_dim, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = math.sqrt(1.0 / self.embed_dim / 3.0)
        if self.pos_1LC is not None:
            nn.init.trunc_normal_(self.pos_1LC, mean=0.0, std=std)
        nn.init.trunc_normal_(self.lvl_embed.weight, mean=0.0, std=std)

    @property
    def weights(self):
        """(pos_weight, sincos_weight) of this table."""
        return {"learned": (1.0, 0.0), "sincos": (0.0, 1.0),
                "mixed": (self.mix_alpha, 1.0 - self.mix_alpha)}[self.table]

    def forward(self, x: torch.Tensor, start: int = 0, *, backend: Optional[str] = None) -> torch.Tensor:
        pos_weight, sincos_weight = self.weights
        return pyramid_pos_level_add(x, self.pos_1LC, self.lvl_embed.weight, self.patch_nums, start=start,
                                     pos_weight=pos_weight, sincos_weight=sincos_weight,
                                     backend=backend if backend is not None else self.backend)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, patch_nums={list(self.patch_nums)}, table={self.table!r}"
        return s + (f", mix_alpha={self.mix_alpha}" if self.table == "mixed" else "")
