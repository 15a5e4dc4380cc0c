"""Stage `baseline`: does the supernet pay for itself?

The baseline users ask about first: the pruned model's policy (prune/policy.json) cut straight
out of the dense model of `config.init.checkpoint` by that model's own HSIC ranks (Eq. 2, the
score stage's settings), then trained with the finetuning recipe (config.finetune over
config.train, the same teacher) for as many steps as the supernet and the finetuning together
(`config.baseline.steps` overrides): the same training budget in steps and images, without a
supernet. Each baseline step trains the pruned model, so it costs at most what a supernet step
costs. Writes baseline/baseline.safetensors; the report sets it next to the supernet's result.

Without an init checkpoint there is no trained dense model to cut from: the stage records that
and skips itself.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vitjax.errors import UserError
from vitjax.stages.context import Context

BASELINE_FILE = "baseline.safetensors"


def check_config(config) -> None:
    steps = (config.get("baseline") or {}).get("steps")
    if steps is not None and int(steps) < 1:
        raise UserError(f"config.baseline.steps={steps}: needs at least one step (None: the "
                        "supernet's plus the finetuning's)")


def baseline_steps(ctx: Context, finetune_train) -> int:
    given = ctx.config.get("baseline", {}).get("steps")
    if given is not None:
        return int(given)
    return int(ctx.config.train.steps) + int(finetune_train.steps)


def run(ctx: Context) -> dict:
    from vitjax.pruning import Policy, count_flops, prune_params
    from vitjax.scoring import score_model
    from vitjax.stages.finetune import finetune_config, train_pruned
    from vitjax.stages.kit import accuracy_text, evaluate_accuracy, parameter_count
    from vitjax.stages.pretrain import load_init_checkpoint

    checkpoint = ctx.config.get("init", {}).get("checkpoint")
    if not checkpoint:
        print("[vitjax] baseline: skipped (no config.init.checkpoint: no trained dense model "
              "to cut the policy from)", flush=True)
        return {"skipped": "no config.init.checkpoint"}
    ctx.summary("prune")
    out = ctx.stage_dir("baseline")
    dense = jax.device_get(load_init_checkpoint(ctx, checkpoint))
    score_config = dataclasses.replace(ctx.score_config(),
                                       score_tokens=ctx.token_mode == "static")
    images = jnp.asarray(ctx.train_images(ctx.score_batch_size))
    ranks = jax.device_get(score_model(ctx.model(), dense, images, config=score_config).ranks())
    policy = Policy.from_json((ctx.workdir / "prune" / "policy.json").read_text())
    pruned_config, params = prune_params(ctx.model_config, dense, policy, ranks, ctx.token_mode)
    before = evaluate_accuracy(ctx, ctx.model(pruned_config), params)

    config, _ = finetune_config(ctx)
    steps = baseline_steps(ctx, config.train)
    config.train.steps = steps
    print("[vitjax] baseline: the policy cut from the dense model by its HSIC ranks scores "
          + accuracy_text(before)
          + f" before training; training it for {steps} steps", flush=True)
    _, trained, accuracy, teacher = train_pruned(
        ctx, pruned_config, params, config, out, BASELINE_FILE, "the baseline's training")
    print("[vitjax] baseline: no-supernet baseline after training "
          + accuracy_text(accuracy), flush=True)
    return {"accuracy": accuracy, "accuracy_before_training": before, "steps": steps,
            "gmacs": count_flops(pruned_config).total, "params": parameter_count(trained),
            "teacher": teacher, "file": str(out / BASELINE_FILE)}
