"""Stage `pretrain`: supernet training (Eq. 5, Alg. 1 lines 3-6).

Writes pretrain/supernet.safetensors (vitjax's weight format) and pretrain/ranks.npz, the
ranks the supernet was last trained with, which later stages select sub-networks by.

From a trained model (`config.init.checkpoint`, the main road) the supernet starts from its
weights and, with `config.train.distill` > 0, learns from it as a frozen teacher: every sampled
sub-network is pulled towards the dense model's logits (`vitjax.training.losses`). The dense
model's own accuracy is measured first: the number the compressed models are compared with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax
import numpy as np
from etils import epath

from vitjax.errors import UserError
from vitjax.stages.context import RANKS_FILE, SUPERNET_FILE, Context
from vitjax.stages.kit import (
    accuracy_text,
    distillation_setup,
    evaluate_accuracy,
    load_teacher,
    local_copy,
    parameter_count,
    save_weights,
    train_model,
)

TOKEN_MODES = ("attention", "static")
# Optimisation hyper-parameters that `train.resume_overrides` may change when resuming a run
# (e.g. a lower learning rate after the loss diverged).
RESUMABLE_TRAIN_KEYS = ("lr", "min_lr", "warmup_lr", "warmup_steps", "grad_clip",
                        "weight_decay", "b1", "b2", "steps")


def check_config(config) -> None:
    """config.train (what every training reads; finetuning overrides it), the teacher and the
    FLOPs budget; a warmup as long as the run is shortened with a warning."""
    from vitjax.stages.checks import check_distillation, clamp_warmup, require, resume_overrides

    train = config.train
    steps = int(train.steps)
    require(steps > 0, f"config.train.steps={steps}: training needs at least one step")
    for key in ("batch_size", "eval_batch_size"):
        value = train.get(key)
        require(value is None or int(value) > 0,
                f"config.train.{key}={value}: must be a positive number of images")
    clamp_warmup(train, "train", steps, int(train.get("warmup_steps", 0) or 0))
    token_mode = train.get("token_mode", "attention")
    require(token_mode in TOKEN_MODES,
            f"config.train.token_mode={token_mode!r}: choose one of {', '.join(TOKEN_MODES)}")
    if token_mode == "attention" and config.model.get("class_token") is False:
        require(False, "config.train.token_mode='attention' selects tokens by class attention, "
                "but config.model has no class token (class_token=False); set "
                "--config.train.token_mode=static")
    unknown = sorted(set(resume_overrides(config)) - set(RESUMABLE_TRAIN_KEYS))
    require(not unknown, f"config.train.resume_overrides names {unknown}: only "
            f"{', '.join(RESUMABLE_TRAIN_KEYS)} may change when resuming")
    check_distillation(train, "train")
    if float(train.get("distill", 0.0) or 0.0) > 0:
        require(bool((config.get("init") or {}).get("checkpoint")),
                f"config.train.distill={train.distill} needs a teacher: set "
                "config.init.checkpoint to the trained dense model, or --config.train.distill=0")
    fraction = config.get("target_flops_fraction")
    if fraction is not None and train.get("target_gmacs") is None:
        require(0 < float(fraction) < 1,
                f"config.target_flops_fraction={fraction}: the FLOPs budget is a fraction of "
                "the dense model in (0, 1), e.g. 0.6 for the paper's 40% reduction")


def load_init_checkpoint(ctx: Context, path: str):
    """Parameters of `config.init.checkpoint`: a timm/DeiT state dict, an AugReg / big_vision
    .npz, or a vitjax weight file (the pipeline's supernet.safetensors, `vitjax.convert`
    output). The input normalisation the checkpoint expects must be config.data's."""
    from vitjax.interop import load_checkpoint

    cfg = ctx.model_config
    # .npz files are read member by member through epath (gs:// too); other remote files are
    # copied to a local temporary file first.
    remote = "://" in path and not path.lower().endswith(".npz")
    try:
        with local_copy(epath.Path(path)) if remote else contextlib.nullcontext(path) as local:
            # Class count and image size follow config.model (head replaced, positions
            # resampled); the heads are checked (.npz, vitjax) or stated (a timm state dict
            # does not store them).
            loaded = load_checkpoint(
                local, num_classes=cfg.num_classes, image_size=cfg.image_size,
                num_heads=cfg.num_heads,
                preprocessing=ctx.config.init.get("preprocessing") or None)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UserError(f"config.init.checkpoint: {e}") from None
    config = loaded.config
    if config != cfg:
        want, got = cfg.to_dict(), config.to_dict()
        differing = [f"{k}={got.get(k)!r} (config.model: {want.get(k)!r})"
                     for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
        raise UserError(f"config.init.checkpoint {path} ({loaded.source_format} "
                        f"{config.family}) does not fit config.model: " + ", ".join(differing))
    check_preprocessing(ctx, path, loaded)
    return loaded.params


def check_preprocessing(ctx: Context, path: str, loaded) -> None:
    """The data must be normalised as the checkpoint was trained: an error where the checkpoint
    states its normalisation, a warning where it is only assumed (a timm state dict)."""
    stats = loaded.preprocessing
    data = ctx.config.data
    if stats is None:
        return
    channels = int(data.get("channels", 3))

    def per_channel(values):
        values = tuple(float(v) for v in values)
        return values * channels if len(values) == 1 else values

    want = (per_channel(stats["mean"]), per_channel(stats["std"]))
    have = (per_channel(data.mean), per_channel(data.std))
    if all(len(w) == len(h) and np.allclose(w, h, rtol=0, atol=1e-6)
           for w, h in zip(want, have, strict=True)):
        return
    message = (f"config.init.checkpoint {path} ({loaded.source_format} {loaded.config.family}) "
               f"expects inputs normalised with mean {want[0]} std {want[1]}, but config.data "
               f"has mean {have[0]} std {have[1]}; set config.data.mean/std to the "
               "checkpoint's")
    if stats.get("known", True) and ctx.config.init.get("check_preprocessing", True):
        raise UserError(message + " (or config.init.check_preprocessing=False to go on)")
    logging.warning("%s (the checkpoint's normalisation is assumed; set "
                    "config.init.preprocessing='imagenet' or 'inception' to state it)", message)


def dense_accuracy(ctx: Context) -> dict[str, float] | None:
    """The starting model's accuracy per evaluation set (None without a checkpoint that fits
    config.model's classes): what compressing it is measured against."""

    if not ctx.config.get("init", {}).get("checkpoint"):
        return None
    try:
        teacher, params = load_teacher(ctx)
    except UserError:
        return None  # e.g. an ImageNet checkpoint that only initialises a 10-class model
    return evaluate_accuracy(ctx, teacher, params)


def run(ctx: Context) -> dict:
    from vitjax.scoring import save_scores, score_model

    out = ctx.stage_dir("pretrain")
    config = ctx.config
    checkpoint = config.get("init", {}).get("checkpoint")
    init_params = load_init_checkpoint(ctx, checkpoint) if checkpoint else None
    score_config = dataclasses.replace(ctx.score_config(),
                                       score_tokens=ctx.token_mode == "static")
    scoring_model = ctx.model()

    def rank_fn(params, images):
        return score_model(scoring_model, params, images, config=score_config).ranks()

    if config.train.get("target_gmacs") is None and ctx.target_gmacs is not None:
        config = config.copy_and_resolve_references()
        config.train.target_gmacs = ctx.target_gmacs
    score_batch = ctx.score_batch_size
    reference = dense_accuracy(ctx)
    if reference:
        print("[vitjax] pretrain: the dense model of config.init.checkpoint scores "
              + accuracy_text(reference), flush=True)
    student = ctx.model(train=True)
    loss_fn = frozen = teacher = None
    if float(config.train.get("distill", 0.0) or 0.0) > 0:
        loss_fn, frozen, teacher = distillation_setup(ctx, student, config.train)
    result = train_model(
        ctx, config, out, student, what="pretraining", init_params=init_params, rank_fn=rank_fn,
        score_batch=(ctx.train_images(score_batch, gather=False), None), loss_fn=loss_fn,
        frozen=frozen)
    ranks = jax.device_get(result.ranks) if result.ranks is not None else None
    params = jax.device_get(result.params)
    if ctx.is_main:
        save_weights(out / SUPERNET_FILE, ctx.model_config, params, ctx.preprocessing)
        if ranks is not None:
            save_scores(out / RANKS_FILE, ranks=ranks)
    return {"metrics": result.metrics, "dense_gmacs": ctx.dense_gmacs, "steps": result.step,
            "init_accuracy": reference, "teacher": teacher,
            "params": parameter_count(params), "supernet": str(out / SUPERNET_FILE),
            "ranks": str(out / RANKS_FILE) if ranks is not None else None}
