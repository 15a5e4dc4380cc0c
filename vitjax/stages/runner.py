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
from vitjax.stages import ORDER, STAGES, checks, sections, upstream
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


def _remove_if_empty(ctx: Context, name: str) -> None:
    """A stage that failed before writing anything leaves no empty folder behind."""
    def has_files(folder) -> bool:  # epath has no recursive glob on cloud paths
        return any(p.is_file() or (p.is_dir() and has_files(p)) for p in folder.iterdir())

    path = ctx.workdir / name
    if ctx.is_main and path.is_dir() and not has_files(path):
        path.rmtree()


def stale_stages(ctx: Context, requested: list[str]) -> dict[str, list[str]]:
    """{stage: changed keys} of finished stages whose recorded config differs from this one and
    that the requested stages would reuse (themselves or upstream)."""
    used = {s for name in requested for s in upstream(name)}
    stale = {}
    for name in ORDER:
        if name not in STAGES or not ctx.done_file(name).exists():
            continue
        recorded = workdir_lib.read_json(ctx.done_file(name)).get("config")
        if recorded is None:  # written before vitjax recorded configs: cannot tell
            logging.warning("stage %s: its results record no config; reused as they are", name)
            continue
        changes = checks.config_changes(recorded, checks.stage_config(ctx.config,
                                                                      sections(name)))
        if changes or any(n in stale for n in STAGES[name].needs):
            stale[name] = changes or [f"reads the results of {STAGES[name].needs}, redone"]
    return {name: changes for name, changes in stale.items() if name in used}


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Context:
    """Runs `config.stages` in `workdir` (local path or gs://...); returns the context."""
    stages = parse_stages(config.get("stages", ",".join(STAGES)))
    checks.check_config(config)
    local = "://" not in str(workdir)
    ctx = Context(config, epath.Path(os.path.abspath(workdir) if local else workdir))
    ctx.model_config  # noqa: B018  (validates config.model against config.data up front)
    checks.check_target(ctx.model_config, ctx.target_gmacs, ctx.dense_gmacs)
    ctx.mesh  # noqa: B018  (config.mesh must fit the devices)
    if ctx.is_main:
        checks.check_workdir(ctx.workdir)
    _sync_processes("vitjax pipeline start")  # every process sees the same finished stages
    stale = stale_stages(ctx, stages)
    if stale:
        first = next(iter(stale))
        if not config.get("overwrite", False):
            raise UserError(
                f"stage {first!r} in {ctx.workdir} was run with another config "
                f"({'; '.join(stale[first][:6])}); rerun with --config.overwrite=True to redo "
                f"it and the stages after it ({', '.join(stale)}), or use a new --workdir"
            )
        if ctx.is_main:
            for name in stale:
                print(f"[vitjax] {name}: config changed, removing its old results", flush=True)
                (ctx.workdir / name).rmtree()
        _sync_processes("vitjax stale stages removed")
    pipeline_started = time.perf_counter()
    for index, name in enumerate(stages, 1):
        step = f"{name} ({index}/{len(stages)})"
        if ctx.done_file(name).exists():
            logging.info("stage %s: already done (%s), skipping", name, ctx.done_file(name))
            print(f"[vitjax] {step}: done earlier with this config, skipped", flush=True)
            continue
        print(f"[vitjax] {step}: running ({STAGES[name].description})", flush=True)
        started = time.perf_counter()
        try:
            summary = STAGES[name].run(ctx)
        except BaseException:
            _remove_if_empty(ctx, name)
            raise
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["config"] = checks.stage_config(config, sections(name))
        if ctx.is_main:
            workdir_lib.write_json(ctx.done_file(name), summary)
        # Process 0 writes a stage's files; nobody starts the next stage before they exist.
        _sync_processes(f"vitjax stage {name} done")
        total = (time.perf_counter() - pipeline_started) / 60
        print(f"[vitjax] {step}: finished in {summary['seconds']}s ({total:.1f} min since the "
              f"start) -> {ctx.workdir / name}", flush=True)
    if ctx.is_main:  # only a config whose stages all ran (or matched) is recorded
        workdir_lib.write_json(ctx.workdir / "config.json", config.to_dict())
    return ctx
