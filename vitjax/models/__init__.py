"""ViT/DeiT models: architecture configs and the maskable Flax module."""

from vitjax.models.config import ViTConfig, ceil_keep, decode_variant
from vitjax.models.vit import Masks, ViT, init_params

__all__ = [
    "ViT", "ViTConfig", "Masks", "init_params", "decode_variant", "ceil_keep",
]
