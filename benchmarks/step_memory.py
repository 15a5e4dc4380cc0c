"""What the step benchmarks share (supernet_step.py, teacher_cost.py): the parts runner, fake
CPU devices, mesh layouts written 'data=4,model=2,fsdp', and the per-device memory of a
compiled train step.

Import it before jax (`fake_cpu_devices` must set XLA_FLAGS first).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

GIB = 2**30


def run_parts(args, parts: Mapping[str, Callable[[], None]]) -> None:
    """Fakes `args.devices` CPU devices, prints the jax header, then runs the parts that
    `args.part` names ('all': every one, in order)."""
    fake_cpu_devices(args.devices)
    import jax

    print(f"jax {jax.__version__}, {jax.device_count()} devices ({jax.devices()[0].platform})")
    for name, part in parts.items():
        if args.part in (name, "all"):
            part()
    sys.stdout.flush()


def fake_cpu_devices(count: int) -> None:
    """On CPU, let XLA show `count` devices (on GPU/TPU the real ones are used)."""
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={count}")


def mesh_layout(text: str) -> dict:
    """'data=4,model=2,fsdp' -> the config.mesh dict (unnamed axes: data=-1, model=1)."""
    out = {"data": -1, "model": 1, "fsdp": False, "fsdp_min_size": 2**18}
    for part in text.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = True if not value else int(value)
    return out


def step_memory(trainer, batch: int, image_size: int = 224) -> tuple[int, int, int]:
    """(argument, temporary, total) bytes per device of `trainer`'s supernet train step at
    global batch `batch`, compiled from abstract inputs (nothing allocated) and read from
    `compiled.memory_analysis()`. The donated state's outputs reuse the argument buffers
    (alias_size), so they are not counted twice."""
    import jax
    import jax.numpy as jnp

    from vitjax.parallel import batch_sharding, replicated

    mesh, depth = trainer.mesh, trainer.config.depth
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32,
                                  sharding=batch_sharding(mesh))
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding(mesh))
    keep = {k: jax.ShapeDtypeStruct((1, depth), jnp.int32, sharding=replicated(mesh))
            for k in ("head", "neuron", "token")}
    stats = trainer.train_step.lower(trainer.abstract_state, images, labels,
                                     keep).compile().memory_analysis()
    args = stats.argument_size_in_bytes
    total = (args + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    return args, stats.temp_size_in_bytes, total
