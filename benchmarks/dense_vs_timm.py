"""Throughput of the dense vitjax ViT vs timm's PyTorch DeiT on the same CPU, as ratios.

    python benchmarks/dense_vs_timm.py                       # DeiT-Ti and DeiT-S, batch 32
    python benchmarks/dense_vs_timm.py --quick               # Ti only, 3 rounds of 1 s
    python benchmarks/dense_vs_timm.py --variants=S --batch=16 --reps=7 --seconds=3
    python benchmarks/dense_vs_timm.py --no-timm             # masked vs dense vitjax only

Measures images/s of the forward pass (inference mode) and of one training step (forward,
backward and AdamW update: `jax.jit` with optax.adamw and donated state for vitjax; `loss.backward`
and `torch.optim.AdamW.step` for timm), 224px, 1000 classes, float32. It also times the masked
supernet step (a new random policy, hence new masks from `vitjax.pruning`, at every step) against
the dense vitjax step: masks are data, so the masked step should cost within 10% of the dense one.

Every contender runs in its own process (no shared thread pools or allocators; torch and
TensorFlow never meet in one process) and the contenders take turns, A B A B ..., each for
--seconds per round after its warm-up (see vitjax/bench/timing.py). The table reports medians
and, above all, ratios of contenders measured in the same rounds. timm is skipped with a message
when torch or timm is not installed (`pip install 'vitjax[timm]'`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys

try:
    import vitjax  # noqa: F401
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from vitjax.bench import timing  # noqa: E402

TIMM_NAMES = {"Ti": "deit_tiny_patch16_224", "S": "deit_small_patch16_224",
              "B": "deit_base_patch16_224"}
SCRIPT = os.path.abspath(__file__)


def timm_missing() -> str | None:
    missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        return f"timm comparison skipped: {', '.join(missing)} not installed " \
               "(pip install 'vitjax[timm]')"
    return None


# ------------------------------------------------------------------------------ worker side


def vitjax_contender(variant: str, batch: int, what: str, mode: str, seed: int = 0, *,
                     dtype: str = "float32", attention: str = "auto", remat: str = "",
                     config: dict | None = None):
    """run_once for the vitjax forward ('forward') or training step ('step', mode dense /
    static / attention). dtype: compute dtype (parameters and AdamW state stay float32);
    attention: `ViT.attention`; remat: '' (off) or a `ViT.remat_policy`; config: a ViTConfig
    dict instead of the DeiT variant at 224 px (e.g. tiny shapes for a smoke test)."""
    import jax
    import jax.numpy as jnp

    from vitjax.models import ViTConfig, init_params

    if config is None:
        config = ViTConfig.from_variant(f"{variant}/16", num_classes=1000, image_size=224)
    else:
        config = ViTConfig.from_dict(config)
    model = vitjax_model(config, dtype=dtype, attention=attention, remat=remat)
    params = init_params(model, jax.random.key(seed))
    size = config.image_size
    images = jax.random.normal(jax.random.key(1), (batch, size, size, config.in_chans),
                               jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, max(config.num_classes, 1))

    if what == "forward":
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
        return lambda: forward(params, images).block_until_ready()

    train_step, init_state = vitjax_train_step(model, mode)
    state = [init_state(params)]
    sample = policy_sampler(config, mode, seed)

    def run_once():
        state[0], loss = train_step(state[0], images, labels, sample())
        loss.block_until_ready()

    return run_once


def vitjax_model(config, *, dtype: str = "float32", attention: str = "auto", remat: str = ""):
    import jax.numpy as jnp

    from vitjax.models import ViT

    # Only options that differ from the defaults: benchmarks/ab_checkouts.py runs this file
    # against older checkouts, whose ViT may not know the newer ones.
    options = {}
    if jnp.dtype(dtype) != jnp.float32:
        options["dtype"] = jnp.dtype(dtype)
    if attention != "auto":
        options["attention"] = attention
    if remat:
        options.update(remat=True, remat_policy=remat)
    return ViT(config, **options)


def vitjax_train_step(model, mode: str):
    """(jitted step(state, images, labels, keep) -> (state, loss) with AdamW and the state
    donated, init_state(params)). mode 'dense': keep is None; 'static' / 'attention': keep are
    the KeepCounts of a policy, turned into masks inside the step (as the supernet trainer
    does), so a new policy is new data, not a recompilation."""
    import jax
    import optax

    from vitjax.pruning import identity_ranks, masks_from_ranks

    config = model.config
    ranks = identity_ranks(config)
    tx = optax.adamw(1e-4, weight_decay=0.05)

    def loss_fn(p, x, y, keep):
        masks = None if keep is None else masks_from_ranks(config, ranks, keep, mode)
        logits, _ = model.apply({"params": p}, x, masks, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(state, x, y, keep):
        p, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y, keep)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), lambda params: (params, tx.init(params))


def policy_sampler(config, mode: str, seed: int = 0):
    """() -> KeepCounts of a new random policy at every call (None for the dense step)."""
    import numpy as np

    from vitjax.pruning import sample_policy

    policy_rng = np.random.default_rng(seed)
    if mode == "dense":
        return lambda: None
    return lambda: sample_policy(config, policy_rng).keep_counts(config)


def timm_kwargs(config: dict) -> dict:
    """create_model overrides that give timm's VisionTransformer the shape of a ViTConfig."""
    return dict(img_size=config["image_size"], patch_size=config["patch_size"],
                embed_dim=config["embed_dim"], depth=config["depth"],
                num_heads=config["num_heads"], mlp_ratio=config["mlp_dim"] / config["embed_dim"],
                num_classes=config["num_classes"])


