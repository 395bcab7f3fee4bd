"""nn.Modules for the additive position encodings of the wider family, built on
``pos_embed_add``. Parameter and buffer names, shapes and init follow each upstream
module, so their checkpoints (or the matching sub-dict of them) load unchanged.

Every module's ``forward(x, ...)`` adds the encoding to x (B, n, C), which holds
tokens ``[start, start + n)`` (prefix tokens first, then the pyramid or grid in
raster order), and ``table(...)`` returns the (P + L, C) table (reference math).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _checks
from ..ops.pos_embed import pos_embed_add, pos_embed_table
from ..reference.pyramid import Scale, normalize_scales


def flexvar_grid_init(embed_dim: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """FlexVAR's initial grid (1, C, H, W): channel 2k is sin(row * d_k), channel 2k + 1
    cos(col * d_k), ``d_k = exp(-2k ln(10000) / C)``, computed in fp32."""
    if embed_dim % 2:
        raise ValueError(f"FlexVAR's grid init needs an even embed_dim, got {embed_dim}")
    d = torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float32) * -(math.log(10000.0) / embed_dim))
    rows = torch.arange(height, dtype=torch.float32)[:, None, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :, None]
    grid = torch.zeros(height, width, embed_dim)
    grid[..., 0::2] = torch.sin(rows * d).expand(height, width, -1)
    grid[..., 1::2] = torch.cos(cols * d).expand(height, width, -1)
    return grid.permute(2, 0, 1).unsqueeze(0)


class FlexVARPosEmbedding(nn.Module):
    """FlexVAR's position embedding: the learned grid ``pos_1LC`` (1, C, Gh, Gw),
    area-resized to each scale and added (no level embedding); the area average is
    computed in the kernels. State dict key ``pos_1LC`` as in FlexVAR."""

    def __init__(self, embed_dim: int, patch_nums: Sequence[Scale], grid_size: int = 32, *,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        _checks.check_positive_int("embed_dim", embed_dim)
        _checks.check_positive_int("grid_size", grid_size)
        self.patch_nums = normalize_scales(patch_nums)
        self.backend = backend
        self.pos_1LC = nn.Parameter(flexvar_grid_init(embed_dim, grid_size, grid_size).to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, start: int = 0, *, patch_nums: Optional[Sequence[Scale]] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        """``patch_nums`` overrides the module's scales (FlexVAR samples at any resolution)."""
        return pos_embed_add(x, "flexvar", patch_nums or self.patch_nums, start=start, tables=(self.pos_1LC,),
                             backend=backend or self.backend)

    def table(self, patch_nums: Optional[Sequence[Scale]] = None) -> torch.Tensor:
        return pos_embed_table("flexvar", patch_nums or self.patch_nums, self.pos_1LC.shape[1],
                               tables=(self.pos_1LC,))


class NaViTPosEmbedding(nn.Module):
    """NaViT's factorized position embedding: ``pos_embed_height[r] + pos_embed_width[c]``
    (names, shapes and ``torch.randn`` init as in lucidrains' vit-pytorch NaViT);
    ``fractional`` indexes ``floor(r * max_h / h)`` (the paper's fractional coordinates)."""

    def __init__(self, embed_dim: int, max_height: int, max_width: int, *, fractional: bool = False,
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("max_height", max_height), ("max_width", max_width)):
            _checks.check_positive_int(name, v)
        self.fractional = bool(fractional)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.pos_embed_height = nn.Parameter(torch.randn(max_height, embed_dim, **factory))
        self.pos_embed_width = nn.Parameter(torch.randn(max_width, embed_dim, **factory))

    def forward(self, x: torch.Tensor, patch_nums: Sequence[Scale], start: int = 0, *,
                backend: Optional[str] = None) -> torch.Tensor:
        return pos_embed_add(x, "navit", patch_nums, start=start,
                             tables=(self.pos_embed_height, self.pos_embed_width), fractional=self.fractional,
                             backend=backend or self.backend)

    def table(self, patch_nums: Sequence[Scale]) -> torch.Tensor:
        return pos_embed_table("navit", patch_nums, self.pos_embed_height.shape[1],
                               tables=(self.pos_embed_height, self.pos_embed_width), fractional=self.fractional)


