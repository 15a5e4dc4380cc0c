"""Supernet pretraining (Eq. 5, Alg. 1 lines 3-6) and plain training/finetuning, sharded.

`train(config, workdir, model=..., train_batches=...)` runs one stage. With policy sampling on,
every step draws a policy from U_T (seeded by (seed, step), so every host draws the same one),
turns it into keep counts, and the jitted step builds the masks from the current ranks: one
compiled step serves every policy. Ranks (heads/neurons, and token positions in 'static' mode)
come from `rank_fn(params, images)` every `score_every` steps, `identity_ranks` without one.
With sampling off (or a physically pruned model) it is an ordinary trainer: that is finetuning.
The step itself is `vitjax.training.steps.train_step` with a pluggable loss; evaluation is
`vitjax.evaluate.evaluate`.

Data boundary: `train_batches(step) -> (images [b, H, W, C], labels [b] int)`, this process's
rows `local_batch_slice(mesh, batch_size)` of the global batch of `step` (mixing happens in the
step); `eval_sets: {name: callable}` returning a fresh iterable of this process's padded eval
batches (`Datasets.eval_batches`, `vitjax.evaluate.array_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import periodic_actions
from etils import epath

from vitjax.data.mixup import MixConfig
from vitjax.evaluate import evaluate
from vitjax.models.vit import ViT
from vitjax.parallel import mesh as mesh_lib
from vitjax.pruning.masks import Ranks, identity_ranks
from vitjax.training import checkpoint as ckpt_lib
from vitjax.training import metrics as metrics_lib
from vitjax.training.losses import LossFn, classification_loss
from vitjax.training.optim import make_optimizer
from vitjax.training.steps import StepConfig, TrainState, train_step
from vitjax.training.supernet import PolicySampler, fixed_eval_policies, stack_keep_counts

Batch = tuple[np.ndarray, np.ndarray]
RankFn = Callable[[Any, jax.Array], Ranks]

# Keys of config.train that do not change what a run computes: they may differ on resume.
_BOOKKEEPING_KEYS = (
    "log_every", "eval_every", "ckpt_every", "keep_checkpoints", "async_checkpoints",
    "eval_batch_size", "resume_overrides",
)


@dataclasses.dataclass
class TrainResult:
    params: Any  # global jax.Arrays on the training mesh (jax.device_get them on one host)
    metrics: dict[str, float]  # last evaluation ('eval/<set>/<policy>/accuracy', ...)
    step: int
    preempted: bool = False  # stopped early by SIGTERM / preemption after saving
    ranks: Ranks | None = None  # the ranks the last steps trained with (None: no masking)


def ranks_to_dict(ranks: Ranks) -> dict[str, Any]:
    out = {"head": ranks.head, "neuron": ranks.neuron}
    if ranks.token is not None:
        out["token"] = ranks.token
    return out


def ranks_from_dict(data: Mapping[str, Any] | None) -> Ranks | None:
    if data is None:
        return None
    return Ranks(head=data["head"], neuron=data["neuron"], token=data.get("token"))


class Trainer:
    """Shardings, state creation and the jitted step for one model, loss and config.

    loss_fn: see `vitjax.training.steps` (default: cross-entropy of `model`). init_fn(key) ->
    params replaces `model.init` when the trainable tree holds more than the ViT (e.g. a
    DynamicViT predictor). frozen: a non-trainable pytree the loss receives (e.g. a teacher).
    """

    def __init__(self, model: ViT, train_config: Mapping[str, Any], mesh, mesh_config=None, *,
                 augment_config=None, num_classes: int | None = None,
                 loss_fn: LossFn | None = None, init_fn: Callable | None = None, frozen=None):
        self.train_config = train_config
        self.mesh = mesh
        drop_path = train_config.get("drop_path")
        self.model = model if drop_path is None else model.clone(drop_path_rate=float(drop_path))
        self.config = model.config
        sample = bool(train_config.get("sample_policies", True))
        self.supernet = sample and not self.config.is_pruned
        self.token_mode = train_config.get("token_mode", "attention")
        if self.token_mode not in ("attention", "static"):
            raise ValueError(
                f"train.token_mode must be 'attention' or 'static', not {self.token_mode!r}"
            )
        self.tx, self.schedule = make_optimizer(train_config)
        self.loss_fn = loss_fn or classification_loss(self.model)
        self._init_fn = init_fn
        self._frozen = frozen
        self.step_config = StepConfig(
            model=self.model,
            num_classes=int(num_classes or max(self.config.num_classes, 1)),
            token_mode=self.token_mode,
            mix=MixConfig.from_config(augment_config,
                                      float(train_config.get("label_smoothing", 0.0))),
        )
        mesh_config = dict(mesh_config or {})
        self._fsdp = dict(
            fsdp=bool(mesh_config.get("fsdp", False)),
            fsdp_min_size=int(mesh_config.get("fsdp_min_size", 2**18)),
        )
        self.replicated = mesh_lib.replicated(mesh)
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self._build()

    # -- state ---------------------------------------------------------------------------------
    def _init_params(self, key):
        if self._init_fn is not None:
            return self._init_fn(key)
        c = self.config
        images = jnp.zeros((1, c.image_size, c.image_size, c.in_chans), jnp.float32)
        return self.model.init({"params": key}, images)["params"]

    def _initial_ranks(self):
        if not self.supernet:
            return None
        return ranks_to_dict(identity_ranks(self.config, with_tokens=self.token_mode == "static"))

    def _new_state(self, params, rng, frozen):
        return TrainState.create(apply_fn=None, params=params, tx=self.tx, rng=rng,
                                 ranks=self._initial_ranks(), frozen=frozen)

    def _build(self):
        abstract_params = jax.eval_shape(self._init_params, jax.random.key(0))
        abstract_frozen = jax.eval_shape(lambda: self._frozen)
        abstract = jax.eval_shape(
            self._new_state, abstract_params, jax.ShapeDtypeStruct((2,), jnp.uint32),
            abstract_frozen,
        )
        fsdp_shardings = functools.partial(mesh_lib.tree_shardings, mesh=self.mesh, **self._fsdp)
        self.param_shardings = fsdp_shardings(abstract_params)
        self.state_shardings = abstract.replace(
            step=self.replicated,
            params=self.param_shardings,
            opt_state=fsdp_shardings(abstract.opt_state),
            rng=self.replicated,
            ranks=jax.tree.map(lambda _: self.replicated, abstract.ranks),
            frozen=fsdp_shardings(abstract.frozen),
        )
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract, self.state_shardings,
        )

        def from_seed(rng, frozen):
            init_key, _ = jax.random.split(jax.random.wrap_key_data(rng))
            return self._new_state(self._init_params(init_key), rng, frozen)

        self._from_params = jax.jit(self._new_state, out_shardings=self.state_shardings)
        self._from_seed = jax.jit(from_seed, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            functools.partial(train_step, config=self.step_config, loss_fn=self.loss_fn,
                              schedule=self.schedule),
            in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding,
                          self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        self._replicate = jax.jit(lambda tree: tree, out_shardings=self.replicated)

    def _place(self, tree, abstract):
        return jax.tree.map(
            lambda leaf, s: mesh_lib.host_to_global(np.asarray(leaf, s.dtype), s.sharding),
            tree, abstract,
        )

    def create_state(self, seed: int, init_params=None) -> TrainState:
        """Fresh state from `seed`; `init_params` (host arrays, e.g. converted timm weights)
        replaces the random initialisation and must match the model's tree exactly."""
        rng = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
        rng = mesh_lib.host_to_global(rng, self.replicated)
        frozen = None
        if self._frozen is not None:
            frozen = self._place(self._frozen, self.abstract_state.frozen)
        if init_params is None:
            return self._from_seed(rng, frozen)
        expected = self.abstract_state.params
        got_struct, want_struct = jax.tree.structure(init_params), jax.tree.structure(expected)
        if got_struct != want_struct:
            raise ValueError(
                f"init_params do not match the model's parameter tree: got {got_struct}, "
                f"expected {want_struct}"
            )
        for path, leaf, want in zip(
            jax.tree_util.tree_flatten_with_path(init_params)[0],
            jax.tree.leaves(init_params), jax.tree.leaves(expected), strict=True,
        ):
            if tuple(np.shape(leaf)) != tuple(want.shape):
                raise ValueError(
                    f"init_params {jax.tree_util.keystr(path[0])} has shape {np.shape(leaf)}, "
                    f"the model needs {want.shape}"
                )
        return self._from_params(self._place(init_params, expected), rng, frozen)

    def place_ranks(self, ranks: Ranks) -> dict[str, jax.Array]:
        """Ranks as replicated global arrays in the layout of the state (any input layout)."""
        expected = self.abstract_state.ranks
        data = ranks_to_dict(ranks)
        if set(data) != set(expected):
            raise ValueError(
                f"rank_fn returned ranks for {sorted(data)}; token_mode={self.token_mode!r} "
                f"needs {sorted(expected)}"
            )
        placed = {}
        for name, value in data.items():
            if tuple(np.shape(value)) != tuple(expected[name].shape):
                raise ValueError(
                    f"ranks.{name} has shape {np.shape(value)}, expected {expected[name].shape}"
                )
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                value = self._replicate(value)
            placed[name] = mesh_lib.host_to_global(np.asarray(value, np.int32), self.replicated)
        return placed

    def evaluate(self, state: TrainState, batches, keep=None) -> dict[str, float]:
        """`vitjax.evaluate.evaluate` of the state's model (sub-network `keep`, [L] counts)."""
        model = self.model.clone(drop_path_rate=0.0)
        return evaluate(model, state.params, keep, batches, self.mesh, ranks=state.ranks,
                        token_mode=self.token_mode)


