"""Device mesh and the sharding rule table for ViT parameters, optimizer state and batches.

The mesh has two axes: 'data' (batch; optionally FSDP-sharded parameters) and 'model' (tensor
parallelism over attention heads and FFN hidden units). A parameter's spec comes from the
logical axis names of its path (`vitjax.models.axes`) and the rule table that maps 'heads' and
'mlp' to 'model'; FSDP then shards the largest remaining axis over 'data'. The same function
serves the optimizer state, whose moments carry the parameter paths inside their own paths.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vitjax.models import axes as axes_lib

DATA, MODEL = "data", "model"

# Which axes are split over 'model' comes from the logical axis names of the parameters
# (vitjax.models.axes): heads and FFN hidden units, the axes that pruning removes.
MODEL_PARALLEL_RULES = axes_lib.MODEL_PARALLEL_RULES


@functools.cache  # once per parameter and mesh size, not per tree walk
def _log_replicated(name: str, logical_name: str, size: int, mesh_axis: str, mesh_size: int):
    logging.info("%s: %s axis of size %d does not divide mesh %s=%d; replicated", name,
                 logical_name, size, mesh_axis, mesh_size)


def make_mesh(mesh_config: Mapping[str, Any] | None = None, devices=None) -> Mesh:
    """Mesh ('data', 'model') from `config.mesh` = {data: int (-1: all the rest), model: int}.

    With fewer devices requested than exist (single process only) the first ones are used, which
    lets tests compare a 1-device run with an 8-device run in one process.
    """
    mesh_config = dict(mesh_config or {})
    devices = list(jax.devices() if devices is None else devices)
    model = int(mesh_config.get("model", 1))
    data = int(mesh_config.get("data", -1))
    if model < 1:
        raise ValueError(f"mesh.model must be >= 1, got {model}")
    if data == -1:
        if len(devices) % model:
            raise ValueError(
                f"mesh.model={model} does not divide the {len(devices)} devices; choose a divisor"
            )
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices but "
            f"{len(devices)} exist; set config.mesh.data=-1 to use all of them"
        )
    if data * model != len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"multi-host runs must use every device: mesh data={data} x model={model} != "
            f"{len(devices)} devices"
        )
    axis_types = (AxisType.Auto, AxisType.Auto)
    if data * model == len(devices):
        # Topology-aware placement (TPU torus, NVLink islands): 'model' stays on close devices.
        return jax.make_mesh((data, model), (DATA, MODEL), axis_types=axis_types,
                             devices=devices)
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA, MODEL), axis_types=axis_types)


def path_name(path) -> str:
    """'blocks_0/attn/qkv/kernel' from a jax key path; non-dict keys (optimizer state fields,
    tuple positions) are left out so optimizer moments map like their parameters."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("params",):
            names.append(key.name)
    return "/".join(names)


def spec_for(
    name: str,
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    *,
    fsdp: bool = False,
    fsdp_min_size: int = 2**18,
    rules: Sequence[tuple[str, str]] = MODEL_PARALLEL_RULES,
) -> P:
    """PartitionSpec of one array named `name` with `shape` on a mesh of `mesh_shape`.

    A logical axis that `rules` maps to a mesh axis is split over it when its size divides the
    mesh axis; otherwise it is replicated (a pruned layer with 3 heads on a model=2 mesh still
    trains, its heads computed redundantly), as big_vision's FSDP rule does, and logged once.
    """
    spec: list[Any] = [None] * len(shape)
    logical = axes_lib.param_axes(name, len(shape))
    rule_table = dict(rules)
    for axis, logical_name in enumerate(logical or ()):
        mesh_axis = rule_table.get(logical_name)
        size = mesh_shape.get(mesh_axis, 1) if mesh_axis else 1
        if size <= 1:
            continue
        if shape[axis] % size:
            _log_replicated(name, logical_name, shape[axis], mesh_axis, size)
            continue
        spec[axis] = mesh_axis
    data_size = mesh_shape.get(DATA, 1)
    if fsdp and data_size > 1 and int(np.prod(shape, dtype=np.int64)) >= fsdp_min_size:
        # Shard the largest free axis that divides evenly; small or odd arrays stay replicated.
        free = [a for a in range(len(shape)) if spec[a] is None and shape[a] % data_size == 0]
        if free:
            spec[max(free, key=lambda a: shape[a])] = DATA
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_partition_specs(tree, mesh: Mesh, *, fsdp: bool = False, fsdp_min_size: int = 2**18):
    """PartitionSpecs for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    mesh_shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: spec_for(
            path_name(path), np.shape(leaf), mesh_shape, fsdp=fsdp, fsdp_min_size=fsdp_min_size
        ),
        tree,
    )


def tree_shardings(tree, mesh: Mesh, *, fsdp: bool = False, fsdp_min_size: int = 2**18):
    """NamedShardings for every leaf of `tree`, following the rule table."""
    specs = tree_partition_specs(tree, mesh, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over 'data', replicated over 'model'."""
    return NamedSharding(mesh, P(DATA))


def local_batch_slice(mesh: Mesh, global_batch: int) -> slice:
    """Rows of a global batch that this process must supply.

    Every process supplies one contiguous block of rows (process p: rows
    [p * B / P, (p + 1) * B / P) on meshes whose devices are ordered by process, which
    `make_mesh` guarantees); raises if the mesh breaks that layout.
    """
    if global_batch % mesh.shape[DATA]:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the mesh's data axis "
            f"({mesh.shape[DATA]}); change train.batch_size or mesh.data"
        )
    sharding = batch_sharding(mesh)
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        block = index[0]
        rows.update(range(*block.indices(global_batch)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError("this process's devices do not hold one contiguous block of the batch")
    return slice(start, stop)


def host_to_global(array, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a value every process holds in full (ranks, keep counts, init
    parameters); each process places only its addressable shards."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def local_to_global(local, mesh: Mesh, global_batch: int) -> jax.Array:
    """Global batch array from this process's rows (see `local_batch_slice`)."""
    local = np.asarray(local)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh), local, (global_batch,) + local.shape[1:]
    )


def batch_to_global(local_batch: dict, mesh: Mesh) -> dict:
    """A tree of this process's batch rows (numpy) -> global jax.Arrays split over 'data'; the
    global batch is every process's rows, in process order (the input pipeline's layout)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
