"""The losses of every trainer, built from a few composable terms.

Terms (pure functions of logits): `cross_entropy` on the step's soft targets (mixed and
smoothed by `vitjax.data.mixup.mix_batch`), `accuracy` against the hard labels, and
`logit_distillation` from a frozen teacher. Losses (the `train_step` interface below) add them
up: `classification_loss` (supernet training and finetuning), `distillation_loss` (the same
with the dense model as teacher); DynamicViT (`vitjax.dynamicvit.losses`) and movement pruning
(`vitjax.blockprune.movement`) add their own terms to the same ones.

    loss_fn(params, frozen, batch, masks, rng) -> (scalar loss, {name: scalar metric})

batch: {'image' [B, H, W, C], 'target' [B, C] soft labels, 'label' [B] int (argmax target)}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from vitjax.models.config import ViTConfig
    from vitjax.models.vit import Masks, ViT

LossFn = Callable[[Any, Any, dict, "Masks | None", jax.Array], tuple[jax.Array, dict]]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Softmax cross-entropy on soft targets [B, C], averaged over the batch."""
    return optax.softmax_cross_entropy(logits, targets).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy of logits [B, C] against int labels [B]."""
    return (jnp.argmax(logits, axis=-1) == labels).mean()


def classification_loss(model: ViT) -> LossFn:
    """`cross_entropy` of `model` (under the step's masks): supernet training and finetuning."""

    def loss_fn(params, frozen, batch, masks, rng):
        del frozen
        logits, _ = model.apply(
            {"params": params}, batch["image"], masks=masks, train=True, rngs={"dropout": rng}
        )
        return cross_entropy(logits, batch["target"]), {
            "accuracy": accuracy(logits, batch["label"])}

    return loss_fn

# What a teacher must share with its student for logit distillation on the same batch: the
# same classes (the KL compares their distributions) and the same images (size, patch grid).
TEACHER_FIELDS = ("num_classes", "image_size", "patch_size")


def logit_distillation(student_logits: jax.Array, teacher_logits: jax.Array,
                       temperature: float = 1.0) -> jax.Array:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch (Hinton
    et al. 2015; DeiT's 'soft' distillation; DynamicViT's KL term). The T^2 factor keeps the
    gradient scale of the soft term independent of T. No gradient flows into the teacher."""
    t = float(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    return optax.kl_divergence(jax.nn.log_softmax(student_logits.astype(jnp.float32) / t),
                               jax.nn.softmax(teacher / t)).mean() * t * t


def check_teacher(student: ViTConfig, teacher: ViTConfig) -> None:
    """ValueError (one line) when `teacher` cannot teach `student` by logit distillation."""
    bad = [f"{k} {getattr(teacher, k)} (student: {getattr(student, k)})"
           for k in TEACHER_FIELDS if getattr(teacher, k) != getattr(student, k)]
    if bad:
        raise ValueError("the teacher does not fit the student: " + ", ".join(bad)
                         + "; distil from a model of the same classes, image size and patch "
                         "size, or turn distillation off (distill=0)")


def distillation_loss(student: ViT, teacher: ViT, *, weight: float = 0.5,
                      temperature: float = 1.0) -> LossFn:
    """(1 - weight) x cross-entropy + weight x `logit_distillation` of the student (under the
    step's masks: a supernet's sub-network, or a pruned model) to the dense teacher. The
    teacher's parameters are the state's `frozen` tree: never trained, no optimizer state,
    sharded like parameters."""
    if not 0.0 <= weight <= 1.0 or temperature <= 0:
        raise ValueError(f"distillation weight must be in [0, 1] and temperature > 0, got "
                         f"{weight}, {temperature}")
    check_teacher(student.config, teacher.config)

    def loss_fn(params, frozen, batch, masks, rng):
        logits, _ = student.apply({"params": params}, batch["image"], masks=masks, train=True,
                                  rngs={"dropout": rng})
        teacher_logits, _ = teacher.apply({"params": frozen}, batch["image"], train=False)
        hard = cross_entropy(logits, batch["target"])
        soft = logit_distillation(logits, teacher_logits, temperature)
        return (1.0 - weight) * hard + weight * soft, {
            "accuracy": accuracy(logits, batch["label"]), "distill": soft}

    return loss_fn
