"""nn.Modules built on the fused ops."""

from .pyramid import PyramidPosLevelEmbedding  # noqa: F401
