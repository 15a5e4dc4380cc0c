"""Logical axis names of every ViT parameter: the one table of the parameter layout.

Sharding (`vitjax.parallel.mesh`), physical pruning (`vitjax.pruning.prune`) and the magnitude
criterion (`vitjax.scoring.criteria`) read which axis of which parameter holds heads, FFN
neurons or the embedding from here, in the style of MaxText's `logical_axis_rules`: a parameter
names its axes ('embed', 'heads', 'mlp', ...), and a separate rule table maps logical names to
mesh axes. The layout itself is documented in `vitjax.models.vit`.
"""

from __future__ import annotations

import re

# Logical axis names.
EMBED = "embed"  # d, the residual width
HEADS = "heads"  # attention heads (pruned, model-parallel)
HEAD_DIM = "head_dim"  # d_h
QKV = "qkv"  # the 3 of q, k, v
MLP = "mlp"  # FFN hidden units (pruned, model-parallel)
CLASSES = "classes"
TOKENS = "tokens"
PATCH = "patch"  # patch rows / columns
CHANNELS = "channels"  # input image channels

# Path regex (matched against 'blocks_3/attn/qkv/kernel') -> one logical name per array axis.
# The first match wins; a parameter with no entry has no named axes (replicated, never sliced).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/qkv/kernel$", (EMBED, QKV, HEADS, HEAD_DIM)),
    (r"attn/qkv/bias$", (QKV, HEADS, HEAD_DIM)),
    (r"attn/proj/kernel$", (HEADS, HEAD_DIM, EMBED)),
    (r"attn/proj/bias$", (EMBED,)),
    (r"mlp/fc1/kernel$", (EMBED, MLP)),
    (r"mlp/fc1/bias$", (MLP,)),
    (r"mlp/fc2/kernel$", (MLP, EMBED)),
    (r"mlp/fc2/bias$", (EMBED,)),
    (r"norm\d?/(scale|bias)$", (EMBED,)),
    (r"ls\d/gamma$", (EMBED,)),  # LayerScale: per channel of d, never sliced by pruning
    (r"^patch_embed/kernel$", (PATCH, PATCH, CHANNELS, EMBED)),
    (r"^patch_embed/bias$", (EMBED,)),
    (r"^(cls_token|dist_token|reg_token)$", (None, None, EMBED)),
    (r"^pos_embed$", (None, TOKENS, EMBED)),
    (r"^head(_dist)?/kernel$", (EMBED, CLASSES)),
    (r"^head(_dist)?/bias$", (CLASSES,)),
)

# Logical name -> mesh axis for tensor parallelism: each device computes whole heads and whole
# neurons, so the only collectives are the reductions after proj and fc2 (Megatron-style).
MODEL_PARALLEL_RULES: tuple[tuple[str, str], ...] = ((HEADS, "model"), (MLP, "model"))


def param_axes(name: str, ndim: int | None = None) -> tuple[str | None, ...] | None:
    """Logical axis names of the parameter at path `name` ('blocks_0/mlp/fc1/kernel'), or None.

    Optimizer moments carry their parameter's path as a suffix of theirs, so they match too.
    With `ndim`, a table entry of another rank does not match (e.g. a scalar optimizer count).
    """
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name) and (ndim is None or len(axes) == ndim):
            return axes
    return None


def axis_of(name: str, logical: str) -> int | None:
    """Position of logical axis `logical` in parameter `name`, or None if it has none."""
    axes = param_axes(name)
    if axes is None or logical not in axes:
        return None
    return axes.index(logical)
