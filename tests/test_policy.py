"""Policies: validation, kept counts, masks from ranks, U_T sampling, JSON."""

import numpy as np
import pytest
from scipy.stats import rankdata

from vitjax.models import ViTConfig
from vitjax.pruning import (
    Policy,
    Ranks,
    count_flops,
    masks_from_ranks,
    policy_rng,
    ranks_from_scores,
    sample_policy,
)

SMALL = ViTConfig(num_classes=10, image_size=32, patch_size=4, embed_dim=64, depth=4,
                  num_heads=4, mlp_dim=128, distilled=True)


def test_keep_counts_follow_ceil_and_compound_over_surviving_patches():
    policy = Policy(neuron=(0.0, 0.1, 0.7, 1.0), head=(0.0, 0.5, 0.3, 0.75),
                    token=(0.0, 0.5, 0.3, 0.9))
    keep = policy.keep_counts(SMALL)
    np.testing.assert_array_equal(keep.neuron, [128, 116, 39, 0])  # ceil(0.3*128)=ceil(38.4)
    np.testing.assert_array_equal(keep.head, [4, 2, 3, 1])  # ceil(0.7*4)=3, 0.25*4=1 exactly
    patches = [64, 32, 23, 3]  # ceil(0.7*32)=23, ceil(0.1*23)=3
    np.testing.assert_array_equal(keep.token, np.array(patches) + 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(neuron=(0.1,) * 3, head=(0.1,) * 4, token=(0.1,) * 4), "depth=4"),
        (dict(neuron=(-0.1,) * 4, head=(0.1,) * 4, token=(0.1,) * 4), "neuron ratio"),
        (dict(neuron=(0.1,) * 4, head=(1.5,) * 4, token=(0.1,) * 4), r"head ratio.*\[0, 1\]"),
        (dict(neuron=(0.1,) * 4, head=(0.1,) * 4, token=(1.0,) * 4), r"token ratio.*\[0, 1\)"),
        (dict(neuron=(float("nan"),) * 4, head=(0.1,) * 4, token=(0.1,) * 4), "neuron"),
    ],
)
def test_invalid_policies_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Policy(**kwargs).validate(SMALL)


def test_json_round_trip_and_malformed_json():
    policy = sample_policy(SMALL, policy_rng(0, 3))
    assert Policy.from_json(policy.to_json()) == policy
    np.testing.assert_array_equal(Policy.from_vector(policy.to_vector()).to_vector(),
                                  policy.to_vector())
    with pytest.raises(ValueError, match="malformed"):
        Policy.from_json("{not json")
    with pytest.raises(ValueError, match="missing"):
        Policy.from_json('{"neuron": [0.1], "head": [0.1]}')


def test_sampling_is_deterministic_and_respects_the_flops_band():
    target = 0.6 * count_flops(SMALL).total
    policies = [sample_policy(SMALL, policy_rng(1, step), target_gmacs=target, tol=0.1)
                for step in range(20)]
    again = [sample_policy(SMALL, policy_rng(1, step), target_gmacs=target, tol=0.1)
             for step in range(20)]
    assert policies == again
    assert len({p.to_json() for p in policies}) == 20
    for policy in policies:
        assert target * 0.9 <= count_flops(SMALL, policy).total <= target
    unconstrained = sample_policy(SMALL, policy_rng(1, 0))
    unconstrained.validate(SMALL)


def test_unreachable_target_is_refused():
    with pytest.raises(ValueError, match="below the smallest model"):
        sample_policy(SMALL, policy_rng(0, 0), target_gmacs=1e-6)


def test_ranks_match_scipy_and_masks_keep_the_top_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 128))
    ranks = np.asarray(ranks_from_scores(scores))
    np.testing.assert_array_equal(ranks, rankdata(-scores, axis=-1, method="ordinal") - 1)
    policy = Policy(neuron=(0.5, 0.25, 0.0, 0.9), head=(0.0,) * 4, token=(0.0,) * 4)
    keep = policy.keep_counts(SMALL)
    head_ranks = np.asarray(ranks_from_scores(rng.normal(size=(4, 4))))
    token_ranks = np.asarray(ranks_from_scores(rng.normal(size=(4, SMALL.num_tokens))))
    masks = masks_from_ranks(SMALL, Ranks(head_ranks, ranks, token_ranks), keep)
    for layer in range(4):
        kept = np.flatnonzero(np.asarray(masks.neuron[layer]))
        top = np.argsort(-scores[layer])[: keep.neuron[layer]]
        assert set(kept) == set(top)


def test_static_token_selection_chooses_among_survivors():
    """Numpy reference of the cumulative token selection (later layers pick among survivors)."""
    rng = np.random.default_rng(1)
    N, prefix = SMALL.num_tokens, SMALL.num_prefix_tokens
    token_scores = rng.normal(size=(4, N))
    policy = Policy(neuron=(0.0,) * 4, head=(0.0,) * 4, token=(0.3, 0.5, 0.0, 0.6))
    keep = policy.keep_counts(SMALL)
    ranks = Ranks(np.zeros((4, 4), np.int32), np.zeros((4, 128), np.int32),
                  ranks_from_scores(token_scores))
    masks = np.asarray(masks_from_ranks(SMALL, ranks, keep).token) > 0
    alive = set(range(N))
    for layer in range(4):
        patches = sorted(alive - set(range(prefix)), key=lambda n: -token_scores[layer, n])
        alive = set(range(prefix)) | set(patches[: keep.token[layer] - prefix])
        assert set(np.flatnonzero(masks[layer])) == alive
        assert masks[layer].sum() == keep.token[layer]
