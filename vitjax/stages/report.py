"""Stage `report`: report/report.md with the paper's tables, every number read from the stage
outputs in the workdir (never a constant), plus measured throughput of the dense and the pruned
model. Sections appear for the stages that ran; a missing stage is named, not invented.

Tables: dense vs compressed (paper Tables 1 and 4: accuracy, GMACs, parameters, measured
images/s); GP search vs random search vs the authors' method (Table 5); the criteria comparison
(Fig. 1); search progress (Fig. 4); the best policy per layer (Table 3 middle/right).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from vitjax import workdir as workdir_lib
from vitjax.stages.context import Context
from vitjax.stages.kit import load_weights, parameter_count


def _done(ctx: Context, stage: str) -> dict | None:
    path = ctx.done_file(stage)
    return workdir_lib.read_json(path) if path.exists() else None


def throughput(models: dict, image_size: int, batches=(1, 64), *, rounds: int = 5,
               seconds: float = 0.2) -> dict:
    """Forward images/s of every `models[name] = (model, params)` (jitted, float32, random
    inputs) at each batch size: after a warm-up, `rounds` rounds in which every model runs
    repeatedly for `seconds` in turn (A B C A B C ...), so a change of machine load hits all
    of them alike; the median round per model. One process: a quick, fair reading for the
    report; `benchmarks/pruned_speedup.py` is the separate-process measurement."""
    from vitjax.bench.timing import alternate_rounds, rate

    forwards = {name: (jax.jit(lambda p, x, model=model: model.apply({"params": p}, x)[0]),
                       jax.device_put(params))
                for name, (model, params) in models.items()}
    out: dict = {name: {} for name in models}
    for batch in batches:
        images = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3))
        images = jax.device_put(images.astype(np.float32))
        measures = {}
        for name, (forward, params) in forwards.items():
            forward(params, images).block_until_ready()  # compile
            call = functools.partial(lambda f, p, x: f(p, x).block_until_ready(), forward,
                                     params, images)
            measures[name] = functools.partial(rate, call, batch, seconds)
        samples = alternate_rounds(measures, rounds)
        for name in models:
            out[name][batch] = float(np.median(samples[name]))
    return out


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"



def check_config(config) -> None:
    """config.report: the timing settings, checked before any stage (the report runs last)."""
    from vitjax.stages.checks import require

    report = config.get("report")
    if report is None:
        return
    sizes = report.get("batch_sizes")
    ok = isinstance(sizes, (tuple, list)) and len(sizes) > 0 and all(
        isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes)
    require(ok, f"config.report.batch_sizes={sizes!r}: give positive batch sizes, e.g. (1, 64)")
    rounds, seconds = report.get("rounds"), report.get("seconds")
    require(isinstance(rounds, int) and rounds >= 1,
            f"config.report.rounds={rounds!r}: must be an integer >= 1")
    require(isinstance(seconds, (int, float)) and seconds > 0,
            f"config.report.seconds={seconds!r}: must be > 0 (seconds per timed round)")


def run(ctx: Context) -> dict:
    from vitjax.stages.prune import PRUNED_FILE

    out = ctx.stage_dir("report")
    done = {s: _done(ctx, s) for s in ("pretrain", "score", "criteria", "search", "ablation",
                                       "prune", "finetune", "baseline", "export", "compare")}
    c = ctx.model_config
    lines = ["# vitjax report", "",
             f"Workdir `{ctx.workdir}`; model: embed {c.embed_dim}, depth {c.depth}, "
             f"{c.num_heads} heads, MLP {c.mlp_dim}, patch {c.patch_size}, {c.image_size} px, "
             f"{c.num_classes} classes; token mode `{ctx.token_mode}`. GMACs count "
             "multiply-accumulates (what the paper and fvcore call FLOPs).", ""]
    summary: dict = {}

    # Tables 1 and 4: dense vs compressed.
    rows = []
    test = "test" if "test" in ctx.datasets.eval_names else "holdout"
    supernet = jax.device_get(ctx.load_supernet())
    dense_params = parameter_count(supernet)
    dense_gmacs = ctx.dense_gmacs
    # Every model this report times, measured together (alternating) before any table.
    contenders = {}
    if done["pretrain"]:
        contenders["dense"] = (ctx.model(), supernet)
    if done["prune"]:
        pruned_config, pruned_params = load_weights(ctx.workdir / "prune" / PRUNED_FILE,
                                                    "prune")
        contenders["pruned"] = (ctx.model(pruned_config), pruned_params)
    compare_methods = (done["compare"] or {}).get("methods") or {}
    if compare_methods:
        from vitjax.stages.compare import load_model

        contenders.update({m: load_model(ctx, m) for m in compare_methods})
    timing = ctx.config.report
    batches = tuple(int(b) for b in timing.batch_sizes)
    rounds, seconds = int(timing.rounds), float(timing.seconds)
    print(f"[vitjax] report: timing {', '.join(contenders)} at batch {_and(batches)} "
          f"(alternating, {_rounds(rounds)} of {seconds:g} s)", flush=True)
    speed = throughput(contenders, ctx.model_config.image_size, batches, rounds=rounds,
                       seconds=seconds)
    if done["pretrain"]:
        acc = done["pretrain"]["metrics"].get(f"eval/{test}/dense/accuracy")
        rows.append(("dense supernet", acc, dense_gmacs, dense_params, speed["dense"]))
    if done["prune"]:
        gmacs = done["prune"]["pruned_gmacs"]
        rows.append(("pruned, no finetuning", done["prune"]["accuracy_before_finetune"].get(test),
                     gmacs, done["prune"]["pruned_params"], speed["pruned"]))
        if done["finetune"]:
            rows.append(("pruned + finetuned", done["finetune"]["accuracy"].get(test), gmacs,
                         done["finetune"]["params"], speed["pruned"]))
    cost_lines, summary["cost"] = cost_section(ctx, done, test, speed, batches)
    lines += cost_lines
    lines += ["## Dense vs compressed (Tables 1 and 4)", "",
              f"Accuracy on the {test} split (%); throughput measured by this stage (XLA, "
              f"float32, {jax.devices()[0].platform}, forward only; all models of this report "
              f"in this process, alternating, median of {_rounds(rounds)} of {seconds:g} s).",
              "", "| model | accuracy | GMACs | FLOPs kept | parameters | "
              + _columns("img/s batch {}", batches),
              "|---|---|---|---|---|" + "---|" * len(batches)]
    for name, acc, gmacs, params, measured in rows:
        lines.append(f"| {name} | {_pct(acc)} | {gmacs:.4g} | {gmacs / dense_gmacs:.1%} | "
                     f"{params:,} | {_speeds(measured, batches)}")
    if "pruned" in speed:
        for batch in batches:
            ratio = speed["pruned"][batch] / speed["dense"][batch]
            flops_ratio = dense_gmacs / done["prune"]["pruned_gmacs"]
            summary[f"speedup_batch{batch}"] = ratio
            lines.append("")
            lines.append(f"Batch {batch}: measured speed-up {ratio:.2f}x for a FLOPs ratio of "
                         f"{flops_ratio:.2f}x (quotient {ratio / flops_ratio:.2f}).")
    summary["rows"] = [dict(model=r[0], accuracy=r[1], gmacs=r[2], params=r[3],
                            images_per_second=r[4]) for r in rows]
    lines.append("")

    # Table 5: search methods at equal budget.
    if done["search"]:
        search = done["search"]
        lines += ["## Policy search (Table 5, Fig. 4)", "",
                  f"Budget {search['target_gmacs']:.4g} GMACs "
                  f"({search['target_gmacs'] / search['dense_gmacs']:.1%} of dense); objective "
                  f"on {search['holdout_images']} hold-out images; initial population "
                  f"min/median/max {search['initial_spread'][0]:.4f} / "
                  f"{search['initial_spread'][1]:.4f} / {search['initial_spread'][2]:.4f}.", "",
                  "| method | best objective | its GMACs | evaluations | search overhead (s) |",
                  "|---|---|---|---|---|"]
        for method, r in search["methods"].items():
            lines.append(f"| {method} | {r['best_value']:.4f} | {r['best_gmacs']:.4g} | "
                         f"{r['evaluations']} | {r['overhead_seconds']:.1f} |")
        lines += ["", "![search progress](../search/progress.png)", "",
                  "### Best policy per layer (Table 3 middle/right)", "",
                  "| layer | neuron | head | token |", "|---|---|---|---|"]
        policy = search["best_policy"]
        for layer in range(ctx.model_config.depth):
            lines.append(f"| {layer + 1} | {policy['neuron'][layer]:.2f} | "
                         f"{policy['head'][layer]:.2f} | {policy['token'][layer]:.2f} |")
        lines += ["", "![best policy](../search/best_policy.png)", ""]
        summary["search"] = search["methods"]
    else:
        lines += ["## Policy search", "", "The search stage has not run in this workdir.", ""]

    # Fig. 1: criteria.
    if done["criteria"]:
        table = (ctx.workdir / "criteria" / "criteria.md").read_text()
        body = table.split("\n", 2)[2] if table.startswith("#") else table
        lines += ["## Pruning criteria (Fig. 1)", "", body.strip(), "",
                  "![criteria](../criteria/criteria.png)", ""]
    # The second paper's systems at matched FLOPs (stage compare).
    if done["compare"] and done["compare"].get("methods"):
        lines += compare_table(done, rows, test, speed, batches, rounds)
        summary["compare"] = {m: r["accuracy"].get(test) for m, r in
                              done["compare"]["methods"].items()}
    # Every model's measured img/s, for the study's speed rows.
    summary["speed"] = {name: {str(b): v for b, v in measured.items()}
                        for name, measured in speed.items()}

    # Table 3 left and Fig. 2: the ablation stage's searches on the supernet.
    missing = []
    if done["ablation"] and done["ablation"].get("dimensions"):
        lines += ablation_table(done["ablation"], dense_gmacs)
        summary["ablation"] = {name: r.get("accuracy") for name, r in
                               done["ablation"]["dimensions"].items()}
    else:
        missing.append("the dimension ablation at equal FLOPs (Table 3 left: run the "
                       "`ablation` stage with config.ablation.dimensions)")
    points = front_points(ctx, done, test)
    if len(points) > 1:
        if ctx.is_main:
            plot_front(points, out / "pareto.png")
        lines += ["## Accuracy vs FLOPs (Fig. 2)", "",
                  f"Accuracy on the {test} split against GMACs. Sub-networks of the supernet "
                  "are the best policies the search found at each budget, without finetuning.",
                  "", "| model | GMACs | FLOPs kept | accuracy |", "|---|---|---|---|"]
        for label, gmacs, acc in points:
            lines.append(f"| {label} | {gmacs:.4g} | {gmacs / dense_gmacs:.1%} | {_pct(acc)} |")
        lines += ["", "![accuracy vs FLOPs](pareto.png)", ""]
        summary["front"] = [dict(model=p[0], gmacs=p[1], accuracy=p[2]) for p in points]
    if not (done["ablation"] and done["ablation"].get("front")):
        missing.append("the accuracy-vs-FLOPs front over several budgets (Fig. 2: "
                       "config.ablation.budgets)")
    expand = ctx.config.get("expand")
    if expand and float(expand.get("width", 1.0)) != 1.0:
        lines += expand_table(ctx, expand, done, test)
    else:
        missing.append("expand-then-compress (Table 2: a config argument `expand=2`)")
    missing.append("statistics over seeds (the study config `configs/digits_study.py` writes "
                   "them to its own study.md)")
    lines += ["## Not in this report", "",
              *(f"- {item}" for item in missing), ""]
    if ctx.is_main:
        workdir_lib.write_text(out / "report.md", "\n".join(lines))
    print(f"[vitjax] report: {out / 'report.md'}", flush=True)
    return {**summary, "file": str(out / "report.md")}


def _pp(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def cost_section(ctx: Context, done: dict, split: str, speed: dict,
                 batches=(1, 64)) -> tuple[list[str], dict]:
    """"How much accuracy does compressing my model cost?": every compressed model as accuracy
    lost against the dense model for the FLOPs and the measured time it saves."""
    pretrain = done["pretrain"] or {}
    dense_gmacs = ctx.dense_gmacs
    reference = (pretrain.get("init_accuracy") or {}).get(split)
    source = "the trained model of config.init.checkpoint"
    if reference is None:
        reference = pretrain.get("metrics", {}).get(f"eval/{split}/dense/accuracy")
        source = "the dense path of the supernet (trained from scratch: no init checkpoint)"
    if reference is None:
        return [], {}

    unmeasured = " | ".join("–" for _ in batches)

    def time_saved(model: str) -> str:
        if model not in speed or "dense" not in speed:
            return unmeasured
        return " | ".join(f"{1 - speed['dense'][b] / speed[model][b]:.0%}" for b in batches)

    rows = []  # (label, accuracy, GMACs, time-saved cells)
    prune, finetune, baseline = done["prune"], done["finetune"], done["baseline"]
    if prune:
        gmacs = prune["pruned_gmacs"]
        if finetune:
            rows.append((f"searched policy, finetuned {finetune.get('steps', '')} steps",
                         finetune["accuracy"].get(split), gmacs, time_saved("pruned")))
        rows.append(("searched policy, no finetuning",
                     prune["accuracy_before_finetune"].get(split), gmacs, time_saved("pruned")))
    if baseline and not baseline.get("skipped"):
        rows.append((f"no supernet: the same policy cut from the dense model, trained "
                     f"{baseline['steps']} steps", baseline["accuracy"].get(split),
                     baseline["gmacs"], time_saved("pruned")))
    for result in (done["ablation"] or {}).get("front", []):
        if result["reachable"]:
            rows.append((f"supernet sub-network at the {result['target_gmacs'] / dense_gmacs:.0%}"
                         " budget, no finetuning", result["accuracy"], result["best_gmacs"],
                         unmeasured))
    lines = ["## What compressing cost", "",
             f"The dense model scores **{_pct(reference)}%** on the {split} split ({source}). "
             "Each compressed model: accuracy lost (percentage points; negative: lost) for the "
             "FLOPs it saves and the forward time it saves (measured below, Tables 1 and 4; "
             "the baseline has the pruned model's architecture, so its time is the pruned "
             "model's).", "",
             "| model | accuracy | change vs dense (pp) | FLOPs saved | "
             + _columns("time saved batch {}", batches),
             "|---|---|---|---|" + "---|" * len(batches)]
    summary = {"dense": reference, "rows": []}
    for label, acc, gmacs, saved in rows:
        change = None if acc is None else acc - reference
        lines.append(f"| {label} | {_pct(acc)} | {_pp(change)} | {1 - gmacs / dense_gmacs:.0%} "
                     f"| {saved} |")
        summary["rows"].append(dict(model=label, accuracy=acc, change=change, gmacs=gmacs))
    if prune and finetune:
        acc = finetune["accuracy"].get(split)
        lines += ["", f"At the budget the finetuned model keeps "
                  f"{prune['pruned_gmacs'] / dense_gmacs:.0%} of the FLOPs and "
                  f"{'loses' if acc < reference else 'gains'} "
                  f"{abs(100 * (acc - reference)):.1f} pp (one seed)."]
        if baseline and not baseline.get("skipped"):
            gap = acc - baseline["accuracy"].get(split)
            verdict = ("beats" if gap > 0 else "ties" if gap == 0 else "loses to")
            lines.append(f"The supernet {verdict} the no-supernet baseline at equal training "
                         f"steps ({100 * gap:+.1f} pp; one seed, configs/digits_study.py "
                         "repeats it over seeds).")
    return [*lines, ""], summary


def ablation_table(ablation: dict, dense_gmacs: float) -> list[str]:
    """Table 3 left: the best policy of each dimension combination at the same budget."""
    lines = ["## Dimension ablation at equal FLOPs (Table 3 left)", "",
             f"Each row: the policy search restricted to the ticked dimensions, at "
             f"{ablation['target_gmacs']:.4g} GMACs ({ablation['target_gmacs'] / dense_gmacs:.1%}"
             f" of dense), {ablation['evaluations_per_search']} evaluations each; accuracy of "
             f"the best policy on the {ablation['split']} split without finetuning.", "",
             "| neuron | head | token | accuracy | GMACs | hold-out objective |",
             "|---|---|---|---|---|---|"]
    for result in ablation["dimensions"].values():
        ticks = " | ".join("✓" if d in result["dims"] else "–" for d in ("neuron", "head", "token"))
        if not result["reachable"] and result.get("reason"):  # InfeasibleTarget
            # Below the most pruned model, but the policies at the budget are too few to sample.
            lines.append(f"| {ticks} | no policy found at the budget (too few to sample) | "
                         f"{result['lowest_gmacs']:.4g} (most pruned) | – |")
            continue
        if not result["reachable"]:
            lines.append(f"| {ticks} | cannot reach the budget | {result['lowest_gmacs']:.4g} "
                         "(most pruned) | – |")
            continue
        lines.append(f"| {ticks} | {_pct(result['accuracy'])} | {result['best_gmacs']:.4g} | "
                     f"{result['best_value']:.4f} |")
    reachable = {n: r for n, r in ablation["dimensions"].items() if r["reachable"]}
    full = next((r for r in reachable.values() if len(r["dims"]) == 3), None)
    others = [r for r in reachable.values() if len(r["dims"]) < 3]
    if full and others:
        best = max(others, key=lambda r: r["accuracy"])
        verdict = "beats" if full["accuracy"] > best["accuracy"] else "does not beat"
        lines += ["", f"All three dimensions ({_pct(full['accuracy'])}%) {verdict} the best "
                  f"one- or two-dimensional policy ({'+'.join(best['dims'])}, "
                  f"{_pct(best['accuracy'])}%) in this run (one seed)."]
    return [*lines, ""]


def front_points(ctx: Context, done: dict, split: str) -> list[tuple[str, float, float | None]]:
    """(label, GMACs, accuracy) for the Fig. 2 plot, read from the stage outputs."""
    points = []
    if done["pretrain"]:
        points.append(("dense", ctx.dense_gmacs,
                       done["pretrain"]["metrics"].get(f"eval/{split}/dense/accuracy")))
    ablation = done["ablation"] or {}
    for result in ablation.get("front", []):
        if result["reachable"]:
            points.append((f"sub-network at {result['target_gmacs'] / ctx.dense_gmacs:.0%} "
                           "budget", result["best_gmacs"], result["accuracy"]))
    if done["prune"]:
        gmacs = done["prune"]["pruned_gmacs"]
        points.append(("searched policy, no finetuning", gmacs,
                       done["prune"]["accuracy_before_finetune"].get(split)))
        if done["finetune"]:
            points.append(("searched policy, finetuned", gmacs,
                           done["finetune"]["accuracy"].get(split)))
    return points


def plot_front(points, path) -> None:
    """Fig. 2: accuracy against GMACs; the supernet's front as a line, the rest as markers."""
    plt = workdir_lib.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    front = sorted((g, 100 * a) for label, g, a in points
                   if (label.startswith("sub-network") or label.endswith("no finetuning"))
                   and a is not None)
    if front:
        ax.plot(*zip(*front, strict=True), "o-", label="supernet sub-networks (no finetuning)")
    markers = {"dense": "*", "searched policy, finetuned": "s"}
    for label, gmacs, acc in points:
        if label in markers and acc is not None:
            ax.plot([gmacs], [100 * acc], markers[label], markersize=10, label=label)
    workdir_lib.save_plot(fig, ax, path, "GMACs", "accuracy (%)")


