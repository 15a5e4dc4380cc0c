"""Throughput of the dense vitjax ViT vs timm's PyTorch DeiT on the same CPU, in one run.

    python benchmarks/dense_vs_timm.py                       # DeiT-Ti and DeiT-S, batch 32
    python benchmarks/dense_vs_timm.py --quick               # fewer repetitions, Ti only
    python benchmarks/dense_vs_timm.py --variants=S --batch=16 --reps=7

Measures images/s of the forward pass (inference mode) and of one training step (forward,
backward and AdamW update: `jax.jit` with optax.adamw and donated state for vitjax; `loss.backward`
and `torch.optim.AdamW.step` for timm), 224px, 1000 classes, float32. It also times the masked
supernet step (a new random policy every repetition, masks from `vitjax.pruning`) against the
dense vitjax step: masks are data, so the masked step should cost within 10% of the dense one.

The machines this runs on are shared and noisy, so every measurement is interleaved (each
repetition times every contender once, in turn) after a warm-up, and the table reports medians
and, above all, ratios measured in the same run. timm is skipped with a message when torch or
timm is not installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    import vitjax  # noqa: F401
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from vitjax.models import ViT, ViTConfig, init_params  # noqa: E402
from vitjax.pruning import identity_ranks, masks_from_ranks, sample_policy  # noqa: E402

TIMM_NAMES = {"Ti": "deit_tiny_patch16_224", "S": "deit_small_patch16_224"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def core_count() -> int:
    # Cores this process may run on (a container or taskset can give fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def try_import_timm():
    try:
        import timm
        import torch
    except ImportError as err:
        return None, None, f"timm comparison skipped: {err} (pip install 'vitjax[timm]')"
    return torch, timm, None


class Bench:
    """One contender: `run(n)` does n batches and blocks until they are done."""

    def __init__(self, name: str, run: Callable[[int], None], batch: int):
        self.name, self.run, self.batch = name, run, batch
        self.samples: list[float] = []  # images/s of each repetition

    def measure(self, iters: int) -> None:
        start = time.perf_counter()
        self.run(iters)
        self.samples.append(iters * self.batch / (time.perf_counter() - start))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def ratio_to(self, other: Bench) -> float:
        """Median of per-repetition ratios: each pair ran back to back, under the same load."""
        return statistics.median(
            a / b for a, b in zip(self.samples, other.samples, strict=True)
        )


def vitjax_benches(variant: str, batch: int, seed: int = 0) -> dict[str, Bench]:
    config = ViTConfig.from_variant(f"{variant}/16", num_classes=1000, image_size=224)
    model = ViT(config)
    key = jax.random.key(seed)
    params = init_params(model, key)
    images = jax.random.normal(jax.random.key(1), (batch, 224, 224, 3), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)
    tx = optax.adamw(1e-4, weight_decay=0.05)

    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def loss_fn(p, x, y, masks):
        logits, _ = model.apply({"params": p}, x, masks, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(state, x, y, masks):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y, masks)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    train_step = jax.jit(step, donate_argnums=0)
    # Each contender owns its state (donation invalidates the buffers it is given).
    states = {name: (jax.tree.map(jnp.copy, params), tx.init(params))
              for name in ("dense", "static", "attention")}

    def run_forward(n):
        for _ in range(n):
            out = forward(params, images)
        out.block_until_ready()

    ranks = identity_ranks(config)
    policy_rng = np.random.default_rng(seed)

    def masks_for(mode):
        if mode == "dense":
            return None
        keep = sample_policy(config, policy_rng).keep_counts(config)
        return jax.tree.map(jnp.asarray, masks_from_ranks(config, ranks, keep, mode))

    def run_step(mode):
        def run(n):
            masks = masks_for(mode)  # one new policy per repetition: data, not a recompile
            state = states[mode]
            for _ in range(n):
                state, loss = train_step(state, images, labels, masks)
            loss.block_until_ready()
            states[mode] = state
        return run

    benches = {"forward": Bench("vitjax forward", run_forward, batch)}
    for mode in ("dense", "static", "attention"):
        benches[f"step/{mode}"] = Bench(f"vitjax step {mode}", run_step(mode), batch)
    return benches


def timm_benches(torch, timm, variant: str, batch: int) -> dict[str, Bench]:
    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=1000)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run_forward(n):
        model.eval()
        with torch.inference_mode():
            for _ in range(n):
                model(images)

    def run_step(n):
        model.train()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            opt.step()
        loss.item()

    return {"forward": Bench("timm forward", run_forward, batch),
            "step/dense": Bench("timm step", run_step, batch)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="Ti,S", help="comma-separated: Ti, S")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--iters", type=int, default=2, help="batches per repetition")
    parser.add_argument("--quick", action="store_true", help="Ti only, 3 reps of 1 batch")
    parser.add_argument("--no-timm", action="store_true", help="vitjax only (masked vs dense)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.quick:
        variants, args.reps, args.iters = ["Ti"], 3, 1
    unknown = [v for v in variants if v not in TIMM_NAMES]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(TIMM_NAMES)}")

    cores = core_count()
    torch, timm, skip = (None, None, "timm comparison skipped (--no-timm)") if args.no_timm \
        else try_import_timm()
    print(f"CPU: {cpu_model()}, {cores} cores available; python {platform.python_version()}")
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if torch is not None:
        torch.set_num_threads(cores)  # XLA's CPU client already uses every core it may run on
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"timm {timm.__version__}")
    else:
        print(skip)
    print(f"batch {args.batch}, 224px, 1000 classes, float32; {args.reps} interleaved reps of "
          f"{args.iters} batch(es) after warm-up; medians in images/s\n")

    rows = []
    for variant in variants:
        benches = {f"vitjax {k}": b for k, b in vitjax_benches(variant, args.batch).items()}
        if torch is not None:
            benches.update({f"timm {k}": b
                            for k, b in timm_benches(torch, timm, variant, args.batch).items()})
        for bench in benches.values():  # warm-up: compile, allocate, fill caches
            bench.run(1)
            bench.run(1)
        for _ in range(args.reps):
            for bench in benches.values():
                bench.measure(args.iters)
        rows.append((variant, benches))

    header = f"{'model':<8}{'what':<24}{'vitjax img/s':>14}{'timm img/s':>12}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    for variant, benches in rows:
        for kind, label in (("forward", "forward"), ("step/dense", "train step")):
            ours = benches[f"vitjax {kind}"]
            theirs = benches.get(f"timm {kind}")
            ref = f"{theirs.median:12.1f}{ours.ratio_to(theirs):9.2f}" if theirs else f"{'-':>12}"
            print(f"DeiT-{variant:<3}{label:<24}{ours.median:14.1f}{ref}")
        dense = benches["vitjax step/dense"]
        for mode in ("static", "attention"):
            masked = benches[f"vitjax step/{mode}"]
            print(f"DeiT-{variant:<3}{'masked step (' + mode + ')':<24}{masked.median:14.1f}"
                  f"{'(vs dense)':>12}{masked.ratio_to(dense):9.2f}")
    print("\nratio: median over repetitions of (vitjax / timm) throughput, or of (masked / dense "
          "vitjax step); higher is faster. Goals: >= 1.0 vs timm, >= 0.9 masked vs dense.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
