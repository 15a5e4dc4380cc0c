"""Multi-host start-up: `jax.distributed.initialize` when the config or the environment asks.

Call `maybe_initialize(config.distributed)` first thing in a program, before anything touches a
jax backend. `initialize`: True always initialises (arguments from the config, then the
environment, then JAX's cluster auto-detection: SLURM, Open MPI, Cloud TPU); False never does;
None does when the environment shows several processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

# Environment variables the launch/ scripts set (JAX reads no such variables itself).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def environment_is_multiprocess() -> bool:
    """True when a launcher started several processes of this program."""
    if os.environ.get(ENV_COORDINATOR):
        return True
    if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    # Cloud TPU pod slices list every worker's hostname.
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize(distributed_config: Mapping[str, Any] | None = None) -> bool:
    """Initialises jax.distributed if asked to; returns whether it did."""
    cfg = dict(distributed_config or {})
    wanted = cfg.get("initialize")
    if wanted is None:
        wanted = environment_is_multiprocess()
    if not wanted:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = dict(
        coordinator_address=cfg.get("coordinator_address") or os.environ.get(ENV_COORDINATOR),
        num_processes=cfg.get("num_processes") or _int_env(ENV_NUM_PROCESSES),
        process_id=cfg.get("process_id") if cfg.get("process_id") is not None
        else _int_env(ENV_PROCESS_ID),
    )
    if cfg.get("local_device_ids") is not None:
        kwargs["local_device_ids"] = cfg["local_device_ids"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and anything else that should exist once."""
    return jax.process_index() == 0