def expand_table(ctx: Context, expand, done: dict, split: str) -> list[str]:
    """Table 2: the width-scaled model compressed to the small model's FLOPs vs the small model
    trained alone (its dense result read from `expand.baseline_workdir`)."""
    width = float(expand.width)
    lines = ["## Expand-then-compress (Table 2)", "",
             f"This run's model is {width:g}x wider, compressed to the small model's FLOPs "
             f"({ctx.target_gmacs:.4g} GMACs).", "",
             "| model | accuracy | GMACs | parameters |", "|---|---|---|---|"]
    baseline = str(expand.get("baseline_workdir", "") or "")
    base_done = None
    if baseline:
        from etils import epath

        path = epath.Path(baseline) / "pretrain" / "DONE.json"
        base_done = workdir_lib.read_json(path) if path.exists() else None
    if base_done:
        acc = base_done["metrics"].get(f"eval/{split}/dense/accuracy")
        lines.append(f"| small model trained alone ({baseline}) | {_pct(acc)} | "
                     f"{base_done.get('dense_gmacs', float('nan')):.4g} | "
                     f"{base_done.get('params', 0):,} |")
    else:
        lines.append("| small model trained alone | not found: set config.expand."
                     "baseline_workdir to a finished run of the small model | – | – |")
    if done["finetune"] and done["prune"]:
        lines.append(f"| {width:g}x wider, compressed and finetuned | "
                     f"{_pct(done['finetune']['accuracy'].get(split))} | "
                     f"{done['prune']['pruned_gmacs']:.4g} | {done['finetune']['params']:,} |")
    return [*lines, ""]


