"""Rounding a policy's kept FFN neurons and tokens to hardware-friendly multiples (8, 16, 64).

GEMM kernels (XNNPACK, oneDNN, Eigen, cuBLAS) work in register/tile blocks of 4-64 rows or
columns; a width of 1531 neurons or a sequence of 113 tokens pays for the padding of its last
block anyway. Rounding kept counts to such a multiple can therefore buy speed at the same (or a
lower) FLOPs count. Heads are left alone: a kept head always adds head_dim (64 in every DeiT)
columns, already a multiple.

The rounded policy never exceeds the FLOPs budget: each count goes to its nearest multiple, and
while the total is above `target_gmacs` the counts rounded up are rounded down instead (the
greedy choice: the flip that lands closest under the budget, else the one that saves most).
Rounding every count down keeps the model no larger than the original policy's, so a policy
within budget always yields a rounded policy within budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vitjax.models.config import ViTConfig
from vitjax.pruning.flops import count_flops
from vitjax.pruning.policy import Policy


@dataclasses.dataclass
class _Choice:
    """One rounded count: 'up' picks the multiple above (or the unpruned size), else below."""

    dim: str  # 'neuron' or 'token'
    layer: int
    up: bool


def _down_up(count: int, multiple: int, upper: int, lowest: int) -> tuple[int, int]:
    """Multiples of `multiple` around `count`, within [lowest, upper]; `count` itself where no
    multiple fits (or it is one already)."""
    down = (count // multiple) * multiple
    up = -(-count // multiple) * multiple
    if down < lowest:
        down = count
    if up > upper:
        up = upper  # keeping everything needs no rounding: the dense size is what it is
    return down, up


def _counts(config: ViTConfig, policy: Policy, choices: dict, multiple: int):
    """Rounded (neurons [L], tokens [L]) for the given up/down choices."""
    keep = policy.keep_counts(config)
    neurons = []
    for layer, count in enumerate(int(c) for c in keep.neuron):
        choice = choices.get(("neuron", layer))
        if choice is None:
            neurons.append(count)
            continue
        down, up = _down_up(count, multiple, config.mlp_dim, multiple)
        neurons.append(up if choice.up else down)
    tokens, available = [], config.num_tokens
    for layer, count in enumerate(int(c) for c in keep.token):
        desired = min(count, available)
        choice = choices.get(("token", layer))
        if choice is not None and desired < available:
            down, up = _down_up(desired, multiple, available, config.num_prefix_tokens + 1)
            desired = up if choice.up else down
        tokens.append(desired)
        available = desired
    return neurons, tokens


def _policy_from_counts(config: ViTConfig, policy: Policy, neurons, tokens) -> Policy:
    neuron_ratios = [1.0 - n / config.mlp_dim for n in neurons]
    token_ratios, previous = [], config.num_patches
    for count in tokens:
        patches = count - config.num_prefix_tokens
        token_ratios.append(1.0 - patches / previous)
        previous = patches
    rounded = Policy(tuple(neuron_ratios), policy.head, tuple(token_ratios))
    keep = rounded.keep_counts(config)
    assert list(keep.neuron) == list(neurons) and list(keep.token) == list(tokens), (
        "ratios do not reproduce the rounded counts"
    )
    return rounded


def round_policy_to_multiple(
    config: ViTConfig,
    policy: Policy,
    multiple: int,
    target_gmacs: float,
    *,
    dims: Sequence[str] = ("neuron", "token"),
) -> Policy:
    """`policy` with kept FFN neurons and kept tokens (class/distillation tokens included, i.e.
    the sequence length the matmuls see) rounded to multiples of `multiple`, within
    `target_gmacs` (GMACs of `vitjax.pruning.count_flops`). Counts equal to the full size
    (nothing pruned) stay as they are; so does a count below the smallest multiple."""
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}")
    unknown = sorted(set(dims) - {"neuron", "token"})
    if unknown:
        raise ValueError(f"dims may hold 'neuron' and 'token', got {unknown}")
    original = count_flops(config, policy).total
    if original > target_gmacs * (1 + 1e-12):
        raise ValueError(
            f"the policy itself needs {original:.4f} GMACs, above the budget of "
            f"{target_gmacs:.4f}; rounding can only keep a policy within budget"
        )

    keep = policy.keep_counts(config)
    choices: dict[tuple[str, int], _Choice] = {}
    if "neuron" in dims:
        for layer, count in enumerate(int(c) for c in keep.neuron):
            down, up = _down_up(count, multiple, config.mlp_dim, multiple)
            if down != up:
                choices[("neuron", layer)] = _Choice("neuron", layer, up - count < count - down)
    if "token" in dims:
        # Token counts compound, so the nearest multiple is decided layer by layer, on the count
        # that reaches the layer after the earlier layers were rounded.
        for layer in range(config.depth):
            choices[("token", layer)] = _Choice("token", layer, False)
            _, tokens = _counts(config, policy, choices, multiple)
            below = tokens[layer]
            choices[("token", layer)].up = True
            _, tokens = _counts(config, policy, choices, multiple)
            above = tokens[layer]
            wanted = int(keep.token[layer])
            choices[("token", layer)].up = above - wanted < wanted - below

    def gmacs() -> float:
        return count_flops(config, _policy_from_counts(config, policy, *_counts(
            config, policy, choices, multiple))).total

    total = gmacs()
    while total > target_gmacs:
        options = []
        for choice in choices.values():
            if choice.up:
                choice.up = False
                options.append((gmacs(), choice))
                choice.up = True
        if not options:  # cannot happen for a policy within budget (see the module docstring)
            raise AssertionError("rounding every count down still exceeds the budget")
        fitting = [o for o in options if o[0] <= target_gmacs]
        total, choice = max(fitting, key=lambda o: o[0]) if fitting else min(
            options, key=lambda o: o[0])
        choice.up = False
    return _policy_from_counts(config, policy, *_counts(config, policy, choices, multiple))
