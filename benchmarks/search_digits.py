"""The policy search on a real supernet: GP (+ EI + SQP) vs the authors' method vs random search,
paired by seed, at equal evaluation budgets.

    python -m vitjax.main --config=configs/digits.py --workdir=runs/digits \\
        --config.stages=pretrain,score                      # a supernet (a few minutes)
    python benchmarks/search_digits.py --workdir=runs/digits
    python benchmarks/search_digits.py --workdir=runs/digits --seeds=1,2 --sizes=12+12 \\
        --budgets=0.6 --methods=gp,authors                  # quick

Every method searches the supernet in `--workdir` (its pretrain stage must have run; the config
is the workdir's config.json, else `--config`) with the objective of its search stage (hold-out
`config.search.objective`), the same settings (`config.search`) and, per seed, the same initial
population where the methods sample the same region. Methods: `gp` (the library's default: GP +
EI, `optimizer=auto`: screened U_T draws below 50 points, SQP after; inside U_T's box at the
budget widened to the box the supernet was trained in, region 'sampled'), `gp-trained` (inside
the trained box only), `gp-cube` (over the whole space: the behaviour before either region
existed, the paper's literal problem (4) with a trust region), `authors` (the released code),
`random` (U_T), `random-trained` (U_T inside the trained region: separates the region's effect
from the GP's). `NAME@field=value` changes a search setting, e.g. `gp@region_margin=1`.

Resumable and fast: each search logs to OUT/<budget>_<size>_s<seed>_<method>.jsonl and resumes
from it (`run_search`); hold-out evaluations are cached by keep counts in OUT/evals.jsonl and
shared by every search (a policy's value is deterministic). Prints one line per search, then
per budget and size the per-seed table of best objective values, the mean paired difference
of every GP method (variants included) - authors and - random with its standard error and a
sign count (wins/ties/losses), and per method the fraction of its proposals (iterations after
the initial population) outside the trained region, the fraction worse than the median
initial policy, and the GP's predicted vs observed values.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import jax
import numpy as np

# (method of run_search, region)
VARIANTS = {
    "gp": ("gp", "sampled"),
    "gp-trained": ("gp", "trained"),
    "gp-cube": ("gp", "cube"),
    "authors": ("authors", "cube"),
    "random": ("random", "cube"),
    "random-trained": ("random", "trained"),
}


DIGITS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                             "digits.py")


def load_config(workdir: str, path: str | None):
    """`path`'s config; without it the workdir's config.json laid over configs/digits.py's
    defaults, so that a workdir written before a key was added still loads (the key takes
    its default; keys the code no longer has are dropped and named)."""
    import ml_collections

    logged = os.path.join(workdir, "config.json")
    spec = importlib.util.spec_from_file_location("benchmark_config", path or DIGITS_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if path is not None or not os.path.exists(logged):
        return module.get_config()
    with open(logged) as f:
        merged, dropped = overlay(module.get_config().to_dict(), json.load(f))
    if dropped:
        print(f"{logged}: keys unknown to this code, ignored: {', '.join(dropped)}")
    return ml_collections.ConfigDict(merged)


def overlay(defaults: dict, logged: dict) -> tuple[dict, list[str]]:
    """`logged`'s values over `defaults`, key by dotted key; logged keys absent from the
    defaults are dropped and returned by their dotted names."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(defaults, sep=".", keep_empty_nodes=True)
    flat_logged = traverse_util.flatten_dict(logged, sep=".", keep_empty_nodes=True)
    dropped = sorted(k for k in flat_logged if k not in flat)
    flat.update((k, v) for k, v in flat_logged.items() if k in flat)
    return traverse_util.unflatten_dict(flat, sep="."), dropped


