"""Pure, module-level training step over a Flax `TrainState`, with a pluggable loss.

Everything a step needs that is not an array is static and hashable (`StepConfig`, the loss),
so `jax.jit(functools.partial(train_step, config=..., loss_fn=...))` compiles once and serves
every policy: policies arrive as keep counts [K, L] (K sub-networks per step, e.g. the sandwich
rule's sampled + dense + smallest) and become masks inside the step from the state's ranks.

The loss is the seam between systems (`vitjax.training.losses`: its interface and terms):
supernet training and finetuning use `classification_loss(model)`; knowledge distillation,
DynamicViT (predictor parameters, keep-ratio and distillation losses) and block pruning (learned
mask scores) supply their own. A loss sees the trainable `params` (any pytree: extra trainable
collections live beside the ViT's), the non-trainable `frozen` pytree of the state (e.g. a
teacher's parameters), the batch and the masks. Mixup/CutMix and label smoothing
(`vitjax.data.mixup.mix_batch`) run inside the step on the global batch, on device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from vitjax.data.mixup import MixConfig, mix_batch
from vitjax.models.vit import Masks, ViT
from vitjax.pruning.masks import Ranks, masks_from_ranks
from vitjax.pruning.policy import KeepCounts
from vitjax.training.losses import LossFn, classification_loss

__all__ = ["LossFn", "MixConfig", "StepConfig", "TrainState", "build_masks",
           "classification_loss", "keep_counts_row", "train_step"]


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state; apply_fn and tx static) plus:

    rng: uint32[2] raw key; dropout and mixing keys fold in the step.
    ranks: {'head', 'neuron'[, 'token']} int32 rank arrays the masks are built from (None: no
        masking). Saved with the parameters, so every later stage sees the ranks the supernet
        was trained with.
    frozen: non-trainable pytree handed to the loss (e.g. a teacher's parameters), or None.
    """

    rng: jax.Array
    ranks: dict[str, jax.Array] | None = None
    frozen: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static part of a training step."""

    model: ViT  # the (dense or pruned) model; its config builds the masks
    num_classes: int
    token_mode: str = "attention"  # 'attention' | 'static' (see masks_from_ranks)
    mix: MixConfig = MixConfig()  # mixing and label smoothing of the targets


def keep_counts_row(keep: dict[str, jax.Array], index: int | None = None) -> KeepCounts:
    """KeepCounts of sub-network `index` of a {'head'|'neuron'|'token': [K, L]} dict (or of a
    single [L] dict when index is None)."""
    pick = (lambda a: a) if index is None else (lambda a: a[index])
    return KeepCounts(neuron=pick(keep["neuron"]), head=pick(keep["head"]),
                      token=pick(keep["token"]))


def build_masks(model: ViT, ranks: dict | Ranks | None, keep: KeepCounts | None,
                token_mode: str) -> Masks | None:
    """Masks of the sub-network keeping `keep` (traced counts) by `ranks`; None: dense."""
    if keep is None:
        return None
    if isinstance(ranks, dict):
        ranks = Ranks(head=ranks["head"], neuron=ranks["neuron"], token=ranks.get("token"))
    return masks_from_ranks(model.config, ranks, keep, token_mode)


def train_step(state: TrainState, images, labels, keep, *, config: StepConfig,
               loss_fn: LossFn, schedule: optax.Schedule | None = None):
    """One optimizer step; keep: {'head'|'neuron'|'token': int32 [K, L]} or None (no masks).

    With K > 1 sub-networks (sandwich rule) the loss is their mean, which keeps the gradient
    scale of a single one; the reported loss/metrics are those of the first (sampled) one.
    """
    base = jax.random.wrap_key_data(state.rng)
    step_key = jax.random.fold_in(base, state.step)
    mix_key, dropout_key = jax.random.split(step_key)
    images, targets = mix_batch(mix_key, images, labels, config.mix, config.num_classes)
    batch = {"image": images, "target": targets, "label": jnp.argmax(targets, axis=-1)}
    subnets = 1 if keep is None else keep["head"].shape[0]

    def total_loss(params):
        losses, first = [], None
        for k in range(subnets):
            row = None if keep is None else keep_counts_row(keep, k)
            masks = build_masks(config.model, state.ranks, row, config.token_mode)
            loss, metrics = loss_fn(params, state.frozen, batch, masks,
                                    jax.random.fold_in(dropout_key, k))
            losses.append(loss)
            if first is None:
                first = {"loss": loss, **metrics}
        return sum(losses) / len(losses), first

    (_, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    return new_state, metrics
