"""Baseline importance criteria the paper compares HSIC against (Fig. 1).

All return scores where higher = more important, in the layouts of `Scores`: head [L, H],
neuron [L, F], token [L, N]; `vitjax.pruning.masks.ranks_from_scores` turns them into ranks.

- random: i.i.d. uniform scores (a random ranking).
- magnitude (neurons): the L2 norm of each neuron's incoming fc1 weights, i.e. the row norm
  of PyTorch's fc1.weight [F, d] ("row norm of the weights" in the paper). The incoming
  weights decide how strongly the neuron responds; the outgoing fc2 row (`which='fc2'`) or the
  product of both (`which='both'`, the neuron's gain through the block) are offered too.
- SpAtten head importance: the mean L1 magnitude of each head's attention output
  (SpAtten's cascade head pruning accumulates |head output| over tokens and inputs).
- class-token attention (tokens): per image, inside the model (Masks.token_keep, the
  DynamicViT/EViT rule); `class_attention_scores` gives the static per-position average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vitjax.models import axes
from vitjax.models.config import ViTConfig
from vitjax.scoring.scores import Scores

Array = jax.Array


def random_scores(config: ViTConfig, key: Array) -> Scores:
    """Uniform random scores for every head, neuron and token position."""
    k_head, k_neuron, k_token = jax.random.split(key, 3)
    L = config.depth
    return Scores(
        head=jax.random.uniform(k_head, (L, config.num_heads)),
        neuron=jax.random.uniform(k_neuron, (L, config.mlp_dim)),
        token=jax.random.uniform(k_token, (L, config.num_tokens)),
    )


def magnitude_neuron_scores(params, config: ViTConfig, *, which: str = "fc1",
                            ord: int = 2) -> Array:
    """[L, F] weight-norm importance of each FFN neuron (see module docstring)."""
    if which not in ("fc1", "fc2", "both"):
        raise ValueError(f"which must be 'fc1', 'fc2' or 'both', got {which!r}")
    rows = []
    for layer in range(config.depth):
        mlp = params[f"blocks_{layer}"]["mlp"]
        norms = {}
        for part in ("fc1", "fc2"):
            name = f"blocks_{layer}/mlp/{part}/kernel"
            # The norm runs over the axis that is not the neuron axis (vitjax.models.axes).
            embed_axis = axes.axis_of(name, axes.EMBED)
            norms[part] = jnp.linalg.norm(mlp[part]["kernel"], ord=ord, axis=embed_axis)
        rows.append({"fc1": norms["fc1"], "fc2": norms["fc2"],
                     "both": norms["fc1"] * norms["fc2"]}[which])
    return jnp.stack(rows)


def spatten_head_scores(aux: dict) -> Array:
    """[L, H] SpAtten head importance: mean over images and tokens of sum_d |head output|."""
    return jnp.stack([jnp.abs(b["attn_heads"]).sum(-1).mean(axis=(0, 1)) for b in aux["blocks"]])


def class_attention_scores(aux: dict) -> Array:
    """[L, N] class-token attention probability of each position, averaged over images and
    heads (a static-position version of the per-image rule)."""
    return jnp.stack([b["cls_attn"].mean(axis=(0, 1)) for b in aux["blocks"]])
