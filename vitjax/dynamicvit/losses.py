"""DynamicViT's training objective (the original's DistillDiffPruningLoss_dynamic, DeiT setting)
in the `vitjax.training.steps` loss interface:

    loss = CE(student, soft targets)
         + ratio_weight x mean over stages of mean over images of (kept fraction - ratio)^2
         + distill_weight x T^2 KL(teacher || student) at temperature T
         + token_distill_weight x MSE(student, teacher final patch tokens) over the kept tokens

The teacher is the dense ViT the student started from; its parameters are the train state's
`frozen` tree. The original uses clf_weight=1, ratio_weight=2 (5 for DeiT-B), distill_weight=0.5
for both distillation terms, mse_token=True and no temperature (T = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from vitjax.dynamicvit.model import DynamicViT
from vitjax.models.vit import ViT

if TYPE_CHECKING:  # the trainer's module pulls in the whole training stack
    from vitjax.training.losses import LossFn

Array = jax.Array


def ratio_loss(decisions: Sequence[Array], ratios: Sequence[float]) -> Array:
    """Mean over stages of mean over images of (mean keep decision of the image - ratio)^2.

    decisions: per stage the running policy [B, N_patches]; ratios: the stages' targets.
    """
    if len(decisions) != len(ratios):
        raise ValueError(f"{len(decisions)} stages of decisions for {len(ratios)} ratios")
    terms = [jnp.mean((jnp.mean(d.astype(jnp.float32), axis=1) - r) ** 2)
             for d, r in zip(decisions, ratios, strict=True)]
    return sum(terms) / len(terms)


def token_distillation_loss(student: Array, teacher: Array, policy: Array) -> Array:
    """Mean squared difference of the patch-token features [B, N, d] over the tokens the student
    kept (policy [B, N] > 0.5, no gradient through the choice); 0 when it kept none."""
    kept = (jax.lax.stop_gradient(policy) > 0.5).astype(jnp.float32)
    per_token = jnp.mean((student.astype(jnp.float32) - teacher.astype(jnp.float32)) ** 2, -1)
    count = kept.sum()
    return jnp.where(count < 0.1, 0.0, (per_token * kept).sum() / jnp.maximum(count, 1.0))


def _is_final_norm(module: Any, method: str) -> bool:
    # The ViT's last LayerNorm is its only module named 'norm' (blocks have norm1/norm2).
    return method == "__call__" and module.name == "norm"


def teacher_outputs(teacher: ViT, params: Any, images: Array) -> tuple[Array, Array]:
    """(logits [B, C], final patch-token features [B, N, d] after the last LayerNorm) of the
    teacher, without gradients: what the original's VisionTransformerTeacher returns."""
    (logits, _), state = teacher.apply(
        {"params": params}, images, train=False, capture_intermediates=_is_final_norm,
        mutable=["intermediates"],
    )
    tokens = state["intermediates"]["norm"]["__call__"][0]
    tokens = tokens[:, teacher.config.num_prefix_tokens:]
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(tokens)


def dynamicvit_loss(
    model: DynamicViT,
    teacher: ViT,
    *,
    ratio_weight: float = 2.0,
    distill_weight: float = 0.5,
    token_distill_weight: float = 0.5,
    temperature: float = 1.0,
) -> LossFn:
    """The DynamicViT loss for `train_step`: params are the DynamicViT's (ViT + predictors),
    frozen the teacher's. Metrics: accuracy, cls_loss, ratio_loss, distill, token_distill and
    keep_fraction_{i} (mean running policy after stage i)."""
    weights = dict(ratio_weight=ratio_weight, distill_weight=distill_weight,
                   token_distill_weight=token_distill_weight)
    negative = {name: w for name, w in weights.items() if w < 0}
    if negative or temperature <= 0:
        raise ValueError(f"DynamicViT loss weights must be >= 0 and temperature > 0; got "
                         f"{weights}, temperature={temperature}")
    student_cfg, teacher_cfg = model.config, teacher.config
    if (teacher_cfg.num_patches, teacher_cfg.embed_dim, teacher_cfg.num_classes) != (
            student_cfg.num_patches, student_cfg.embed_dim, student_cfg.num_classes):
        raise ValueError(
            "the teacher must see the same patches and have the same width and classes as the "
            f"student for logit and token distillation: teacher (patches, embed_dim, classes) = "
            f"{(teacher_cfg.num_patches, teacher_cfg.embed_dim, teacher_cfg.num_classes)}, "
            f"student {(student_cfg.num_patches, student_cfg.embed_dim, student_cfg.num_classes)}"
        )
    ratios = model.dyn.ratios
    from vitjax.training.losses import accuracy, cross_entropy, logit_distillation

    def loss_fn(params, frozen, batch, masks, rng):
        if masks is not None:
            raise ValueError("DynamicViT takes no structural masks: run train_step with "
                             "keep=None (prune heads/FFN physically before DynamicViT)")
        gumbel_key, dropout_key = jax.random.split(rng)
        logits, aux = model.apply({"params": params}, batch["image"], train=True,
                                  rngs={"gumbel": gumbel_key, "dropout": dropout_key})
        teacher_logits, teacher_tokens = teacher_outputs(teacher, frozen, batch["image"])
        cls_loss = cross_entropy(logits, batch["target"])
        keep_loss = ratio_loss(aux["decisions"], ratios)
        distill = logit_distillation(logits, teacher_logits, temperature)
        token_distill = token_distillation_loss(aux["features"], teacher_tokens,
                                                aux["decisions"][-1])
        loss = (cls_loss + ratio_weight * keep_loss + distill_weight * distill
                + token_distill_weight * token_distill)
        metrics = {
            "accuracy": accuracy(logits, batch["label"]),
            "cls_loss": cls_loss, "ratio_loss": keep_loss, "distill": distill,
            "token_distill": token_distill,
        }
        for stage, decision in enumerate(aux["decisions"]):
            metrics[f"keep_fraction_{stage}"] = decision.mean()
        return loss, metrics

    return loss_fn
