"""What the pipeline's stages share: the config, the workdir, and lazily built model, data, mesh
and supernet. Only shared things live here; each stage's own logic is in its module."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vitjax.configs import model_config_from
from vitjax.errors import UserError
from vitjax.models import ViT, ViTConfig
from vitjax.stages.kit import damaged, load_weights

SUPERNET_FILE = "supernet.safetensors"
RANKS_FILE = "ranks.npz"  # the ranks the supernet was last trained with (save_scores format)


@dataclasses.dataclass
class Context:
    """The config, the workdir (local path or gs://...), and what stages build from them."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    # Stages whose summary the running stage read: the runner records their identities as its
    # inputs (vitjax.stages.provenance), besides its upstream in the stage table.
    reads: set = dataclasses.field(default_factory=set, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        """Process 0 writes the files of a stage; every process computes."""
        return jax.process_index() == 0

    def stage_dir(self, stage: str) -> epath.Path:
        path = self.workdir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done_file(self, stage: str) -> epath.Path:
        return self.workdir / stage / "DONE.json"

    def summary(self, stage: str) -> dict:
        """The DONE.json summary of a finished stage; a clear error if it has not run."""
        from vitjax.stages.provenance import read_record

        path = self.done_file(stage)
        record, problem = read_record(path)
        if problem:
            raise UserError(f"{path} {problem}; delete it and rerun with --config.stages="
                            f"{stage},... to redo that stage (its checkpoints and logs are "
                            "resumed)")
        if record is None:
            raise UserError(
                f"stage {stage!r} has not run in {self.workdir}; run it first "
                f"(--config.stages={stage},...)"
            )
        self.reads.add(stage)
        return record

    # -- model ---------------------------------------------------------------------------------
    @functools.cached_property
    def model_config(self) -> ViTConfig:
        config = self.config
        if config.model.get("num_classes") == -1:  # 'from the data' (configs/folder.py)
            config = config.copy_and_resolve_references()
            config.model.num_classes = self._datasets.num_classes
        model_config = model_config_from(config)
        data_classes = self.config.data.get("num_classes")
        if data_classes and data_classes > 0 and data_classes != model_config.num_classes:
            raise UserError(
                f"config.model.num_classes={model_config.num_classes} but config.data has "
                f"{data_classes} classes; set both to the same number"
            )
        if self.config.data.image_size != model_config.image_size:
            raise UserError(
                f"config.model.image_size={model_config.image_size} but config.data.image_size="
                f"{self.config.data.image_size}; set both to the same resolution"
            )
        return model_config

    @property
    def dense_gmacs(self) -> float:
        from vitjax.pruning import count_flops

        return count_flops(self.model_config).total

    @property
    def target_gmacs(self) -> float | None:
        """The FLOPs budget T: config.train.target_gmacs, else target_flops_fraction x dense."""
        explicit = self.config.train.get("target_gmacs")
        if explicit is not None:
            return float(explicit)
        fraction = self.config.get("target_flops_fraction")
        return float(fraction) * self.dense_gmacs if fraction else None

    @property
    def preprocessing(self) -> dict:
        """The input normalisation of config.data, recorded in the weight files stages write
        (vitjax.interop.checkpoints), so a later run from them can check it."""
        data = self.config.data
        return dict(mean=[float(v) for v in data.mean], std=[float(v) for v in data.std],
                    known=True, source="config.data")

    @property
    def token_mode(self) -> str:
        return self.config.train.get("token_mode", "attention")

    def model(self, config: ViTConfig | None = None, *, train: bool = False) -> ViT:
        """The configured model (or one of another architecture, e.g. a pruned one)."""
        dtype = jnp.dtype(self.config.model.get("dtype", "float32"))
        drop_path = float(self.config.train.get("drop_path", 0.0)) if train else 0.0
        remat = bool(self.config.model.get("remat", False)) and train
        return ViT(config or self.model_config, drop_path_rate=drop_path, dtype=dtype,
                   remat=remat, remat_policy=str(self.config.model.get("remat_policy", "full")),
                   attention=str(self.config.model.get("attention", "auto")))

    @functools.cached_property
    def mesh(self):
        from vitjax.parallel import make_mesh

        try:
            return make_mesh(dict(self.config.get("mesh", {})))
        except ValueError as e:
            raise UserError(f"config.mesh: {e}") from None

    # -- data ----------------------------------------------------------------------------------
    @functools.cached_property
    def _datasets(self):
        from vitjax.data import make_datasets

        return make_datasets(
            self.config.data,
            self.config.get("augment"),
            global_batch_size=int(self.config.train.batch_size),
            eval_batch_size=int(self.config.train.get("eval_batch_size", 256)),
        )

    @property
    def datasets(self):
        """The train stream and evaluation sets of config.data (built once)."""
        datasets = self._datasets
        if datasets.num_classes != self.model_config.num_classes:
            raise UserError(
                f"{datasets.description} has {datasets.num_classes} classes but "
                f"config.model.num_classes={self.model_config.num_classes}; set "
                f"--config.model.num_classes={datasets.num_classes}"
            )
        return datasets

    def eval_batches(self, name: str):
        """A callable returning a fresh pass over evaluation set `name` ('holdout'/'test'),
        this process's padded batches. Streamed (never the whole set in memory), unless the
        set's images fit in `config.data.cache_eval_mb`: then the first pass is
        kept in host memory, since the criteria sweep and the searches make hundreds of passes
        and a tf.data pass costs more than evaluating a small set (digits)."""
        datasets = self.datasets
        if name not in datasets.eval_names:
            raise UserError(
                f"no {name!r} evaluation set in config.data (have {datasets.eval_names})"
            )
        stream = functools.partial(datasets.eval_batches, name)
        size = int(self.config.data.image_size)
        megabytes = datasets.eval_size(name) * size * size * 3 * 4 / 2**20
        if megabytes > float(self.config.data.cache_eval_mb):
            return stream
        cache = self.__dict__.setdefault("_eval_cache", {})

        def cached():
            if name not in cache:
                cache[name] = list(stream())
            return iter(cache[name])

        return cached

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

    # -- supernet and ranks --------------------------------------------------------------------
    def load_supernet(self, *, replicate: bool = False) -> dict[str, Any]:
        """The pretrained supernet's parameters: host arrays, or with `replicate` global arrays
        replicated over the mesh (what the sharded evaluator takes on several hosts)."""
        path = self.workdir / "pretrain" / SUPERNET_FILE
        if not path.exists():
            raise UserError(f"no supernet at {path}: run the pretrain stage first")
        config, params = load_weights(path, "pretrain")
        if config != self.model_config:
            raise UserError(
                f"the supernet in {path} was trained for another architecture than "
                "config.model; use a fresh --workdir"
            )
        if not replicate:
            return jax.tree.map(jnp.asarray, params)
        from vitjax.parallel import host_to_global, replicated

        sharding = replicated(self.mesh)
        return jax.tree.map(lambda a: host_to_global(a, sharding), params)

    def ranks(self):
        """The ranks that later stages select heads/neurons/tokens by: those the supernet was
        last trained with (pretrain/ranks.npz), or with `config.score.rescore` the score
        stage's. Static token mode needs token ranks; attention mode selects per image."""
        from vitjax.scoring import load_ranks

        rescore = bool(self.config.get("score", {}).get("rescore", False))
        stage, name = ("score", "scores.npz") if rescore else ("pretrain", RANKS_FILE)
        self.summary(stage)
        path = self.workdir / stage / name
        try:
            ranks = load_ranks(path)
        except Exception as e:  # noqa: BLE001 - missing, truncated, not an npz: all "damaged"
            raise UserError(damaged(path, stage, e)) from None
        if self.token_mode == "static" and ranks.token is None:
            raise UserError(
                f"{self.workdir / stage / name} has no token ranks but train.token_mode="
                "'static' needs them; rerun that stage with token_mode='static'"
            )
        return ranks

    @property
    def score_batch_size(self) -> int:
        """Images HSIC scoring reads (config.score.batch_size): the score and criteria stages,
        the supernet's periodic re-ranking and the baseline's ranks."""
        return int(self.config.score.batch_size)

    def score_config(self):
        from vitjax.scoring import ScoreConfig

        fields = dict(self.config.get("score", {}))
        for key in ("batch_size", "rescore"):
            fields.pop(key, None)
        preset = fields.pop("preset", "authors_code")
        make = {"paper": ScoreConfig.paper, "authors_code": ScoreConfig.authors_code}
        if preset not in make:
            raise UserError(f"config.score.preset must be one of {sorted(make)}, not {preset!r}")
        try:
            return make[preset](**fields)
        except (TypeError, ValueError) as e:
            raise UserError(f"config.score is invalid: {e}") from None
