"""Stage `finetune` (Alg. 1 line 13): the shared trainer on the physically pruned model (no
masks), resumable from its own checkpoints -> finetune/finetuned.safetensors.

`config.finetune` overrides `config.train` (steps, lr, ...) for this stage; `distill` > 0 adds
logit distillation from the dense supernet (weight `distill`, temperature `temperature`), off by
default as in the paper.
"""

from __future__ import annotations

import jax

from vitjax.errors import UserError
from vitjax.stages.context import Context
from vitjax.stages.prune import PRUNED_FILE, parameter_count, save_model

FINETUNED_FILE = "finetuned.safetensors"
_LOSS_KEYS = ("distill", "temperature")


def finetune_config(ctx: Context):
    """config with config.train replaced by the finetuning recipe (no policy sampling)."""
    config = ctx.config.copy_and_resolve_references()
    overrides = dict(ctx.config.get("finetune", {}))
    unknown = sorted(set(overrides) - set(config.train) - set(_LOSS_KEYS))
    if unknown:
        raise UserError(f"config.finetune has unknown keys {unknown}; it overrides keys of "
                        "config.train (steps, lr, warmup_steps, ...) plus distill, temperature")
    config.train.update({k: v for k, v in overrides.items() if k not in _LOSS_KEYS})
    config.train.sample_policies = False
    config.train.target_gmacs = None
    return config, overrides


def run(ctx: Context) -> dict:
    from vitjax.interop import load_native
    from vitjax.stages.context import local_copy
    from vitjax.stages.pretrain import StepBatches
    from vitjax.training import train
    from vitjax.training.losses import distillation_loss

    ctx.summary("prune")
    out = ctx.stage_dir("finetune")
    with local_copy(ctx.workdir / "prune" / PRUNED_FILE) as local:
        pruned_config, params = load_native(local)
    config, overrides = finetune_config(ctx)
    model = ctx.model(pruned_config, train=True).clone(
        drop_path_rate=float(config.train.get("drop_path", 0.0)))
    loss_fn = frozen = None
    weight = float(overrides.get("distill", 0.0) or 0.0)
    if weight > 0:
        loss_fn = distillation_loss(model, ctx.model(), weight=weight,
                                    temperature=float(overrides.get("temperature", 1.0)))
        frozen = jax.device_get(ctx.load_supernet())
    datasets = ctx.datasets
    result = train(
        config, str(out), model=model, train_batches=StepBatches(datasets),
        eval_sets={name: ctx.eval_batches(name) for name in datasets.eval_names},
        init_params=params, mesh=ctx.mesh, num_classes=datasets.num_classes,
        loss_fn=loss_fn, frozen=frozen,
    )
    if result.preempted:
        raise UserError("finetuning was preempted; rerun the same command to resume")
    finetuned = jax.device_get(result.params)
    if ctx.is_main:
        save_model(out / FINETUNED_FILE, pruned_config, finetuned, ctx.preprocessing)
    accuracy = {name: result.metrics[f"eval/{name}/model/accuracy"]
                for name in datasets.eval_names}
    print("[vitjax] finetune: accuracy after finetuning "
          + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()), flush=True)
    return {"metrics": result.metrics, "accuracy": accuracy, "steps": result.step,
            "distill": weight, "params": parameter_count(finetuned),
            "file": str(out / FINETUNED_FILE)}
