"""Measured speedup of pruned DeiT-S / DeiT-B over the dense model, against the FLOPs ratio.

    python benchmarks/pruned_speedup.py --quick        # DeiT-S, batch 8, 3 runtimes (~10 min)
    python benchmarks/pruned_speedup.py                # DeiT-S, batches 1 and 8
    python benchmarks/pruned_speedup.py --models=S,B --batches=1,8,64 --round=0,8,16,64 \\
        --reps=7 --seconds=2                           # everything (hours on 2 cores)
    python benchmarks/pruned_speedup.py --runtimes=xla --token-modes=static --targets=0.6

For each model, runtime (XLA float32 via jax.jit, onnxruntime, LiteRT) and batch size, the
dense model and pruned models at 37% and 60% fewer FLOPs (GMACs) are timed, each in its own
process, taking turns (dense, pruned, dense, pruned, ...; see vitjax/bench/timing.py). Printed
per pruned model: the FLOPs ratio (dense / pruned GMACs), the measured speedup (median over
rounds of pruned / dense images per second) and their quotient (1.0: every FLOP saved turned
into time saved).

Pruned models come from `vitjax.pruning.prune_params` on randomly initialised weights (speed
does not depend on the values) with identity ranks. Token modes: 'static' (fixed positions) and
'attention' (each image keeps its top-k tokens by class attention: includes the top-k itself).
Policies are shaped like the paper's learned DeiT-B policy (Table 3, Sec. 4.4: head and neuron
pruning mostly in shallow layers, token pruning mostly in deep layers; the per-layer numbers are
only plotted in the paper, so the shape is reproduced qualitatively), scaled by bisection to the
FLOPs target. `--shape=uniform` uses equal ratios in every layer instead. `--round=8,16,64`
adds models whose kept neurons and tokens are rounded to those multiples within the same FLOPs
budget (vitjax.pruning.round_policy_to_multiple), timed in the same rounds as the unrounded one.

ONNX and TFLite files are built once per configuration into --workdir (reused by later runs;
--rebuild to redo). TFLite files have a fixed batch size, one file per batch. Timings taken on a
loaded machine are not figures: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

try:
    import vitjax  # noqa: F401
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from vitjax.bench import timing  # noqa: E402
from vitjax.models import ViTConfig  # noqa: E402
from vitjax.pruning import Policy, count_flops  # noqa: E402

RUNTIMES = ("xla", "ort", "litert")
SCRIPT = os.path.abspath(__file__)


# ----------------------------------------------------------------------------------- policies


def _profile(depth: int, shape: str) -> np.ndarray:
    """[3, L] ratios at scale 1 (neuron, head, token); the scale is set by bisection."""
    t = np.linspace(0.0, 1.0, depth)
    if shape == "paper":
        return np.stack([0.6 * (1.0 - 0.5 * t), 0.5 * (1.0 - t), 0.3 * t])
    if shape == "uniform":
        return np.stack([np.full(depth, 1.0), np.full(depth, 1.0), np.full(depth, 0.25)])
    raise ValueError(f"unknown policy shape {shape!r}: 'paper' or 'uniform'")


def shaped_policy(config: ViTConfig, reduction: float, shape: str = "paper") -> Policy:
    """The policy of the given shape with the fewest pruning that removes `reduction` of the
    dense GMACs (largest GMACs <= target, by bisection on the scale)."""
    target = (1.0 - reduction) * count_flops(config).total
    profile = _profile(config.depth, shape)
    caps = np.array([1.0, 1.0, 0.95])[:, None]

    def policy_at(scale):
        return Policy.from_vector(np.minimum(scale * profile, caps).reshape(-1))

    lo, hi = 0.0, float(1.0 / profile[profile > 0].min())
    if count_flops(config, policy_at(hi)).total > target:
        raise ValueError(f"a {shape!r} policy cannot remove {reduction:.0%} of the FLOPs")
    for _ in range(50):
        mid = (lo + hi) / 2
        if count_flops(config, policy_at(mid)).total > target:
            lo = mid
        else:
            hi = mid
    return policy_at(hi)


# ------------------------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class Variant:
    """A pruned model; None in a Spec stands for the dense model."""

    reduction: float  # fraction of the dense GMACs removed
    token_mode: str  # 'static' | 'attention'
    multiple: int = 0  # round kept neurons/tokens to this multiple (0: no rounding)
    shape: str = "paper"

    @property
    def label(self) -> str:
        rounding = f" round{self.multiple}" if self.multiple else ""
        return f"-{self.reduction:.0%} {self.token_mode}{rounding}"


@dataclasses.dataclass(frozen=True)
class Spec:
    model: str  # 'S' | 'B'
    runtime: str
    batch: int
    variant: Variant | None
    threads: int
    workdir: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        data = json.loads(text)
        variant = data.pop("variant")
        return cls(**data, variant=Variant(**variant) if variant else None)

    @property
    def name(self) -> str:
        return "dense" if self.variant is None else self.variant.label

    def artifact(self) -> str | None:
        """Path of the ONNX / TFLite file this contender runs (None for XLA)."""
        if self.runtime == "xla":
            return None
        key = json.dumps([self.model, dataclasses.asdict(self.variant) if self.variant else None,
                          self.batch if self.runtime == "litert" else "any"])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        suffix = ".onnx" if self.runtime == "ort" else ".tflite"
        return os.path.join(self.workdir, f"deit_{self.model}_{digest}{suffix}")


def dense_config(model: str) -> ViTConfig:
    return ViTConfig.from_variant(f"{model}/16", num_classes=1000, image_size=224)


def variant_policy(config: ViTConfig, variant: Variant) -> Policy:
    policy = shaped_policy(config, variant.reduction, variant.shape)
    if variant.multiple:
        from vitjax.pruning import round_policy_to_multiple

        budget = (1.0 - variant.reduction) * count_flops(config).total
        policy = round_policy_to_multiple(config, policy, variant.multiple, budget)
    return policy


def build_model(spec: Spec):
    """(ViT, params) of the contender, randomly initialised (seed 0) and pruned."""
    import jax

    from vitjax.models import ViT, init_params
    from vitjax.pruning import identity_ranks
    from vitjax.pruning.prune import prune_params

    config = dense_config(spec.model)
    params = init_params(ViT(config), jax.random.key(0))
    if spec.variant is None:
        return ViT(config), params
    policy = variant_policy(config, spec.variant)
    pruned, pruned_params = prune_params(
        config, params, policy, identity_ranks(config), spec.variant.token_mode
    )
    return ViT(pruned), pruned_params


def images_for(spec: Spec) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((spec.batch, 224, 224, 3), np.float32)


# ----------------------------------------------------------------------- child process modes


def build_artifact(spec: Spec) -> None:
    """--build: write the ONNX / TFLite file of a contender (a process of its own, so the
    converter's memory is gone before anything is timed)."""
    from vitjax.export import export_onnx, export_tflite

    model, params = build_model(spec)
    if spec.runtime == "ort":
        export_onnx(model, params, spec.artifact())
    else:
        export_tflite(model, params, spec.artifact(), batch=spec.batch)


def run_worker(spec: Spec) -> None:
    """--worker: time one contender (see vitjax.bench.timing.serve)."""
    images = images_for(spec)
    if spec.runtime == "xla":
        import jax

        model, params = build_model(spec)
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
        params, images = jax.device_put((params, images))  # not a host copy per call
        run_once = lambda: forward(params, images).block_until_ready()  # noqa: E731
    elif spec.runtime == "ort":
        from vitjax.export.onnx import INPUT_NAME, onnx_session

        session = onnx_session(spec.artifact(), threads=spec.threads)
        feed = {INPUT_NAME: images}
        run_once = lambda: session.run(None, feed)  # noqa: E731
    else:
        from vitjax.export.tflite import tflite_interpreter

        interpreter = tflite_interpreter(spec.artifact(), threads=spec.threads)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
        run_once = interpreter.invoke
    timing.serve(run_once, spec.batch)


# -------------------------------------------------------------------------------------- parent


def ensure_artifact(spec: Spec, rebuild: bool) -> None:
    path = spec.artifact()
    if path is None or (os.path.exists(path) and not rebuild):
        return
    os.makedirs(spec.workdir, exist_ok=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, SCRIPT, "--build", spec.to_json()],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"building {path} failed:\n{result.stderr[-4000:]}")
    size = os.path.getsize(path) / 2**20
    print(f"  built {os.path.basename(path)} (DeiT-{spec.model} {spec.name}, {spec.runtime}, "
          f"{size:.0f} MiB) in {time.perf_counter() - start:.0f} s", flush=True)


