"""Importance scores of heads, FFN neurons and tokens: HSIC (paper Sec. 3.2) and baselines.

Kernels and estimators live in `vitjax.scoring.hsic` (the module; `hsic.hsic(K, L)` is the
estimator), model scoring in `vitjax.scoring.scores`, baselines in `vitjax.scoring.criteria`.
"""

from vitjax.scoring.scores import (
    ScoreConfig,
    Scores,
    hsic_scores,
    load_ranks,
    load_scores,
    output_weights,
    save_scores,
    score_model,
)

__all__ = [
    "ScoreConfig", "Scores", "hsic_scores", "load_ranks", "load_scores", "output_weights",
    "save_scores", "score_model",
]
