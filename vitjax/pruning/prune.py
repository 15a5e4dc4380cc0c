"""Physical pruning: slice the kept heads and neurons out of a dense parameter tree.

The result is a smaller model (a `ViTConfig` with per-layer sizes, plus its parameters) that
computes exactly what the masked supernet computes for the same policy and ranks.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vitjax.models.config import ViTConfig
from vitjax.pruning.masks import Ranks, static_token_masks
from vitjax.pruning.policy import Policy


def _top(ranks: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` best-ranked entries, in their original order."""
    return np.sort(np.flatnonzero(ranks < keep))


def prune_params(
    config: ViTConfig, params, policy: Policy, ranks: Ranks, token_mode: str = "static"
) -> tuple[ViTConfig, dict]:
    """Returns (pruned_config, pruned_params) for `policy` applied to the dense model."""
    keep = policy.keep_counts(config)
    pruned = policy.pruned_config(config)
    if token_mode == "static":
        if ranks.token is None:
            raise ValueError("token_mode='static' needs token ranks (score the tokens first)")
        alive = np.asarray(
            static_token_masks(ranks.token, keep.token, config.num_prefix_tokens)
        )
        indices, previous = [], np.arange(config.num_tokens)
        for row in alive:
            positions = np.flatnonzero(row)  # original positions alive after this layer
            indices.append(tuple(int(i) for i in np.searchsorted(previous, positions)))
            previous = positions
        pruned = dataclasses.replace(pruned, layer_token_indices=tuple(indices))
    elif token_mode != "attention":
        raise ValueError(f"token_mode must be 'static' or 'attention', got {token_mode!r}")

    params = jax.tree.map(np.asarray, params)
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    head_ranks, neuron_ranks = np.asarray(ranks.head), np.asarray(ranks.neuron)
    for layer in range(config.depth):
        block = params[f"blocks_{layer}"]
        new = {}
        heads = _top(head_ranks[layer], int(keep.head[layer]))
        if heads.size:
            qkv, proj = block["attn"]["qkv"], block["attn"]["proj"]
            new["norm1"] = block["norm1"]
            new["attn"] = {
                "qkv": {"kernel": qkv["kernel"][:, :, heads], "bias": qkv["bias"][:, heads]},
                "proj": {"kernel": proj["kernel"][heads], "bias": proj["bias"]},
            }
        neurons = _top(neuron_ranks[layer], int(keep.neuron[layer]))
        if neurons.size:
            fc1, fc2 = block["mlp"]["fc1"], block["mlp"]["fc2"]
            new["norm2"] = block["norm2"]
            new["mlp"] = {
                "fc1": {"kernel": fc1["kernel"][:, neurons], "bias": fc1["bias"][neurons]},
                "fc2": {"kernel": fc2["kernel"][neurons], "bias": fc2["bias"]},
            }
        out[f"blocks_{layer}"] = new
    return pruned, out
