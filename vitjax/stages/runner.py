"""Runs the configured stages in order in one workdir, skipping finished ones."""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from absl import logging
from etils import epath

from vitjax import workdir as workdir_lib
from vitjax.errors import UserError
from vitjax.stages import ORDER, STAGES
from vitjax.stages.context import Context


def parse_stages(spec: str | tuple | list) -> list[str]:
    """`config.stages` ('pretrain,score' or a list) -> stage names in pipeline order."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in ORDER]
    if unknown or not names:
        raise UserError(
            f"unknown stage(s) {unknown or spec!r} in config.stages; choose from "
            f"{','.join(ORDER)}"
        )
    missing = [n for n in names if n not in STAGES]
    if missing:
        raise UserError(
            f"stage(s) {missing} are not implemented in this version of vitjax; available: "
            f"{','.join(s for s in ORDER if s in STAGES)}"
        )
    return sorted(names, key=ORDER.index)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Context:
    """Runs `config.stages` in `workdir` (local path or gs://...); returns the context."""
    stages = parse_stages(config.get("stages", ",".join(STAGES)))
    local = "://" not in str(workdir)
    ctx = Context(config, epath.Path(os.path.abspath(workdir) if local else workdir))
    ctx.model_config  # noqa: B018  (validates config.model against config.data up front)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        workdir_lib.write_json(ctx.workdir / "config.json", config.to_dict())
    _sync_processes("vitjax pipeline start")  # every process sees the same finished stages
    for name in stages:
        if ctx.done_file(name).exists():
            logging.info("stage %s: already done (%s), skipping", name, ctx.done_file(name))
            print(f"[vitjax] {name}: done earlier, skipped", flush=True)
            continue
        print(f"[vitjax] {name}: running ({STAGES[name].description})", flush=True)
        started = time.perf_counter()
        summary = STAGES[name].run(ctx)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        if ctx.is_main:
            workdir_lib.write_json(ctx.done_file(name), summary)
        # Process 0 writes a stage's files; nobody starts the next stage before they exist.
        _sync_processes(f"vitjax stage {name} done")
        print(f"[vitjax] {name}: finished in {summary['seconds']}s -> {ctx.workdir / name}",
              flush=True)
    return ctx
