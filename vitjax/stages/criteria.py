"""Stage `criteria` (Fig. 1): accuracy without finetuning vs pruning ratio, per dimension and
criterion, on the supernet; streamed over the test set -> criteria/criteria.{md,csv,json,png}."""

from __future__ import annotations

from vitjax.errors import UserError
from vitjax.stages.context import Context


def run(ctx: Context) -> dict:
    from vitjax.scoring import ScoreConfig
    from vitjax.scoring.sweep import RATIOS, run_criteria_sweep

    out = ctx.stage_dir("criteria")
    params = ctx.load_supernet(replicate=True)
    batch = ctx.score_batch_size
    ratios = tuple(float(r) for r in (ctx.config.get("criteria", {}).get("ratios") or RATIOS))
    if not ratios or not all(0.0 <= r < 1.0 for r in ratios):
        raise UserError(f"config.criteria.ratios={ratios}: give pruning ratios in [0, 1)")
    rows = run_criteria_sweep(
        ctx.model(), params, ctx.train_images(batch), ctx.eval_batches("test"), ctx.mesh,
        out if ctx.is_main else None,
        score_config=ctx.score_config(), seed=int(ctx.config.get("seed", 0)),
        # The kernel bandwidth matters (BUILD_NOTES.md): compare the paper's fixed sigma = 1
        # and the median heuristic with the configured scoring.
        extra_hsic={"hsic-paper": ScoreConfig.paper(), "hsic-median": ScoreConfig(
            sigma_mode="median")},
        file_stem="criteria", ratios=ratios,
        progress=lambda line: print(f"[vitjax] criteria: {line}", flush=True),
    )
    return {"rows": rows, "table": str(out / "criteria.md"), "plot": str(out / "criteria.png")}
