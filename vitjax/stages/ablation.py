"""Stage `ablation`: the paper's dimension ablation (Table 3 left) and accuracy-vs-FLOPs front
(Fig. 2), both on the supernet's sub-networks (inherited weights, the supernet's ranks).

Dimension ablation: for each combination in `config.ablation.dimensions` ('neuron', 'token',
'head+neuron', ...) the policy search runs with the other dimensions held at ratio 0, at the
search stage's FLOPs budget and with the same (small) evaluation budget for every combination;
its best policy's accuracy on the test split is reported. A combination that cannot reach the
budget at all (head pruning alone: attention is a third of a block's FLOPs) is reported as such.

Front: the search (every dimension) at each fraction in `config.ablation.budgets` of the dense
FLOPs; the report plots the best policies' test accuracy against their GMACs next to the dense
and the finetuned models.

Accuracies here are of sub-networks without finetuning (the paper's Table 3 finetunes each);
they compare dimensions and budgets on equal terms, not with the finetuned model. Each search
logs to ablation/<name>.jsonl and resumes from it like the search stage.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vitjax import workdir as workdir_lib
from vitjax.errors import UserError
from vitjax.pruning.policy import DIMENSIONS
from vitjax.stages.context import Context


def combination(name: str) -> tuple[str, ...]:
    """'neuron+token' -> ('neuron', 'token'), validated."""
    dims = tuple(sorted({d.strip() for d in name.split("+") if d.strip()}))
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown or not dims:
        raise UserError(f"config.ablation.dimensions entry {name!r}: combine {list(DIMENSIONS)} "
                        "with '+', e.g. 'head+token'")
    return dims


def check_config(config) -> None:
    ablation = config.get("ablation") or {}
    for name in ablation.get("dimensions", ()) or ():
        combination(name)
    for b in ablation.get("budgets", ()) or ():
        if not 0.0 < float(b) < 1.0:
            raise UserError(f"config.ablation.budgets has {b}: give fractions of the dense "
                            "FLOPs in (0, 1), e.g. (0.4, 0.5, 0.7, 0.8)")


def _space_for(block, dims: tuple[str, ...], depth: int):
    """The search stage's space with the dimensions outside `dims` fixed at ratio 0."""
    from vitjax.search import SearchSpace

    space = SearchSpace.from_config(block, depth)
    fixed = {d: 0.0 for d in DIMENSIONS if d not in dims}
    return dataclasses.replace(space, **fixed)


def _most_pruned_gmacs(space, config) -> float:
    """GMACs of the space's most pruned policy (every free ratio at its upper bound)."""
    from vitjax.pruning import count_flops

    return count_flops(config, space.to_policy(np.ones(space.dim))).total


def run(ctx: Context) -> dict:
    from vitjax.evaluate import evaluate
    from vitjax.search import SearchSettings, run_search
    from vitjax.search.space import InfeasibleTarget
    from vitjax.stages.search import _sync, make_objective, provenance, target_gmacs

    block = ctx.config.get("ablation")
    names = tuple(block.get("dimensions", ()) or ()) if block else ()
    budgets = tuple(float(b) for b in (block.get("budgets", ()) or ())) if block else ()
    out = ctx.stage_dir("ablation")
    if not names and not budgets:
        print("[vitjax] ablation: skipped, config.ablation.dimensions and .budgets are empty",
              flush=True)
        return {"dimensions": {}, "front": []}
    for b in budgets:
        if not 0.0 < b < 1.0:
            raise UserError(f"config.ablation.budgets has {b}: give fractions of the dense "
                            "FLOPs in (0, 1), e.g. (0.4, 0.5, 0.7, 0.8)")
    combos = {name: combination(name) for name in names}
    search = ctx.config.search
    settings = SearchSettings.from_config(search)
    settings = dataclasses.replace(
        settings, population=int(block.get("population", settings.population)),
        iterations=int(block.get("iterations", settings.iterations)))
    config = ctx.model_config
    params = ctx.load_supernet(replicate=True)
    ranks = ctx.ranks()
    objective = make_objective(ctx, params, ranks)
    test_split = "test" if "test" in ctx.datasets.eval_names else "holdout"
    test_batches = ctx.eval_batches(test_split)
    model = ctx.model()
    target = target_gmacs(ctx)
    jobs = [(f"dims_{'+'.join(dims)}", dims, target) for dims in combos.values()]
    jobs += [(f"budget_{b:g}", DIMENSIONS, b * ctx.dense_gmacs) for b in budgets]

    def test_accuracy(policy) -> float:
        result = evaluate(model, params, policy.keep_counts(config), test_batches(), ctx.mesh,
                          ranks=ranks, token_mode=ctx.token_mode)
        return float(result["accuracy"])

    results = {}
    for index, (name, dims, budget) in enumerate(jobs, 1):
        space = _space_for(search.space, dims, config.depth)
        lowest = _most_pruned_gmacs(space, config)
        head = f"[vitjax] ablation {index}/{len(jobs)} {name}"
        if lowest > budget:
            print(f"{head}: cannot reach {budget:.4g} GMACs (at most pruned {lowest:.4g}), "
                  "skipped", flush=True)
            results[name] = {"dims": list(dims), "target_gmacs": budget, "reachable": False,
                             "lowest_gmacs": lowest}
            continue
        print(f"{head}: searching {'+'.join(dims)} at {budget:.4g} GMACs "
              f"({settings.population} + {settings.iterations} evaluations)", flush=True)
        try:
            result = run_search(
                objective, config, budget, space=space, settings=settings,
                log_path=out / f"{name}.jsonl", is_writer=ctx.is_main, sync=_sync,
                provenance=provenance(ctx),
                progress=lambda line, head=head: print(f"{head}: {line}", flush=True),
                trained_gmacs=ctx.target_gmacs)
        except InfeasibleTarget as error:
            # Reachable only in a corner too thin to sample (e.g. one dimension of a 2x-wide
            # model at a quarter of its FLOPs): a row of the table, not the end of the run.
            print(f"{head}: no policy found at {budget:.4g} GMACs ({error}), skipped",
                  flush=True)
            results[name] = {"dims": list(dims), "target_gmacs": budget, "reachable": False,
                             "lowest_gmacs": lowest, "reason": str(error)}
            continue
        accuracy = test_accuracy(result.best_policy)
        print(f"{head}: best hold-out objective {result.best_value:.4f}, {test_split} "
              f"accuracy {accuracy:.2%} at {result.best_gmacs:.4g} GMACs", flush=True)
        results[name] = {"dims": list(dims), "target_gmacs": budget, "reachable": True,
                         "best_value": result.best_value, "best_gmacs": result.best_gmacs,
                         "accuracy": accuracy, "evaluations": len(result.history),
                         "best_policy": result.best_policy.to_dict()}
    dimensions = {n: results[f"dims_{'+'.join(d)}"] for n, d in combos.items()}
    front = [results[f"budget_{b:g}"] for b in budgets]
    summary = {"split": test_split, "target_gmacs": target, "dense_gmacs": ctx.dense_gmacs,
               "dimensions": dimensions, "front": front,
               "evaluations_per_search": settings.population + settings.iterations}
    if ctx.is_main:
        workdir_lib.write_json(out / "ablation.json", summary)
    return summary
