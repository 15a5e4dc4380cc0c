"""Pruning policies, U_T sampling, masks from importance ranks, FLOPs, physical pruning."""

from vitjax.pruning.flops import Flops, count_flops, count_flops_batch, relaxed_gmacs
from vitjax.pruning.masks import (
    Ranks,
    identity_ranks,
    masks_from_ranks,
    policy_masks,
    ranks_from_scores,
    static_token_masks,
)
from vitjax.pruning.policy import KeepCounts, Policy
from vitjax.pruning.prune import prune_params
from vitjax.pruning.rounding import round_policy_to_multiple
from vitjax.pruning.sampling import (
    SamplingSpace,
    calibrated_space,
    policy_rng,
    sample_policy,
)

__all__ = [
    "Flops", "count_flops", "count_flops_batch", "relaxed_gmacs", "Ranks", "identity_ranks",
    "masks_from_ranks", "policy_masks", "ranks_from_scores", "static_token_masks", "KeepCounts",
    "Policy", "SamplingSpace", "calibrated_space", "policy_rng", "sample_policy",
    "prune_params", "round_policy_to_multiple",
]
