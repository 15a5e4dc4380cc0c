"""Deployable artifacts of a (pruned) ViT: `jax.export`, ONNX and TFLite, each verified.

    from vitjax.export import export_all
    summary = export_all(ViT(config), params, workdir / "export")

writes `model.jax_exported` (any batch size, needs only jax), `model.onnx` (any batch size,
onnxruntime) and `model_b{1,8}.tflite` (LiteRT; one file per batch size), runs each on the same
images as the JAX model and returns the file sizes and the largest logit differences.

ONNX and TFLite need the 'export' extra (`pip install -e '.[export]'`); the heavy libraries
(jax2onnx, onnxruntime, TensorFlow, LiteRT) are imported only when a function needs them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from vitjax.errors import UserError
from vitjax.export.jax_export import export_jax, load_and_run, load_exported
from vitjax.export.onnx import export_onnx, onnx_session, run_onnx
from vitjax.export.tflite import export_tflite, run_tflite, tflite_interpreter
from vitjax.export.verify import DEFAULT_TOLERANCE, max_abs_diff, reference_logits

FORMATS = ("jax", "onnx", "tflite")


class ExportMismatchError(RuntimeError):
    """An artifact's logits differ from the JAX model's by more than the tolerance."""


def export_all(
    model,
    params,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    sample_images=None,
    *,
    batches: Sequence[int] = (1, 8),
    tolerance: float = DEFAULT_TOLERANCE,
    strict: bool = True,
    name: str = "model",
) -> dict:
    """Exports `model` (a `ViT`, dense or pruned) with `params` into `out_dir` in `formats`.

    Every artifact is run at each batch size in `batches` on the first images of
    `sample_images` ([B, H, W, C] float32, normalised as for training; standard normal images
    when None) and compared with the JAX model's logits. Returns
    {'tolerance', 'reference_scale', 'formats': {format: {'files': {name: bytes},
    'max_abs_diff': {batch: diff}, 'ok', 'seconds'}}}. With `strict`, a difference above
    `tolerance * max(1, max |logit|)` raises ExportMismatchError after all formats ran.
    """
    from etils import epath

    from vitjax.export import verify

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise UserError(f"unknown export formats {unknown}; choose from {list(FORMATS)}")
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = verify.sample_batches(model, batches, sample_images)
    reference = {b: reference_logits(model, params, x) for b, x in images.items()}
    scale = max(1.0, max(float(abs(r).max()) for r in reference.values()))

    def jax_format():
        path = out_dir / f"{name}.jax_exported"
        export_jax(model, params, path)
        exported = load_exported(path)
        return {path.name: path}, {b: exported.call(x) for b, x in images.items()}

    def onnx_format():
        path = out_dir / f"{name}.onnx"
        export_onnx(model, params, path)
        session = onnx_session(path)
        return {path.name: path}, {b: run_onnx(session, x) for b, x in images.items()}

    def tflite_format():
        files, logits = {}, {}
        for b, x in images.items():
            path = out_dir / f"{name}_b{b}.tflite"
            export_tflite(model, params, path, batch=b)
            files[path.name] = path
            logits[b] = run_tflite(tflite_interpreter(path), x)
        return files, logits

    exporters = {"jax": jax_format, "onnx": onnx_format, "tflite": tflite_format}
    summary = {"tolerance": tolerance, "reference_scale": scale, "formats": {}}
    for fmt in formats:
        start = time.perf_counter()
        files, logits = exporters[fmt]()
        diffs = {b: max_abs_diff(logits[b], reference[b]) for b in images}
        summary["formats"][fmt] = {
            "files": {file_name: path.stat().length for file_name, path in files.items()},
            "max_abs_diff": diffs,
            "ok": all(verify.within_tolerance(diffs[b], reference[b], tolerance) for b in diffs),
            "seconds": round(time.perf_counter() - start, 2),
        }
    failed = [fmt for fmt, result in summary["formats"].items() if not result["ok"]]
    if strict and failed:
        details = {fmt: summary["formats"][fmt]["max_abs_diff"] for fmt in failed}
        raise ExportMismatchError(
            f"exported logits differ from the JAX model's by more than {tolerance} x {scale:.3g}"
            f": {details}"
        )
    return summary


__all__ = [
    "FORMATS", "ExportMismatchError", "export_all", "export_jax", "load_exported",
    "load_and_run", "export_onnx", "onnx_session", "run_onnx", "export_tflite",
    "tflite_interpreter", "run_tflite", "reference_logits", "max_abs_diff",
]
