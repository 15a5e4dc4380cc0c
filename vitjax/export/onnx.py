"""ONNX export through jax2onnx, and running the result with onnxruntime.

jax2onnx converts the jaxpr of the plain inference function (`lambda x: model.apply(v, x)[0]`),
so the Linen model needs no NNX bridge. Every op the model uses converts, including the
per-image token selection of a model pruned in 'attention' token mode: its `argsort` / `sort`
become ONNX `TopK` (whose ties go to the lower index, as the stable sort's do). The batch
dimension stays symbolic ('B'); widths and kept token counts are static.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np

from vitjax.export.artifact import image_shape, inference_fn, missing_extra
from vitjax.fileio import read_bytes, write_bytes

SUFFIX = ".onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 23


def _import_jax2onnx():
    try:
        import jax2onnx
        import onnx
    except ImportError:
        raise missing_extra("ONNX export") from None
    return jax2onnx, onnx


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise missing_extra("Running ONNX models") from None
    return onnxruntime


@contextlib.contextmanager
def _quiet_plugin_discovery():
    # jax2onnx imports every plugin module on first use and logs a warning with a traceback for
    # each one whose optional library (brax, tokamax, ...) is absent; none of them is ours.
    logger = logging.getLogger("jax2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model,
    params,
    path: str | os.PathLike,
    *,
    batch: str | int = "B",
    opset: int = DEFAULT_OPSET,
) -> int:
    """Writes `model`'s inference function as an ONNX file; returns its size in bytes.

    batch: a name for a dynamic batch dimension, or a fixed batch size.
    Input 'images' [B, H, W, C] float32 (NHWC, as the JAX model), output 'logits'.
    """
    jax2onnx, onnx = _import_jax2onnx()
    with _quiet_plugin_discovery():
        proto = jax2onnx.to_onnx(
            inference_fn(model, params),
            [(batch, *image_shape(model))],
            model_name="vitjax",
            opset=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()  # DeiT-B is 0.35 GB, well inside protobuf's 2 GB
    write_bytes(path, data)
    return len(data)


def onnx_session(path: str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU session for the file at `path` (all graph optimisations on)."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(
        read_bytes(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_onnx(path_or_session, images) -> np.ndarray:
    """Logits of the ONNX model (a path or an `onnx_session`) for images [B, H, W, C]."""
    session = path_or_session
    if isinstance(path_or_session, (str, os.PathLike)):
        session = onnx_session(path_or_session)
    images = np.ascontiguousarray(images, np.float32)
    return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
