"""Metric writers (console + TensorBoard on process 0) and a few reductions of step metrics."""

from __future__ import annotations

import numpy as np
from clu import metric_writers


def create_writer(workdir: str, *, is_main: bool) -> metric_writers.MetricWriter:
    """Console + TensorBoard in `workdir` on process 0; nothing on the others (every host
    computes the same numbers, so one copy is enough)."""
    if not is_main:
        return metric_writers.MultiWriter([])
    return metric_writers.create_default_writer(workdir, asynchronous=True)


def mean_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Average of the per-step metric dicts collected since the last report."""
    keys = history[0].keys()
    return {k: float(np.mean([h[k] for h in history])) for k in keys}


def first_nonfinite(history: list[dict[str, float]], steps: list[int]) -> int | None:
    """The step of the first non-finite loss in `history`, or None."""
    for step, metrics in zip(steps, history, strict=True):
        if not np.isfinite(metrics["loss"]):
            return step
    return None