def worker_for(spec: Spec) -> timing.Worker:
    return timing.Worker(spec.name, [sys.executable, SCRIPT, "--worker", spec.to_json()])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="S", help="comma-separated: S, B")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="xla, ort, litert")
    parser.add_argument("--targets", default="0.37,0.60", help="FLOPs reductions")
    parser.add_argument("--token-modes", default="static,attention")
    parser.add_argument("--round", default="0", help="multiples for kept neurons/tokens; 0: none")
    parser.add_argument("--shape", default="paper", choices=["paper", "uniform"])
    parser.add_argument("--reps", type=int, default=5, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="run time per turn")
    parser.add_argument("--threads", type=int, default=timing.available_cores(),
                        help="intra-op threads for onnxruntime and LiteRT (XLA uses every core)")
    parser.add_argument("--workdir", default=os.path.join("/tmp", "vitjax_pruned_speedup"))
    parser.add_argument("--rebuild", action="store_true", help="rebuild ONNX/TFLite files")
    parser.add_argument("--quick", action="store_true",
                        help="DeiT-S, batch 8, 3 rounds of 0.5 s (proves the script works)")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        build_artifact(Spec.from_json(args.build))
        return 0
    if args.worker:
        run_worker(Spec.from_json(args.worker))
        return 0

    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    models, runtimes = split(args.models), split(args.runtimes)
    batches = [int(b) for b in split(args.batches)]
    targets = [float(t) for t in split(args.targets)]
    modes, multiples = split(args.token_modes), [int(m) for m in split(args.round)]
    if args.quick:
        models, batches, args.reps, args.seconds = ["S"], [8], 3, 0.5
    if unknown := sorted(set(runtimes) - set(RUNTIMES)):
        parser.error(f"unknown runtimes {unknown}; choose from {list(RUNTIMES)}")
    if unknown := sorted(set(models) - {"S", "B"}):
        parser.error(f"unknown models {unknown}; choose from S, B")

    print(f"CPU: {timing.cpu_model()}, {timing.available_cores()} cores; python "
          f"{platform.python_version()}; {timing.load_average()} (before)")
    print(f"{args.reps} alternating rounds of {args.seconds} s per contender; onnxruntime/LiteRT "
          f"threads {args.threads}; float32, 224px, 1000 classes; policy shape {args.shape!r}\n")
    for model in models:
        config = dense_config(model)
        dense_gmacs = count_flops(config).total
        for reduction in targets:
            for multiple in multiples:
                variant = Variant(reduction, "static", multiple, args.shape)
                keep = variant_policy(config, variant).keep_counts(config)
                print(f"DeiT-{model} {variant.label}: "
                      f"{count_flops(config, variant_policy(config, variant)).total:.2f} of "
                      f"{dense_gmacs:.2f} GMACs; heads {list(map(int, keep.head))}, neurons "
                      f"{list(map(int, keep.neuron))}, tokens {list(map(int, keep.token))}")
    print()

    rows = []
    for model in models:
        config = dense_config(model)
        dense_gmacs = count_flops(config).total
        for runtime in runtimes:
            for batch in batches:
                dense = Spec(model, runtime, batch, None, args.threads, args.workdir)
                groups = [
                    [dataclasses.replace(dense, variant=Variant(r, mode, m, args.shape))
                     for m in multiples]
                    for r in targets for mode in modes
                ]
                for spec in [dense, *(s for g in groups for s in g)]:
                    ensure_artifact(spec, args.rebuild)
                print(f"timing DeiT-{model} {runtime} batch {batch} ...", flush=True)
                with worker_for(dense) as dense_worker:
                    for group in groups:
                        workers = [worker_for(s) for s in group]
                        try:
                            samples = timing.alternate([dense_worker, *workers], args.reps,
                                                       args.seconds)
                        finally:
                            for worker in workers:
                                worker.close()
                        for spec in group:
                            gmacs = count_flops(config, variant_policy(config, spec.variant))
                            flops_ratio = dense_gmacs / gmacs.total
                            speedup = timing.median_ratio(samples[spec.name], samples["dense"])
                            rows.append((model, runtime, batch, spec.name, gmacs.total,
                                         flops_ratio, np.median(samples["dense"]),
                                         np.median(samples[spec.name]), speedup))
    print(f"\n{timing.load_average()} (after)\n")
    header = (f"{'model':<7}{'runtime':<8}{'batch':>5}  {'pruned model':<26}{'GMACs':>7}"
              f"{'FLOPs x':>9}{'dense/s':>9}{'pruned/s':>10}{'speedup':>9}{'quotient':>10}")
    print(header)
    print("-" * len(header))
    for model, runtime, batch, name, gmacs, flops_ratio, dense_ips, ips, speedup in rows:
        print(f"DeiT-{model:<2}{runtime:<8}{batch:>5}  {name:<26}{gmacs:7.2f}{flops_ratio:9.2f}"
              f"{dense_ips:9.1f}{ips:10.1f}{speedup:9.2f}{speedup / flops_ratio:10.2f}")
    print("\nFLOPs x: dense / pruned GMACs. speedup: median over rounds of pruned / dense "
          "images per second, measured in alternating separate processes. quotient: speedup / "
          "FLOPs x (1.0 = the FLOPs reduction fully became time).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
