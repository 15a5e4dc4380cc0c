"""The stage kit: what the stages do with models, written once.

- weights: `load_weights` reads a vitjax weight file from the workdir (local or gs://; a damaged
  or missing file is a one-line error that says which stage to redo), `save_weights` writes one
  (atomically, with the input normalisation it expects), `parameter_count`;
- training: `train_model` runs the shared trainer (`vitjax.training.train`) on the configured
  data, evaluation sets and mesh, and turns a preemption into the one-line "rerun to resume";
  `trained_accuracy` reads the accuracy per evaluation set from its result, `evaluate_accuracy`
  measures it for any model, `accuracy_text` prints it;
- teachers: `teacher_loss` picks the frozen dense teacher of a distilling stage (the model of
  `config.init.checkpoint`, else the dense supernet) and builds the distillation loss.

`Context` (vitjax.stages.context) holds what the stages share (config, workdir, model, data,
mesh, supernet); the kit holds what they do with it. Stage modules keep only their own logic.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from etils import epath

from vitjax.errors import UserError

if TYPE_CHECKING:
    from vitjax.models import ViTConfig
    from vitjax.stages.context import Context
    from vitjax.training import TrainResult


# -- weights ---------------------------------------------------------------------------------
def damaged(path, stage: str, error: BaseException) -> str:
    """The message for a result file of a finished stage that cannot be read."""
    what = "is missing" if isinstance(error, FileNotFoundError) else \
        f"cannot be read ({type(error).__name__}: {str(error)[:120]})"
    return (f"{path} {what} although stage {stage!r} finished; delete "
            f"{path.parent / 'DONE.json'} and rerun with --config.stages={stage},... to redo it "
            "(from its final checkpoint where one is kept)")


@contextlib.contextmanager
def local_copy(path: epath.Path):
    """A local file with the contents of `path` (itself when it is local already)."""
    if "://" not in str(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = epath.Path(tmp) / path.name
        path.copy(local)
        yield str(local)


def load_weights(path: epath.Path, stage: str) -> tuple[ViTConfig, dict[str, Any]]:
    """(architecture, host parameters) of the vitjax weight file `path` that stage `stage`
    wrote; a one-line UserError naming the stage to redo when it is missing or damaged."""
    from vitjax.interop import load_native

    try:
        with local_copy(path) as local:
            return load_native(local)
    except Exception as e:  # noqa: BLE001 - safetensors/json raise many types: all "damaged"
        raise UserError(damaged(path, stage, e)) from None


def save_weights(path: epath.Path, config: ViTConfig, params, preprocessing=None) -> None:
    """vitjax's weight file (atomic, local or gs://); `preprocessing`: the input normalisation
    it was trained with (Context.preprocessing)."""
    from vitjax.interop import save_native

    save_native(path, config, params, preprocessing=preprocessing)


def parameter_count(params) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


# -- training ----------------------------------------------------------------------------------
def train_model(ctx: Context, config, out: epath.Path, model, *, what: str,
                init_params=None, **train_kwargs) -> TrainResult:
    """`vitjax.training.train` on config.data's train stream and evaluation sets and the
    configured mesh, checkpointing under `out`; `train_kwargs` go to the trainer (loss_fn,
    frozen, rank_fn, ...). Preemption (after its checkpoint is saved) stops the stage with the
    one-line "rerun to resume"; `what` names the training in it."""
    from vitjax.training import StepBatches, train

    datasets = ctx.datasets
    result = train(config, str(out), model=model, train_batches=StepBatches(datasets),
                   eval_sets={name: ctx.eval_batches(name) for name in datasets.eval_names},
                   init_params=init_params, mesh=ctx.mesh, num_classes=datasets.num_classes,
                   **train_kwargs)
    if result.preempted:
        raise UserError(f"{what} was preempted; rerun the same command to resume")
    return result


def trained_accuracy(ctx: Context, result: TrainResult, policy: str = "model") -> dict[str, float]:
    """Accuracy per evaluation set of a training's last evaluation ('model': the trained model
    itself; a supernet's results also hold its fixed evaluation policies)."""
    return {name: result.metrics[f"eval/{name}/{policy}/accuracy"]
            for name in ctx.datasets.eval_names}


def evaluate_accuracy(ctx: Context, model, params) -> dict[str, float]:
    """Accuracy of `model` (no masks) per evaluation set of config.data (the one evaluator,
    `vitjax.evaluate`, on the configured mesh)."""
    from vitjax.evaluate import evaluate

    return {name: evaluate(model, params, None, ctx.eval_batches(name)(), ctx.mesh)["accuracy"]
            for name in ctx.datasets.eval_names}


def accuracy_text(accuracy: dict[str, float]) -> str:
    """'holdout 97.0%, test 96.4%': how the stages print accuracy per evaluation set."""
    return ", ".join(f"{name} {value:.1%}" for name, value in accuracy.items())


# -- teachers ----------------------------------------------------------------------------------
def load_teacher(ctx: Context):
    """(ViT, host parameters) of `config.init.checkpoint` as it was trained (its own classes and
    image size, no head replaced): the frozen dense teacher. A one-line UserError when it cannot
    teach config.model's student (other classes, image size or patch size)."""
    from vitjax.interop import load_checkpoint
    from vitjax.training.losses import check_teacher

    path = ctx.config.init.checkpoint
    cache = ctx.__dict__.setdefault("_teacher", {})
    if path not in cache:
        remote = "://" in path and not path.lower().endswith(".npz")
        try:
            with local_copy(epath.Path(path)) if remote else contextlib.nullcontext(path) as local:
                loaded = load_checkpoint(
                    local, num_heads=ctx.model_config.num_heads,
                    preprocessing=ctx.config.init.get("preprocessing") or None)
            check_teacher(ctx.model_config, loaded.config)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise UserError(f"config.init.checkpoint {path} as teacher: {e}") from None
        cache[path] = (ctx.model(loaded.config), jax.device_get(loaded.params))
    return cache[path]


def distillation_setup(ctx: Context, student, train_config):
    """(loss_fn, frozen teacher parameters, teacher name) distilling `student` from the init
    checkpoint's dense model with train_config.distill / temperature."""
    from vitjax.training.losses import distillation_loss

    if not ctx.config.get("init", {}).get("checkpoint"):
        raise UserError(f"config.train.distill={train_config.distill} needs a teacher: set "
                        "config.init.checkpoint to the trained dense model, or "
                        "--config.train.distill=0")
    teacher, params = load_teacher(ctx)
    try:
        loss_fn = distillation_loss(student, teacher, weight=float(train_config.distill),
                                    temperature=float(train_config.get("temperature", 1.0)))
    except ValueError as e:
        raise UserError(f"config.train: {e}") from None
    return loss_fn, params, f"dense model of {ctx.config.init.checkpoint}"


def teacher_loss(ctx: Context, student, train_config):
    """(loss_fn, frozen teacher parameters, teacher name) for `train_config.distill` > 0, else
    (None, None, None): the init checkpoint's dense model when there is one, else the supernet."""
    weight = float(train_config.get("distill", 0.0) or 0.0)
    if weight <= 0:
        return None, None, None
    if ctx.config.get("init", {}).get("checkpoint"):
        return distillation_setup(ctx, student, train_config)
    from vitjax.training.losses import distillation_loss

    loss_fn = distillation_loss(student, ctx.model(), weight=weight,
                                temperature=float(train_config.get("temperature", 1.0)))
    return loss_fn, jax.device_get(ctx.load_supernet()), "dense supernet"
