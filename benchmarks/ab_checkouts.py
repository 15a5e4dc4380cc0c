"""Is a model change faster? The dense vitjax forward or training step of two checkouts, A/B.

    git worktree add /tmp/base HEAD        # the code before your change
    python benchmarks/ab_checkouts.py --base=/tmp/base                       # training step
    python benchmarks/ab_checkouts.py --base=/tmp/base --what=forward --reps=7
    git worktree remove /tmp/base
    python benchmarks/ab_checkouts.py --base=. --xla-flags=--xla_cpu_use_onednn=true   # a flag

Each checkout runs in its own process with its own `PYTHONPATH` (the one importing `vitjax`
from `--base`, the other from `--new`, this checkout by default), the same contender as
`benchmarks/dense_vs_timm.py` (DeiT, 224px, 1000 classes, float32, AdamW with donated state for
the step), and the two take turns for --seconds per round (vitjax/bench/timing.py). It prints
each round's images/s and the median of per-round new/base ratios: a ratio inside the spread of
the rounds is no change. `--xla-flags` are added to XLA_FLAGS of the new side only (the base
keeps the caller's), so one checkout can be timed against itself with and without a compiler flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)


def checkout(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "vitjax", "__init__.py")):
        raise SystemExit(f"error: {path} is not a vitjax checkout (no vitjax/__init__.py); "
                         "make one with: git worktree add /tmp/base HEAD")
    return path


def _this_checkouts_timing():
    """The timing harness of this script's checkout, whatever checkout `vitjax` is imported
    from: the worker must speak the parent's protocol, and a base checkout may predate
    `vitjax.bench` (the harness lived in vitjax/export/ before). It imports only the standard
    library, so it is loaded from its file and registered under its name."""
    import importlib.util
    import types

    path = os.path.join(os.path.dirname(HERE), "vitjax", "bench", "timing.py")
    spec = importlib.util.spec_from_file_location("vitjax.bench.timing", path)
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    package = sys.modules.setdefault("vitjax.bench", types.ModuleType("vitjax.bench"))
    package.timing = timing
    sys.modules["vitjax.bench.timing"] = timing
    return timing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="checkout with the code before the change")
    parser.add_argument("--new", default=os.path.dirname(HERE), help="checkout with the change")
    parser.add_argument("--what", default="step", choices=["step", "forward"])
    parser.add_argument("--variant", default="S", help="Ti, S (or B)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--xla-flags", default=None, help="added to XLA_FLAGS of the new side only")
    parser.add_argument("--reps", type=int, default=9, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="run time per turn")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        timing = _this_checkouts_timing()
        sys.path.insert(0, HERE)
        import dense_vs_timm

        import vitjax

        run_once = dense_vs_timm.vitjax_contender(spec["variant"], spec["batch"], spec["what"],
                                                  "dense")
        timing.serve(run_once, spec["batch"], vitjax=os.path.dirname(os.path.dirname(
            vitjax.__file__)))
        return 0

    if not args.base:
        parser.error("--base is required: a checkout of the code before the change "
                     "(git worktree add /tmp/base HEAD)")
    paths = {"base": checkout(args.base), "new": checkout(args.new)}
    if paths["base"] == paths["new"] and args.xla_flags is None:
        parser.error("--base and --new are the same checkout (give --xla-flags to time a flag)")
    from vitjax.bench import timing

    spec = json.dumps({"variant": args.variant, "batch": args.batch, "what": args.what})
    print(f"DeiT-{args.variant} {args.what}, batch {args.batch}; {timing.load_average()} (before)")
    workers = []
    try:
        for name, path in paths.items():
            env = dict(os.environ, PYTHONPATH=path)
            if name == "new" and args.xla_flags is not None:
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
            workers.append(timing.Worker(name, [sys.executable, SCRIPT, "--worker", spec], env=env))
            print(f"  {name}: vitjax from {workers[-1].info['vitjax']}, "
                  f"XLA_FLAGS={env.get('XLA_FLAGS', '')!r}", flush=True)
        samples = timing.alternate(workers, args.reps, args.seconds)
    finally:
        for worker in workers:
            worker.close()
    for name in paths:
        print(f"  {name:<5} img/s per round: {' '.join(f'{x:.2f}' for x in samples[name])}")
    ratio = timing.median_ratio(samples["new"], samples["base"])
    print(f"new / base: {ratio:.3f} (median of per-round ratios); {timing.load_average()} (after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
