"""Physical pruning: slice the kept heads and neurons out of a dense parameter tree.

The result is a smaller model (a `ViTConfig` with per-layer sizes, plus its parameters) that
computes exactly what the masked supernet computes for the same policy and ranks.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from vitjax.models import axes
from vitjax.models.config import ViTConfig
from vitjax.pruning.masks import Ranks, check_token_mode, static_token_masks
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
    else:
        check_token_mode(config, token_mode)

    params = jax.tree.map(np.asarray, params)
    out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    head_ranks, neuron_ranks = np.asarray(ranks.head), np.asarray(ranks.neuron)
    for layer in range(config.depth):
        block = params[f"blocks_{layer}"]
        kept = {
            axes.HEADS: _top(head_ranks[layer], int(keep.head[layer])),
            axes.MLP: _top(neuron_ranks[layer], int(keep.neuron[layer])),
        }
        new = {}
        # A sub-block with nothing kept is removed whole (its residual branch passes through).
        # LayerScale gammas scale channels of d, not heads or neurons: kept whole with their
        # sub-block.
        for sub, norm, scale, logical in (("attn", "norm1", "ls1", axes.HEADS),
                                          ("mlp", "norm2", "ls2", axes.MLP)):
            if kept[logical].size:
                new[norm] = block[norm]
                new[sub] = _slice_tree(block[sub], f"blocks_{layer}/{sub}", kept)
                if scale in block:
                    new[scale] = _slice_tree(block[scale], f"blocks_{layer}/{scale}", kept)
        out[f"blocks_{layer}"] = new
    return pruned, out


def _slice_tree(tree: dict, prefix: str, kept: dict[str, np.ndarray]) -> dict:
    """Every array of `tree` sliced along its logical axes named in `kept` (vitjax.models.axes)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out[key] = _slice_tree(value, name, kept)
            continue
        for logical, indices in kept.items():
            axis = axes.axis_of(name, logical)
            if axis is not None:
                value = np.take(value, indices, axis=axis)
        out[key] = value
    return out
