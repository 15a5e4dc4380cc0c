"""Supernet train step vs dense train step, and per-device memory of DeiT-B training.

1. Throughput: the jitted supernet step (a new random policy every step, applied as masks built
   from ranks inside the step; policy sampling on the host included) against the plain dense
   step of the same model, same batch, same device, measured in one run. Goal: ratio >= 0.9.
2. Memory: the train step of DeiT-B/16 at global batch 1024 on an 8-device mesh, compiled from
   abstract inputs (jax.ShapeDtypeStruct, nothing allocated); per-device bytes from
   `compiled.memory_analysis()` for several mesh layouts, against a 16 GiB device.

    python benchmarks/supernet_step.py --part throughput --variant Ti/16 --batch 16
    python benchmarks/supernet_step.py --part memory --devices 8
On CPU, `--devices N` fakes N devices (XLA_FLAGS); on GPU/TPU the real ones are used.
"""

from __future__ import annotations

import argparse
import time

from step_memory import GIB, mesh_layout, run_parts, step_memory

ARGS: argparse.Namespace  # set by main(): importing this module parses nothing


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("throughput", "memory", "all"), default="all")
    parser.add_argument("--variant", default="Ti/16", help="throughput model, e.g. Ti/16, B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="throughput batch per device")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed blocks")
    parser.add_argument("--token-mode", default="attention", choices=("attention", "static"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    parser.add_argument("--memory-variant", default="B/16")
    parser.add_argument("--memory-batch", type=int, default=1024)
    parser.add_argument("--remat", action="store_true",
                        help="memory part: recompute block activations in the backward pass")
    parser.add_argument("--remat-policy", default="full", choices=("full", "dots"),
                        help="with --remat: recompute everything, or keep the matmul outputs")
    parser.add_argument(
        "--layouts", default="data=8;data=4,model=2;data=8,fsdp;data=4,model=2,fsdp",
        help="mesh layouts for the memory part, ';'-separated",
    )
    return parser.parse_args(argv)


def _train_config(supernet: bool, token_mode: str):
    from vitjax.training import default_train_config

    cfg = default_train_config()
    cfg.update(steps=1000, warmup_steps=10, sample_policies=supernet, token_mode=token_mode)
    return cfg


def throughput():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitjax.bench.timing import alternate_rounds
    from vitjax.models import ViT, ViTConfig
    from vitjax.parallel import local_to_global, make_mesh
    from vitjax.training.supernet import PolicySampler
    from vitjax.training.train import Trainer

    dtype = jnp.dtype(ARGS.dtype)
    config = ViTConfig.from_variant(ARGS.variant, num_classes=1000, image_size=ARGS.image_size)
    mesh = make_mesh({"data": 1, "model": 1})  # one device: the same device for both steps
    batch = ARGS.batch
    rng = np.random.default_rng(0)
    images = local_to_global(
        rng.normal(size=(batch, ARGS.image_size, ARGS.image_size, 3)).astype(np.float32),
        mesh, batch,
    )
    labels = local_to_global(rng.integers(0, 1000, batch).astype(np.int32), mesh, batch)
    runners = {}
    for name, supernet in (("dense", False), ("supernet", True)):
        train_cfg = _train_config(supernet, ARGS.token_mode)
        trainer = Trainer(ViT(config, dtype=dtype), train_cfg, mesh)
        sampler = PolicySampler(config, train_cfg) if supernet else None
        state = trainer.create_state(seed=0)

        def step(state, i, trainer=trainer, sampler=sampler):
            keep = sampler(i)[0] if sampler is not None else None
            return trainer.train_step(state, images, labels, keep)

        for i in range(2):  # compile and warm up
            state, metrics = step(state, i)
        jax.block_until_ready(metrics)
        runners[name] = [step, state, 2]

    def timed_block(name):
        step, state, i = runners[name]
        start = time.perf_counter()
        for _ in range(ARGS.steps):
            state, metrics = step(state, i)
            i += 1
        jax.block_until_ready((state, metrics))
        runners[name][1:] = [state, i]
        return (time.perf_counter() - start) / ARGS.steps

    # Alternate the two so that load from other processes hits both alike; the median of the
    # per-repetition ratios cancels most of the remaining noise.
    times = alternate_rounds({name: lambda name=name: timed_block(name)
                              for name in ("dense", "supernet")}, ARGS.repeats)
    for name, samples in times.items():
        seconds = float(np.median(samples))
        print(f"{name:9s} step: {seconds * 1e3:9.1f} ms  ({batch / seconds:8.1f} img/s)")
    ratio = float(np.median(np.asarray(times["dense"]) / np.asarray(times["supernet"])))
    print(
        f"supernet/dense throughput ratio: {ratio:.3f} (goal >= 0.9; {ARGS.variant} at "
        f"{ARGS.image_size}px, batch {batch}, {ARGS.dtype}, token_mode={ARGS.token_mode}, "
        f"median of {ARGS.repeats} paired blocks of {ARGS.steps} steps, on "
        f"{jax.devices()[0].device_kind})"
    )


def memory():
    import jax
    import jax.numpy as jnp

    from vitjax.models import ViT, ViTConfig
    from vitjax.parallel import make_mesh
    from vitjax.training.train import Trainer

    config = ViTConfig.from_variant(ARGS.memory_variant, num_classes=1000, image_size=224)
    batch = ARGS.memory_batch
    print(
        f"\n{ARGS.memory_variant} supernet train step (remat={ARGS.remat}, "
        f"{ARGS.remat_policy}), global batch {batch}, "
        f"{jax.device_count()} {jax.devices()[0].device_kind} devices; per-device bytes "
        "from compiled.memory_analysis()"
    )
    print(f"{'layout':24s} {'dtype':9s} {'args':>9s} {'temp':>9s} {'total':>9s}  fits 16 GiB")
    for layout_text in ARGS.layouts.split(";"):
        layout = mesh_layout(layout_text)
        mesh = make_mesh(layout)
        for dtype in (jnp.float32, jnp.bfloat16):
            trainer = Trainer(
                ViT(config, dtype=dtype, remat=ARGS.remat, remat_policy=ARGS.remat_policy),
                _train_config(True, "attention"),
                mesh, layout,
            )
            args, temp, total = step_memory(trainer, batch)
            print(
                f"{layout_text:24s} {jnp.dtype(dtype).name:9s} {args / GIB:8.2f}G "
                f"{temp / GIB:8.2f}G {total / GIB:8.2f}G  "
                f"{'yes' if total < 16 * GIB else 'NO'}",
                flush=True,
            )


def main(argv=None) -> None:
    global ARGS
    ARGS = _parse(argv)
    run_parts(ARGS, {"throughput": throughput, "memory": memory})


if __name__ == "__main__":
    main()
