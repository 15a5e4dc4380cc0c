"""DynamicViT (Rao et al. 2021): learned, per-image token pruning on a (possibly block-pruned) ViT.

    dyn = DynamicViTConfig.from_rate('original', 0.7)       # keep 70%, 49%, 34% of the patches
    model = DynamicViT(vit_config, dyn)
    params = init_from_vit(model, vit_params, jax.random.key(0))
    loss_fn = dynamicvit_loss(model, ViT(vit_config))       # frozen = the dense teacher's params

Released PyTorch checkpoints load with vitjax.interop.dynamicvit.load_dynamicvit_torch.
"""

from vitjax.dynamicvit.losses import (
    dynamicvit_loss,
    ratio_loss,
    teacher_outputs,
    token_distillation_loss,
)
from vitjax.dynamicvit.model import (
    DynamicViT,
    DynamicViTConfig,
    Predictor,
    dynamicvit_gmacs,
    init_from_vit,
    predictor_gmacs,
    softmax_with_policy,
)
from vitjax.dynamicvit.schedule import keep_counts, keep_ratios, validate

__all__ = [
    "DynamicViT", "DynamicViTConfig", "Predictor", "init_from_vit", "dynamicvit_gmacs",
    "predictor_gmacs", "softmax_with_policy", "dynamicvit_loss", "ratio_loss",
    "token_distillation_loss", "teacher_outputs", "keep_ratios", "keep_counts", "validate",
]
