"""The compression pipeline's stages, one module each, registered in one table.

A stage is a function `run(ctx: Context) -> dict` that reads the workdir (earlier stages'
results) and writes `workdir/<stage>/`; its returned summary becomes `<stage>/DONE.json`, written
last, so a stage with a DONE.json is finished and is skipped on a rerun, unless the runner finds
it damaged or made from inputs that changed since (`vitjax.stages.provenance`: DONE.json also
records the stage's result files, their identity, and the identities of the stages it read).
`vitjax.stages.runner` runs them in `ORDER`; `vitjax.main` only parses flags and calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from vitjax.stages import (
    ablation,
    baseline,
    compare,
    criteria,
    export,
    finetune,
    pretrain,
    prune,
    report,
    score,
    search,
)
from vitjax.stages.context import Context

# The paper's pipeline (DESIGN.md); a name without an entry in STAGES is not built yet.
ORDER = ("pretrain", "score", "criteria", "search", "ablation", "prune", "finetune", "baseline",
         "export", "compare", "report")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    needs: tuple[str, ...]  # stages whose results it reads
    sections: tuple[str, ...]  # config sections its results depend on (besides its needs')
    description: str
    # Its config checks, run up front for every stage (vitjax.stages.checks.check_config):
    # config -> None, a one-line UserError on a mistake.
    check: Callable[[ml_collections.ConfigDict], None] | None = None


# What a supernet depends on; every later stage reads the supernet.
_SUPERNET = ("seed", "target_flops_fraction", "model", "init", "data", "augment", "train",
             "score")

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("pretrain", pretrain.run, (), _SUPERNET, "supernet training (Eq. 5)",
              pretrain.check_config),
        Stage("score", score.run, ("pretrain",), ("score",), "HSIC scores (Eq. 2)"),
        Stage("criteria", criteria.run, ("pretrain",), ("score", "seed", "criteria"),
              "criteria comparison (Fig. 1)"),
        Stage("search", search.run, ("pretrain",), ("search",),
              "GP + EI policy search (Sec. 3.3; SQP from 50 points on)", search.check_config),
        Stage("ablation", ablation.run, ("pretrain",), ("ablation", "search"),
              "dimension ablation (Table 3 left) and accuracy-vs-FLOPs front (Fig. 2)",
              ablation.check_config),
        Stage("prune", prune.run, ("pretrain", "search"), ("prune",),
              "physically smaller model (Alg. 1 line 12)"),
        Stage("finetune", finetune.run, ("prune",), ("finetune",),
              "finetuning the pruned model (Alg. 1 line 13)", finetune.check_config),
        Stage("baseline", baseline.run, ("prune", "finetune"), ("baseline",),
              "no-supernet baseline: the policy cut from the dense model, trained as long",
              baseline.check_config),
        Stage("export", export.run, ("prune", "finetune"), ("export",),
              "jax.export / ONNX / TFLite artifacts, verified"),
        Stage("compare", compare.run, ("pretrain", "prune"), ("compare", "finetune"),
              "DynamicViT, block pruning, block + token at matched FLOPs (second paper)",
              compare.check_config),
        Stage("report", report.run,
              ("pretrain", "score", "criteria", "search", "ablation", "prune", "finetune",
               "baseline", "export", "compare"), ("report",),
              "report.md with the paper's tables", report.check_config),
    )
}


def upstream(name: str) -> list[str]:
    """The stages whose results `name` reads, directly or through others, and itself."""
    seen = [name]
    for need in STAGES[name].needs:
        if need in STAGES:
            seen += [s for s in upstream(need) if s not in seen]
    return seen


def sections(name: str) -> tuple[str, ...]:
    """Config sections the results of stage `name` depend on (its own and its upstream's)."""
    return tuple(dict.fromkeys(sec for s in upstream(name) for sec in STAGES[s].sections))

__all__ = ["ORDER", "STAGES", "Context", "Stage", "sections", "upstream"]