def compare_table(done: dict, rows: list, split: str, speed: dict, batches=(1, 64),
                  rounds: int = 5) -> list[str]:
    """Dense, multi-dimensional (HSIC + GP), DynamicViT, block pruning and block + token at
    matched FLOPs; speed as measured with Tables 1 and 4."""
    compare = done["compare"]
    lines = ["## Against DynamicViT and block pruning at matched FLOPs", "",
             f"Target {compare['target_gmacs']:.4g} GMACs (the pruned model's). Accuracy on the "
             f"{split} split; img/s measured by this stage with Tables 1 and 4 (XLA, float32, "
             f"forward only, alternating in one process, median of {_rounds(rounds)}).", "",
             "| method | accuracy | GMACs | parameters | " + _columns("img/s batch {}", batches),
             "|---|---|---|---|" + "---|" * len(batches)]
    named = {"dense supernet": "dense", "pruned + finetuned": "multi-dimensional (HSIC + GP)"}
    for name, acc, gmacs, params, measured in rows:
        if name in named:
            lines.append(f"| {named[name]} | {_pct(acc)} | {gmacs:.4g} | {params:,} | "
                         f"{_speeds(measured, batches)}")
    for method, result in compare["methods"].items():
        lines.append(f"| {method} | {_pct(result['accuracy'].get(split))} | "
                     f"{result['gmacs']:.4g} | {result['params']:,} | "
                     f"{_speeds(speed[method], batches)}")
    if "dense" in speed and "dynamicvit" in speed:
        batch = batches[0]
        ratio = speed["dynamicvit"][batch] / speed["dense"][batch]
        lines += ["", f"DynamicViT at batch {batch} runs at {ratio:.2f}x the dense model's speed "
                  f"({'slower' if ratio < 1 else 'faster'} than dense)."]
    return [*lines, ""]


def _columns(header: str, batches) -> str:
    """Table header cells, one per timed batch size, and the closing bar."""
    return " | ".join(header.format(b) for b in batches) + " |"


def _speeds(measured: dict, batches) -> str:
    return " | ".join(f"{measured[b]:.0f}" for b in batches) + " |"


def _rounds(count: int) -> str:
    return f"{count} round" + ("" if count == 1 else "s")


def _and(items) -> str:
    """(1, 64) -> '1 and 64'."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
