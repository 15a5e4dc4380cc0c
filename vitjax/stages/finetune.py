"""Stage `finetune` (Alg. 1 line 13): the shared trainer on the physically pruned model (no
masks), resumable from its own checkpoints -> finetune/finetuned.safetensors.

`config.finetune` overrides `config.train` (steps, lr, ...) for this stage; `distill` > 0 adds
logit distillation (weight `distill`, temperature `temperature`) from the frozen dense teacher:
the model of `config.init.checkpoint` when the run started from one (the same teacher as the
supernet's), else the dense supernet. Off by default, as in the paper.
"""

from __future__ import annotations

import jax

from vitjax.errors import UserError
from vitjax.stages.context import Context
from vitjax.stages.kit import (
    accuracy_text,
    load_weights,
    parameter_count,
    save_weights,
    teacher_loss,
    train_model,
    trained_accuracy,
)
from vitjax.stages.prune import PRUNED_FILE

FINETUNED_FILE = "finetuned.safetensors"
# Keys of config.train that only policy sampling reads; finetuning sets them itself.
SUPERNET_ONLY_KEYS = ("sample_policies", "sandwich", "target_gmacs", "target_tol",
                      "score_every", "token_mode")


def _overrides(config) -> dict:
    """config.finetune's set keys (unset, None, keys keep config.train's value), checked."""
    overrides = {k: v for k, v in dict(config.get("finetune", {})).items() if v is not None}
    unknown = sorted(set(overrides) - set(config.train))
    if unknown:
        raise UserError(f"config.finetune has unknown keys {unknown}; it overrides keys of "
                        "config.train (steps, lr, warmup_steps, distill, temperature, ...)")
    supernet_only = sorted(set(overrides) & set(SUPERNET_ONLY_KEYS))
    if supernet_only:
        raise UserError(f"config.finetune sets {supernet_only}, which only the supernet's "
                        "training uses: finetuning trains the pruned model itself, without "
                        "policies; leave them unset")
    return overrides


def check_config(config) -> None:
    """config.finetune: the keys it overrides, its length and warmup, its teacher weight."""
    from vitjax.stages.checks import check_distillation, clamp_warmup, require

    finetune = config.get("finetune")
    if finetune is None:
        return
    _overrides(config)
    given = finetune.get("steps")
    steps = int(config.train.steps if given is None else given)
    require(steps > 0, f"config.finetune.steps={steps}: finetuning needs at least one step")
    warmup = finetune.get("warmup_steps")
    clamp_warmup(finetune, "finetune", steps,
                 int(config.train.warmup_steps if warmup is None else warmup))
    check_distillation(finetune, "finetune")


def finetune_config(ctx: Context):
    """config with config.train replaced by the finetuning recipe (no policy sampling)."""
    config = ctx.config.copy_and_resolve_references()
    overrides = _overrides(ctx.config)
    config.train.update(overrides)
    config.train.sample_policies = False
    config.train.target_gmacs = None
    return config, overrides


def train_pruned(ctx: Context, pruned_config, params, config, out, file_name: str, what: str):
    """Trains a physically pruned model with the finetuning recipe `config` (from
    `finetune_config`) and its teacher; saves it as out/file_name. The one training path of the
    finetune and baseline stages. Returns (train result, trained params, accuracy per eval set,
    teacher name)."""
    model = ctx.model(pruned_config, train=True).clone(
        drop_path_rate=float(config.train.get("drop_path", 0.0)))
    loss_fn, frozen, teacher = teacher_loss(ctx, model, config.train)
    result = train_model(ctx, config, out, model, what=what, init_params=params,
                         loss_fn=loss_fn, frozen=frozen)
    trained = jax.device_get(result.params)
    if ctx.is_main:
        save_weights(out / file_name, pruned_config, trained, ctx.preprocessing)
    return result, trained, trained_accuracy(ctx, result), teacher


def run(ctx: Context) -> dict:
    ctx.summary("prune")
    out = ctx.stage_dir("finetune")
    pruned_config, params = load_weights(ctx.workdir / "prune" / PRUNED_FILE, "prune")
    config, _ = finetune_config(ctx)
    result, finetuned, accuracy, teacher = train_pruned(
        ctx, pruned_config, params, config, out, FINETUNED_FILE, "finetuning")
    print("[vitjax] finetune: accuracy after finetuning "
          + accuracy_text(accuracy), flush=True)
    return {"metrics": result.metrics, "accuracy": accuracy, "steps": result.step,
            "distill": float(config.train.get("distill", 0.0) or 0.0), "teacher": teacher,
            "params": parameter_count(finetuned),
            "file": str(out / FINETUNED_FILE)}
