"""A study: the pipeline repeated over seeds, with mean +- std and a verdict per paper claim.

    python -m vitjax.main --config=configs/digits_study.py --workdir=runs/digits_study

A config with a `study` block (`study.seeds`) runs the whole pipeline once per seed in
`<workdir>/seed_<s>` (the seeds of training, search and criteria set to s, the data split
fixed; each run resumes like any other), then reads every run's stage outputs and writes
`<workdir>/study.md` and `study.json`.

Claims checked (the paper's, on whatever model and data the config names):
  compression:  the pruned + finetuned model loses at most `max_drop` (0.5 pp) of test accuracy
                at the configured FLOPs budget, against the dense model (the init checkpoint's
                when the run compresses a trained model, else the supernet's dense path);
  supernet:     the supernet pays for itself: the pruned + finetuned model beats the
                no-supernet baseline (stage `baseline`: the same policy cut from the dense
                model by its HSIC ranks, trained for as many steps);
  dimensions:   all three dimensions beat the best one- or two-dimensional policy at equal FLOPs
                (ablation stage, test accuracy without finetuning);
  search:       GP search beats random search at the same number of evaluations (best hold-out
                objective);
  criteria:     HSIC beats every other criterion at high pruning ratios (>= `high_ratio`),
                averaged over the dimensions (criteria stage, test accuracy without finetuning).

Verdict per claim from the per-seed margins m_s (> 0 means the claim holds in seed s): "holds"
when every m_s > 0 and mean(m) > std(m); "does not hold" when every m_s < 0 and -mean(m) >
std(m); otherwise "within noise". With 3 seeds this is a coarse test, and the report says so.
"""

from __future__ import annotations

import time

import ml_collections
import numpy as np
from etils import epath

from vitjax import workdir as workdir_lib
from vitjax.errors import UserError


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The pipeline config of one seed: the study block removed; the seeds of training
    (initialisation, dropout, policy sampling), search and criteria set to `seed`. The data
    seed stays: every run sees the same hold-out and test images."""
    out = config.copy_and_resolve_references()
    del out["study"]
    out.seed = seed
    out.train.seed = seed
    if "search" in out:
        out.search.seed = seed
    return out


def run_study(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs the pipeline for each of config.study.seeds, then writes study.md / study.json."""
    from vitjax.stages.runner import run_pipeline

    seeds = [int(s) for s in config.study.get("seeds", ())]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"config.study.seeds={tuple(seeds)}: give at least 2 distinct seeds, "
                        "e.g. (0, 1, 2)")
    workdir = epath.Path(workdir)
    started = time.perf_counter()
    for index, seed in enumerate(seeds, 1):
        elapsed = time.perf_counter() - started
        eta = f", about {elapsed / (index - 1) * (len(seeds) - index + 1) / 60:.0f} min left" \
            if index > 1 else ""
        print(f"[vitjax] study: seed {seed} ({index}/{len(seeds)}), "
              f"{elapsed / 60:.1f} min elapsed{eta}", flush=True)
        run_pipeline(seed_config(config, seed), workdir / f"seed_{seed}")
    runs = {seed: _read_run(workdir / f"seed_{seed}") for seed in seeds}
    claims = evaluate_claims(runs, max_drop=float(config.study.get("max_drop", 0.005)),
                             high_ratio=float(config.study.get("high_ratio", 0.5)))
    seconds = time.perf_counter() - started
    summary = {"seeds": seeds, "claims": claims, "runs": runs, "seconds": round(seconds, 1)}
    lines = study_markdown(summary)
    workdir_lib.write_json(workdir / "study.json", summary)
    workdir_lib.write_text(workdir / "study.md", "\n".join(lines))
    print("\n".join(lines[2:]), flush=True)
    print(f"[vitjax] study: {workdir / 'study.md'} ({seconds / 60:.1f} min)", flush=True)
    return summary


def _read_run(run_dir: epath.Path) -> dict:
    """The numbers of one seed's run that the claims need, from its stages' DONE.json."""
    def done(stage):
        path = run_dir / stage / "DONE.json"
        return workdir_lib.read_json(path) if path.exists() else None

    out: dict = {}
    pretrain, prune, finetune = done("pretrain"), done("prune"), done("finetune")
    if pretrain:
        out["dense_supernet"] = pretrain["metrics"].get("eval/test/dense/accuracy")
        out["dense"] = (pretrain.get("init_accuracy") or {}).get("test", out["dense_supernet"])
    if prune:
        out["pruned_gmacs"] = prune["pruned_gmacs"]
        out["pruned_no_finetune"] = prune["accuracy_before_finetune"].get("test")
    if finetune:
        out["finetuned"] = finetune["accuracy"].get("test")
    if (baseline := done("baseline")) and not baseline.get("skipped"):
        out["baseline"] = baseline["accuracy"].get("test")
    if search := done("search"):
        out["search"] = {m: r["best_value"] for m, r in search["methods"].items()}
    if (ablation := done("ablation")) and ablation.get("dimensions"):
        out["ablation"] = {n: r.get("accuracy") for n, r in ablation["dimensions"].items()
                           if r.get("reachable")}
    if criteria := done("criteria"):
        out["criteria"] = criteria["rows"]
    from vitjax.stages import STAGES

    out["stage_seconds"] = sum(float((done(stage) or {}).get("seconds", 0.0))
                               for stage in STAGES)
    if (report := done("report")) and report.get("speed"):
        out["speed"] = report["speed"]
    if (compare := done("compare")) and compare.get("methods"):
        out["compare"] = {m: r["accuracy"].get("test") for m, r in compare["methods"].items()}
        out["compare_gmacs"] = {m: r["gmacs"] for m, r in compare["methods"].items()}
    return out


