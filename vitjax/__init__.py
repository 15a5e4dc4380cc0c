"""vitjax: multi-dimensional (head, neuron, token) compression of Vision Transformers in JAX."""

from vitjax.models import Masks, ViT, ViTConfig, init_params
from vitjax.pruning import (
    Policy,
    Ranks,
    count_flops,
    masks_from_ranks,
    policy_masks,
    sample_policy,
)
from vitjax.pruning.prune import prune_params

__version__ = "0.1.0"

__all__ = [
    "Masks", "Policy", "Ranks", "ViT", "ViTConfig", "count_flops", "init_params",
    "masks_from_ranks", "policy_masks", "prune_params", "sample_policy",
]
