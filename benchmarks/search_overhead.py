"""Policy-search overhead and quality: GP + EI + SQP vs the authors' method vs random search.

    python benchmarks/search_overhead.py                        # 36-d DeiT-S, 100 + 100, 3 seeds
    python benchmarks/search_overhead.py --population 20 --iterations 10 --seeds 1   # quick
    python benchmarks/search_overhead.py --methods gp,gp@optimizer=slsqp   # a setting changed

Every method searches the same synthetic 36-d problem (`vitjax.search.SyntheticObjective`:
DeiT-S, 12 neuron + 12 head + 12 token ratios, a smooth stand-in for hold-out accuracy whose
optimum lies on the FLOPs budget) with the same initial population and the same number of
evaluations. The objective costs microseconds, so "overhead" is everything the search itself
does: sampling, GP fits, EI maximisation, rounding, logging (`SearchResult.overhead_seconds`,
JIT compilation included). Prints, per method, the best value found (mean over seeds, and per
seed), its gap to the optimum of the continuous relaxation (an upper bound no policy with
integer keep counts can exceed), and the overhead; then the machine and its load.
Goal: GP overhead < 60 s for 100 + 100 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import numpy as np

from vitjax.models.config import ViTConfig
from vitjax.pruning.flops import count_flops
from vitjax.search import (
    AcquisitionSettings,
    SearchSettings,
    SearchSpace,
    SyntheticObjective,
    run_search,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search_digits import with_overrides  # noqa: E402  (one parser of NAME@field=value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="S/16")
    parser.add_argument("--fraction", type=float, default=0.6, help="FLOPs budget / dense")
    parser.add_argument("--population", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tol", type=float, default=0.05, help="FLOPs band [T(1-tol), T]")
    parser.add_argument("--methods", default="gp,authors,random",
                        help="gp | authors | random | gp-cube (gp over the whole cube instead "
                             "of the region U_T samples from, with the trust region) | "
                             "gp-whole-cube (gp over the whole cube without the trust region: "
                             "the paper's literal (4)); NAME@field=value changes a search "
                             "setting, e.g. gp@optimizer=candidates@band=0.02")
    args = parser.parse_args()

    config = ViTConfig.from_variant(args.variant)
    target = args.fraction * count_flops(config).total
    space = SearchSpace.paper(config.depth)
    methods = args.methods.split(",")
    best = {m: [] for m in methods}
    overhead = {m: [] for m in methods}
    optima = []
    load_before = os.getloadavg()
    started = time.time()
    for seed in range(args.seeds):
        optimum, _ = SyntheticObjective(config, seed).optimum(space, target)
        optima.append(optimum)
        for method in methods:
            objective = SyntheticObjective(config, seed)
            name, *pairs = method.split("@")
            variant = {}
            if name in ("gp-cube", "gp-whole-cube"):
                variant = dict(region="cube")
            if name == "gp-whole-cube":
                variant["acquisition"] = AcquisitionSettings(trust_region=False)
            settings = with_overrides(dataclasses.replace(
                SearchSettings(), method=name.split("-")[0], population=args.population,
                iterations=args.iterations, seed=seed, tol=args.tol, **variant), pairs)
            result = run_search(objective, config, target, space=space, settings=settings,
                                progress=lambda line: None)
            best[method].append(result.best_value)
            overhead[method].append(result.overhead_seconds)
            print(f"seed {seed} {method:13s} best {result.best_value:.4f} (optimum <= "
                  f"{optimum:.4f}) at {result.best_gmacs:.3f} GMACs, overhead "
                  f"{result.overhead_seconds:.1f} s", flush=True)

    optima = np.array(optima)
    print(f"\n{args.variant}, {space.dim}-d space, budget {target:.3f} GMACs "
          f"({args.fraction:.0%} of dense), band {args.tol}, {args.population} initial + "
          f"{args.iterations} iterations, {args.seeds} seeds\n")
    print("| method | best value (mean) | gap to relaxed optimum (mean) | per seed | "
          "search overhead (mean s) | per iteration (ms) |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        values, seconds = np.array(best[method]), np.array(overhead[method])
        per_seed = " ".join(f"{v:.4f}" for v in values)
        print(f"| {method} | {values.mean():.4f} | {(optima - values).mean():.4f} | {per_seed} "
              f"| {seconds.mean():.1f} | {1000 * seconds.mean() / max(args.iterations, 1):.0f} |")
    load_after = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.python_implementation()} {platform.python_version()}; load average "
          f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; wall "
          f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