def _verdict(margins: list[float]) -> str:
    m = np.asarray(margins, float)
    mean, std = m.mean(), m.std(ddof=1) if len(m) > 1 else 0.0
    if (m > 0).all() and mean > std:
        return "holds"
    if (m < 0).all() and -mean > std:
        return "does not hold"
    return "within noise"


def _criteria_margin(rows: list[dict], high_ratio: float) -> float | None:
    """Mean over dimensions and ratios >= high_ratio of HSIC minus the best other criterion
    (the HSIC bandwidth variants are not 'other criteria')."""
    margins = []
    cells: dict = {}
    for r in rows:
        if r["ratio"] >= high_ratio and r["ratio"] > 0:
            cells.setdefault((r["dimension"], r["ratio"]), {})[r["criterion"]] = r["accuracy"]
    for accs in cells.values():
        others = [a for c, a in accs.items() if not c.startswith("hsic")]
        if "hsic" in accs and others:
            margins.append(accs["hsic"] - max(others))
    return float(np.mean(margins)) if margins else None


def evaluate_claims(runs: dict, *, max_drop: float = 0.005, high_ratio: float = 0.5) -> list:
    """[{claim, margins per seed, mean, std, verdict, detail}] from the per-seed numbers."""
    claims = []

    def add(name, statement, margins, detail):
        margins = [m for m in margins if m is not None]
        if len(margins) < 2:
            claims.append(dict(claim=name, statement=statement, verdict="not measured",
                               margins=margins, detail="fewer than 2 seeds have the numbers"))
            return
        m = np.asarray(margins)
        claims.append(dict(claim=name, statement=statement, margins=margins,
                           mean=float(m.mean()), std=float(m.std(ddof=1)),
                           verdict=_verdict(margins), detail=detail))

    drops = [(r["dense"] - r["finetuned"]) if r.get("finetuned") is not None
             and r.get("dense") is not None else None for r in runs.values()]
    add("compression", f"pruned + finetuned loses <= {100 * max_drop:.1f} pp of test accuracy",
        [None if d is None else max_drop - d for d in drops],
        "drop (pp) per seed: " + ", ".join("–" if d is None else f"{100 * d:.2f}"
                                          for d in drops))
    add("supernet", "the supernet beats the no-supernet baseline at equal training steps",
        [r["finetuned"] - r["baseline"] if r.get("finetuned") is not None
         and r.get("baseline") is not None else None for r in runs.values()],
        "margin = pruned + finetuned minus the baseline (same policy, dense model's HSIC "
        "ranks, no supernet)")
    dim_margins, best_names = [], []
    for r in runs.values():
        ablation = r.get("ablation") or {}
        full = [a for n, a in ablation.items() if len(n.split("+")) == 3]
        others = {n: a for n, a in ablation.items() if len(n.split("+")) < 3}
        if full and others:
            best = max(others, key=others.get)
            dim_margins.append(full[0] - others[best])
            best_names.append(best)
        else:
            dim_margins.append(None)
    add("dimensions", "all three dimensions beat the best one or two at equal FLOPs",
        dim_margins, "best other combination per seed: " + ", ".join(best_names or ["–"]))
    search_margins = [r["search"]["gp"] - r["search"]["random"]
                      if "gp" in r.get("search", {}) and "random" in r.get("search", {})
                      else None for r in runs.values()]
    add("search", "GP search beats random search at equal evaluations", search_margins,
        "margin = best hold-out objective, GP minus random")
    add("criteria", f"HSIC beats the other criteria at pruning ratios >= {high_ratio:g}",
        [_criteria_margin(r["criteria"], high_ratio) if r.get("criteria") else None
         for r in runs.values()],
        "margin = HSIC minus the best other criterion, mean over dimensions and ratios")
    return claims


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _minutes(runs: dict) -> str:
    """Total and per-seed stage time (the sum of the stages' own seconds, so a resumed study
    counts each stage once)."""
    per_seed = [r.get("stage_seconds", 0.0) / 60 for r in runs.values()]
    return (f"{sum(per_seed):.1f} min in all ("
            + ", ".join(f"{m:.1f}" for m in per_seed) + " min per seed)")


