"""Up-front checks of a pipeline config and workdir: user mistakes become one-line `UserError`s
before any work starts, and finished stages are never silently reused with another config.

`check_config` checks what every stage shares (config.model) and then runs each stage's own
validator, declared beside the stage in the table (`vitjax.stages.STAGES`, `Stage.check`):
`pretrain.check_config` (config.train, the budget), `finetune.check_config`, ... Those use
`require` and `clamp_warmup` from here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath

from vitjax.errors import UserError

TOKEN_MODES = ("attention", "static")
# Keys that never change what a stage computes: they may differ between a run and its rerun.
BOOKKEEPING = {
    "stages", "overwrite", "mesh", "distributed", "workdir",
    "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.eval_batch_size", "train.resume_overrides",
    "data.num_parallel_calls", "data.prefetch", "data.cache_eval", "data.cache_eval_mb",
    # How the same numbers are computed (results equal up to float rounding).
    "model.attention", "model.remat_policy",
}
# Optimisation hyper-parameters that `train.resume_overrides` may change when resuming a run
# (e.g. a lower learning rate after the loss diverged).
RESUMABLE_TRAIN_KEYS = ("lr", "min_lr", "warmup_lr", "warmup_steps", "grad_clip",
                        "weight_decay", "b1", "b2", "steps")


def require(condition: bool, message: str) -> None:
    """A one-line UserError with `message` unless `condition` holds."""
    if not condition:
        raise UserError(message)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates (and, where a default cannot fit, adjusts with a warning) the config: the
    model, then every stage's block by the stage's validator (all stages, selected or not, so a
    mistake is found before hours of the stages before it)."""
    from vitjax.stages import STAGES

    dtype = config.model.get("dtype", "float32")
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    require(ok, f"config.model.dtype={dtype!r}: use float32 or bfloat16 (float16 also works)")
    from vitjax.models.vit import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

    attention = config.model.get("attention", "auto")
    require(attention in ATTENTION_IMPLEMENTATIONS,
            f"config.model.attention={attention!r}: choose one of "
            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    require(attention != "cudnn" or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16),
            f"config.model.attention='cudnn' needs config.model.dtype='bfloat16' (or float16), "
            f"not {dtype!r}; or use attention='auto'")
    remat_policy = config.model.get("remat_policy", "full")
    require(remat_policy in REMAT_POLICIES,
            f"config.model.remat_policy={remat_policy!r}: choose one of "
            f"{', '.join(REMAT_POLICIES)}")
    # A config written before label smoothing had one home would otherwise be silently ignored.
    require("augment" not in config or "label_smoothing" not in config.augment,
            "config.augment.label_smoothing is no longer read: label smoothing is the loss's, "
            "set config.train.label_smoothing (finetune and compare take it from there too)")
    for stage in STAGES.values():
        if stage.check is not None:
            stage.check(config)


def clamp_warmup(block, name: str, steps: int, warmup: int) -> None:
    """A warmup as long as the run (e.g. a shortened run from the command line) becomes a
    tenth of the run, with a warning, instead of failing in the learning-rate schedule."""
    require(warmup >= 0, f"config.{name}.warmup_steps={warmup} must be >= 0")
    if warmup < steps:
        return
    clamped = steps // 10
    logging.warning("config.%s.warmup_steps=%d is not below %s.steps=%d; using %d (a tenth of "
                    "the run)", name, warmup, name, steps, clamped)
    print(f"[vitjax] warning: {name}.warmup_steps={warmup} >= {name}.steps={steps}; "
          f"warming up for {clamped} steps instead", flush=True)
    block.warmup_steps = clamped


def check_distillation(section, block: str) -> None:
    """The teacher's weight and temperature of a training block (train, finetune)."""
    section = section or {}
    weight, temperature = section.get("distill"), section.get("temperature")
    require(weight is None or 0.0 <= float(weight) <= 1.0,
            f"config.{block}.distill={weight}: the teacher's weight in the loss is in "
            "[0, 1] (0: no teacher)")
    require(temperature is None or float(temperature) > 0,
            f"config.{block}.temperature={temperature}: must be > 0 (1: plain KL)")


def check_target(model_config, target_gmacs: float | None, dense_gmacs: float) -> None:
    """The FLOPs budget must lie between the smallest model the supernet samples and dense."""
    if target_gmacs is None:
        return
    from vitjax.pruning.sampling import check_reachable, smallest_gmacs

    require(target_gmacs < dense_gmacs,
            f"FLOPs target {target_gmacs:.4g} GMACs is not below the dense model "
            f"({dense_gmacs:.4g} GMACs); lower config.target_flops_fraction (or "
            "train.target_gmacs)")
    smallest = smallest_gmacs(model_config)
    check_reachable(target_gmacs, smallest, of="the supernet can sample",
                    detail=f", {smallest / dense_gmacs:.1%} of dense", error=UserError,
                    fix=f"raise config.target_flops_fraction above {smallest / dense_gmacs:.2f}")


def check_compare(config: ml_collections.ConfigDict, model_config, target_gmacs: float | None,
                  stages: Iterable[str]) -> None:
    """DynamicViT (compare.methods 'dynamicvit') must reach the FLOPs the pruned model can land
    at, checked before pretraining rather than found out at the compare stage after every other
    stage ran. The search keeps the policy in [T(1 - search.tol), T], so the bottom of that band
    is the target DynamicViT may be asked for; the compare stage's own bisection
    (vitjax.stages.compare.schedule_for_target) decides, so both refuse alike. A config is
    refused when DynamicViT reaches only part of the band (digits:flops=0.4,compare,distilled:
    from 38.8% of dense, band 38-40%): the search would decide after hours whether the run
    ends in that error. 'block+token' runs DynamicViT on a model sliced during the run, which
    cannot be known here."""
    block = config.get("compare") or {}
    if ("compare" not in stages or target_gmacs is None
            or "dynamicvit" not in tuple(block.get("methods", ()) or ())):
        return
    from vitjax.stages.compare import schedule_for_target

    tol = (config.get("search") or {}).get("tol")
    lowest = float(target_gmacs) * (1.0 - float(tol)) if tol else float(target_gmacs)
    schedule_for_target(block, model_config, lowest)


def check_workdir(path: epath.Path) -> None:
    """The workdir must be a writable directory (created if missing)."""
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"--workdir {path} is a file, not a directory; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".vitjax_write_test"
        probe.write_text("")
        probe.unlink()
    except PermissionError:
        raise UserError(f"--workdir {path} is not writable; choose a directory you can write "
                        "to") from None
    except OSError as e:
        raise UserError(f"--workdir {path} cannot be used: {e.strerror or e}") from None


def resume_overrides(config: ml_collections.ConfigDict) -> list[str]:
    """The keys of config.train that train.resume_overrides lets a resumed run change."""
    return _split(config.train.get("resume_overrides", ""))


def _split(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """{'train': {'lr': x}} -> {'train.lr': x} (flax's own flattening)."""
    from flax import traverse_util

    return traverse_util.flatten_dict(config, sep=".")


def stage_config(config: ml_collections.ConfigDict, sections: Iterable[str]) -> dict[str, Any]:
    """The part of the config a stage's results depend on: its sections (and those of the
    stages it reads), flattened, minus bookkeeping. Stored in the stage's DONE.json."""
    flat = flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    wanted = tuple(sections)
    return {k: v for k, v in sorted(flat.items())
            if k not in BOOKKEEPING and k.split(".")[0] in wanted}


def config_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs (a key absent on one side equals
    None on the other: a placeholder added to a config block later is unset)."""
    return [f"{k}: {recorded.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
