"""The compression pipeline: stages that read and write one workdir.

Each stage writes its results under `workdir/<stage>/` and, last, `workdir/<stage>/DONE.json`
(its summary). A stage whose DONE.json exists is skipped, so rerunning the same command resumes
a killed run; a stage killed midway resumes from its own checkpoints (pretrain/finetune).

Stages, in order (DESIGN.md): pretrain, score, criteria (Fig. 1 of the paper), search, prune,
finetune, export, report. This version implements pretrain, score and criteria; asking for
another stage is an error that says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

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
    for key in ("variant", "drop_path_rate", "dtype", "remat"):
        fields.pop(key, None)
    try:
        if config.model.get("variant"):
            return ViTConfig.from_variant(config.model.variant, **fields)
        return ViTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"config.model is invalid: {e}") from None


def _write_json_atomic(path: epath.Path, data: Any) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, (np.generic, jnp.ndarray)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


@contextlib.contextmanager
def _local_copy(path: epath.Path):
    """A local file with the contents of `path` (itself when it is local already)."""
    if "://" not in str(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = epath.Path(tmp) / path.name
        path.copy(local)
        yield str(local)


@dataclasses.dataclass
class Context:
    """What stages share: the config, the workdir, and lazily built model and data."""

    config: ml_collections.ConfigDict
    workdir: epath.Path  # local path or cloud URL (gs://...)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def stage_dir(self, stage: str) -> epath.Path:
        path = self.workdir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done_file(self, stage: str) -> epath.Path:
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
        remat = bool(self.config.model.get("remat", False)) and train
        return ViT(self.model_config, drop_path_rate=drop_path, dtype=dtype, remat=remat)

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

    def eval_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """An evaluation set ('holdout' / 'test') as host arrays, in full on every process
        (the pipeline gives each process its own padded share; they are gathered here)."""
        batches = list(self.datasets.eval_batches(name))
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        keep = np.concatenate([b["mask"] for b in batches]) > 0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            images, labels, keep = (
                np.asarray(multihost_utils.process_allgather(a, tiled=True))
                for a in (images, labels, keep)
            )
        return images[keep], labels[keep]

    def train_images(self, count: int, *, gather: bool = True) -> np.ndarray:
        """A fixed sample of `count` training images (the first of the stream) for scoring.

        Each process reads its `count // process_count` rows; `gather` assembles all of them on
        every process, so every host computes the same scores and ranks.
        """
        local_count = max(count // jax.process_count(), 1)
        out, seen = [], 0
        for batch in self.datasets.train_batches(0):
            out.append(batch["image"])
            seen += len(batch["image"])
            if seen >= local_count:
                break
        images = np.concatenate(out)[:local_count]
        if gather and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        return images

    def load_supernet(self):
        from vitjax.interop import load_native

        path = self.workdir / "pretrain" / SUPERNET_FILE
        if not path.exists():
            raise PipelineError(f"no supernet at {path}: run the pretrain stage first")
        with _local_copy(path) as local:
            config, params = load_native(local)
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
        preset = fields.pop("preset", "authors_code")
        make = {"paper": ScoreConfig.paper, "authors_code": ScoreConfig.authors_code}
        if preset not in make:
            raise PipelineError(f"config.score.preset must be one of {sorted(make)}")
        try:
            return make[preset](**fields)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"config.score is invalid: {e}") from None


class _StepBatches:
    """`step -> (images, labels)` over the data pipeline's sequential train stream: the trainer
    asks for consecutive steps, and a jump (a resumed run) restarts the stream at that step.

    With mixup/cutmix in `config.augment`, each local batch is mixed on the host CPU with a key
    derived from (seed, step, process), so a resumed run mixes exactly as an uninterrupted one.
    Labels then are soft targets that already carry `augment.label_smoothing`.
    """

    def __init__(self, datasets, augment_config=None, seed: int = 0):
        self._datasets = datasets
        self._next_step: int | None = None
        self._iterator: Iterator[dict] | None = None
        self._mix = None
        mixing = augment_config is not None and max(
            float(augment_config.get("mixup", 0.0)), float(augment_config.get("cutmix", 0.0))
        ) > 0
        if mixing:
            from vitjax.data import mix_batch

            self._cpu = jax.local_devices(backend="cpu")[0]
            self._key = jax.random.fold_in(jax.random.key(seed), jax.process_index())
            self._mix = jax.jit(functools.partial(
                mix_batch, augment_config=augment_config, num_classes=datasets.num_classes
            ))

    def __call__(self, step: int):
        if self._iterator is None or step != self._next_step:
            self._iterator = iter(self._datasets.train_batches(step))
        batch = next(self._iterator)
        self._next_step = step + 1
        images, labels = batch["image"], batch["label"]
        if self._mix is not None:
            with jax.default_device(self._cpu):
                images, labels = self._mix(jax.random.fold_in(self._key, step), images, labels)
            images, labels = np.asarray(images), np.asarray(labels)
        return images, labels


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
    # Streamed from the pipeline: each process evaluates its own rows, nothing is held in
    # memory (the ImageNet validation set is 30 GB as float32 at 224 px).
    eval_sets = {
        name: functools.partial(datasets.eval_batches, name) for name in datasets.eval_names
    }
    score_batch = int(ctx.config.get("score", {}).get("batch_size", 256))
    result = train(
        config, str(out), model=model,
        train_batches=_StepBatches(datasets, config.get("augment"), int(config.train.seed)),
        eval_sets=eval_sets, init_params=init_params, rank_fn=rank_fn,
        score_batch=(ctx.train_images(score_batch, gather=False), None),
    )
    if getattr(result, "preempted", False):
        raise PipelineError("pretraining was preempted; rerun the same command to resume")
    if ctx.is_main:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, SUPERNET_FILE)
            save_native(local, ctx.model_config, jax.device_get(result.params))
            epath.Path(local).copy(out / (SUPERNET_FILE + ".tmp"), overwrite=True)
            (out / (SUPERNET_FILE + ".tmp")).replace(out / SUPERNET_FILE)
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
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
        tmp.replace(out / "scores.npz")
    logging.info("scored %d images in %.1fs", len(images), seconds)
    return {"batch_size": len(images), "seconds": seconds, "file": str(out / "scores.npz")}


def load_ranks(ctx: Context):
    """Ranks written by the score stage."""
    from vitjax.pruning import Ranks

    ctx.summary("score")
    with (ctx.workdir / "score" / "scores.npz").open("rb") as f, np.load(f) as data:
        token = jnp.asarray(data["rank_token"]) if "rank_token" in data else None
        return Ranks(jnp.asarray(data["rank_head"]), jnp.asarray(data["rank_neuron"]), token)


def criteria(ctx: Context) -> dict:
    """Fig. 1: accuracy without finetuning vs pruning ratio, per dimension and criterion."""
    from vitjax.scoring import ScoreConfig
    from vitjax.scoring.sweep import run_criteria_sweep

    out = ctx.stage_dir("criteria")
    params = ctx.load_supernet()
    batch = int(ctx.config.get("score", {}).get("batch_size", 256))
    images, labels = ctx.eval_arrays("test")
    rows = run_criteria_sweep(
        ctx.model(), params, ctx.train_images(batch), images, labels,
        str(out) if ctx.is_main else None,
        score_config=ctx.score_config(), seed=int(ctx.config.get("seed", 0)),
        # The kernel bandwidth matters (BUILD_NOTES.md): compare the paper's fixed sigma = 1
        # and the median heuristic with the configured scoring.
        extra_hsic={"hsic-paper": ScoreConfig.paper(), "hsic-median": ScoreConfig(
            sigma_mode="median")},
        file_stem="criteria",
    )
    return {"rows": rows, "table": str(out / "criteria.md"), "plot": str(out / "criteria.png")}


_STAGES: dict[str, Callable[[Context], dict]] = {
    "pretrain": pretrain,
    "score": score,
    "criteria": criteria,
}


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    stages = parse_stages(config.get("stages", ",".join(_STAGES)))
    local = "://" not in str(workdir)
    ctx = Context(config, epath.Path(os.path.abspath(workdir) if local else workdir))
    ctx.model_config  # noqa: B018  (validates config.model against config.data up front)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        _write_json_atomic(ctx.workdir / "config.json", config.to_dict())
    _sync_processes("vitjax pipeline start")  # every process sees the same finished stages
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
        # Process 0 writes a stage's files; nobody starts the next stage before they exist.
        _sync_processes(f"vitjax stage {stage} done")
        print(f"[vitjax] {stage}: finished in {summary['seconds']}s -> "
              f"{ctx.workdir / stage}", flush=True)
