"""Orbax checkpoints of the training state: async, keep-N, preemption-safe, validated on resume.

A checkpoint holds two items: 'state' (step, parameters, optimizer state, rng, ranks) and 'meta'
(JSON: step, a hash of the configuration that determines the run, and that configuration). A
resume restores the latest *finalised* step (orbax writes into a temporary directory and renames
it when complete, so a save cut by kill -9 is never picked up). A checkpoint of another
configuration or one that cannot be read is an error, never a silent restart from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


@contextlib.contextmanager
def _orbax_quiet():
    """Drops orbax's (and TensorStore's) log records while restoring: a failure becomes one
    CheckpointError that carries the detail, instead of pages of logged errors."""

    def keep(record) -> bool:
        return "/orbax/" not in record.pathname and "tensorstore" not in record.pathname

    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says which and what to do."""


def config_fingerprint(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class Checkpointer:
    """CheckpointManager for one training run under `directory`."""

    def __init__(
        self, directory: str, *, run_config: dict[str, Any], keep: int = 3, async_save=True,
        allowed_changes: tuple[str, ...] = (),
    ):
        # epath: local paths and cloud buckets (gs://...) alike.
        # orbax needs absolute paths; cloud URLs (gs://...) already are.
        local = "://" not in str(directory)
        self.directory = epath.Path(os.path.abspath(directory) if local else directory)
        self.run_config = json.loads(json.dumps(run_config, default=str))
        self.fingerprint = config_fingerprint(self.run_config)
        # Keys ('train.lr', ...) a resume may change on purpose (train.resume_overrides).
        self.allowed_changes = tuple(allowed_changes)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        # Replica-parallel saving slices replicated arrays with one eager jit per shape: seconds
        # of compilation for nothing on small arrays, so only arrays whose slices exceed 4 MiB
        # use it.
        arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20)
        registry = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, arrays),
            (np.ndarray, ocp.type_handlers.NumpyHandler()),
            (int, ocp.type_handlers.ScalarHandler()),
            (float, ocp.type_handlers.ScalarHandler()),
            (np.number, ocp.type_handlers.ScalarHandler()),
        )
        with _orbax_quiet():  # it reads existing checkpoints' metadata; restore reports damage
            self.manager = self._manager(options, registry)

    def _manager(self, options, registry) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        with _orbax_quiet():
            return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an (async) save; the device-to-host copy finishes before this returns, so the
        caller may donate `state` to the next step right away."""
        meta = {"step": int(step), "config_hash": self.fingerprint, "config": self.run_config}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, step) of the latest complete checkpoint, or (None, None) when there is none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: the restored arrays
        land directly in the layout of the current mesh (which may differ from the saving one).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            names = [p.name for p in self.directory.iterdir()] if self.directory.exists() else []
            leftovers = [n for n in names if not n.startswith(".")]
            if leftovers:
                logging.warning(
                    "no complete checkpoint in %s (found only %s); starting from scratch",
                    self.directory, leftovers,
                )
            return None, None
        where = str(self.directory / str(step))
        try:
            with _orbax_quiet():
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "unreadable"
            raise CheckpointError(
                f"checkpoint {where} is unreadable ({type(e).__name__}: {e}); delete that "
                "directory to resume from the previous checkpoint, or use a new workdir"
            ) from e
        diff = []
        if meta.get("config_hash") != self.fingerprint:
            diff = _differences(meta.get("config", {}), self.run_config)
        if diff and all(d.split(":")[0] in self.allowed_changes for d in diff):
            logging.warning("resuming %s with changed %s (train.resume_overrides)", where,
                            "; ".join(diff))
            print(f"[vitjax] resuming {where} with changed {'; '.join(diff)}", flush=True)
            diff = []
        if diff:
            raise CheckpointError(
                f"checkpoint {where} was written by a run with another configuration "
                f"({'; '.join(diff[:8]) or 'hash differs'}); resume with the same configuration "
                "or use a new workdir"
            )
        try:
            with _orbax_quiet():
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            item=abstract_state,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(
                                abstract_state),
                        )
                    ),
                )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {where} could not be restored into the current model/optimizer "
                f"({type(e).__name__}: {e}); it is corrupt or incompatible: delete it to resume "
                "from the previous checkpoint, or use a new workdir"
            ) from e
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionWatch:
    """Tells the training loop when to save and stop because the job is being preempted.

    Single process: a SIGTERM handler sets a flag that the loop checks every step. Several
    processes: JAX's coordination service already receives the preemption notice and
    `reached_preemption_sync_point` makes every host agree on the same step (a host-local flag
    could stop the hosts at different steps and deadlock the collectives).
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._previous_int = None
        self.interrupted = False  # stopped by Ctrl-C (SIGINT) rather than SIGTERM
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            # Ctrl-C saves like SIGTERM instead of losing the steps since the last checkpoint;
            # a second Ctrl-C (the previous handler is back) stops at once.
            self._previous_int = signal.signal(signal.SIGINT, self._handle_int)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self._flag.set()

    def _handle_int(self, signum, frame):
        del signum, frame
        print("[vitjax] Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to "
              "stop at once)", flush=True)
        self.interrupted = True
        self._flag.set()
        signal.signal(signal.SIGINT, self._previous_int)

    def should_stop(self, step: int) -> bool:
        if not self._multiprocess:
            return self._flag.is_set()
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service not running (e.g. CPU tests)
            return False

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None
