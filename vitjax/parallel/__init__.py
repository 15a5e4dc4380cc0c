"""Meshes, sharding rules and multi-host start-up."""

from vitjax.parallel.distributed import is_main_process, maybe_initialize
from vitjax.parallel.mesh import (
    DATA,
    MODEL,
    MODEL_PARALLEL_RULES,
    batch_sharding,
    batch_to_global,
    host_to_global,
    local_batch_slice,
    local_to_global,
    make_mesh,
    replicated,
    spec_for,
    tree_partition_specs,
    tree_shardings,
)

__all__ = [
    "DATA", "MODEL", "MODEL_PARALLEL_RULES", "batch_sharding", "batch_to_global",
    "host_to_global",
    "local_batch_slice", "local_to_global", "make_mesh", "replicated", "spec_for",
    "tree_partition_specs", "tree_shardings", "is_main_process", "maybe_initialize",
]
