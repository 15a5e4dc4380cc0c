"""Runs the configured stages in order in one workdir, skipping finished ones.

The workdir is locked for the whole run (`vitjax.workdir_lock`: one writer at a time). Finished
results are reused only when they are intact, were made with this config and from the inputs in
the workdir now (`vitjax.stages.provenance`); otherwise the run stops with one line (a changed
config: --config.overwrite=True redoes) or redoes them (damaged files, inputs redone since).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import ml_collections
from absl import logging
from etils import epath

from vitjax import workdir as workdir_lib
from vitjax import workdir_lock
from vitjax.errors import UserError
from vitjax.stages import ORDER, STAGES, checks, provenance, sections, upstream
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
        return any((p.is_file() and p.name != provenance.STARTED_FILE)
                   or (p.is_dir() and has_files(p)) for p in folder.iterdir())

    path = ctx.workdir / name
    if ctx.is_main and path.is_dir() and not has_files(path):
        path.rmtree()


def stale_stages(ctx: Context, requested: list[str]) -> dict[str, list[str]]:
    """{stage: changed keys} of finished stages whose recorded config differs from this one and
    that the requested stages would reuse (themselves or upstream)."""
    used = {s for name in requested for s in upstream(name)}
    stale = {}
    for name in ORDER:
        record = _done_record(ctx, name)
        if record is None:
            continue
        recorded = record.get("config")
        if recorded is None:  # written before vitjax recorded configs: cannot tell
            logging.warning("stage %s: its results record no config; reused as they are", name)
            continue
        changes = checks.config_changes(recorded, checks.stage_config(ctx.config,
                                                                      sections(name)))
        if changes or any(n in stale for n in STAGES[name].needs):
            stale[name] = changes or [f"reads the results of {STAGES[name].needs}, redone"]
    return {name: changes for name, changes in stale.items() if name in used}


# Stages that resume from unfinished results, and the config keys (prefixes) they check
# themselves when they do: training checkpoints compare config.train (allowing
# train.resume_overrides), a search log's header pins the settings a resumed search must keep.
# Any other key of the stage's config that changed makes its unfinished results unusable.
RESUMING = {
    "pretrain": ("train.",),
    "finetune": ("train.", "finetune."),
    "compare": ("train.", "finetune.", "compare."),
    "search": ("search.",),
    "ablation": ("search.", "ablation."),
}
# ... except these, which decide what a search's values mean.
_NOT_SELF_CHECKED = ("search.objective", "search.loss_weight")


def _done_record(ctx: Context, name: str) -> dict | None:
    """The DONE.json of a finished stage; None if it has not finished (or is unreadable: the
    runner moves such files aside before it looks, see `_check_finished`)."""
    if name not in STAGES:
        return None
    record, _ = provenance.read_record(ctx.done_file(name))
    return record


def _identity(ctx: Context, name: str) -> str | None:
    record = _done_record(ctx, name)
    return None if record is None else record.get("identity")


def _current_inputs(ctx: Context, name: str, extra=()) -> dict[str, str]:
    names = [s for s in ORDER if s in set(upstream(name)[1:]) | set(extra)]
    return {s: ident for s in names if (ident := _identity(ctx, s)) is not None}


def _changed_inputs(ctx: Context, name: str, recorded: dict | None) -> list[str]:
    """What changed among the finished stages `name` read (or could read) since `recorded`."""
    if recorded is None:  # written before vitjax recorded inputs: cannot tell
        return []
    out = []
    for other in ORDER:
        if other not in set(upstream(name)[1:]) | set(recorded):
            continue
        current = _identity(ctx, other)
        if current is not None and recorded.get(other) != current:
            out.append(f"{other} was redone since" if other in recorded
                       else f"{other} finished after it")
    return out


def _print_main(ctx: Context, line: str) -> None:
    if ctx.is_main:
        print(f"[vitjax] {line}", flush=True)


def _check_finished(ctx: Context, used: set[str]) -> None:
    """A finished stage whose DONE.json cannot be read, or whose recorded result files are
    missing or changed in size, counts as not run: its DONE.json is moved aside (never a
    traceback on every later command) and the stage is redone when it is next requested."""
    for name in ORDER:
        if name not in STAGES or name not in used:
            continue
        path = ctx.done_file(name)
        record, problem = provenance.read_record(path)
        if record is not None:
            damaged = provenance.damaged_files(path.parent, record)
            if damaged:
                problem = f"lists results that are gone or changed: {', '.join(damaged[:4])}"
        if not problem:
            continue
        aside = path.parent / "DONE.json.invalid"
        _print_main(ctx, f"warning: {path} {problem}; moved it to {aside.name}: {name} counts "
                    f"as not run and is redone when --config.stages includes it (from its "
                    "checkpoints and logs where they exist)")
        if ctx.is_main:
            path.replace(aside)
    _sync_processes("vitjax finished stages checked")


def _check_unfinished(ctx: Context, name: str) -> None:
    """Unfinished results of `name` (a search log, checkpoints) are reused only if they were made
    from the same inputs: otherwise they are discarded, or refused when the config changed."""
    folder = ctx.workdir / name
    started, _ = provenance.read_record(folder / provenance.STARTED_FILE)
    if started is None:  # none, or written before vitjax recorded them: resumed as it is
        return
    reasons = [r.replace(" finished after it", " finished since they were started")
               for r in _changed_inputs(ctx, name, started.get("inputs"))]
    if reasons:
        _print_main(ctx, f"{name}: discarding its unfinished results in {folder}: they were "
                    f"made from other inputs ({'; '.join(reasons)})")
    elif name in RESUMING and started.get("config") is not None:
        current = checks.stage_config(ctx.config, sections(name))
        recorded = started["config"]
        keys = [k for k in sorted(set(recorded) | set(current))
                if recorded.get(k) != current.get(k)]
        overwrite = bool(ctx.config.get("overwrite", False))
        if overwrite:  # redo on any change, except what train.resume_overrides lets change
            allowed = {f"{section}.{key}" for section in ("train", "finetune")
                       for key in checks.resume_overrides(ctx.config)}
            keys = [k for k in keys if k not in allowed]
        else:  # the stage's own resume check compares the rest, with its own allowances
            keys = [k for k in keys
                    if k in _NOT_SELF_CHECKED or not k.startswith(RESUMING[name])]
        if not keys:
            return
        changes = [f"{k}: {recorded.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}"
                   for k in keys]
        if not overwrite:
            raise UserError(
                f"{folder} holds unfinished {name} results started with another config "
                f"({'; '.join(changes[:6])}); rerun with that config to resume them, or with "
                f"--config.overwrite=True to discard them and start {name} over")
        _print_main(ctx, f"{name}: config changed ({'; '.join(changes[:6])}), discarding its "
                    f"unfinished results in {folder}")
    else:
        return
    if ctx.is_main:
        folder.rmtree()


def _check_read_stages(ctx: Context, name: str, requested: list[str]) -> None:
    """Stages that `name` reads but that this run does not redo must be up to date."""
    for other in upstream(name)[1:]:
        record = _done_record(ctx, other)
        if other in requested or record is None:
            continue
        changed = _changed_inputs(ctx, other, record.get("inputs"))
        if changed:
            raise UserError(
                f"stage {other!r}, which {name} reads, is out of date ({'; '.join(changed)}); "
                f"add it to --config.stages (e.g. --config.stages={other},{name}) to redo it")


def _finish_record(ctx: Context, name: str, summary: dict) -> dict:
    folder = ctx.workdir / name
    files = provenance.result_files(folder)
    summary["config"] = checks.stage_config(ctx.config, sections(name))
    summary["inputs"] = _current_inputs(ctx, name, extra=ctx.reads - {name})
    summary["files"] = files
    summary["identity"] = provenance.identity(folder, files)
    return summary


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Context:
    """Runs `config.stages` in `workdir` (local path or gs://...); returns the context."""
    stages = parse_stages(config.get("stages", ",".join(STAGES)))
    checks.check_config(config)
    local = "://" not in str(workdir)
    ctx = Context(config, epath.Path(os.path.abspath(workdir) if local else workdir))
    ctx.model_config  # noqa: B018  (validates config.model against config.data up front)
    checks.check_target(ctx.model_config, ctx.target_gmacs, ctx.dense_gmacs)
    checks.check_compare(config, ctx.model_config, ctx.target_gmacs, stages)
    ctx.mesh  # noqa: B018  (config.mesh must fit the devices)
    if ctx.is_main:
        checks.check_workdir(ctx.workdir)
    with _locked(ctx):
        _run_locked(ctx, stages)
    return ctx


@contextlib.contextmanager
def _locked(ctx: Context):
    """The workdir lock, taken by process 0 only: a multi-host job's processes all work in the
    workdir; every process learns whether process 0 got it."""
    lock = None
    problem = None
    if ctx.is_main:
        lock = workdir_lock.WorkdirLock(ctx.workdir)
        try:
            lock.acquire()
        except UserError as e:
            problem, lock = e, None
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if int(failed) and problem is None:
            problem = UserError(f"process 0 could not lock the workdir {ctx.workdir} (its "
                                "output says why)")
    if problem is not None:
        raise problem
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _run_locked(ctx: Context, stages: list[str]) -> None:
    config = ctx.config
    _sync_processes("vitjax pipeline start")  # every process sees the same finished stages
    _check_finished(ctx, {s for name in stages for s in upstream(name)})
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
        _sync_processes(f"vitjax stage {name} check")
        record = _done_record(ctx, name)
        if record is not None:
            changed = _changed_inputs(ctx, name, record.get("inputs"))
            if not changed:
                logging.info("stage %s: already done (%s), skipping", name, ctx.done_file(name))
                print(f"[vitjax] {step}: done earlier with this config, skipped", flush=True)
                continue
            _print_main(ctx, f"{name}: its results are out of date ({'; '.join(changed)}), "
                        "redoing it")
            if ctx.is_main:
                (ctx.workdir / name).rmtree()
        else:
            _check_unfinished(ctx, name)
        _check_read_stages(ctx, name, stages)
        _sync_processes(f"vitjax stage {name} checked")
        if ctx.is_main:
            workdir_lib.write_json(ctx.stage_dir(name) / provenance.STARTED_FILE, {
                "inputs": _current_inputs(ctx, name),
                "config": checks.stage_config(config, sections(name))})
        print(f"[vitjax] {step}: running ({STAGES[name].description})", flush=True)
        started = time.perf_counter()
        ctx.reads = set()
        try:
            summary = STAGES[name].run(ctx)
        except BaseException:
            _remove_if_empty(ctx, name)
            raise
        summary["seconds"] = round(time.perf_counter() - started, 1)
        # Process 0 writes a stage's files; nobody starts the next stage before they exist.
        _sync_processes(f"vitjax stage {name} written")
        if ctx.is_main:
            workdir_lib.write_json(ctx.done_file(name), _finish_record(ctx, name, summary))
        _sync_processes(f"vitjax stage {name} done")
        total = (time.perf_counter() - pipeline_started) / 60
        print(f"[vitjax] {step}: finished in {summary['seconds']}s ({total:.1f} min since the "
              f"start) -> {ctx.workdir / name}", flush=True)
    if ctx.is_main:  # only a config whose stages all ran (or matched) is recorded
        workdir_lib.write_json(ctx.workdir / "config.json", config.to_dict())
