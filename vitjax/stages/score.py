"""Stage `score`: HSIC dependency scores (Sec. 3.2, Eq. 2) of every head, neuron and token
position of the supernet, on one batch of training images -> score/scores.npz."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import logging

from vitjax.stages.context import Context


def run(ctx: Context) -> dict:
    from vitjax.scoring import save_scores, score_model

    out = ctx.stage_dir("score")
    params = ctx.load_supernet()
    batch = ctx.score_batch_size
    images = jnp.asarray(ctx.train_images(batch))
    started = time.perf_counter()
    scores = score_model(ctx.model(), params, images, config=ctx.score_config())
    jax.block_until_ready(scores)
    seconds = time.perf_counter() - started
    if ctx.is_main:
        save_scores(out / "scores.npz", jax.device_get(scores))
    logging.info("scored %d images in %.1fs", len(images), seconds)
    return {"batch_size": len(images), "seconds": seconds, "file": str(out / "scores.npz")}
