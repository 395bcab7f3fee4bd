"""nn.Modules built on the fused ops."""

from .pyramid import PyramidPosLevelEmbedding  # noqa: F401
from .rope import PyramidRoPE  # noqa: F401
from .attention import FusedSelfAttention, block_causal_bias  # noqa: F401
from .pos_embed import (DETRPositionEmbeddingSine, FlexVARPosEmbedding, NaViTPosEmbedding,  # noqa: F401
                        Pix2StructPosEmbedding, SAMPositionEmbeddingRandom, SinCosPosEmbedding)
