"""Stage `compare`: the second paper's systems at the pruned model's FLOPs, on the same data,
teacher and FLOPs accounting as the multi-dimensional method (vit_block_and_token_pruning.md).

Methods (`config.compare.methods`):
  'dynamicvit'   DynamicViT (Rao et al.): predictors before `locations`, trained from the dense
                 supernet with hard Gumbel-softmax decisions, the keep-ratio loss and logit +
                 token distillation from the dense model (`vitjax.dynamicvit`); the keep rate of
                 the `schedule` is set by bisection so the inference model's GMACs meet the
                 target. Inference keeps a static top-k per stage.
  'block'        movement pruning of heads and FFN neuron blocks (Sanh et al., Lagunas et al.;
                 `vitjax.blockprune`) learned while finetuning with the L1 regulariser, then
                 thresholded to the target and physically sliced through `prune_params`.
  'block+token'  block pruning to `block_share` of the FLOPs cut, then DynamicViT on the sliced
                 model for the rest: the combination the second paper could not complete.

The target is the prune stage's GMACs (matched FLOPs), or the config's budget when the prune
stage has not run. Every method trains with the finetuning recipe (`config.finetune`,
`config.compare.steps` overriding its length) through the shared trainer with its own loss and
extra trainable state; each lands in compare/<method>/ with its weights, a verified jax.export
artifact and result.json. A finished method is not redone; a killed one resumes from its
checkpoints. The report measures every model's speed in one process with the others.
"""

from __future__ import annotations

import dataclasses

import jax

from vitjax import workdir as workdir_lib
from vitjax.errors import UserError
from vitjax.models import ViTConfig
from vitjax.stages.context import Context
from vitjax.stages.kit import (
    evaluate_accuracy,
    load_weights,
    parameter_count,
    save_weights,
    train_model,
    trained_accuracy,
)

METHODS = ("dynamicvit", "block", "block+token")
# DynamicViT "reaches" a target it exceeds by at most this fraction: below the 4 significant
# digits the report prints. Without it a search landing at the bottom of its FLOPs band (e.g.
# digits_study: band from 38.000% of dense, DynamicViT's smallest schedule at 38.003%) would
# stop the run, and the up-front check would refuse such a config for a sliver of the band.
REACH_RTOL = 1e-4
DYNAMICVIT_FILE = "dynamicvit.json"


def folder(method: str) -> str:
    return method.replace("+", "_")


