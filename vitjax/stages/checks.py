"""Up-front checks of a pipeline config and workdir: user mistakes become one-line `UserError`s
before any work starts, and finished stages are never silently reused with another config."""

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
    "data.num_parallel_calls", "data.prefetch", "data.cache_eval",
    # How the same numbers are computed (results equal up to float rounding).
    "model.attention", "model.remat_policy",
}
# Optimisation hyper-parameters that `train.resume_overrides` may change when resuming a run
# (e.g. a lower learning rate after the loss diverged).
RESUMABLE_TRAIN_KEYS = ("lr", "min_lr", "warmup_lr", "warmup_steps", "grad_clip",
                        "weight_decay", "b1", "b2", "steps")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates (and, where a default cannot fit, adjusts with a warning) the config."""
    train = config.train
    steps = int(train.steps)
    _require(steps > 0, f"config.train.steps={steps}: training needs at least one step")
    for key in ("batch_size", "eval_batch_size"):
        value = train.get(key)
        _require(value is None or int(value) > 0,
                 f"config.train.{key}={value}: must be a positive number of images")
    _clamp_warmup(train, "train", steps, int(train.get("warmup_steps", 0) or 0))
    finetune = config.get("finetune")
    if finetune is not None:  # unset keys are config.train's
        given = finetune.get("steps")
        finetune_steps = int(steps if given is None else given)
        _require(finetune_steps > 0, f"config.finetune.steps={finetune_steps}: finetuning "
                 "needs at least one step")
        warmup = finetune.get("warmup_steps")
        _clamp_warmup(finetune, "finetune", finetune_steps,
                      int(train.warmup_steps if warmup is None else warmup))
    token_mode = train.get("token_mode", "attention")
    _require(token_mode in TOKEN_MODES,
             f"config.train.token_mode={token_mode!r}: choose one of {', '.join(TOKEN_MODES)}")
    if token_mode == "attention" and config.model.get("class_token") is False:
        _require(False, "config.train.token_mode='attention' selects tokens by class attention, "
                 "but config.model has no class token (class_token=False); set "
                 "--config.train.token_mode=static")
    dtype = config.model.get("dtype", "float32")
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    _require(ok, f"config.model.dtype={dtype!r}: use float32 or bfloat16 (float16 also works)")
    from vitjax.models.vit import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES

    attention = config.model.get("attention", "auto")
    _require(attention in ATTENTION_IMPLEMENTATIONS,
             f"config.model.attention={attention!r}: choose one of "
             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    _require(attention != "cudnn" or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16),
             f"config.model.attention='cudnn' needs config.model.dtype='bfloat16' (or float16), "
             f"not {dtype!r}; or use attention='auto'")
    remat_policy = config.model.get("remat_policy", "full")
    _require(remat_policy in REMAT_POLICIES,
             f"config.model.remat_policy={remat_policy!r}: choose one of "
             f"{', '.join(REMAT_POLICIES)}")
    overrides = resume_overrides(config)
    unknown = sorted(set(overrides) - set(RESUMABLE_TRAIN_KEYS))
    _require(not unknown, f"config.train.resume_overrides names {unknown}: only "
             f"{', '.join(RESUMABLE_TRAIN_KEYS)} may change when resuming")
    from vitjax.stages.ablation import combination
    from vitjax.stages.compare import METHODS

    ablation = config.get("ablation") or {}
    for name in ablation.get("dimensions", ()) or ():
        combination(name)
    for b in ablation.get("budgets", ()) or ():
        _require(0.0 < float(b) < 1.0, f"config.ablation.budgets has {b}: give fractions of the "
                 "dense FLOPs in (0, 1), e.g. (0.4, 0.5, 0.7, 0.8)")
    unknown = [m for m in ((config.get("compare") or {}).get("methods", ()) or ())
               if m not in METHODS]
    _require(not unknown, f"config.compare.methods has {unknown}; choose from {list(METHODS)}")
    _check_distill(config)
    fraction = config.get("target_flops_fraction")
    if fraction is not None and train.get("target_gmacs") is None:
        _require(0 < float(fraction) < 1,
                 f"config.target_flops_fraction={fraction}: the FLOPs budget is a fraction of "
                 "the dense model in (0, 1), e.g. 0.6 for the paper's 40% reduction")


def _clamp_warmup(block, name: str, steps: int, warmup: int) -> None:
    """A warmup as long as the run (e.g. a shortened run from the command line) becomes a
    tenth of the run, with a warning, instead of failing in the learning-rate schedule."""
    _require(warmup >= 0, f"config.{name}.warmup_steps={warmup} must be >= 0")
    if warmup < steps:
        return
    clamped = steps // 10
    logging.warning("config.%s.warmup_steps=%d is not below %s.steps=%d; using %d (a tenth of "
                    "the run)", name, warmup, name, steps, clamped)
    print(f"[vitjax] warning: {name}.warmup_steps={warmup} >= {name}.steps={steps}; "
          f"warming up for {clamped} steps instead", flush=True)
    block.warmup_steps = clamped


def _check_distill(config: ml_collections.ConfigDict) -> None:
    """Distillation weights and temperatures (supernet and finetuning), the baseline's steps."""
    for block in ("train", "finetune"):
        section = config.get(block) or {}
        weight, temperature = section.get("distill"), section.get("temperature")
        _require(weight is None or 0.0 <= float(weight) <= 1.0,
                 f"config.{block}.distill={weight}: the teacher's weight in the loss is in "
                 "[0, 1] (0: no teacher)")
        _require(temperature is None or float(temperature) > 0,
                 f"config.{block}.temperature={temperature}: must be > 0 (1: plain KL)")
    if float(config.train.get("distill", 0.0) or 0.0) > 0:
        _require(bool((config.get("init") or {}).get("checkpoint")),
                 f"config.train.distill={config.train.distill} needs a teacher: set "
                 "config.init.checkpoint to the trained dense model, or --config.train.distill=0")
    steps = (config.get("baseline") or {}).get("steps")
    _require(steps is None or int(steps) > 0,
             f"config.baseline.steps={steps}: needs at least one step (None: the supernet's "
             "plus the finetuning's)")


def check_target(model_config, target_gmacs: float | None, dense_gmacs: float) -> None:
    """The FLOPs budget must lie between the smallest model the supernet samples and dense."""
    if target_gmacs is None:
        return
    from vitjax.pruning import Policy, count_flops
    from vitjax.pruning.policy import SamplingSpace

    space = SamplingSpace()
    smallest = count_flops(model_config, Policy.uniform(
        model_config.depth, space.neuron, space.head, space.token)).total
    _require(target_gmacs < dense_gmacs,
             f"FLOPs target {target_gmacs:.4g} GMACs is not below the dense model "
             f"({dense_gmacs:.4g} GMACs); lower config.target_flops_fraction (or "
             "train.target_gmacs)")
    _require(target_gmacs >= smallest,
             f"FLOPs target {target_gmacs:.4g} GMACs ({target_gmacs / dense_gmacs:.1%} of dense) "
             f"is below the smallest model the supernet can sample ({smallest:.4g} GMACs, "
             f"{smallest / dense_gmacs:.1%}); raise config.target_flops_fraction above "
             f"{smallest / dense_gmacs:.2f}")


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


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


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