class CachedObjective:
    """The search stage's objective, memoised by keep counts in a JSONL file."""

    def __init__(self, objective, model_config, path: str):
        self.objective, self.model_config, self.path = objective, model_config, path
        self.cache: dict[str, float] = {}
        self.hits = self.misses = 0
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.endswith("\n"):  # a torn last line is dropped
                        record = json.loads(line)
                        self.cache[record["key"]] = record["value"]

    def key(self, policy) -> str:
        keep = policy.keep_counts(self.model_config)
        return json.dumps([np.asarray(getattr(keep, f)).tolist()
                           for f in ("neuron", "head", "token")])

    def __call__(self, policies):
        keys = [self.key(p) for p in policies]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            values = self.objective([policies[i] for i in missing])
            with open(self.path, "a") as f:
                for i, value in zip(missing, values, strict=True):
                    self.cache[keys[i]] = float(value)
                    f.write(json.dumps({"key": keys[i], "value": float(value)}) + "\n")
        return [self.cache[k] for k in keys]


def with_overrides(settings, pairs):
    """'field=value' pairs applied to SearchSettings or its AcquisitionSettings."""
    import ast
    import dataclasses

    from vitjax.errors import UserError

    top, acquisition = {}, {}
    acquisition_fields = {f.name for f in dataclasses.fields(settings.acquisition)}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key in acquisition_fields:
            acquisition[key] = value
        elif key in {f.name for f in dataclasses.fields(settings)}:
            top[key] = value
        else:
            raise UserError(f"unknown search setting {key!r} in a method name")
    if acquisition:
        top["acquisition"] = dataclasses.replace(settings.acquisition, **acquisition)
    return dataclasses.replace(settings, **top)


def proposal_stats(result, inside, predicted, outside_by_dimension) -> dict:
    """Per search: proposals outside the region (and in which dimensions), worse than the
    median initial, GP error."""
    initial = [e for e in result.history if e.iteration == 0]
    later = [e for e in result.history if e.iteration > 0]
    median = float(np.median([e.value for e in initial]))
    stats = {"outside": [not inside(e.u) for e in later],
             "outside_by_dimension": [outside_by_dimension(e.u) for e in later],
             "worse_than_median": [e.value < median for e in later],
             "all_outside": [not inside(e.u) for e in result.history]}
    if predicted:
        observed = [e.value for e in later]
        stats["predicted"] = [predicted[(e.iteration, e.slot)] for e in later]
        stats["observed"] = observed
    return stats


def outside_dimensions(problem, u) -> list[bool]:
    """Whether u leaves the region in a neuron, head, token coordinate."""
    beyond = np.asarray(u) > problem.bound + 1e-9
    dims = problem.space.coordinate_dimensions
    return [bool(np.any(beyond[dims == d])) for d in range(3)]


def predictions(log_path: str) -> dict:
    from vitjax.search import read_log

    out = {}
    for record in read_log(log_path):
        if record.get("type") == "propose" and "predicted" in record:
            for slot, value in enumerate(record["predicted"]):
                out[(record["iteration"], slot)] = value
    return out


def paired(table, a: str, b: str) -> str:
    """Mean paired difference a - b over the seeds in pp, its standard error (the sample
    standard deviation of the differences over sqrt(seeds); '?' for one seed) and the sign
    count."""
    diffs = np.array([row[a] - row[b] for row in table if a in row and b in row])
    if not len(diffs):
        return "n/a"
    wins, ties = int(np.sum(diffs > 1e-12)), int(np.sum(np.abs(diffs) <= 1e-12))
    error = (f"{100 * diffs.std(ddof=1) / np.sqrt(len(diffs)):.3f}" if len(diffs) > 1
             else "?")
    return (f"{100 * diffs.mean():+.3f} pp ± {error} (wins/ties/losses {wins}/{ties}/"
            f"{len(diffs) - wins - ties})")


def comparisons(methods) -> list[tuple[str, str]]:
    """The pairs the report compares: every GP method (`gp`, `gp-trained`, `gp-cube` and any
    `gp...@field=value` variant) against each baseline and the other region variants run."""
    baselines = ("authors", "random", "gp-trained", "gp-cube")
    return [(a, b) for a in methods if a.split("@")[0] in ("gp", "gp-trained", "gp-cube")
            for b in baselines if b in methods and b != a]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a run whose pretrain stage finished")
    parser.add_argument("--config", default=None,
                        help="config file (default: WORKDIR/config.json, else "
                             "configs/digits.py)")
    parser.add_argument("--out", default=None, help="default: WORKDIR/search_benchmark")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--budgets", default="0.6,0.4", help="fractions of the dense FLOPs")
    parser.add_argument("--sizes", default="12+12,24+24", help="initial+iterations, ...")
    parser.add_argument("--methods", default="gp,authors,random,gp-cube,gp-trained")
    args = parser.parse_args()

    from vitjax.errors import UserError

    try:
        run(args)
    except UserError as e:
        sys.exit(f"error: {e}")


