"""TFLite export through jax2tf, and running the result with the LiteRT interpreter.

Route: `jax2tf.convert` (native serialization, the only mode jax2tf still has) wraps the
StableHLO of the inference function in one `XlaCallModule` op; the function is saved as a TF
SavedModel and `tf.lite.TFLiteConverter.from_saved_model` legalizes that StableHLO to TFLite
builtins (FULLY_CONNECTED, BATCH_MATMUL, SOFTMAX, ...). Two incompatibilities are bridged here:

* Version skew. jax serializes StableHLO for consumers up to 4 weeks old (1.15.0 for jax 0.10.2,
  where `lax.erf` becomes a `vhlo.composite_v2`), while TensorFlow 2.21's converter reads up to
  StableHLO 1.13.7 and rejects the module. The module is therefore serialized for the version
  the installed TensorFlow reports (`get_current_version()`), through jax's internal
  `_module_to_bytecode` hook while the conversion runs.
* Sorting. The converter has no lowering for `stablehlo.sort` ("'vhlo.sort_v1' op is not part
  of the vhlo support yet"), which the per-image token selection of 'attention' mode pruned
  models uses (argsort of the class attention, then a sort of the kept positions). It does lower
  `lax.top_k` (TOPK_V2) when only its indices are used, so each `sort` primitive in the jaxpr is
  rewritten as a full-length `top_k` of the negated keys (ascending, ties to the lower index:
  exactly a stable sort) followed by gathers. Models without sorts are not touched.

The batch size is fixed per artifact: with a symbolic batch the converter fails on the
`dynamic_gather` of the class token ('vhlo.dynamic_gather_v1' op is not part of the vhlo support
yet), so export one file per batch size you serve.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from vitjax.export.artifact import image_shape, inference_fn, missing_extra
from vitjax.fileio import read_bytes, write_bytes

SUFFIX = ".tflite"


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF's first import only
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError:
        raise missing_extra("TFLite export (TensorFlow)") from None
    return tf, jax2tf


def _import_litert():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise missing_extra("Running TFLite models (ai-edge-litert)") from None
    return Interpreter


@contextlib.contextmanager
def _stablehlo_for_tensorflow():
    """Serializes jax exports for the StableHLO version the installed TensorFlow can read."""
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

    original = getattr(_export, "_module_to_bytecode", None)
    if original is None:  # jax moved its internals; try the default serialization
        yield
        return
    from jax._src.lib.mlir.dialects import hlo

    jax_target = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_4
    )
    target = tf_stablehlo.get_smaller_version(jax_target, tf_stablehlo.get_current_version())

    def module_to_bytecode(module):
        return _jax.mlir.serialize_portable_artifact(
            module, target, xla_bridge.get_backend().serialize_with_sdy
        )

    _export._module_to_bytecode = module_to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def _sort_by_top_k(operands, *, dimension: int, num_keys: int, **_):
    """`lax.sort` (stable, ascending) of `operands` by their first operand, with top_k."""
    import jax.numpy as jnp
    from jax import lax

    if num_keys != 1:
        raise NotImplementedError("TFLite export: sorts on several keys are not supported")
    moved = [jnp.moveaxis(op, dimension, -1) for op in operands]
    key = moved[0]
    if jnp.issubdtype(key.dtype, jnp.floating):
        descending = -key
    else:  # ~x = -x - 1 reverses the order of integers without overflowing
        descending = ~key.astype(jnp.int32) if key.dtype == jnp.bool_ else ~key
    _, order = lax.top_k(descending, key.shape[-1])  # ties: lower index first, as a stable sort
    return [jnp.moveaxis(jnp.take_along_axis(op, order, axis=-1), -1, dimension) for op in moved]


def without_sort(fn, example):
    """`fn` with each `sort` replaced by `top_k` + gathers (same results), or `fn` itself when
    it sorts nothing. `example`: an array or ShapeDtypeStruct fixing the input's shape."""
    from vitjax.export import rewrite

    return rewrite.substitute(fn, example, {"sort": _sort_by_top_k})


def export_tflite(model, params, path: str | os.PathLike, *, batch: int = 1) -> int:
    """Writes `model`'s inference function for a fixed `batch` as a .tflite file; returns its
    size in bytes. Input [batch, H, W, C] float32 (NHWC), output logits [batch, classes]."""
    import jax
    import jax.numpy as jnp

    tf, jax2tf = _import_tensorflow()
    shape = (int(batch), *image_shape(model))
    fn = without_sort(inference_fn(model, params), jax.ShapeDtypeStruct(shape, jnp.float32))
    with _stablehlo_for_tensorflow(), tempfile.TemporaryDirectory() as saved_model:
        serve = tf.function(
            jax2tf.convert(fn, with_gradient=False),
            autograph=False,
            input_signature=[tf.TensorSpec(shape, tf.float32, name="images")],
        )
        module = tf.Module()
        module.serve = serve
        tf.saved_model.save(module, saved_model, signatures=serve.get_concrete_function())
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        data = converter.convert()
    write_bytes(path, data)
    return len(data)


def tflite_interpreter(path: str | os.PathLike, *, threads: int | None = None):
    """A LiteRT interpreter (XNNPACK CPU kernels) for the file at `path`, tensors allocated."""
    interpreter_cls = _import_litert()
    interpreter = interpreter_cls(model_content=read_bytes(path), num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(path_or_interpreter, images) -> np.ndarray:
    """Logits of the TFLite model (a path or a `tflite_interpreter`) for images whose batch size
    is the one the file was exported for."""
    interpreter = path_or_interpreter
    if isinstance(path_or_interpreter, (str, os.PathLike)):
        interpreter = tflite_interpreter(path_or_interpreter)
    (inp,) = interpreter.get_input_details()
    images = np.ascontiguousarray(images, np.float32)
    if tuple(inp["shape"]) != images.shape:
        raise ValueError(
            f"this TFLite model takes images of shape {tuple(inp['shape'])} (its batch size is "
            f"fixed at export), got {images.shape}"
        )
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
