"""Stage `search` (Sec. 3.3, Eq. 3-4, Alg. 1 lines 7-11): the per-layer ratios that maximise the
hold-out accuracy of the supernet's sub-networks (inherited weights, the supernet's ranks) under
the FLOPs budget, by GP + expected improvement (screened U_T draws on few points, SQP from 50 on;
`vitjax.search`).

Writes search/log.jsonl (every evaluation, flushed before the next one: a killed search resumes
without re-evaluating), search/best_policy.json, search/result.json and the plots
search/progress.png (paper Fig. 4) and search/best_policy.png (Table 3 middle/right: per-layer
ratios and per-layer FLOPs reduction). `config.search.baselines` runs the random-search and
authors'-code baselines at the same evaluation budget (paper Table 5) into log_<method>.jsonl.

`config.search.region='sampled'` (default) keeps the searched policies inside the box U_T
samples the initial population from, widened to the box the supernet's training policies were
drawn from (its target `ctx.target_gmacs`); the baselines always sample the whole space as
published.
"""

from __future__ import annotations

import time

import numpy as np

from vitjax import workdir as workdir_lib
from vitjax.errors import UserError
from vitjax.stages.context import Context

_OBJECTIVES = ("accuracy", "accuracy_minus_loss")
SECONDS_FILE = "seconds.json"  # the search time of earlier, killed runs (SearchClock)


def make_objective(ctx: Context, params, ranks, *, split: str = "holdout"):
    """policies -> hold-out objective values, every policy through the one evaluator (one
    compilation for all of them); every host evaluates its slice of the hold-out set."""
    from vitjax.evaluate import evaluate

    block = ctx.config.search
    kind = block.get("objective", "accuracy")
    if kind not in _OBJECTIVES:
        raise UserError(f"config.search.objective={kind!r}: choose one of {_OBJECTIVES}")
    weight = float(block.get("loss_weight", 0.0))
    batches = ctx.eval_batches(split)
    model = ctx.model()

    def objective(policies):
        values = []
        for policy in policies:
            result = evaluate(model, params, policy.keep_counts(ctx.model_config), batches(),
                              ctx.mesh, ranks=ranks, token_mode=ctx.token_mode)
            value = result["accuracy"]
            if kind == "accuracy_minus_loss":
                value -= weight * result["loss"]
            values.append(value)
        return values

    return objective


def provenance(ctx: Context) -> dict:
    """What a search log's values measure, for its header: the supernet (and, with
    score.rescore, the score stage's ranks) by identity, and the objective."""
    block = ctx.config.search
    rescore = bool(ctx.config.get("score", {}).get("rescore", False))
    out = {"supernet": ctx.summary("pretrain").get("identity"),
           "objective": block.get("objective", "accuracy"),
           "loss_weight": float(block.get("loss_weight", 0.0))}
    if rescore:
        out["ranks"] = ctx.summary("score").get("identity")
    return out


def _sync(u: np.ndarray) -> np.ndarray:
    """Every host must evaluate the same policies: take process 0's proposal (they are
    deterministic from the log, this guards against floating-point differences)."""
    import jax

    if jax.process_count() == 1:
        return u
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(u))


class SearchClock:
    """Seconds each method's search spent, over every run of the stage: a killed search
    resumes from its log without re-evaluating, and without this record its summary would
    count only the time since the resume. search/seconds.json holds the estimate (wall time
    less time in the objective) up to the last progress line of the earlier runs."""

    def __init__(self, path, is_writer: bool):
        self.path, self.is_writer = path, is_writer
        try:
            self.earlier = workdir_lib.read_json(path) if path.exists() else {}
        except (ValueError, OSError):  # a torn write: the earlier time is unknown, not fatal
            self.earlier = {}
        self.totals: dict = {}
        self.method, self.started, self.objective_seconds = None, 0.0, 0.0

    def timed(self, objective):
        def timed_objective(policies):
            tick = time.perf_counter()
            try:
                return objective(policies)
            finally:
                self.objective_seconds += time.perf_counter() - tick
        return timed_objective

    def _earlier(self, method) -> dict:
        return {"overhead_seconds": 0.0, "objective_seconds": 0.0,
                **self.earlier.get(method, {})}

    def start(self, method: str) -> None:
        self.method, self.started, self.objective_seconds = method, time.perf_counter(), 0.0

    def save(self) -> None:
        if self.method is None or not self.is_writer:
            return
        earlier = self._earlier(self.method)
        wall = time.perf_counter() - self.started
        self.totals[self.method] = {
            "overhead_seconds": earlier["overhead_seconds"] + wall - self.objective_seconds,
            "objective_seconds": earlier["objective_seconds"] + self.objective_seconds}
        workdir_lib.write_json(self.path, {**self.earlier, **self.totals})

    def finish(self, result) -> None:
        """The method's totals: this run's measured times plus the earlier runs'."""
        earlier = self._earlier(self.method)
        self.totals[self.method] = {
            "overhead_seconds": earlier["overhead_seconds"] + result.overhead_seconds,
            "objective_seconds": earlier["objective_seconds"] + result.objective_seconds,
            "resumed": self.method in self.earlier}
        self.method = None


def baseline_region(settings, method: str) -> dict:
    """The baselines search as published (U_T at the search's target, the whole space); the
    configured region applies to the method under study."""
    return {} if method == settings.method else {"region": "cube"}