def run(args):
    import dataclasses

    from vitjax.errors import UserError
    from vitjax.search import SearchSettings, SearchSpace, run_search
    from vitjax.search.loop import trained_region
    from vitjax.search.optimize import Problem
    from vitjax.stages.context import Context
    from vitjax.stages.search import make_objective

    methods = args.methods.split(",")
    unknown = [m for m in methods if m.split("@")[0] not in VARIANTS]
    if unknown:
        raise UserError(f"unknown methods {unknown}; use {list(VARIANTS)}, optionally with "
                        "@field=value settings, e.g. gp@xi=0.001@initial_length=0.5")
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = [tuple(int(v) for v in s.split("+")) for s in args.sizes.split(",")]
    if not os.path.exists(os.path.join(args.workdir, "pretrain", "supernet.safetensors")):
        raise UserError(f"no supernet in {args.workdir}/pretrain: run the pretrain stage first")
    from etils import epath

    config_dict = load_config(args.workdir, args.config)
    ctx = Context(config_dict, epath.Path(os.path.abspath(args.workdir)))
    # The same number of hold-out batches, each as small as it can be: 300 digits images in
    # batches of 256 pad the second to 256 and spend 40% of every evaluation on padding.
    size = ctx.datasets.eval_size("holdout")
    batch = int(config_dict.train.get("eval_batch_size", 256))
    count = -(-size // batch)
    devices = jax.device_count()
    per_batch = math.ceil(size / count)
    smallest = math.ceil(per_batch / devices) * devices
    if smallest != batch:
        config_dict.train.eval_batch_size = smallest
        ctx = Context(config_dict, ctx.workdir)
        print(f"hold-out: {size} images in {count} batches of {smallest} (instead of {batch})")
    out = args.out or os.path.join(args.workdir, "search_benchmark")
    os.makedirs(out, exist_ok=True)
    config = ctx.model_config
    block = ctx.config.search
    base = SearchSettings.from_config(block)
    space = SearchSpace.from_config(block.space, config.depth)
    objective = CachedObjective(make_objective(ctx, ctx.load_supernet(replicate=True),
                                               ctx.ranks()), config,
                                os.path.join(out, "evals.jsonl"))
    trained = ctx.target_gmacs
    upper = trained_region(config, space, trained)
    lower, top = space.lower_upper()
    bounds = None if upper is None else np.round(lower + np.asarray(upper) * (top - lower), 3)
    print(f"supernet {args.workdir} trained at {trained:.4g} GMACs "
          f"({trained / ctx.dense_gmacs:.0%} of dense); trained region (ratio bounds per "
          f"coordinate): {None if bounds is None else bounds.tolist()}", flush=True)

    jobs = [(b, s, seed, m) for b in budgets for s in sizes for seed in seeds for m in methods]
    results, started, done_fresh = {}, time.monotonic(), 0
    for index, (budget, (population, iterations), seed, name) in enumerate(jobs, 1):
        method, region = VARIANTS[name.split("@")[0]]
        settings = dataclasses.replace(base, method=method, region=region, seed=seed,
                                       population=population, iterations=iterations)
        settings = with_overrides(settings, name.split("@")[1:])
        log_path = os.path.join(out, f"{budget:g}_{population}+{iterations}_s{seed}_{name}.jsonl")
        fresh = not os.path.exists(log_path)
        misses = objective.misses
        tick = time.monotonic()
        result = run_search(objective, config, budget * ctx.dense_gmacs, space=space,
                            settings=settings, log_path=log_path, progress=lambda line: None,
                            trained_gmacs=trained)
        problem = Problem(config, space, budget * ctx.dense_gmacs, upper=upper)
        stats = proposal_stats(result, lambda u, p=problem: bool(p.inside(u)),
                               predictions(log_path),
                               lambda u, p=problem: outside_dimensions(p, u))
        results[(budget, population, iterations, seed, name)] = (result.best_value, stats)
        done_fresh += fresh
        spent = time.monotonic() - started
        eta = spent / max(done_fresh, 1) * (len(jobs) - index) if done_fresh else float("nan")
        print(f"[{index}/{len(jobs)}] budget {budget:g} {population}+{iterations} seed {seed} "
              f"{name:14s} best {result.best_value:.4f}, {objective.misses - misses} new "
              f"evaluations, {time.monotonic() - tick:.0f} s; elapsed {spent / 60:.1f} min, "
              f"eta {eta / 60:.0f} min", flush=True)

    summary = report(results, methods, seeds, budgets, sizes)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nevaluations: {objective.misses} computed, {objective.hits} from the cache; "
          f"load average {os.getloadavg()[0]:.2f}")


