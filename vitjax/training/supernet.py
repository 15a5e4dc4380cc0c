"""Policies for supernet training (Eq. 5): sampling per step, sandwich, fixed eval policies.

Keep counts leave here as int32 arrays [K, L] (K sub-networks per step); the jitted step turns
them into masks with the current ranks, so a new policy is new data, never a new compilation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vitjax.models.config import ViTConfig
from vitjax.pruning.flops import count_flops, count_flops_batch
from vitjax.pruning.policy import Policy
from vitjax.pruning.sampling import policy_rng, sample_policy, sampling_space

KEEP_FIELDS = ("head", "neuron", "token")


def smallest_policy(config: ViTConfig, target_gmacs: float | None) -> Policy:
    space = sampling_space(config, target_gmacs)
    return Policy.uniform(config.depth, space.neuron, space.head, space.token)


def uniform_policy_at(config: ViTConfig, target_gmacs: float) -> Policy:
    """The same ratio in every layer and dimension, the largest model within the target."""
    lo, hi = 0.0, 0.99
    if count_flops(config, Policy.uniform(config.depth, hi, hi, hi)).total > target_gmacs:
        raise ValueError(f"no uniform policy reaches {target_gmacs} GMACs; raise the target")
    for _ in range(40):
        mid = (lo + hi) / 2
        if count_flops(config, Policy.uniform(config.depth, mid, mid, mid)).total > target_gmacs:
            lo = mid
        else:
            hi = mid
    return Policy.uniform(config.depth, hi, hi, hi)


def fixed_eval_policies(config: ViTConfig, train: Mapping[str, Any]) -> dict[str, Policy]:
    """dense, target (uniform at the target GMACs, when set), smallest of the sampling space."""
    target = train.get("target_gmacs")
    out = {"dense": Policy.dense(config.depth)}
    if target is not None:
        out["target"] = uniform_policy_at(config, float(target))
    out["smallest"] = smallest_policy(config, target)
    return out


def stack_keep_counts(config: ViTConfig, policies) -> dict[str, np.ndarray]:
    """{'head'|'neuron'|'token': int32 [K, L]} for a list of K policies."""
    counts = [p.keep_counts(config) for p in policies]
    return {f: np.stack([getattr(c, f) for c in counts]).astype(np.int32) for f in KEEP_FIELDS}


class PolicySampler:
    """Policy of step `step` from U_T, identical on every host (seeded by (seed, step))."""

    def __init__(self, config: ViTConfig, train: Mapping[str, Any]):
        self.config = config
        self.seed = int(train.get("seed", 0))
        self.target = train.get("target_gmacs")
        self.tol = train.get("target_tol")
        self.sandwich = bool(train.get("sandwich", False))
        self._fixed = [Policy.dense(config.depth), smallest_policy(config, self.target)]
        if self.target is not None:
            sample_policy(config, policy_rng(self.seed, 0), target_gmacs=self.target, tol=self.tol)

    @property
    def num_subnets(self) -> int:
        return 3 if self.sandwich else 1

    def policy(self, step: int) -> Policy:
        return sample_policy(
            self.config, policy_rng(self.seed, step), target_gmacs=self.target, tol=self.tol
        )

    def __call__(self, step: int) -> tuple[dict[str, np.ndarray], float]:
        """Keep counts [K, L] of step `step` (sampled first, then dense and smallest with the
        sandwich rule) and the sampled policy's GMACs."""
        sampled = self.policy(step)
        policies = [sampled] + (self._fixed if self.sandwich else [])
        gmacs = float(count_flops_batch(self.config, sampled.to_vector()[None])[0])
        return stack_keep_counts(self.config, policies), gmacs
