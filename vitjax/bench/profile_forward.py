"""Where the dense ViT forward pass (or training step) spends its CPU time under XLA:CPU.

    python -m vitjax.bench.profile_forward                      # DeiT-S, batch 32, both parts
    python -m vitjax.bench.profile_forward --part=trace --runs=3
    python -m vitjax.bench.profile_forward --part=ablate --reps=5 --seconds=2
    python -m vitjax.bench.profile_forward --step --runs=2      # the training step's trace

Part 'trace': `jax.jit(f).lower(...).compile()`, then `jax.profiler.trace` of a few calls; the
time of every executed thunk (one per XLA fusion / op, on XLA's worker threads) is summed per
model op (the fusion's root op, block index removed, e.g. 'mlp/dot_general') and tagged with
the costly elementwise ops fused into it (erf: GELU, exponential: softmax, rsqrt: LayerNorm,
transpose). Times are CPU time summed over threads.

`--step` traces the pipeline's own training step instead (`vitjax.training.Trainer.train_step`:
label-smoothed cross-entropy, `jax.value_and_grad`, AdamW, the state donated), dense, as
finetuning runs it; backward ops read 'transpose(jvp(...))'.

Part 'ablate': the same forward with one op made free, timed against the full model, each in
its own process, alternating (vitjax.bench.timing): transposes become bitcasts (reshape),
`erf` (GELU) or `exp` (softmax) become the identity, LayerNorm returns its input. The time saved
is an upper bound of what a better implementation of that op could gain.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

ABLATIONS = ("transpose", "erf", "exp", "layernorm")
_FLAGS = {"erf": "erf", "exponential": "exp", "rsqrt": "rsqrt", "transpose": "transpose"}


def build(variant: str, batch: int, ablation: str | None = None):
    """(forward, params, images) of the dense model, randomly initialised, optionally ablated."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vitjax.export import rewrite
    from vitjax.models import ViT, ViTConfig, init_params

    config = ViTConfig.from_variant(f"{variant}/16", num_classes=1000, image_size=224)
    model = ViT(config)
    params = init_params(model, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (batch, 224, 224, 3), jnp.float32)

    def forward(p, x):
        if ablation == "layernorm":
            def skip_layernorm(next_fun, args, kwargs, context):
                if isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__":
                    return args[0]
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(skip_layernorm):
                return model.apply({"params": p}, x)[0]
        return model.apply({"params": p}, x)[0]

    if ablation in ("transpose", "erf", "exp"):
        replacement = {
            "transpose": lambda ops, permutation, **_: [
                ops[0].reshape([ops[0].shape[i] for i in permutation])],
            "erf": lambda ops, **_: [ops[0]],
            "exp": lambda ops, **_: [ops[0]],
        }[ablation]
        plain = forward
        example = jax.ShapeDtypeStruct(images.shape, images.dtype)

        def forward(p, x):
            return rewrite.substitute(lambda y: plain(p, y), example, {ablation: replacement})(x)

    return jax.jit(forward), params, images


# ------------------------------------------------------------------------------------ trace


