"""nn.Modules built on the fused ops."""

from .pyramid import PyramidPosLevelEmbedding  # noqa: F401
from .rope import PyramidRoPE  # noqa: F401
from .attention import FusedSelfAttention, block_causal_bias  # noqa: F401
