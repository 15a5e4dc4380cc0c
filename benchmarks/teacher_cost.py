"""What the frozen dense teacher costs the supernet step: memory and time.

1. Memory: the supernet train step of a DeiT variant (bfloat16 compute, 224 px) with and without
   the teacher's logit distillation, compiled from abstract inputs (nothing allocated); per-device
   bytes from `compiled.memory_analysis()`. The teacher's parameters live in the train state's
   `frozen` tree, sharded like the student's parameters, with no gradients and no optimizer
   state.
2. Time: the jitted supernet step of configs/digits.py's model (or --variant) with and without
   the teacher, same batch and policies, alternating timed blocks in one process; the median
   ratio.

    python benchmarks/teacher_cost.py --part memory --memory-variant S/16 --memory-batch 256
    python benchmarks/teacher_cost.py --part time
On CPU, `--devices N` fakes N devices (XLA_FLAGS); on GPU/TPU the real ones are used.
"""

from __future__ import annotations

import argparse
import statistics
import time

from step_memory import GIB, mesh_layout, run_parts, step_memory

ARGS: argparse.Namespace  # set by main(): importing this module parses nothing


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("time", "memory", "all"), default="all")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (CPU only)")
    parser.add_argument("--memory-variant", default="S/16")
    parser.add_argument("--memory-batch", type=int, default=256, help="global batch")
    parser.add_argument("--layouts", default="data=8;data=8,fsdp",
                        help="mesh layouts for the memory part, ';'-separated")
    parser.add_argument("--variant", default="", help="time part: e.g. Ti/16; empty: digits")
    parser.add_argument("--batch", type=int, default=128, help="time part: global batch")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed blocks")
    return parser.parse_args(argv)


def _train_config(config):
    from vitjax.pruning import count_flops
    from vitjax.training import default_train_config

    c = default_train_config()
    c.update(steps=1000, warmup_steps=10, target_gmacs=0.6 * count_flops(config).total,
             target_tol=0.2, drop_path=0.0)
    return c


def _trainers(model, mesh, layout: dict):
    """(without teacher, with teacher): the same student, the teacher = the dense model."""
    import jax
    import numpy as np

    from vitjax.models import init_params
    from vitjax.training.losses import distillation_loss
    from vitjax.training.train import Trainer

    config = model.config
    teacher_params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    teacher_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), teacher_params)
    plain = Trainer(model, _train_config(config), mesh, layout)
    taught = Trainer(model, _train_config(config), mesh, layout, frozen=teacher_params,
                     loss_fn=distillation_loss(model, model, weight=0.5, temperature=1.0))
    return plain, taught


def memory():
    import jax
    import jax.numpy as jnp

    from vitjax.models import ViT, ViTConfig
    from vitjax.parallel import make_mesh

    config = ViTConfig.from_variant(ARGS.memory_variant, num_classes=1000, image_size=224)
    batch = ARGS.memory_batch
    print(f"\n{ARGS.memory_variant} supernet train step, bfloat16 compute, global batch {batch}, "
          f"{jax.device_count()} {jax.devices()[0].device_kind} devices; per-device bytes from "
          "compiled.memory_analysis()")
    print(f"{'layout':20s} {'teacher':8s} {'args':>9s} {'temp':>9s} {'total':>9s}")
    for text in ARGS.layouts.split(";"):
        layout = mesh_layout(text)
        mesh = make_mesh(layout)
        totals = {}
        for name, trainer in zip(("no", "yes"), _trainers(ViT(config, dtype=jnp.bfloat16),
                                                            mesh, layout), strict=True):
            args, temp, total = step_memory(trainer, batch)
            totals[name] = total
            print(f"{text:20s} {name:8s} {args / GIB:8.3f}G {temp / GIB:8.3f}G "
                  f"{total / GIB:8.3f}G", flush=True)
        print(f"{text:20s} teacher adds {(totals['yes'] - totals['no']) / GIB:.3f} GiB per device "
              f"({totals['yes'] / totals['no'] - 1:+.1%})", flush=True)


def time_ratio():
    import jax
    import numpy as np

    from vitjax.bench.timing import alternate_rounds
    from vitjax.models import ViT, ViTConfig
    from vitjax.parallel import local_to_global, make_mesh, replicated
    from vitjax.training.supernet import PolicySampler

    if ARGS.variant:
        config = ViTConfig.from_variant(ARGS.variant, num_classes=1000, image_size=224)
    else:  # configs/digits.py's model
        config = ViTConfig(num_classes=10, image_size=32, patch_size=4, embed_dim=96, depth=4,
                           num_heads=4, mlp_dim=384)
    mesh = make_mesh({"data": -1})
    model = ViT(config)
    plain, taught = _trainers(model, mesh, {})
    rng = np.random.default_rng(0)
    size = config.image_size
    images = local_to_global(rng.normal(size=(ARGS.batch, size, size, 3)).astype(np.float32),
                             mesh, ARGS.batch)
    labels = local_to_global(rng.integers(0, config.num_classes, ARGS.batch).astype(np.int32),
                             mesh, ARGS.batch)
    sampler = PolicySampler(config, plain.train_config)
    keeps = [{k: jax.device_put(v, replicated(mesh)) for k, v in sampler(s)[0].items()}
             for s in range(ARGS.steps)]
    states = {"no": plain.create_state(0), "yes": taught.create_state(0)}
    trainers = {"no": plain, "yes": taught}

    def block(name):
        state = states[name]
        started = time.perf_counter()
        for keep in keeps:
            state, metrics = trainers[name].train_step(state, images, labels, keep)
        jax.block_until_ready(metrics)
        states[name] = state
        return (time.perf_counter() - started) / len(keeps)

    for name in states:  # compile and warm up
        block(name)
    seconds = alternate_rounds({name: lambda name=name: block(name) for name in states},
                               ARGS.repeats)
    ratios = [b / a for a, b in zip(seconds["no"], seconds["yes"], strict=True)]
    print(f"\nsupernet step of {'digits ViT' if not ARGS.variant else ARGS.variant} "
          f"({config.image_size}px, global batch {ARGS.batch}, {jax.device_count()} "
          f"{jax.devices()[0].platform} devices): without teacher "
          f"{statistics.median(seconds['no']) * 1e3:.0f} ms, with teacher "
          f"{statistics.median(seconds['yes']) * 1e3:.0f} ms; step-time ratio with/without "
          f"{statistics.median(ratios):.2f} (median of {ARGS.repeats} paired blocks of "
          f"{ARGS.steps} steps)")


def main(argv=None) -> None:
    global ARGS
    ARGS = _parse(argv)
    run_parts(ARGS, {"time": time_ratio, "memory": memory})


if __name__ == "__main__":
    main()
