"""A `jax.export` artifact of a model's inference function: one file that needs only jax to run.

The parameters are closed over, so they are constants inside the serialized StableHLO module:
the artifact is a single self-contained file whose one input is the image batch, which is what
a server wants to load (no parameter tree, no Flax, no vitjax). Passing the parameters as an
argument instead would save nothing at run time and would make every consumer rebuild the exact
pytree structure of the parameters, i.e. depend on vitjax's parameter layout.

The batch dimension is symbolic (`jax.export.symbolic_shape`), so one artifact serves any batch
size; the image size, the pruned widths and the kept token counts are static.

This module imports only the standard library at module level, and `load_exported` /
`load_and_run` need only jax and numpy: the file can be copied next to a deployment (or loaded by
path) where vitjax and Flax are not installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

SUFFIX = ".jax_exported"


def export_jax(
    model,
    params,
    path: str | os.PathLike,
    *,
    batch: str | int = "b",
    platforms: Sequence[str] | None = None,
):
    """Serializes `model`'s inference function (logits only) to `path`; returns the Exported.

    batch: a name for a symbolic batch dimension, or a fixed batch size.
    platforms: e.g. ('cpu', 'cuda', 'tpu') for one artifact that runs on all of them; None
      lowers for the default backend of this process.
    """
    import jax
    import jax.numpy as jnp
    from jax import export

    from vitjax.export.artifact import image_shape, inference_fn
    from vitjax.fileio import write_bytes

    batch_dims = export.symbolic_shape(batch) if isinstance(batch, str) else (int(batch),)
    spec = jax.ShapeDtypeStruct((*batch_dims, *image_shape(model)), jnp.float32)
    exported = export.export(jax.jit(inference_fn(model, params)), platforms=platforms)(spec)
    write_bytes(path, exported.serialize())
    return exported


def load_exported(path: str | os.PathLike):
    """The `jax.export.Exported` stored in `path` (call it with `.call(images)`)."""
    from jax import export

    with open(os.fspath(path), "rb") as f:
        return export.deserialize(bytearray(f.read()))


def load_and_run(path: str | os.PathLike, images):
    """Logits (numpy) of the artifact at `path` for images [B, H, W, C] float32."""
    import jax.numpy as jnp
    import numpy as np

    return np.asarray(load_exported(path).call(jnp.asarray(images, jnp.float32)))
