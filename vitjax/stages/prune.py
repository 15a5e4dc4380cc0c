"""Stage `prune` (Alg. 1 line 12): the chosen policy + the supernet's ranks -> a physically
smaller model: prune/pruned.safetensors (vitjax format: parameters + the pruned ViTConfig),
prune/architecture.json and prune/policy.json.

The policy is `config.prune.policy` (a policy JSON file) when given, else the search stage's
best policy. The pruned model is checked against the masked supernet on a hold-out batch (the
same logits), and evaluated without finetuning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vitjax import workdir as workdir_lib
from vitjax.errors import UserError
from vitjax.stages.context import Context
from vitjax.stages.kit import accuracy_text, evaluate_accuracy, parameter_count, save_weights

PRUNED_FILE = "pruned.safetensors"


def chosen_policy(ctx: Context):
    """(Policy, where it came from): config.prune.policy, else the search stage's best."""
    from vitjax.pruning import Policy

    given = ctx.config.get("prune", {}).get("policy")
    if given:
        path = epath.Path(given)
        if not path.exists():
            raise UserError(f"config.prune.policy: no such file {given}")
        source = str(path)
    else:
        path = ctx.workdir / "search" / "best_policy.json"
        if not ctx.done_file("search").exists() or not path.exists():
            raise UserError("the prune stage needs a policy: run the search stage first, or "
                            "give one with --config.prune.policy=policy.json")
        source = "search stage"
    try:
        policy = Policy.from_json(path.read_text()).validate(ctx.model_config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"policy from {source} is invalid: {e}") from None
    for problem in policy_warnings(ctx, policy):
        print(f"[vitjax] prune: warning: the policy from {source} {problem}", flush=True)
    return policy, source


def policy_warnings(ctx: Context, policy) -> list[str]:
    """What makes a valid policy unlikely to be what the user wants: a cost above the FLOPs
    budget, or no attention left at all."""
    from vitjax.pruning import count_flops

    problems = []
    gmacs, target = count_flops(ctx.model_config, policy).total, ctx.target_gmacs
    if target is not None and gmacs > target * (1 + 1e-6):
        problems.append(f"costs {gmacs:.4g} GMACs, above the FLOPs budget of {target:.4g} "
                        f"({gmacs / ctx.dense_gmacs:.1%} vs {target / ctx.dense_gmacs:.1%} of "
                        "dense, config.target_flops_fraction)")
    if not policy.keep_counts(ctx.model_config).head.any():
        problems.append("removes every attention head: the class token never sees the image, "
                        "so every image gets the same prediction")
    return problems


def compare_with_masked(model_config, supernet, masks, pruned_config, pruned_params,
                        images) -> tuple[float, float]:
    """(max |masked supernet logits - pruned model logits|, the allowed difference).

    Both models run in float32 with full-precision matmuls whatever config.model.dtype says:
    the check is of the tree surgery (which rows and columns were kept), not of rounding. In
    bfloat16 the two models round differently (the masked one sums over zeroed entries, the
    pruned one over fewer), which differs by ~1e-2 of the logits' scale, so any tolerance a
    bfloat16 run could meet would also pass a wrongly kept neuron; and TPUs and GPUs
    (TF32) run float32 matmuls at reduced precision by default."""
    from vitjax.models import ViT

    with jax.default_matmul_precision("highest"):
        masked, _ = jax.jit(ViT(model_config, dtype=jnp.float32).apply)(
            {"params": supernet}, images, masks)
        pruned, _ = jax.jit(ViT(pruned_config, dtype=jnp.float32).apply)(
            {"params": pruned_params}, images)
    masked, pruned = np.asarray(masked, np.float64), np.asarray(pruned, np.float64)
    tolerance = 1e-3 * max(1.0, float(np.abs(masked).max()))
    return float(np.abs(masked - pruned).max()), tolerance


def run(ctx: Context) -> dict:
    from vitjax.pruning import count_flops, prune_params
    from vitjax.pruning.masks import masks_from_ranks

    out = ctx.stage_dir("prune")
    policy, source = chosen_policy(ctx)
    round_to = int(ctx.config.get("prune", {}).get("round_to", 0) or 0)
    if round_to:
        from vitjax.pruning.rounding import round_policy_to_multiple

        policy = round_policy_to_multiple(ctx.model_config, policy, round_to,
                                          ctx.target_gmacs or ctx.dense_gmacs)
    ranks = ctx.ranks()
    supernet = jax.device_get(ctx.load_supernet())
    pruned_config, pruned_params = prune_params(ctx.model_config, supernet, policy, ranks,
                                                ctx.token_mode)

    # The physically pruned model must compute what the masked supernet computed.
    batch = next(iter(ctx.eval_batches("holdout" if "holdout" in ctx.datasets.eval_names
                                       else "test")()))
    images = batch["image"][: max(int(batch["mask"].sum()), 1)]
    masks = masks_from_ranks(ctx.model_config, ranks, policy.keep_counts(ctx.model_config),
                             ctx.token_mode)
    max_diff, tolerance = compare_with_masked(ctx.model_config, supernet, masks, pruned_config,
                                              pruned_params, images)
    if max_diff > tolerance:
        raise UserError(
            f"the pruned model's logits differ from the masked supernet's by {max_diff:.3g} "
            f"(allowed {tolerance:.3g}, both in float32) on {len(images)} images: pruning "
            f"this policy ({source}) is wrong, a bug in vitjax to report; nothing was written "
            "and the results of the earlier stages are kept")

    accuracy = evaluate_accuracy(ctx, ctx.model(pruned_config), pruned_params)
    dense_gmacs, pruned_gmacs = ctx.dense_gmacs, count_flops(pruned_config).total
    if ctx.is_main:
        save_weights(out / PRUNED_FILE, pruned_config, pruned_params, ctx.preprocessing)
        workdir_lib.write_text(out / "architecture.json", pruned_config.to_json())
        workdir_lib.write_text(out / "policy.json", policy.to_json())
    summary = {
        "policy_source": source, "policy": policy.to_dict(), "round_to": round_to,
        "dense_gmacs": dense_gmacs, "pruned_gmacs": pruned_gmacs,
        "flops_reduction": 1.0 - pruned_gmacs / dense_gmacs,
        "dense_params": parameter_count(supernet),
        "pruned_params": parameter_count(pruned_params),
        "accuracy_before_finetune": accuracy, "max_logit_diff_vs_masked": max_diff,
        "file": str(out / PRUNED_FILE),
    }
    print(f"[vitjax] prune: {pruned_gmacs:.4g} of {dense_gmacs:.4g} GMACs "
          f"({summary['flops_reduction']:.1%} fewer), {summary['pruned_params']:,} of "
          f"{summary['dense_params']:,} parameters; accuracy before finetuning "
          + accuracy_text(accuracy), flush=True)
    return summary