def report(results, methods, seeds, budgets, sizes) -> dict:
    summary = []
    for budget in budgets:
        for population, iterations in sizes:
            table = []
            for seed in seeds:
                table.append({m: results[(budget, population, iterations, seed, m)][0]
                              for m in methods})
            print(f"\n### budget {budget:g} of dense FLOPs, {population} + {iterations} "
                  "evaluations: best hold-out objective\n")
            print("| seed | " + " | ".join(methods) + " |")
            print("|---" * (len(methods) + 1) + "|")
            for seed, row in zip(seeds, table, strict=True):
                print(f"| {seed} | " + " | ".join(f"{row[m]:.4f}" for m in methods) + " |")
            print("| mean | " + " | ".join(
                f"{np.mean([row[m] for row in table]):.4f}" for m in methods) + " |")
            print()
            entry = {"budget": budget, "population": population, "iterations": iterations,
                     "seeds": seeds, "best": {m: [row[m] for row in table] for m in methods}}
            for a, b in comparisons(methods):
                line = paired(table, a, b)
                print(f"- {a} - {b}: {line}")
                entry[f"{a} - {b}"] = line
            print("\n| method | proposals outside trained region | outside in neuron / head / "
                  "token | evaluated policies outside | proposals worse than median initial | "
                  "GP predicted - observed (mean, MAE, corr) |")
            print("|---|---|---|---|---|---|")
            for m in methods:
                stats = [results[(budget, population, iterations, seed, m)][1] for seed in seeds]
                outside = np.concatenate([s["outside"] for s in stats])
                everything = np.concatenate([s["all_outside"] for s in stats])
                worse = np.concatenate([s["worse_than_median"] for s in stats])
                gp_line = ""
                if all("predicted" in s for s in stats):
                    predicted = np.concatenate([s["predicted"] for s in stats])
                    observed = np.concatenate([s["observed"] for s in stats])
                    error = predicted - observed
                    corr = np.corrcoef(predicted, observed)[0, 1] if len(error) > 2 else np.nan
                    gp_line = (f"{100 * error.mean():+.2f} pp, {100 * np.abs(error).mean():.2f}"
                               f" pp, {corr:.2f}")
                    entry[f"{m} gp error"] = gp_line
                by_dim = np.concatenate([s["outside_by_dimension"] for s in stats]).reshape(-1, 3)
                dims = " / ".join(f"{v:.0%}" for v in by_dim.mean(axis=0))
                print(f"| {m} | {outside.mean():.0%} ({outside.sum()}/{len(outside)}) | {dims} | "
                      f"{everything.mean():.0%} | {worse.mean():.0%} | {gp_line} |")
                entry[f"{m} outside by dimension"] = by_dim.mean(axis=0).tolist()
                entry[f"{m} outside"] = float(outside.mean())
                entry[f"{m} worse than median"] = float(worse.mean())
            summary.append(entry)
    return summary


if __name__ == "__main__":
    main()