def target_gmacs(ctx: Context) -> float:
    explicit = ctx.config.search.get("target_gmacs")
    target = float(explicit) if explicit is not None else ctx.target_gmacs
    if target is None:
        raise UserError("the search needs a FLOPs budget: set config.target_flops_fraction or "
                        "config.search.target_gmacs")
    return target


def check_config(config) -> None:
    """config.search read as this stage and the ablation read it: a misspelt method, region,
    optimizer, kernel, band or space setting is one line before any stage runs, not after the
    supernet has been trained."""
    from vitjax.configs import model_config_from
    from vitjax.search import SearchSettings, SearchSpace

    block = config.get("search")
    if block is None:
        return
    SearchSettings.from_config(block)
    SearchSpace.from_config(block.space, model_config_from(config).depth)


def run(ctx: Context) -> dict:
    from vitjax.search import SearchSettings, SearchSpace, run_search

    block = ctx.config.search
    out = ctx.stage_dir("search")
    settings = SearchSettings.from_config(block)
    space = SearchSpace.from_config(block.space, ctx.model_config.depth)
    target = target_gmacs(ctx)
    params = ctx.load_supernet(replicate=True)
    clock = SearchClock(out / SECONDS_FILE, ctx.is_main)
    objective = clock.timed(make_objective(ctx, params, ctx.ranks()))

    def progress(line: str) -> None:
        print(f"[vitjax] search: {line}", flush=True)
        clock.save()

    results = {}
    methods = [settings.method] + [m for m in block.get("baselines", ()) or ()
                                   if m != settings.method]
    for method in methods:
        name = "log.jsonl" if method == settings.method else f"log_{method}.jsonl"
        if method != settings.method:
            progress(f"baseline '{method}' at the same budget ({settings.population} + "
                     f"{settings.iterations} x {settings.q} evaluations)")
        clock.start(method)
        results[method] = run_search(
            objective, ctx.model_config, target, space=space, settings=settings,
            log_path=out / name, is_writer=ctx.is_main, sync=_sync, progress=progress,
            provenance=provenance(ctx), method=method, trained_gmacs=ctx.target_gmacs,
            **baseline_region(settings, method),
        )
        clock.finish(results[method])
    result = results[settings.method]
    low, median, high = result.initial_spread
    holdout = ctx.datasets.eval_size("holdout")
    progress(f"initial population: objective min {low:.4f}, median {median:.4f}, max "
             f"{high:.4f} on {holdout} hold-out images")
    if block.get("objective", "accuracy") == "accuracy" and (high - low) * holdout < 3:
        progress("warning: the initial policies differ by fewer than 3 hold-out images; the "
                 "search cannot tell them apart (raise data.holdout_per_class or lower the "
                 "FLOPs target)")
    if ctx.is_main:
        workdir_lib.write_text(out / "best_policy.json", result.best_policy.to_json())
        workdir_lib.write_json(out / "result.json", {m: r.to_dict() for m, r in results.items()})
        plot_progress(results, out / "progress.png")
        plot_policy(ctx, result.best_policy, out / "best_policy.png")
    return {
        "target_gmacs": target, "dense_gmacs": ctx.dense_gmacs,
        "best_value": result.best_value, "best_gmacs": result.best_gmacs,
        "best_policy": result.best_policy.to_dict(), "evaluations": len(result.history),
        "initial_spread": [low, median, high], "holdout_images": holdout,
        "methods": {m: {"best_value": r.best_value, "best_gmacs": r.best_gmacs,
                        "evaluations": len(r.history), **clock.totals[m]}
                    for m, r in results.items()},
    }


def plot_progress(results: dict, path) -> None:
    """Fig. 4: the objective of every evaluation and the best so far, per method."""
    plt = workdir_lib.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, result in results.items():
        values = np.array([e.value for e in result.history])
        line, = ax.plot(np.maximum.accumulate(values), label=f"{method}: best so far")
        ax.scatter(np.arange(len(values)), values, s=6, alpha=0.4, color=line.get_color())
    workdir_lib.save_plot(fig, ax, path, "evaluation", "hold-out objective")


def per_layer_flops_reduction(config, policy) -> np.ndarray:
    """1 - (layer l's MACs under the policy) / (its dense MACs), per layer."""
    from vitjax.pruning import count_flops

    dense = count_flops(config)
    pruned = count_flops(config, policy)
    return 1.0 - np.asarray(pruned.per_layer) / np.asarray(dense.per_layer)


def plot_policy(ctx: Context, policy, path) -> None:
    """Table 3 middle/right: the best policy's ratios and FLOPs reduction per layer."""
    plt = workdir_lib.pyplot()
    layers = np.arange(1, ctx.model_config.depth + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.27
    for offset, name in zip((-width, 0, width), ("neuron", "head", "token"), strict=True):
        left.bar(layers + offset, getattr(policy, name), width, label=name)
    left.set_xlabel("layer")
    left.set_ylabel("pruning ratio")
    left.legend(fontsize=8)
    right.bar(layers, per_layer_flops_reduction(ctx.model_config, policy))
    right.set_xlabel("layer")
    right.set_ylabel("FLOPs reduction")
    for ax in (left, right):
        ax.set_xticks(layers)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    workdir_lib.save_figure(fig, path)
