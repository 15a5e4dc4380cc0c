"""Losses beyond plain cross-entropy, in the `vitjax.training.steps` loss interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vitjax.models.vit import ViT
from vitjax.training.steps import LossFn


def distillation_loss(student: ViT, teacher: ViT, *, weight: float = 0.5,
                      temperature: float = 1.0) -> LossFn:
    """(1 - weight) x cross-entropy + weight x T^2 KL(teacher || student) at temperature T
    (Hinton et al.; soft logit distillation as in DeiT's 'soft' mode). The teacher's parameters
    are the state's `frozen` tree: never trained, sharded like parameters."""
    if not 0.0 <= weight <= 1.0 or temperature <= 0:
        raise ValueError(f"distillation weight must be in [0, 1] and temperature > 0, got "
                         f"{weight}, {temperature}")

    def loss_fn(params, frozen, batch, masks, rng):
        logits, _ = student.apply({"params": params}, batch["image"], masks=masks, train=True,
                                  rngs={"dropout": rng})
        teacher_logits, _ = teacher.apply({"params": frozen}, batch["image"], train=False)
        teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
        hard = optax.softmax_cross_entropy(logits, batch["target"]).mean()
        t = temperature
        soft = optax.kl_divergence(jax.nn.log_softmax(logits.astype(jnp.float32) / t),
                                   jax.nn.softmax(teacher_logits / t)).mean() * t * t
        accuracy = (jnp.argmax(logits, axis=-1) == batch["label"]).mean()
        return (1.0 - weight) * hard + weight * soft, {"accuracy": accuracy, "distill": soft}

    return loss_fn
