"""Every shipped config's search and ablation jobs, at their own model shapes, run 3 proposals of
the configured search on the synthetic objective (no training, no data): no error, every policy
within its budget. A job whose initial population cannot be drawn is what the ablation stage
reports as an unreachable row.

    python tools/check_search_jobs.py        # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

from vitjax.configs import model_config_from
from vitjax.pruning import count_flops
from vitjax.search import SearchSettings, SyntheticObjective, run_search
from vitjax.search.space import InfeasibleTarget
from vitjax.stages.ablation import DIMENSIONS, _most_pruned_gmacs, _space_for, combination

CONFIGS = [("configs/digits.py", None), ("configs/digits.py", "flops=0.4"),
           ("configs/digits.py", "expand=2"), ("configs/deit_ti.py", None),
           ("configs/deit_s.py", None), ("configs/deit_s.py", "flops=0.4"),
           ("configs/deit_b.py", None), ("configs/deit_ti.py", "expand=2"),
           ("configs/folder.py", "root=/tmp")]


def load(path: str, arg: str | None):
    spec = importlib.util.spec_from_file_location("shipped_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def jobs(config, model_config):
    """(name, dimensions, target GMACs, population) of the search stage and the ablation."""
    dense = count_flops(model_config).total
    target = config.target_flops_fraction * dense
    population = config.search.population
    ablation = config.get("ablation") or {}
    yield "search", tuple(DIMENSIONS), target, population
    population = ablation.get("population", population)
    for name in ablation.get("dimensions") or ():
        yield name, combination(name), target, population
    for budget in ablation.get("budgets") or ():
        yield f"budget {budget}", tuple(DIMENSIONS), budget * dense, population


def main():
    failures = 0
    for path, arg in CONFIGS:
        config = load(path, arg)
        model_config = model_config_from(config)
        trained = config.target_flops_fraction * count_flops(model_config).total
        base = SearchSettings.from_config(config.search)
        for name, dims, target, population in jobs(config, model_config):
            space = _space_for(config.search.space, dims, model_config.depth)
            if _most_pruned_gmacs(space, model_config) > target:
                continue  # the stage skips it before searching
            settings = dataclasses.replace(base, population=int(population), iterations=3)
            started = time.time()
            try:
                result = run_search(SyntheticObjective(model_config, 0), model_config, target,
                                    space=space, settings=settings, trained_gmacs=trained,
                                    progress=lambda line: None)
                within = all(e.gmacs <= target * (1 + 1e-9) for e in result.history)
                failures += not within
                status = (f"{len(result.history)} evaluations, "
                          f"{'all within budget' if within else 'OVER BUDGET'}")
            except InfeasibleTarget as error:
                status = f"unreachable row: {str(error)[:70]}"
            print(f"{path}:{arg or ''} {name}: {status} ({time.time() - started:.1f} s)",
                  flush=True)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
