"""Losses beyond plain cross-entropy, in the `vitjax.training.steps` loss interface.

Knowledge distillation is one term, `logit_distillation`, that every loss with a teacher adds:
the supernet and the finetuning of the pruned model (`distillation_loss`, teacher = the frozen
dense model), and DynamicViT (`vitjax.dynamicvit.losses`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vitjax.models.config import ViTConfig
from vitjax.models.vit import ViT
from vitjax.training.steps import LossFn

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
        hard = optax.softmax_cross_entropy(logits, batch["target"]).mean()
        soft = logit_distillation(logits, teacher_logits, temperature)
        accuracy = (jnp.argmax(logits, axis=-1) == batch["label"]).mean()
        return (1.0 - weight) * hard + weight * soft, {"accuracy": accuracy, "distill": soft}

    return loss_fn
