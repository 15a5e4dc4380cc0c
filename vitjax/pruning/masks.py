"""From importance scores to ranks, and from ranks plus kept counts to model masks.

"Keep the top-k by score" is `rank < k`, with ranks computed once from the scores and k a
(possibly traced) per-layer count, so a new policy is new data, never a new compilation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from vitjax.models.config import ViTConfig
from vitjax.models.vit import Masks
from vitjax.pruning.policy import KeepCounts, Policy


@flax.struct.dataclass
class Ranks:
    """Importance ranks, 0 = most important, along the last axis of each field.

    head [L, H], neuron [L, F], token [L, N] (token positions, for the static token selection
    mode; None when tokens are chosen per image by class attention).
    """

    head: jax.Array
    neuron: jax.Array
    token: jax.Array | None = None


def ranks_from_scores(scores) -> jax.Array:
    """Ranks along the last axis, highest score first; ties go to the lower index."""
    scores = jnp.asarray(scores)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def identity_ranks(config: ViTConfig, with_tokens: bool = True) -> Ranks:
    """Ranks by index (keeps the first heads/neurons/tokens): a placeholder before scoring."""
    def arange(size):
        return jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (config.depth, size))

    token = arange(config.num_tokens) if with_tokens else None
    return Ranks(arange(config.num_heads), arange(config.mlp_dim), token)


def static_token_masks(token_ranks, keep_tokens, num_prefix: int) -> jax.Array:
    """Cumulative token selection at fixed positions: at layer l keep, among the tokens that
    survived layers < l, the `keep_tokens[l] - num_prefix` patches of best rank; prefix tokens
    always survive. token_ranks [L, N] (ranks of all positions at each layer), keep_tokens [L]
    (prefix included). Returns [L, N] bool, each row a subset of the previous one."""
    token_ranks = jnp.asarray(token_ranks)
    L, N = token_ranks.shape
    is_prefix = jnp.arange(N) < num_prefix
    alive = jnp.ones((N,), bool)
    rows = []
    for layer in range(L):
        rank = token_ranks[layer]
        # Rank among surviving patches: how many surviving patches are ranked better.
        better = (rank[None, :] < rank[:, None]) & (alive & ~is_prefix)[None, :]
        rank_among_alive = better.sum(axis=1)
        keep_patches = jnp.asarray(keep_tokens)[layer] - num_prefix
        alive = is_prefix | (alive & (rank_among_alive < keep_patches))
        rows.append(alive)
    return jnp.stack(rows)


def check_token_mode(config: ViTConfig, token_mode: str) -> None:
    """Refuses per-image token selection by class attention for a model without a class token:
    there is no class-token row to rank the tokens by. Static positions (scored by HSIC per
    position) work for every family."""
    if token_mode == "attention" and not config.class_token:
        raise ValueError(
            f"token_mode='attention' selects tokens by class attention, but this {config.family} "
            "has no class token; use token_mode='static' (config.train.token_mode=static)"
        )


def masks_from_ranks(
    config: ViTConfig, ranks: Ranks, keep: KeepCounts, token_mode: str = "static"
) -> Masks:
    """Masks of the sub-network that keeps the top-`keep` heads/neurons/tokens of each layer.

    token_mode 'static': fixed token positions by `ranks.token` (the paper's HSIC per position);
    'attention': each image keeps its `keep.token[l]` tokens with the largest class attention
    (DynamicViT/EViT and the authors' released code). Traceable in `keep`.
    """
    head = ranks.head < jnp.asarray(keep.head)[:, None]
    neuron = ranks.neuron < jnp.asarray(keep.neuron)[:, None]
    if token_mode == "static":
        if ranks.token is None:
            raise ValueError("token_mode='static' needs token ranks (score the tokens first)")
        token = static_token_masks(ranks.token, keep.token, config.num_prefix_tokens)
        return Masks(head=head.astype(jnp.float32), neuron=neuron.astype(jnp.float32),
                     token=token.astype(jnp.float32))
    if token_mode == "attention":
        check_token_mode(config, token_mode)
        return Masks(head=head.astype(jnp.float32), neuron=neuron.astype(jnp.float32),
                     token_keep=jnp.asarray(keep.token, jnp.int32))
    raise ValueError(f"token_mode must be 'static' or 'attention', got {token_mode!r}")


def policy_masks(
    config: ViTConfig, policy: Policy, ranks: Ranks, token_mode: str = "static"
) -> Masks:
    """Masks for one policy (host side: validates the policy, then builds the masks)."""
    keep = policy.keep_counts(config)
    return masks_from_ranks(config, ranks, keep, token_mode)
