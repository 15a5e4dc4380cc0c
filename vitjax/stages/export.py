"""Stage `export`: the finetuned (else the pruned) model as deployable artifacts, each verified
against the JAX model's logits on hold-out images: `jax.export` (any batch, needs only jax),
ONNX (onnxruntime) and TFLite (LiteRT) -> export/. The weights themselves are in vitjax's format
in prune/ and finetune/ (`python -m vitjax.convert` writes a dense model back to timm).

`config.export.formats`: 'auto' (jax, plus onnx and tflite when the 'export' extra is
installed) or a comma-separated list; asking for a format whose extra is missing is an error
naming the extra.
"""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp

from vitjax.errors import UserError
from vitjax.stages.context import Context
from vitjax.stages.kit import load_weights

_EXTRA_MODULES = {"onnx": ("jax2onnx", "onnxruntime"), "tflite": ("ai_edge_litert",)}


def installed(fmt: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _EXTRA_MODULES.get(fmt, ()))


def chosen_formats(ctx: Context) -> list[str]:
    from vitjax.export import FORMATS

    spec = str(ctx.config.get("export", {}).get("formats", "auto") or "auto")
    if spec == "auto":
        formats = [f for f in FORMATS if installed(f)]
        skipped = [f for f in FORMATS if f not in formats]
        if skipped:
            print(f"[vitjax] export: {', '.join(skipped)} skipped (pip install -e "
                  "'.[export]' adds them)", flush=True)
        return formats
    formats = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise UserError(f"config.export.formats: unknown {unknown}; choose from "
                        f"{', '.join(FORMATS)} or 'auto'")
    for fmt in formats:
        if not installed(fmt):
            raise UserError(f"{fmt} export needs the 'export' extra: pip install -e "
                            "'.[export]' (or drop it from config.export.formats)")
    return formats


def run(ctx: Context) -> dict:
    from vitjax.export import export_all
    from vitjax.stages.finetune import FINETUNED_FILE
    from vitjax.stages.prune import PRUNED_FILE

    formats = chosen_formats(ctx)
    source, stage = ctx.workdir / "finetune" / FINETUNED_FILE, "finetune"
    if not (ctx.done_file("finetune").exists() and source.exists()):
        ctx.summary("prune")
        source, stage = ctx.workdir / "prune" / PRUNED_FILE, "prune"
    config, params = load_weights(source, stage)
    split = "holdout" if "holdout" in ctx.datasets.eval_names else "test"
    batch = next(iter(ctx.eval_batches(split)()))
    images = batch["image"][: max(int(batch["mask"].sum()), 1)]
    out = ctx.stage_dir("export")
    strict = bool(ctx.config.get("export", {}).get("strict", True))
    model = ctx.model(config)
    # onnxruntime and LiteRT run float32 on CPUs and phones (LiteRT cannot even convert
    # bfloat16 transposes): those artifacts come from the float32 model and are verified
    # against it; the jax.export artifact keeps the configured compute dtype.
    float32 = [f for f in formats if f != "jax" and jnp.dtype(model.dtype) != jnp.float32]
    summary: dict = {}
    for group, group_model in ((([f for f in formats if f not in float32]), model),
                               (float32, model.clone(dtype=jnp.float32, attention=(
                                   "auto" if model.attention == "cudnn" else model.attention)))):
        if group:
            part = export_all(group_model, params, out, group, images, strict=strict)
            formats_done = {**summary.get("formats", {}), **part["formats"]}
            for result in part["formats"].values():
                result["compute_dtype"] = jnp.dtype(group_model.dtype).name
            summary = {**part, "formats": formats_done}
    for fmt, result in summary["formats"].items():
        diffs = ", ".join(f"batch {b}: {d:.1e}" for b, d in result["max_abs_diff"].items())
        print(f"[vitjax] export: {fmt} {sorted(result['files'])} max |logit diff| {diffs}",
              flush=True)
    return {**summary, "source": str(source)}