def _speed_rows(runs: dict, methods: list) -> list[str]:
    """Rows of img/s relative to dense at batch 1 and 64 for the HSIC model and each method."""
    rows = []
    for label, key in [("multi-dimensional (HSIC + GP)", "pruned"),
                       *((m, m) for m in methods)]:
        cells = []
        for batch in ("1", "64"):
            # A run timed at other batch sizes (config.report.batch_sizes) has no entry.
            ratios = [r["speed"][key][batch] / r["speed"]["dense"][batch]
                      if batch in r.get("speed", {}).get(key, {})
                      and batch in r.get("speed", {}).get("dense", {}) else None
                      for r in runs.values()]
            known = [x for x in ratios if x is not None]
            if not known:
                cells += ["–", "–"]
                continue
            std = np.std(known, ddof=1) if len(known) > 1 else 0.0
            cells += [f"{np.mean(known):.2f} ± {std:.2f}",
                      ", ".join("–" if x is None else f"{x:.2f}" for x in ratios)]
        if any(c != "–" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def study_markdown(summary: dict) -> list[str]:
    runs = summary["runs"]
    seeds = summary["seeds"]
    lines = ["# vitjax study", "",
             f"Seeds {', '.join(map(str, seeds))}; the stages took {_minutes(runs)} "
             f"(this invocation {summary['seconds'] / 60:.1f} min: finished stages are "
             "skipped on a rerun). Accuracies in % on the test split, mean ± std over seeds "
             "(std with ddof=1).", "",
             "| quantity | mean ± std | per seed |", "|---|---|---|"]

    def row(label, values):
        per_seed = ", ".join("–" if v is None else f"{100 * v:.2f}" for v in values)
        lines.append(f"| {label} | {_mean_std(values)} | {per_seed} |")

    row("dense", [r.get("dense") for r in runs.values()])
    if any(r.get("dense_supernet") != r.get("dense") for r in runs.values()):
        row("dense path of the supernet", [r.get("dense_supernet") for r in runs.values()])
    row("pruned, no finetuning", [r.get("pruned_no_finetune") for r in runs.values()])
    row("pruned + finetuned", [r.get("finetuned") for r in runs.values()])
    if any(r.get("baseline") is not None for r in runs.values()):
        row("no supernet: same policy cut from the dense model, trained as long",
            [r.get("baseline") for r in runs.values()])
    methods = sorted({m for r in runs.values() for m in r.get("search", {})})
    for method in methods:
        row(f"search {method}: best hold-out objective",
            [r.get("search", {}).get(method) for r in runs.values()])
    combos = list(dict.fromkeys(n for r in runs.values() for n in r.get("ablation", {})))
    for name in combos:
        row(f"ablation {name}", [r.get("ablation", {}).get(name) for r in runs.values()])
    methods = list(dict.fromkeys(m for r in runs.values() for m in r.get("compare", {})))
    if methods:
        lines += ["", "## Second paper's systems at matched FLOPs (test accuracy)", "",
                  "| method | mean ± std | per seed |", "|---|---|---|"]
        candidates = {"multi-dimensional (HSIC + GP), finetuned":
                      [r.get("finetuned") for r in runs.values()]}
        candidates.update({m: [r.get("compare", {}).get(m) for r in runs.values()]
                           for m in methods})
        for label, values in candidates.items():
            per_seed = ", ".join("–" if v is None else f"{100 * v:.2f}" for v in values)
            lines.append(f"| {label} | {_mean_std(values)} | {per_seed} |")
        speed_rows = _speed_rows(runs, methods)
        if speed_rows:
            lines += ["", "Speed of each model relative to the dense model (img/s ratio, "
                      "measured by each seed's report stage: all models in one process, "
                      "alternating, median of 5 rounds of 0.2 s; > 1 is faster than dense):",
                      "",
                      "| method | batch 1 mean ± std | batch 1 per seed | batch 64 mean ± std | "
                      "batch 64 per seed |", "|---|---|---|---|---|", *speed_rows]
        means = {label: np.mean([v for v in values if v is not None])
                 for label, values in candidates.items() if any(v is not None for v in values)}
        if means:
            best = max(means, key=means.get)
            lines += ["", f"Highest mean: {best} ({100 * means[best]:.2f}%)."]
    lines += ["", "## Claims", "",
              "Verdict from the per-seed margins m (> 0: the claim holds in that seed): holds "
              "if every m > 0 and mean > std; does not hold if every m < 0 and -mean > std; "
              "else within noise.", "",
              "| claim | margin (pp) mean ± std | verdict | detail |", "|---|---|---|---|"]
    for c in summary["claims"]:
        margin = "–" if "mean" not in c else f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f}"
        lines.append(f"| {c['statement']} | {margin} | **{c['verdict']}** | {c['detail']} |")
    return [*lines, ""]