def _recipe(ctx: Context):
    """The finetuning config (config.finetune over config.train), its length from
    config.compare.steps when given."""
    from vitjax.stages.finetune import finetune_config

    config, _ = finetune_config(ctx)
    steps = ctx.config.compare.get("steps")
    if steps:
        config.train.steps = int(steps)
        config.train.warmup_steps = min(int(config.train.warmup_steps), int(steps) // 10)
    return config


def _train(ctx: Context, config, out, model, params, **kwargs):
    result = train_model(ctx, config, out, model, what="the compare stage", init_params=params,
                         **kwargs)
    return jax.device_get(result.params), trained_accuracy(ctx, result)


def dynamicvit_schedule(ctx: Context, config: ViTConfig, target: float):
    """The DynamicViTConfig of the configured locations and schedule kind whose inference GMACs
    are the largest <= target (x (1 + REACH_RTOL); bisection on the rate)."""
    return schedule_for_target(ctx.config.compare, config, target)


def schedule_for_target(block, config: ViTConfig, target: float):
    """dynamicvit_schedule from the config.compare block alone (no workdir), so the up-front
    config check (vitjax.stages.checks.check_compare) refuses what this stage would refuse."""
    from vitjax.dynamicvit import DynamicViTConfig, dynamicvit_gmacs, keep_ratios, validate

    locations = tuple(int(x) for x in block.locations) if block.get("locations") else \
        (config.depth // 4, config.depth // 2, 3 * config.depth // 4)
    locations = tuple(dict.fromkeys(max(1, x) for x in locations))
    kind = block.get("schedule", "original")

    def dyn(rate):
        return DynamicViTConfig(locations=locations,
                                ratios=keep_ratios(kind, rate, len(locations)))

    def gmacs(rate):
        try:
            validate(dyn(rate).ratios, locations, config)
        except ValueError:
            return float("inf")
        return dynamicvit_gmacs(config, dyn(rate))

    limit = target * (1.0 + REACH_RTOL)
    if gmacs(1.0) <= limit:
        return dyn(1.0)
    lo, hi = 0.0, 1.0  # gmacs(hi) > limit
    for _ in range(40):
        mid = (lo + hi) / 2
        if gmacs(mid) <= limit:
            lo = mid
        else:
            hi = mid
    if lo == 0.0 or gmacs(lo) > limit:
        raise UserError(
            f"DynamicViT with locations {locations} and the {kind!r} schedule cannot reach "
            f"{target:.4g} GMACs on this model (its predictors and the blocks before the first "
            "location cost more); move config.compare.locations earlier or raise the budget")
    validate(dyn(lo).ratios, locations, config)
    return dyn(lo)


def train_dynamicvit(ctx: Context, config: ViTConfig, params, target: float, out) -> dict:
    """DynamicViT on `config` (dense or sliced) from `params`, teacher = the dense supernet."""
    from vitjax.dynamicvit import DynamicViT, dynamicvit_gmacs, dynamicvit_loss, init_from_vit

    dyn = dynamicvit_schedule(ctx, config, target)
    print(f"[vitjax] compare: DynamicViT locations {dyn.locations}, keep ratios "
          f"{tuple(round(r, 3) for r in dyn.ratios)}: {dynamicvit_gmacs(config, dyn):.4g} GMACs "
          f"(target {target:.4g})", flush=True)
    recipe = _recipe(ctx)
    model = DynamicViT(config, dyn, dtype=ctx.model(config).dtype,
                       attention=ctx.model(config).attention)
    block = ctx.config.compare
    loss_fn = dynamicvit_loss(
        model, ctx.model(), ratio_weight=float(block.get("ratio_weight", 2.0)),
        distill_weight=float(block.get("distill_weight", 0.5)),
        token_distill_weight=float(block.get("token_distill_weight", 0.5)))
    start = init_from_vit(model, params, jax.random.key(int(ctx.config.get("seed", 0))))
    teacher = jax.device_get(ctx.load_supernet())
    trained, accuracy = _train(ctx, recipe, out, model, start, loss_fn=loss_fn, frozen=teacher)
    return dict(model=model, params=trained, accuracy=accuracy, config=config,
                gmacs=dynamicvit_gmacs(config, dyn),
                dynamicvit=dict(locations=list(dyn.locations), ratios=list(dyn.ratios)))


def train_block(ctx: Context, target: float, out) -> dict:
    """Movement pruning of the dense supernet to `target` GMACs, sliced."""
    from vitjax.blockprune import (
        MovementConfig,
        MovementViT,
        learned_scores,
        movement_init_fn,
        movement_loss,
        prune_movement,
    )
    from vitjax.pruning import count_flops

    block = ctx.config.compare
    config = ctx.model_config
    mcfg = MovementConfig(**dict(block.get("movement", {})))
    recipe = _recipe(ctx)
    model = MovementViT(config, mcfg, dtype=ctx.model().dtype)
    start = movement_init_fn(jax.device_get(ctx.load_supernet()), config, mcfg)(None)
    trained, _ = _train(ctx, recipe, out, model, start,
                        loss_fn=movement_loss(ctx.model(train=True), mcfg))
    scores = jax.device_get(learned_scores(trained, mcfg))
    pruned_config, pruned_params = prune_movement(config, trained["vit"], scores, target)
    if set(pruned_config.layer_tokens or ()) <= {config.num_tokens}:  # no token is pruned
        pruned_config = dataclasses.replace(pruned_config, layer_tokens=None)
    gmacs = count_flops(pruned_config).total
    print(f"[vitjax] compare: block pruning kept heads {list(pruned_config.layer_heads or [])}"
          f", neurons {list(pruned_config.layer_mlp_dims or [])}: {gmacs:.4g} GMACs (target "
          f"{target:.4g})", flush=True)
    accuracy = evaluate_accuracy(ctx, ctx.model(pruned_config), pruned_params)
    return dict(model=ctx.model(pruned_config), params=pruned_params, accuracy=accuracy,
                config=pruned_config, gmacs=gmacs)


def save_result(ctx: Context, method: str, result: dict, out) -> dict:
    """Weights (+ DynamicViT schedule), a verified jax.export artifact, result.json."""
    from vitjax.export import export_all

    summary = {k: result[k] for k in ("accuracy", "gmacs", "block_gmacs") if k in result}
    summary.update(params=parameter_count(result["params"]), method=method,
                   weights=str(out / "model.safetensors"))
    if ctx.is_main:
        save_weights(out / "model.safetensors", result["config"], result["params"],
                     ctx.preprocessing)
        if "dynamicvit" in result:
            workdir_lib.write_json(out / DYNAMICVIT_FILE, result["dynamicvit"])
            summary["dynamicvit"] = result["dynamicvit"]
        exported = export_all(result["model"], result["params"], out / "export",
                              formats=("jax",), strict=True)
        summary["export_max_abs_diff"] = exported["formats"]["jax"]["max_abs_diff"]
        workdir_lib.write_json(out / "result.json", summary)
    return summary


def load_model(ctx: Context, method: str):
    """(model, params) of a finished method, for the report's speed measurement."""
    out = ctx.workdir / "compare" / folder(method)
    config, params = load_weights(out / "model.safetensors", "compare")
    if (out / DYNAMICVIT_FILE).exists():
        from vitjax.dynamicvit import DynamicViT, DynamicViTConfig

        spec = workdir_lib.read_json(out / DYNAMICVIT_FILE)
        dyn = DynamicViTConfig(locations=tuple(spec["locations"]), ratios=tuple(spec["ratios"]))
        return DynamicViT(config, dyn), params
    return ctx.model(config), params


def check_config(config) -> None:
    block = config.get("compare") or {}
    methods = tuple(block.get("methods", ()) or ())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"config.compare.methods has {unknown}; choose from {list(METHODS)}")
    if "block+token" in methods:
        share = float(block.block_share)
        if not 0.0 < share < 1.0:
            raise UserError(f"config.compare.block_share={share}: the fraction of the FLOPs "
                            "cut taken by block pruning must be in (0, 1)")


def run(ctx: Context) -> dict:
    block = ctx.config.get("compare")
    methods = tuple(block.get("methods", ()) or ()) if block else ()
    if not methods:
        print("[vitjax] compare: skipped, config.compare.methods is empty (e.g. "
              "--config=configs/digits.py:compare)", flush=True)
        return {"methods": {}}
    out = ctx.stage_dir("compare")
    prune = ctx.done_file("prune")
    target = workdir_lib.read_json(prune)["pruned_gmacs"] if prune.exists() else \
        ctx.target_gmacs
    if target is None:
        raise UserError("the compare stage needs a FLOPs target: run the prune stage or set "
                        "config.target_flops_fraction")
    results = {}
    for index, method in enumerate(methods, 1):
        mdir = out / folder(method)
        if (mdir / "result.json").exists():
            print(f"[vitjax] compare {index}/{len(methods)} {method}: done earlier, reused",
                  flush=True)
            results[method] = workdir_lib.read_json(mdir / "result.json")
            continue
        print(f"[vitjax] compare {index}/{len(methods)} {method}: training at {target:.4g} "
              "GMACs", flush=True)
        if method == "dynamicvit":
            result = train_dynamicvit(ctx, ctx.model_config, jax.device_get(ctx.load_supernet()),
                                      target, mdir)
        elif method == "block":
            result = train_block(ctx, target, mdir)
        else:
            share = float(block.block_share)
            middle = ctx.dense_gmacs - share * (ctx.dense_gmacs - target)
            first = train_block(ctx, middle, mdir / "block")
            result = train_dynamicvit(ctx, first["config"], first["params"], target, mdir)
            result["block_gmacs"] = first["gmacs"]
        results[method] = save_result(ctx, method, result, mdir)
        test = "test" if "test" in result["accuracy"] else next(iter(result["accuracy"]))
        print(f"[vitjax] compare {index}/{len(methods)} {method}: {test} accuracy "
              f"{result['accuracy'][test]:.2%} at {result['gmacs']:.4g} GMACs", flush=True)
    return {"target_gmacs": target, "dense_gmacs": ctx.dense_gmacs, "methods": results}