def _hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
    """instruction name -> (model op from its metadata, fused elementwise ops tag)."""
    computations: dict[str, str] = {}
    current, lines = None, []
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current, lines = header.group(1), []
        elif line.startswith("}") and current:
            computations[current] = "\n".join(lines)
            current = None
        elif current:
            lines.append(line)
    index = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(", line)
        if not match:
            continue
        name, opcode = match.groups()
        op_name = re.search(r'op_name="([^"]*)"', line)
        op = op_name.group(1) if op_name else opcode
        op = re.sub(r"^jit\([^)]*\)/(ViT/)?", "", op)
        op = re.sub(r"blocks_\d+/", "", op)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = computations.get(called.group(1), "") if called else line
        flags = sorted({tag for hlo_op, tag in _FLAGS.items() if f" {hlo_op}(" in body})
        if opcode == "fusion" and " dot(" in body:
            flags.insert(0, "dot")
        index[name] = (op, "+".join(flags))
    return index


def build_step(variant: str, batch: int):
    """(call, compiled) of the pipeline's own training step (`vitjax.training.Trainer`, i.e.
    `vitjax.training.steps.train_step` with the default recipe: cross-entropy with label
    smoothing, AdamW, the state donated) on the dense model and random data, one device, no
    policy sampling: what finetuning runs. call() runs a step."""
    import jax
    import numpy as np

    from vitjax.models import ViT, ViTConfig
    from vitjax.parallel import local_to_global, make_mesh
    from vitjax.training import Trainer, default_train_config

    config = ViTConfig.from_variant(f"{variant}/16", num_classes=1000, image_size=224)
    train_config = default_train_config()
    train_config.update(steps=1000, warmup_steps=10, sample_policies=False)
    mesh = make_mesh({"data": 1, "model": 1})
    trainer = Trainer(ViT(config), train_config, mesh)
    rng = np.random.default_rng(0)
    images = local_to_global(rng.normal(size=(batch, 224, 224, 3)).astype(np.float32), mesh,
                             batch)
    labels = local_to_global(rng.integers(0, 1000, batch).astype(np.int32), mesh, batch)
    state = [trainer.create_state(seed=0)]
    compiled = trainer.train_step.lower(state[0], images, labels, None).compile()

    def call():
        state[0], metrics = compiled(state[0], images, labels, None)
        jax.block_until_ready(metrics)

    return call, compiled


def trace(variant: str, batch: int, runs: int, step: bool = False) -> None:
    import time

    import jax
    from jax.profiler import ProfileData

    if step:
        call, compiled = build_step(variant, batch)
    else:
        forward, params, images = build(variant, batch)
        compiled = forward.lower(params, images).compile()

        def call():
            compiled(params, images).block_until_ready()

    index = _hlo_index(compiled.as_text())
    for _ in range(2):
        call()
    with tempfile.TemporaryDirectory() as logdir:
        start = time.perf_counter()
        with jax.profiler.trace(logdir):
            for _ in range(runs):
                call()
        wall = (time.perf_counter() - start) / runs
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        profile = ProfileData.from_file(path)
    by_op: collections.Counter = collections.Counter()
    threads = set()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in index:
                    threads.add(line.name)
                    by_op[index[event.name]] += event.duration_ns / 1e9 / runs
    total = sum(by_op.values())
    what = "training step" if step else "forward"
    print(f"DeiT-{variant} batch {batch}: {wall * 1e3:.0f} ms per {what} (wall, under the "
          f"profiler); thunk CPU time {total * 1e3:.0f} ms on {len(threads)} threads")
    print(f"{'model op (fusion root)':<52}{'fused':<22}{'ms':>8}{'share':>8}")
    for (op, flags), seconds in by_op.most_common():
        if seconds / total < 0.002:
            continue
        print(f"{op[:51]:<52}{flags:<22}{seconds * 1e3:8.1f}{seconds / total:8.1%}")
    kinds: collections.Counter = collections.Counter()
    for (op, flags), seconds in by_op.items():
        kinds[_kind(op, flags)] += seconds
    print("\nby kind:")
    for kind, seconds in kinds.most_common():
        print(f"  {kind:<48}{seconds * 1e3:8.1f} ms {seconds / total:7.1%}")


def _kind(op: str, flags: str) -> str:
    if "dot" in flags or "dot_general" in op:
        if "bhqd,bhkd" in op or "bhqk,bhkd" in op:
            return "attention matmuls (QK^T, AV)"
        return "weight matmuls (qkv, proj, fc1, fc2, patch, head)"
    if "exp" in flags:
        return "softmax (not fused into a matmul)"
    if "rsqrt" in flags or "norm" in op:
        return "LayerNorm (not fused into a matmul)"
    if "erf" in flags:
        return "GELU (not fused into a matmul)"
    if "transpose" in flags or "transpose" in op or op.startswith("copy"):
        return "transposes / copies"
    return "other elementwise / data movement"


# ----------------------------------------------------------------------------------- ablate


def ablate(variant: str, batch: int, reps: int, seconds: float) -> None:
    from vitjax.bench import timing

    def worker(ablation):
        spec = json.dumps({"variant": variant, "batch": batch, "ablation": ablation})
        argv = [sys.executable, "-m", "vitjax.bench.profile_forward", "--worker", spec]
        return timing.Worker(ablation or "full", argv)

    workers = [worker(None)]
    try:
        workers += [worker(a) for a in ABLATIONS]
        samples = timing.alternate(workers, reps, seconds)
    finally:
        for w in workers:
            w.close()
    print(f"DeiT-{variant} batch {batch}: full model {sorted(samples['full'])[reps // 2]:.1f} "
          f"img/s; {reps} alternating rounds of {seconds} s, one process per variant")
    print(f"{'made free':<16}{'time saved':>12}")
    for ablation in ABLATIONS:
        speedup = timing.median_ratio(samples[ablation], samples["full"])
        print(f"{ablation:<16}{1 - 1 / speedup:12.1%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="S")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--part", default="both", choices=["trace", "ablate", "both"])
    parser.add_argument("--runs", type=int, default=3, help="traced calls")
    parser.add_argument("--step", action="store_true",
                        help="trace a training step instead of the forward (trace part only)")
    parser.add_argument("--reps", type=int, default=5, help="alternating rounds (ablate)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per turn (ablate)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from vitjax.bench import timing

    if args.worker:
        spec = json.loads(args.worker)
        forward, params, images = build(spec["variant"], spec["batch"], spec["ablation"])
        timing.serve(lambda: forward(params, images).block_until_ready(), spec["batch"])
        return 0

    if args.step and args.part == "ablate":
        parser.error("--step profiles the training step with --part=trace only")
    print(timing.load_average(), "(before)")
    if args.part in ("trace", "both"):
        trace(args.variant, args.batch, args.runs, step=args.step)
        print()
    if args.part in ("ablate", "both") and not args.step:
        ablate(args.variant, args.batch, args.reps, args.seconds)
    print(timing.load_average(), "(after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
