"""What every exporter shares: the inference function of a model, missing extras (files are
written by `vitjax.fileio`).

Nothing heavy is imported at module level: `import vitjax.export` must stay cheap for users who
never export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vitjax.errors import UserError

EXTRA_HINT = "pip install -e '.[export]'"


def missing_extra(what: str) -> UserError:
    """The one-line error for an absent optional dependency of the export extra."""
    return UserError(f"{what} needs the 'export' extra: {EXTRA_HINT}")


def variables_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """`{'params': tree}` from either the bare tree or the variables dict."""
    return dict(params) if set(params) == {"params"} else {"params": params}


def inference_fn(model, params) -> Callable:
    """images [B, H, W, C] float32 -> logits [B, classes] float32, parameters closed over.

    Closing over the parameters makes them constants of the traced program: every exporter
    then writes one self-contained file whose only input is the image batch.
    """
    variables = variables_of(params)

    def logits(images):
        return model.apply(variables, images)[0]

    return logits


def image_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    return (cfg.image_size, cfg.image_size, cfg.in_chans)