class Pix2StructPosEmbedding(nn.Module):
    """Pix2Struct's 2D learned indexing: ``row_embedder(r + 1) + column_embedder(c + 1)``
    (1-based ids, as its image processor makes them), ``nn.Embedding(seq_len, C)`` each,
    keys ``row_embedder.weight`` / ``column_embedder.weight`` as in HF Pix2StructVisionEmbeddings."""

    def __init__(self, embed_dim: int, seq_len: int = 4096, *, backend: Optional[str] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        _checks.check_positive_int("embed_dim", embed_dim)
        _checks.check_positive_int("seq_len", seq_len)
        self.backend = backend
        self.row_embedder = nn.Embedding(seq_len, embed_dim, device=device, dtype=dtype)
        self.column_embedder = nn.Embedding(seq_len, embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, patch_nums: Sequence[Scale], start: int = 0, *,
                backend: Optional[str] = None) -> torch.Tensor:
        return pos_embed_add(x, "pix2struct", patch_nums, start=start,
                             tables=(self.row_embedder.weight, self.column_embedder.weight),
                             backend=backend or self.backend)

    def table(self, patch_nums: Sequence[Scale]) -> torch.Tensor:
        return pos_embed_table("pix2struct", patch_nums, self.row_embedder.embedding_dim,
                               tables=(self.row_embedder.weight, self.column_embedder.weight))


SINCOS_KINDS = ("mae", "timm", "sincos_pyramid", "sincos_1d")


class SinCosPosEmbedding(nn.Module):
    """A fixed sin-cos encoding (``mae``, ``timm``, ``sincos_pyramid`` or ``sincos_1d``),
    generated in the kernels. ``keep_table=True`` also registers the frozen
    ``pos_embed`` parameter (1, P + L, C) that MAE / DiT / timm models keep, so their
    checkpoints load; it holds the same numbers and the forward does not read it."""

    def __init__(self, embed_dim: int, patch_nums: Sequence[Scale], kind: str = "mae", *,
                 num_prefix_tokens: int = 0, temperature: float = 10000.0, interleave: bool = False,
                 reverse_coord: bool = False, keep_table: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        if kind not in SINCOS_KINDS:
            raise ValueError(f"kind must be one of {SINCOS_KINDS}, got {kind!r}")
        self.embed_dim, self.kind = embed_dim, kind
        self.patch_nums = normalize_scales(patch_nums)
        self.num_prefix_tokens = num_prefix_tokens
        self.options = {"temperature": temperature}
        if kind in ("timm", "sincos_1d"):
            self.options["interleave"] = interleave
        if kind == "timm":
            self.options["reverse_coord"] = reverse_coord
        self.backend = backend
        table = self.table()  # validates the arguments
        if keep_table:
            self.pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)

    def forward(self, x: torch.Tensor, start: int = 0, *, backend: Optional[str] = None) -> torch.Tensor:
        return pos_embed_add(x, self.kind, self.patch_nums, start=start, num_prefix_tokens=self.num_prefix_tokens,
                             backend=backend or self.backend, **self.options)

    def table(self) -> torch.Tensor:
        return pos_embed_table(self.kind, self.patch_nums, self.embed_dim,
                               num_prefix_tokens=self.num_prefix_tokens, **self.options)


class DETRPositionEmbeddingSine(nn.Module):
    """DETR's ``PositionEmbeddingSine`` (no parameters; same constructor), added to the
    flattened feature map: C = 2 * num_pos_feats; ``forward(x, size, mask=None)`` with
    ``size`` the (h, w) of the map and ``mask`` (B, h, w) True at padding."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0, normalize: bool = False,
                 scale: Optional[float] = None, *, backend: Optional[str] = None) -> None:
        super().__init__()
        _checks.check_positive_int("num_pos_feats", num_pos_feats)
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed (as in DETR)")
        self.num_pos_feats, self.temperature, self.normalize = num_pos_feats, float(temperature), bool(normalize)
        self.scale = 2 * math.pi if scale is None else float(scale)
        self.backend = backend

    def _options(self):
        return dict(temperature=self.temperature, normalize=self.normalize, scale=self.scale)

    def forward(self, x: torch.Tensor, size: Tuple[int, int], mask: Optional[torch.Tensor] = None, *,
                start: int = 0, backend: Optional[str] = None) -> torch.Tensor:
        return pos_embed_add(x, "detr", [tuple(size)], start=start, mask=mask, backend=backend or self.backend,
                             **self._options())

    def table(self, size: Tuple[int, int], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return pos_embed_table("detr", [tuple(size)], 2 * self.num_pos_feats, mask=mask, **self._options())


class SAMPositionEmbeddingRandom(nn.Module):
    """SAM's ``PositionEmbeddingRandom``: buffer ``positional_encoding_gaussian_matrix``
    (2, num_pos_feats) = scale * randn (scale None or <= 0: 1), as in SAM; C = 2 *
    num_pos_feats. ``forward(x, patch_nums)`` adds the encoding of each scale's grid."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        _checks.check_positive_int("num_pos_feats", num_pos_feats)
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))
        self.backend = backend

    def forward(self, x: torch.Tensor, patch_nums: Sequence[Scale], start: int = 0, *,
                backend: Optional[str] = None) -> torch.Tensor:
        return pos_embed_add(x, "sam", patch_nums, start=start, gaussian=self.positional_encoding_gaussian_matrix,
                             backend=backend or self.backend)

    def table(self, patch_nums: Sequence[Scale]) -> torch.Tensor:
        G = self.positional_encoding_gaussian_matrix
        return pos_embed_table("sam", patch_nums, 2 * G.shape[1], gaussian=G, device=G.device)
