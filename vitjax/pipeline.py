"""The compression pipeline: stages that read and write one workdir.

Each stage writes its results under `workdir/<stage>/` and, last, `workdir/<stage>/DONE.json`
(its summary). A stage whose DONE.json exists is skipped, so rerunning the same command resumes
a killed run; a stage killed midway resumes from its own checkpoints (pretrain/finetune).

Stages, in order (DESIGN.md): pretrain, score, criteria (Fig. 1 of the paper), search, prune,
finetune, export, report. This version implements pretrain, score and criteria; asking for
another stage is an error that says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vitjax.models import ViT, ViTConfig

STAGE_ORDER = (
    "pretrain", "score", "criteria", "search", "prune", "finetune", "export", "report"
)
SUPERNET_FILE = "supernet.safetensors"


class PipelineError(Exception):
    """A user-facing problem (bad config, missing input of a stage); printed as one line."""


def parse_stages(spec: str | tuple | list) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown or not names:
        raise PipelineError(
            f"unknown stage(s) {unknown or spec!r} in config.stages; choose from "
            f"{','.join(STAGE_ORDER)}"
        )
    missing = [n for n in names if n not in _STAGES]
    if missing:
        raise PipelineError(
            f"stage(s) {missing} are not implemented in this version of vitjax; available: "
            f"{','.join(s for s in STAGE_ORDER if s in _STAGES)}"
        )
    return sorted(names, key=STAGE_ORDER.index)


def model_config_from(config: ml_collections.ConfigDict) -> ViTConfig:
    """`config.model`: either `variant='S/16'` plus overrides, or every field spelled out."""
    fields = dict(config.model.to_dict())
    for key in ("variant", "drop_path_rate", "dtype"):
        fields.pop(key, None)
    try:
        if config.model.get("variant"):
            return ViTConfig.from_variant(config.model.variant, **fields)
        return ViTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"config.model is invalid: {e}") from None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.generic, jnp.ndarray)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


@dataclasses.dataclass
class Context:
    """What stages share: the config, the workdir, and lazily built model and data."""

    config: ml_collections.ConfigDict
    workdir: Path

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def stage_dir(self, stage: str) -> Path:
        path = self.workdir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done_file(self, stage: str) -> Path:
        return self.workdir / stage / "DONE.json"

    def summary(self, stage: str) -> dict:
        path = self.done_file(stage)
        if not path.exists():
            raise PipelineError(
                f"stage {stage!r} has not run in {self.workdir}; run it first "
                f"(--config.stages={stage},...)"
            )
        return json.loads(path.read_text())

    @functools.cached_property
    def model_config(self) -> ViTConfig:
        model_config = model_config_from(self.config)
        data_classes = self.config.data.get("num_classes")
        if data_classes and data_classes != model_config.num_classes:
            raise PipelineError(
                f"config.model.num_classes={model_config.num_classes} but config.data has "
                f"{data_classes} classes"
            )
        if self.config.data.image_size != model_config.image_size:
            raise PipelineError(
                f"config.model.image_size={model_config.image_size} but config.data.image_size="
                f"{self.config.data.image_size}; set both to the same resolution"
            )
        return model_config

    @property
    def dense_gmacs(self) -> float:
        from vitjax.pruning import count_flops

        return count_flops(self.model_config).total

    def model(self, *, train: bool = False) -> ViT:
        dtype = jnp.dtype(self.config.model.get("dtype", "float32"))
        drop_path = float(self.config.train.get("drop_path", 0.0)) if train else 0.0
        return ViT(self.model_config, drop_path_rate=drop_path, dtype=dtype)

    @functools.cached_property
    def datasets(self):
        from vitjax.data import make_datasets

        try:
            return make_datasets(
                self.config.data,
                self.config.get("augment"),
                global_batch_size=int(self.config.train.batch_size),
                eval_batch_size=int(self.config.train.get("eval_batch_size", 256)),
            )
        except FileNotFoundError as e:
            raise PipelineError(str(e)) from None

    def eval_arrays(self, name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """An evaluation set ('holdout' / 'test') gathered into host arrays (padding dropped)."""
        images, labels, seen = [], [], 0
        for batch in self.datasets.eval_batches(name):
            keep = batch["mask"] > 0
            images.append(batch["image"][keep])
            labels.append(batch["label"][keep])
            seen += int(keep.sum())
            if limit is not None and seen >= limit:
                break
        images, labels = np.concatenate(images), np.concatenate(labels)
        return (images[:limit], labels[:limit]) if limit else (images, labels)

    def train_images(self, count: int) -> np.ndarray:
        """The first `count` images of the training stream (a fixed sample for scoring)."""
        out, seen = [], 0
        for batch in self.datasets.train_batches(0):
            out.append(batch["image"])
            seen += len(batch["image"])
            if seen >= count:
                break
        return np.concatenate(out)[:count]

    def load_supernet(self):
        from vitjax.interop import load_native

        path = self.workdir / "pretrain" / SUPERNET_FILE
        if not path.exists():
            raise PipelineError(f"no supernet at {path}: run the pretrain stage first")
        config, params = load_native(path)
        if config != self.model_config:
            raise PipelineError(
                f"the supernet in {path} was trained for another architecture than "
                "config.model; use a fresh --workdir"
            )
        return jax.tree.map(jnp.asarray, params)

    def score_config(self):
        from vitjax.scoring import ScoreConfig

        fields = dict(self.config.get("score", {}))
        fields.pop("batch_size", None)
        preset = fields.pop("preset", "paper")
        make = {"paper": ScoreConfig.paper, "authors_code": ScoreConfig.authors_code}
        if preset not in make:
            raise PipelineError(f"config.score.preset must be one of {sorted(make)}")
        try:
            return make[preset](**fields)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"config.score is invalid: {e}") from None


class _StepBatches:
    """`step -> (images, labels)` over the data pipeline's sequential train stream: the trainer
    asks for consecutive steps, and a jump (a resumed run) restarts the stream at that step."""

    def __init__(self, datasets):
        self._datasets = datasets
        self._next_step: int | None = None
        self._iterator: Iterator[dict] | None = None

    def __call__(self, step: int):
        if self._iterator is None or step != self._next_step:
            self._iterator = iter(self._datasets.train_batches(step))
        batch = next(self._iterator)
        self._next_step = step + 1
        return batch["image"], batch["label"]


def pretrain(ctx: Context) -> dict:
    """Supernet pretraining (Eq. 5, Alg. 1 lines 3-6); finishes with supernet.safetensors."""
    from vitjax.interop import load_timm, save_native
    from vitjax.scoring import score_model
    from vitjax.training import train

    out = ctx.stage_dir("pretrain")
    model = ctx.model(train=True)
    init_params = None
    checkpoint = ctx.config.get("init", {}).get("checkpoint")
    if checkpoint:
        try:
            loaded, init_params = load_timm(
                checkpoint, num_classes=ctx.model_config.num_classes,
                image_size=ctx.model_config.image_size,
            )
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise PipelineError(f"config.init.checkpoint: {e}") from None
        if loaded.config != ctx.model_config:
            raise PipelineError(
                f"config.init.checkpoint {checkpoint} holds {loaded.config}, which is not "
                f"config.model ({ctx.model_config})"
            )
    score_config = ctx.score_config()
    token_mode = ctx.config.train.get("token_mode", "attention")
    score_config = dataclasses.replace(score_config, score_tokens=token_mode == "static")
    scoring_model = ctx.model()

    def rank_fn(params, images):
        return score_model(scoring_model, params, images, config=score_config).ranks()

    datasets = ctx.datasets
    config = ctx.config
    if config.train.get("target_gmacs") is None and config.get("target_flops_fraction"):
        config = ml_collections.ConfigDict(config.to_dict())
        config.train.target_gmacs = float(config.target_flops_fraction) * ctx.dense_gmacs
    eval_sets = {name: ctx.eval_arrays(name) for name in datasets.eval_names}
    score_batch = int(ctx.config.get("score", {}).get("batch_size", 256))
    result = train(
        config, str(out), model=model, train_batches=_StepBatches(datasets),
        eval_sets=eval_sets, init_params=init_params, rank_fn=rank_fn,
        score_batch=(ctx.train_images(score_batch), None),
    )
    if getattr(result, "preempted", False):
        raise PipelineError("pretraining was preempted; rerun the same command to resume")
    if ctx.is_main:
        save_native(out / SUPERNET_FILE, ctx.model_config, jax.device_get(result.params))
    return {"metrics": getattr(result, "metrics", {}), "supernet": str(out / SUPERNET_FILE)}


def score(ctx: Context) -> dict:
    """HSIC dependency scores (Sec. 3.2, Eq. 2) of every head, neuron and token position."""
    from vitjax.scoring import score_model

    out = ctx.stage_dir("score")
    params = ctx.load_supernet()
    batch = int(ctx.config.get("score", {}).get("batch_size", 256))
    images = jnp.asarray(ctx.train_images(batch))
    started = time.perf_counter()
    scores = score_model(ctx.model(), params, images, config=ctx.score_config())
    jax.block_until_ready(scores)
    seconds = time.perf_counter() - started
    ranks = scores.ranks()
    if ctx.is_main:
        arrays = {f"score_{k}": np.asarray(v) for k, v in vars(scores).items() if v is not None}
        arrays.update({f"rank_{k}": np.asarray(v) for k, v in vars(ranks).items()
                       if v is not None})
        tmp = out / "scores.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out / "scores.npz")
    logging.info("scored %d images in %.1fs", len(images), seconds)
    return {"batch_size": len(images), "seconds": seconds, "file": str(out / "scores.npz")}


def load_ranks(ctx: Context):
    """Ranks written by the score stage."""
    from vitjax.pruning import Ranks

    ctx.summary("score")
    with np.load(ctx.workdir / "score" / "scores.npz") as data:
        token = jnp.asarray(data["rank_token"]) if "rank_token" in data else None
        return Ranks(jnp.asarray(data["rank_head"]), jnp.asarray(data["rank_neuron"]), token)


def criteria(ctx: Context) -> dict:
    """Fig. 1: accuracy without finetuning vs pruning ratio, per dimension and criterion."""
    from vitjax.scoring.sweep import run_criteria_sweep

    out = ctx.stage_dir("criteria")
    params = ctx.load_supernet()
    batch = int(ctx.config.get("score", {}).get("batch_size", 256))
    images, labels = ctx.eval_arrays("test")
    rows = run_criteria_sweep(
        ctx.model(), params, ctx.train_images(batch), images, labels, str(out),
        score_config=ctx.score_config(), seed=int(ctx.config.get("seed", 0)),
    )
    return {"rows": rows, "table": str(out / "criteria.md"), "plot": str(out / "criteria.png")}


_STAGES: dict[str, Callable[[Context], dict]] = {
    "pretrain": pretrain,
    "score": score,
    "criteria": criteria,
}


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    stages = parse_stages(config.get("stages", ",".join(_STAGES)))
    ctx = Context(config, Path(workdir))
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        _write_json_atomic(ctx.workdir / "config.json", config.to_dict())
    for stage in stages:
        if ctx.done_file(stage).exists():
            logging.info("stage %s: already done (%s), skipping", stage, ctx.done_file(stage))
            print(f"[vitjax] {stage}: done earlier, skipped", flush=True)
            continue
        print(f"[vitjax] {stage}: running", flush=True)
        started = time.perf_counter()
        summary = _STAGES[stage](ctx)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        if ctx.is_main:
            _write_json_atomic(ctx.done_file(stage), summary)
        print(f"[vitjax] {stage}: finished in {summary['seconds']}s -> "
              f"{ctx.workdir / stage}", flush=True)
