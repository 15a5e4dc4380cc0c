"""Input pipeline throughput vs the train step it feeds (the pipeline must not be the bottleneck).

    python benchmarks/input_pipeline.py                 # digits 32px + 224px image folder
    python benchmarks/input_pipeline.py --cases=folder --batch=256 --steps=30   # on a GPU host

For each case it measures, in one run on one machine:
  pipeline  images/s of `make_datasets(...).train_batches()` alone (full DeiT augmentation:
            random resized crop, flip, RandAugment m9, random erasing; host CPU only),
  step      images/s of a jitted forward+backward+adamw update of `vitjax.models.ViT` (with
            on-device mixup/cutmix) on a batch already on the device,
  fed       images/s of that step fed by the pipeline through `prefetch_to_device`,
and prints pipeline/step (> 1: the accelerator, not the input, limits training) and fed/step.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from vitjax.data import (
    MixConfig,
    deit_augment_config,
    digits_data_config,
    folder_data_config,
    make_datasets,
    mix_batch,
    prefetch_to_device,
)
from vitjax.models import ViT, ViTConfig, init_params


def write_jpeg_folder(root: str, count: int = 256, classes: int = 4) -> None:
    """`count` ImageNet-like JPEGs (random crops ~300-500px of scikit-learn's sample photos)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % 2]
        h, w = rng.integers(300, 427), rng.integers(300, 640)
        y, x = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
        folder = os.path.join(root, "train", f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(photo[y : y + h, x : x + w]).save(
            os.path.join(folder, f"{i}.jpg"), quality=90
        )


def make_step(model, optimizer, mix, num_classes):
    def loss_fn(params, images, targets):
        logits, _ = model.apply({"params": params}, images, train=False)
        return optax.softmax_cross_entropy(logits, targets).mean()

    @jax.jit
    def step(params, opt_state, batch, rng):
        images, targets = mix_batch(rng, batch["image"], batch["label"], mix, num_classes)
        loss, grads = jax.value_and_grad(loss_fn)(params, images, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def measure(name, data_config, model_config, batch, steps):
    augment = deit_augment_config()
    data = make_datasets(data_config, augment, global_batch_size=batch)
    # Pipeline alone.
    batches = data.train_batches(0)
    for _ in range(3):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    pipeline = steps * batch / (time.perf_counter() - start)

    model = ViT(model_config)
    params = init_params(model, jax.random.key(0))
    optimizer = optax.adamw(1e-3, weight_decay=0.05)
    opt_state = optimizer.init(params)
    # DeiT's label smoothing (config.train.label_smoothing of its configs).
    step = make_step(model, optimizer, MixConfig.from_config(augment, label_smoothing=0.1),
                     data.num_classes)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))  # Auto axes: the model is not sharding-typed
    device_batch = next(prefetch_to_device(data.train_batches(0), mesh))
    rng = jax.random.key(1)
    for _ in range(2):  # compile + warm up
        params, opt_state, loss = step(params, opt_state, device_batch, rng)
    loss.block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, device_batch, jax.random.fold_in(rng, i))
    loss.block_until_ready()
    train = steps * batch / (time.perf_counter() - start)

    fed_batches = prefetch_to_device(data.train_batches(0), mesh, size=2)
    for _ in range(2):
        params, opt_state, loss = step(params, opt_state, next(fed_batches), rng)
    loss.block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(
            params, opt_state, next(fed_batches), jax.random.fold_in(rng, i)
        )
    loss.block_until_ready()
    fed = steps * batch / (time.perf_counter() - start)
    print(
        f"{name:<28} {batch:>6} {pipeline:>12.0f} {train:>12.0f} {fed:>10.0f} "
        f"{pipeline / train:>15.2f} {fed / train:>9.2f}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="digits,folder")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores "
        f"(affinity {len(os.sched_getaffinity(0))}), jax {jax.__version__} on "
        f"{len(jax.devices())} x {device.device_kind} ({device.platform})"
    )
    print(
        f"{'case':<28} {'batch':>6} {'pipeline/s':>12} {'step img/s':>12} {'fed/s':>10} "
        f"{'pipeline/step':>15} {'fed/step':>9}"
    )
    cases = args.cases.split(",")
    if "digits" in cases:
        measure(
            "digits 32px, ViT d64 L4",
            digits_data_config(image_size=32),
            ViTConfig(
                num_classes=10,
                image_size=32,
                patch_size=4,
                embed_dim=64,
                depth=4,
                num_heads=4,
                mlp_dim=128,
            ),
            args.batch,
            args.steps,
        )
    if "folder" in cases:
        with tempfile.TemporaryDirectory() as root:
            write_jpeg_folder(root)
            measure(
                "folder 224px JPEG, DeiT-Ti/16",
                folder_data_config(root, eval_split="", holdout_per_class=0, num_classes=4),
                ViTConfig.from_variant("Ti/16", num_classes=4, image_size=224),
                args.batch,
                args.steps,
            )


if __name__ == "__main__":
    main()
