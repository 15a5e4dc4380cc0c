"""AdamW with linear warmup + cosine decay, optional clipping, and DeiT's weight-decay mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

# timm's `no_weight_decay`: 1-d parameters (biases, LayerNorm) and the learned tokens/positions.
_NO_DECAY_NAMES = ("bias", "scale", "cls_token", "dist_token", "pos_embed")


def peak_learning_rate(train: Mapping[str, Any]) -> float:
    """lr, scaled linearly with the global batch when `lr_base_batch` is set (DeiT rule)."""
    lr = float(train["lr"])
    if train.get("lr_base_batch"):
        lr *= train["batch_size"] / train["lr_base_batch"]
    return lr


def learning_rate_schedule(train: Mapping[str, Any]) -> optax.Schedule:
    peak = peak_learning_rate(train)
    steps, warmup = int(train["steps"]), int(train.get("warmup_steps", 0))
    if warmup >= steps:
        raise ValueError(f"warmup_steps={warmup} must be smaller than steps={steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=float(train.get("warmup_lr", 0.0)) if warmup else peak,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=steps,
        end_value=float(train.get("min_lr", 0.0)),
    )


def weight_decay_mask(params):
    """True for the leaves AdamW decays: matrices and conv kernels only."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name not in _NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(train)
    parts = []
    if train.get("grad_clip"):
        parts.append(optax.clip_by_global_norm(float(train["grad_clip"])))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(train.get("b1", 0.9)),
            b2=float(train.get("b2", 0.999)),
            eps=1e-8,
            weight_decay=float(train.get("weight_decay", 0.0)),
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts), schedule
