"""The compression pipeline's stages, one module each, registered in one table.

A stage is a function `run(ctx: Context) -> dict` that reads the workdir (earlier stages'
results) and writes `workdir/<stage>/`; its returned summary becomes `<stage>/DONE.json`, written
last, so a stage with a DONE.json is finished and is skipped on a rerun. `vitjax.stages.runner`
runs them in `ORDER`; `vitjax.main` only parses flags and calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vitjax.stages import criteria, pretrain, score
from vitjax.stages.context import Context

# The paper's pipeline (DESIGN.md); a name without an entry in STAGES is not built yet.
ORDER = ("pretrain", "score", "criteria", "search", "prune", "finetune", "export", "report")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Context], dict]
    needs: tuple[str, ...]  # stages whose results it reads
    description: str


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("pretrain", pretrain.run, (), "supernet training (Eq. 5)"),
        Stage("score", score.run, ("pretrain",), "HSIC scores (Eq. 2)"),
        Stage("criteria", criteria.run, ("pretrain",), "criteria comparison (Fig. 1)"),
    )
}

__all__ = ["ORDER", "STAGES", "Context", "Stage"]
