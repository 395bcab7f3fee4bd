"""posenc_fast: fused CUDA and Triton kernels for the position encodings of visual
autoregressive (VAR) image generators, with pure-PyTorch reference fallbacks."""

from ._backends import BACKENDS, available_backends, use_backend

__version__ = "0.1.0"

# -- pyramid position + level embedding (VAR) --
from .ops.pyramid import pyramid_pos_level_add  # noqa: E402
from .nn.pyramid import PyramidPosLevelEmbedding  # noqa: E402

# -- 2D rotary family (Infinity, STAR, HART, ViTs) --
from .ops.rope import (apply_rope, apply_rope_, axial_rope_freqs, hart_rope, hart_rope_tables,  # noqa: E402
                       infinitystar_coords, infinitystar_coords4d, infinitystar_rope4d_freqs, infinitystar_rope_freqs,
                       infinitystar_text_coords4d, mrope_freqs, pyramid_coords, rope_1d_freqs,
                       rope_mixed_freqs)
from .nn.rope import PyramidRoPE  # noqa: E402

# -- additive encodings of the wider family (FlexVAR, NaViT, Pix2Struct, sin-cos, DETR, SAM) --
from .ops.pos_embed import pos_embed_add, pos_embed_table  # noqa: E402
from .nn.pos_embed import (DETRPositionEmbeddingSine, FlexVARPosEmbedding, NaViTPosEmbedding,  # noqa: E402
                           Pix2StructPosEmbedding, SAMPositionEmbeddingRandom, SinCosPosEmbedding)

# -- fused attention input projection --
from .ops.qkv_proj import qkv_proj  # noqa: E402

from . import integrations  # noqa: E402,F401

__all__ = [
    "BACKENDS", "available_backends", "use_backend",
    "pyramid_pos_level_add", "PyramidPosLevelEmbedding",
    "apply_rope", "apply_rope_", "pyramid_coords", "axial_rope_freqs", "rope_1d_freqs", "mrope_freqs",
    "rope_mixed_freqs", "infinitystar_rope_freqs", "infinitystar_coords", "infinitystar_rope4d_freqs",
    "infinitystar_coords4d", "infinitystar_text_coords4d", "hart_rope", "hart_rope_tables",
    "PyramidRoPE",
    "pos_embed_add", "pos_embed_table", "FlexVARPosEmbedding", "NaViTPosEmbedding", "Pix2StructPosEmbedding",
    "SinCosPosEmbedding", "DETRPositionEmbeddingSine", "SAMPositionEmbeddingRandom",
    "qkv_proj",
]
