"""Stage `report`: report/report.md with the paper's tables, every number read from the stage
outputs in the workdir (never a constant), plus measured throughput of the dense and the pruned
model. Sections appear for the stages that ran; a missing stage is named, not invented.

Tables: dense vs compressed (paper Tables 1 and 4: accuracy, GMACs, parameters, measured
images/s); GP search vs random search vs the authors' method (Table 5); the criteria comparison
(Fig. 1); search progress (Fig. 4); the best policy per layer (Table 3 middle/right).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from vitjax import workdir as workdir_lib
from vitjax.stages.context import Context, local_copy


def _done(ctx: Context, stage: str) -> dict | None:
    path = ctx.done_file(stage)
    return workdir_lib.read_json(path) if path.exists() else None


def images_per_second(model, params, image_size: int, batch: int, *, repeats: int = 5) -> float:
    """Forward throughput of `model` (jitted, float32, random inputs): best of `repeats` after
    a warm-up; both contenders are measured in this process one after the other."""
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    images = np.random.default_rng(0).normal(size=(batch, image_size, image_size, 3))
    images = jax.device_put(images.astype(np.float32))
    params = jax.device_put(params)
    forward(params, images).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        forward(params, images).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return batch / best


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def run(ctx: Context) -> dict:
    from vitjax.interop import load_native
    from vitjax.stages.prune import PRUNED_FILE, parameter_count

    out = ctx.stage_dir("report")
    done = {s: _done(ctx, s) for s in ("pretrain", "score", "criteria", "search", "prune",
                                       "finetune", "export")}
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
    speed = {}
    if done["pretrain"]:
        acc = done["pretrain"]["metrics"].get(f"eval/{test}/dense/accuracy")
        speed["dense"] = {b: images_per_second(ctx.model(), supernet, ctx.model_config.image_size,
                                               b) for b in (1, 64)}
        rows.append(("dense supernet", acc, dense_gmacs, dense_params, speed["dense"]))
    if done["prune"]:
        with local_copy(ctx.workdir / "prune" / PRUNED_FILE) as local:
            pruned_config, pruned_params = load_native(local)
        speed["pruned"] = {b: images_per_second(ctx.model(pruned_config), pruned_params,
                                                pruned_config.image_size, b) for b in (1, 64)}
        gmacs = done["prune"]["pruned_gmacs"]
        rows.append(("pruned, no finetuning", done["prune"]["accuracy_before_finetune"].get(test),
                     gmacs, done["prune"]["pruned_params"], speed["pruned"]))
        if done["finetune"]:
            rows.append(("pruned + finetuned", done["finetune"]["accuracy"].get(test), gmacs,
                         done["finetune"]["params"], speed["pruned"]))
    lines += ["## Dense vs compressed (Tables 1 and 4)", "",
              f"Accuracy on the {test} split (%); throughput measured by this stage (XLA, "
              f"float32, {jax.devices()[0].platform}, forward only, best of 5).", "",
              "| model | accuracy | GMACs | FLOPs kept | parameters | img/s batch 1 | "
              "img/s batch 64 |", "|---|---|---|---|---|---|---|"]
    for name, acc, gmacs, params, measured in rows:
        lines.append(f"| {name} | {_pct(acc)} | {gmacs:.4g} | {gmacs / dense_gmacs:.1%} | "
                     f"{params:,} | {measured[1]:.0f} | {measured[64]:.0f} |")
    if "pruned" in speed:
        for batch in (1, 64):
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
    lines += ["## Not in this report", "",
              "The dimension ablation at equal FLOPs (Table 3 left), the accuracy-vs-FLOPs "
              "Pareto front over several budgets (Fig. 2), multi-seed statistics and "
              "expand-then-compress (Table 2) are not produced by this version.", ""]
    if ctx.is_main:
        workdir_lib.write_text(out / "report.md", "\n".join(lines))
    print(f"[vitjax] report: {out / 'report.md'}", flush=True)
    return {**summary, "file": str(out / "report.md")}