def timm_contender(variant: str, batch: int, what: str, threads: int, *, amp: bool = False,
                   config: dict | None = None):
    """run_once for timm's forward or training step (AdamW) on CUDA when torch sees a GPU,
    else on the CPU. amp: bfloat16 autocast (torch AMP; softmax, norms and loss stay float32
    as autocast decides). config: a ViTConfig dict for other shapes than the DeiT variant."""
    import timm
    import torch

    torch.set_num_threads(threads)  # XLA's CPU client also uses every core it may run on
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"num_classes": 1000} if config is None else timm_kwargs(config)
    model = timm.create_model(TIMM_NAMES.get(variant, "deit_tiny_patch16_224"), pretrained=False,
                              **kwargs).to(device)
    size = 224 if config is None else config["image_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=amp)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if what == "forward":
        model.eval()

        def forward():
            with torch.inference_mode(), autocast:
                model(images)
            sync()

        return forward

    model.train()
    # The fused AdamW kernel where there is one (CUDA): timm at its fastest.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                            **({"fused": True} if device == "cuda" else {}))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()
        loss.item()

    return step


def timm_info() -> dict:
    """Versions and what timm's attention runs (fused scaled_dot_product_attention or not)."""
    import timm
    import torch
    from timm.layers import use_fused_attn

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
                        f"{device}), timm {timm.__version__}",
            "fused_attn": bool(use_fused_attn())}


def run_worker(spec: dict) -> None:
    if spec["who"] == "timm":
        run_once = timm_contender(spec["variant"], spec["batch"], spec["what"], spec["threads"])
        import timm
        import torch

        versions = {"versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
                                f", timm {timm.__version__}"}
    else:
        run_once = vitjax_contender(spec["variant"], spec["batch"], spec["what"], spec["mode"])
        import jax

        versions = {"versions": f"jax {jax.__version__} ({jax.default_backend()}, "
                                f"{jax.device_count()} device(s))"}
    timing.serve(run_once, spec["batch"], **versions)


# ------------------------------------------------------------------------------ parent side


def worker(name: str, **spec) -> timing.Worker:
    return timing.Worker(name, [sys.executable, SCRIPT, "--worker", json.dumps(spec)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="Ti,S", help="comma-separated: Ti, S")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="run time per turn")
    parser.add_argument("--quick", action="store_true", help="Ti only, 3 rounds of 1 s")
    parser.add_argument("--no-timm", action="store_true", help="vitjax only (masked vs dense)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.quick:
        variants, args.reps, args.seconds = ["Ti"], 3, 1.0
    unknown = [v for v in variants if v not in TIMM_NAMES]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(TIMM_NAMES)}")

    cores = timing.available_cores()
    skip = "timm comparison skipped (--no-timm)" if args.no_timm else timm_missing()
    print(f"CPU: {timing.cpu_model()}, {cores} cores available; "
          f"python {platform.python_version()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {timing.load_average()} (before)")
    if skip:
        print(skip)
    print(f"batch {args.batch}, 224px, 1000 classes, float32; {args.reps} alternating rounds of "
          f"{args.seconds} s per contender, each in its own process; medians in images/s\n")

    rows = []
    for variant in variants:
        common = dict(variant=variant, batch=args.batch, threads=cores)
        groups = {
            "forward": [("vitjax forward", dict(who="vitjax", what="forward", mode="dense"))],
            "step": [("vitjax step dense", dict(who="vitjax", what="step", mode="dense"))],
        }
        if not skip:
            groups["forward"].append(("timm forward", dict(who="timm", what="forward")))
            groups["step"].append(("timm step", dict(who="timm", what="step")))
        groups["step"] += [(f"vitjax step {mode}", dict(who="vitjax", what="step", mode=mode))
                           for mode in ("static", "attention")]
        samples = {}
        for group in groups.values():
            workers = []
            try:
                for name, spec in group:
                    workers.append(worker(name, **common, **spec))
                    print(f"  DeiT-{variant} {name}: ready, {workers[-1].info['versions']}",
                          flush=True)
                samples.update(timing.alternate(workers, args.reps, args.seconds))
            finally:
                for w in workers:
                    w.close()
        rows.append((variant, samples))
    print(f"\n{timing.load_average()} (after)\n")

    header = f"{'model':<8}{'what':<24}{'vitjax img/s':>14}{'timm img/s':>12}{'ratio':>9}"
    print(header)
    print("-" * len(header))
    for variant, samples in rows:
        for ours, theirs, label in (("vitjax forward", "timm forward", "forward"),
                                    ("vitjax step dense", "timm step", "train step")):
            ref = f"{'-':>12}"
            if theirs in samples:
                ref = (f"{statistics.median(samples[theirs]):12.1f}"
                       f"{timing.median_ratio(samples[ours], samples[theirs]):9.2f}")
            print(f"DeiT-{variant:<3}{label:<24}{statistics.median(samples[ours]):14.1f}{ref}")
        for mode in ("static", "attention"):
            masked = samples[f"vitjax step {mode}"]
            ratio = timing.median_ratio(masked, samples["vitjax step dense"])
            print(f"DeiT-{variant:<3}{'masked step (' + mode + ')':<24}"
                  f"{statistics.median(masked):14.1f}{'(vs dense)':>12}{ratio:9.2f}")
    print("\nratio: median over rounds of (vitjax / timm) throughput, or of (masked / dense "
          "vitjax step); higher is faster. Goals: >= 1.0 vs timm, >= 0.9 masked vs dense.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