def _run_config(config: ml_collections.ConfigDict, model: ViT, init_given: bool) -> dict:
    train_cfg = {k: v for k, v in config.train.to_dict().items() if k not in _BOOKKEEPING_KEYS}
    return {
        "model": model.config.to_dict(), "dtype": str(jnp.dtype(model.dtype)),
        "train": train_cfg, "init_params": bool(init_given),
        "augment": _to_dict(config.get("augment")),
    }


def _nonfinite_message(step: int, checkpointer, tcfg) -> str:
    last = checkpointer.latest_step()
    lower = float(tcfg.lr) / 4
    where = (f"the last good checkpoint is step {last} in {checkpointer.directory}; resume "
             f"from it with a lower learning rate: rerun the same command with "
             f"--config.train.lr={lower:.3g} --config.train.resume_overrides=lr"
             if last is not None else "no checkpoint was saved; lower train.lr and rerun")
    return (f"training loss became non-finite at step {step}; stopped without saving: {where} "
            "(or clip gradients: --config.train.grad_clip=1.0 "
            "--config.train.resume_overrides=grad_clip)")


def _to_dict(cfg) -> dict:
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model: ViT,
    train_batches: Callable[[int], Batch],
    eval_sets: Mapping[str, Callable[[], Any]] | None = None,
    init_params=None,
    rank_fn: RankFn | None = None,
    score_batch: Batch | None = None,
    mesh=None,
    num_classes: int | None = None,
    loss_fn: LossFn | None = None,
    init_fn: Callable | None = None,
    frozen=None,
) -> TrainResult:
    """Trains `model` for `config.train.steps`, resuming from `workdir/checkpoints` if present.

    rank_fn(params, images) -> Ranks is called on `score_batch` (default: the first training
    batch) with global arrays, every `score_every` steps. Mixing follows `config.augment`.
    loss_fn / init_fn / frozen: see `Trainer`. Returns when done or preempted.
    """
    tcfg = config.train
    if mesh is None:
        mesh = mesh_lib.make_mesh(_to_dict(config.get("mesh")))
    trainer = Trainer(model, tcfg, mesh, _to_dict(config.get("mesh")),
                      augment_config=config.get("augment"), num_classes=num_classes,
                      loss_fn=loss_fn, init_fn=init_fn, frozen=frozen)
    is_main = jax.process_index() == 0
    steps, global_batch = int(tcfg.steps), int(tcfg.batch_size)
    rows = mesh_lib.local_batch_slice(mesh, global_batch)
    local_batch = rows.stop - rows.start
    eval_sets = dict(eval_sets or {})
    if is_main:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)

    overrides = [k.strip() for k in str(tcfg.get("resume_overrides", "") or "").split(",")]
    checkpointer = ckpt_lib.Checkpointer(
        epath.Path(workdir) / "checkpoints",
        run_config=_run_config(config, model, init_params is not None),
        keep=int(tcfg.get("keep_checkpoints", 3)),
        async_save=bool(tcfg.get("async_checkpoints", True)),
        allowed_changes=tuple(f"train.{k}" for k in overrides if k),
    )
    state, start = checkpointer.restore(trainer.abstract_state)
    if state is None:
        state, start = trainer.create_state(int(tcfg.seed), init_params), 0
    else:
        logging.info("resumed from %s at step %d", checkpointer.directory, start)

    sampler = PolicySampler(trainer.config, tcfg) if trainer.supernet else None
    eval_policies = fixed_eval_policies(trainer.config, tcfg) if trainer.supernet else None
    score_every = int(tcfg.get("score_every", 0) or 0)
    score_images = None

    def refresh_ranks(state: TrainState) -> TrainState:
        nonlocal score_images
        if rank_fn is None:
            ranks = identity_ranks(trainer.config, with_tokens=trainer.token_mode == "static")
        else:
            if score_images is None:
                # Each process holds its rows of the fixed scoring batch, like a training batch.
                images = (score_batch or train_batches(0))[0]
                score_images = mesh_lib.local_to_global(
                    images, mesh, len(images) * jax.process_count()
                )
            ranks = rank_fn(state.params, score_images)
        return state.replace(ranks=trainer.place_ranks(ranks))

    def run_eval(state: TrainState) -> dict[str, float]:
        out = {}
        policies = eval_policies or {"model": None}
        for set_name, batches in eval_sets.items():
            for policy_name, policy in policies.items():
                keep = None
                if policy is not None:
                    keep = {k: v[0] for k, v in stack_keep_counts(trainer.config, [policy]).items()}
                result = trainer.evaluate(state, batches(), keep)
                for k in ("accuracy", "loss"):
                    out[f"eval/{set_name}/{policy_name}/{k}"] = result[k]
        return out

    writer = metrics_lib.create_writer(workdir, is_main=is_main)
    report = (
        periodic_actions.ReportProgress(
            num_train_steps=steps, writer=writer, every_steps=int(tcfg.log_every)
        ) if is_main else None
    )
    watch = ckpt_lib.PreemptionWatch()
    log_every, eval_every = int(tcfg.log_every), int(tcfg.get("eval_every", 0) or 0)
    ckpt_every = int(tcfg.get("ckpt_every", 0) or 0)
    history, history_steps, gmacs_history = [], [], []
    eval_metrics: dict[str, float] = {}
    preempted = diverging = False
    best_loss: float | None = None
    done = start
    try:
        if is_main and start == 0:
            logging.info(
                "training %s for %d steps, global batch %d on mesh %s (supernet=%s)",
                trainer.config, steps, global_batch, dict(mesh.shape), trainer.supernet,
            )
        for step in range(start, steps):
            if trainer.supernet and (step == 0 or (score_every and step % score_every == 0)):
                state = refresh_ranks(state)
            keep, gmacs = (None, float("nan"))
            if sampler is not None:
                keep_np, gmacs = sampler(step)
                keep = {
                    k: mesh_lib.host_to_global(v, trainer.replicated) for k, v in keep_np.items()
                }
            images, labels = train_batches(step)
            if len(images) != local_batch:
                raise ValueError(
                    f"train_batches({step}) gave {len(images)} rows; this process must supply "
                    f"rows {rows.start}:{rows.stop} of the global batch of {global_batch}"
                )
            state, step_metrics = trainer.train_step(
                state,
                mesh_lib.local_to_global(images, mesh, global_batch),
                mesh_lib.local_to_global(labels, mesh, global_batch),
                keep,
            )
            done = step + 1
            history.append(step_metrics)
            history_steps.append(step)
            gmacs_history.append(gmacs)
            if report is not None:
                # At most one step in flight (the next is dispatched while this one runs), so
                # the progress line counts finished steps, not queued ones.
                jax.block_until_ready(history[-2] if len(history) > 1 and done < steps
                                      else history[-1])
                report(done)
            preempted = watch.should_stop(done)
            save_now = preempted or done == steps or (ckpt_every and done % ckpt_every == 0)
            eval_now = done == steps or (eval_every and done % eval_every == 0)
            if save_now or eval_now or done % log_every == 0:
                # Fetch and check before anything is written: a non-finite state is never saved.
                fetched = jax.device_get(history)
                bad = metrics_lib.first_nonfinite(fetched, history_steps)
                if bad is not None:
                    checkpointer.wait()
                    raise FloatingPointError(_nonfinite_message(bad, checkpointer, tcfg))
                summary = metrics_lib.mean_metrics(fetched)
                diverging = best_loss is not None and summary["loss"] > max(
                    2.0 * best_loss, best_loss + 1.0)
                if diverging:
                    logging.warning("loss %.3g at step %d is far above its best %.3g: no "
                                    "checkpoint is written until it recovers", summary["loss"],
                                    done, best_loss)
                else:
                    best_loss = min(summary["loss"], best_loss or summary["loss"])
                if sampler is not None:
                    summary["policy_gmacs"] = float(np.mean(gmacs_history))
                writer.write_scalars(done, {f"train/{k}": v for k, v in summary.items()})
                history, history_steps, gmacs_history = [], [], []
            if eval_now and eval_sets:
                eval_metrics = run_eval(state)
                writer.write_scalars(done, eval_metrics)
            if save_now and not diverging:
                # A diverging state is never saved: the last checkpoint stays one to resume
                # from (with a lower learning rate) if the loss goes on to become NaN.
                checkpointer.save(done, state)
            if preempted:
                logging.warning("preempted: saved step %d, stopping", done)
                break
        if start >= steps and eval_sets:
            eval_metrics = run_eval(state)
    finally:
        watch.close()
        checkpointer.close()
        writer.flush()
    if preempted and watch.interrupted:
        print(f"[vitjax] interrupted: saved a checkpoint at step {done} in "
              f"{checkpointer.directory}", flush=True)
        raise KeyboardInterrupt
    return TrainResult(
        params=state.params, metrics=eval_metrics, step=done, preempted=preempted,
        ranks=ranks_from_dict(state.ranks),
    )
