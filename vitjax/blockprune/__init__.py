"""Block movement pruning of heads and FFN neurons (Sanh et al.; Lagunas et al.): learned scores,
straight-through masks, the masked model (`MovementViT`), a pluggable training loss, and
FLOPs-budgeted physical pruning."""

from vitjax.blockprune.model import MovementViT
from vitjax.blockprune.movement import (
    STEP_KEY,
    MovementConfig,
    init_scores,
    keep_fraction,
    l1_regularizer,
    learned_scores,
    movement_frozen,
    movement_init_fn,
    movement_loss,
    movement_masks,
    num_neuron_blocks,
    policy_from_keep_counts,
    prune_movement,
    straight_through,
    threshold_to_budget,
)

__all__ = [
    "STEP_KEY", "MovementConfig", "MovementViT", "init_scores", "keep_fraction", "l1_regularizer",
    "learned_scores", "movement_frozen", "movement_init_fn", "movement_loss", "movement_masks",
    "num_neuron_blocks", "policy_from_keep_counts", "prune_movement", "straight_through",
    "threshold_to_budget",
]
