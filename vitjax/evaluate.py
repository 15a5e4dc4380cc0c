"""The one evaluator: accuracy and loss of a (sub-)network over a stream of batches.

    result = evaluate(model, params, keep, batches, mesh, ranks=ranks, token_mode='attention')

`batches` is an iterable of this process's rows of global evaluation batches, dicts with
'image', 'label' and 'mask' (0 on padding rows), the same number of batches on every process:
what `Datasets.eval_batches(name)` yields, or `array_batches(images, labels, size)` for arrays
in memory. Nothing beyond one batch is held, on any host, so ImageNet-size sets stream.

What is evaluated: `keep` (KeepCounts or a {'head','neuron','token'} dict of [L] counts, masks
built inside the jitted step from `ranks`), ready-made `Masks`, or None (the whole model). The
step is jitted once per (model, token_mode, mask structure): every policy reuses it, since keep
counts and ranks are traced arrays. The trainer's periodic evaluation, the criteria sweep and
the policy search all call this function.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vitjax.models.vit import Masks, ViT
from vitjax.parallel import mesh as mesh_lib
from vitjax.pruning.masks import Ranks, masks_from_ranks
from vitjax.pruning.policy import KeepCounts


@functools.partial(jax.jit, static_argnames=("model", "token_mode"))
def eval_step(model: ViT, token_mode: str, params, ranks: Ranks | None,
              selection: KeepCounts | Masks | None, images, labels, weights):
    """Sums of loss / correct / count over one padded global batch."""
    masks = selection
    if isinstance(selection, KeepCounts):
        masks = masks_from_ranks(model.config, ranks, selection, token_mode)
    logits, _ = model.apply({"params": params}, images, masks=masks, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss": jnp.sum(loss * weights), "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}


def _as_selection(keep, mesh: Mesh):
    if keep is None or isinstance(keep, Masks):
        return keep
    if isinstance(keep, Mapping):
        keep = KeepCounts(neuron=keep["neuron"], head=keep["head"], token=keep["token"])
    replicated = mesh_lib.replicated(mesh)
    return jax.tree.map(
        lambda a: mesh_lib.host_to_global(np.asarray(a, np.int32), replicated), keep
    )


def _as_ranks(ranks, mesh: Mesh) -> Ranks | None:
    if ranks is None:
        return None
    if isinstance(ranks, Mapping):
        ranks = Ranks(head=ranks["head"], neuron=ranks["neuron"], token=ranks.get("token"))
    replicated = mesh_lib.replicated(mesh)

    def place(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a  # already a global array (the training state's ranks)
        return mesh_lib.host_to_global(np.asarray(a, np.int32), replicated)

    return jax.tree.map(place, ranks)


def evaluate(
    model: ViT,
    params,
    keep: KeepCounts | Mapping[str, Any] | Masks | None,
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
    *,
    ranks: Ranks | Mapping[str, Any] | None = None,
    token_mode: str = "attention",
) -> dict[str, float]:
    """{'accuracy', 'loss', 'count'} of `model` with `params` over `batches` (see module doc).

    params: global arrays (e.g. the training state's) or host arrays, which jit places.
    """
    if isinstance(keep, (KeepCounts, Mapping)) and ranks is None:
        raise ValueError("evaluate: keep counts need the ranks that choose what is kept")
    selection = _as_selection(keep, mesh)
    ranks = _as_ranks(ranks, mesh) if isinstance(selection, KeepCounts) else None
    totals: collections.Counter = collections.Counter()
    pending = []
    for batch in batches:
        global_rows = len(batch["image"]) * jax.process_count()
        arrays = (batch["image"], np.asarray(batch["label"], np.int32),
                  np.asarray(batch["mask"], np.float32))
        placed = [mesh_lib.local_to_global(a, mesh, global_rows) for a in arrays]
        pending.append(eval_step(model, token_mode, params, ranks, selection, *placed))
        if len(pending) >= 8:  # bounded: a few batches in flight, never the whole set
            _accumulate(totals, pending)
    _accumulate(totals, pending)
    if not totals["count"]:
        raise ValueError("the evaluation stream yielded no examples")
    return {"accuracy": totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"], "count": int(totals["count"])}


def _accumulate(totals: collections.Counter, pending: list) -> None:
    for out in jax.device_get(pending):
        for k, v in out.items():
            totals[k] += float(v)
    pending.clear()


def array_batches(images, labels, batch_size: int, *, rows: slice | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Padded evaluation batches (the `Datasets.eval_batches` format) over arrays in memory
    (tests, small sets). `rows`: this process's rows of every global batch (default all)."""
    images, labels = np.asarray(images), np.asarray(labels)
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        weight = np.ones(len(x), np.float32)
        pad = batch_size - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
        batch = {"image": x, "label": y, "mask": weight}
        yield batch if rows is None else {k: v[rows] for k, v in batch.items()}
