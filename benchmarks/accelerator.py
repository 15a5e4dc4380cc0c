"""The accelerator benchmark: one command, one table, one JSON file.

    python benchmarks/accelerator.py                       # one GPU (sized for 8 min on an H100)
    python benchmarks/accelerator.py --smoke               # any machine, tiny shapes, seconds
    python benchmarks/accelerator.py --sections=timm,pruned --reps=7 --json=/tmp/acc.json

Sections (all in bfloat16 compute with float32 parameters and optimizer state, unless --dtype):
  timm    vitjax dense vs timm (torch AMP bfloat16, timm's fused scaled_dot_product_attention),
          forward and training step (AdamW), DeiT-S and DeiT-B at batch 256, each in its own
          process; plus the masked supernet step (a new random policy each step, static and
          per-image token modes) against the dense step of the same vitjax process.
  pruned  dense vs physically pruned DeiT-B forward, paper-shaped policies at -37% and -60%
          GMACs (as benchmarks/pruned_speedup.py builds them; static token positions), at
          batch 1, 64 and 256, one process per model serving the three batch sizes.
  hsic    HSIC scoring of DeiT-B at batch 256 (`vitjax.scoring.score_model`: the forward pass
          and every head's and neuron's score).
  memory  per-device memory of the DeiT-B supernet training step at 128 images, without remat,
          with remat ('full') and with remat keeping the matmul outputs ('dots'), from the
          compiled step's memory_analysis().

Contenders run in separate processes and take turns (vitjax/bench/timing.py), with
XLA_PYTHON_CLIENT_PREALLOCATE=false so that several JAX processes share one GPU. Needs only
jax, flax, optax, numpy (and torch + timm for the timm rows): nothing imported here or in the
workers pulls in TensorFlow, clu or ml_collections (tests/test_accelerator.py checks). A failing
section is reported in the table and the JSON; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
# Several JAX processes on one GPU: each takes memory as it needs it instead of 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, HERE)  # dense_vs_timm, pruned_speedup
try:
    import vitjax  # noqa: F401
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))

import dense_vs_timm  # noqa: E402
import pruned_speedup  # noqa: E402

from vitjax import fileio  # noqa: E402
from vitjax.bench import timing  # noqa: E402
from vitjax.models import ViTConfig  # noqa: E402
from vitjax.pruning import count_flops  # noqa: E402

SECTIONS = ("timm", "pruned", "hsic", "memory")
GIB = 2**30


@dataclasses.dataclass
class Plan:
    """Shapes and timing of one run: the real one or --smoke."""

    variants: dict[str, dict]  # name -> ViTConfig dict
    pruned_model: str
    batch: int  # timm section
    pruned_batches: tuple[int, ...]
    hsic_batch: int
    memory_batch: int
    reductions: tuple[float, ...] = (0.37, 0.60)


def real_plan() -> Plan:
    deit = {v: ViTConfig.from_variant(f"{v}/16", num_classes=1000, image_size=224).to_dict()
            for v in ("S", "B")}
    return Plan(variants=deit, pruned_model="B", batch=256, pruned_batches=(1, 64, 256),
                hsic_batch=256, memory_batch=128)


def smoke_plan() -> Plan:
    tiny = ViTConfig(num_classes=10, image_size=32, patch_size=8, embed_dim=32, depth=4,
                     num_heads=2, mlp_dim=64).to_dict()
    return Plan(variants={"S": tiny}, pruned_model="S", batch=4, pruned_batches=(2,),
                hsic_batch=8, memory_batch=4)


# ------------------------------------------------------------------------------ worker side


def _jax_info() -> dict:
    import jax

    device = jax.devices()[0]
    return {"versions": f"jax {jax.__version__} ({jax.default_backend()}, "
                        f"{jax.device_count()} x {device.device_kind})",
            "device": device.device_kind}


def _attention_used(spec: dict, config: ViTConfig) -> str:
    import jax.numpy as jnp

    from vitjax.models.vit import resolve_attention

    return resolve_attention(spec["attention"], jnp.dtype(spec["dtype"]), config.dim_per_head)


def vitjax_worker(spec: dict) -> None:
    """Tasks 'forward', 'step dense', 'step static', 'step attention' of one model."""
    config = spec["config"]
    common = dict(dtype=spec["dtype"], attention=spec["attention"], config=config)
    tasks = {"forward": (dense_vs_timm.vitjax_contender(
        "", spec["batch"], "forward", "dense", **common), spec["batch"])}
    for mode in ("dense", "static", "attention"):
        tasks[f"step {mode}"] = (dense_vs_timm.vitjax_contender(
            "", spec["batch"], "step", mode, **common), spec["batch"])
    attention = _attention_used(spec, ViTConfig.from_dict(config))
    timing.serve_tasks(tasks, **_jax_info(), attention=attention)


def timm_worker(spec: dict) -> None:
    config, variant = spec["config"], spec["variant"]
    tasks = {what: (dense_vs_timm.timm_contender(variant, spec["batch"], what, spec["threads"],
                                                 amp=spec["dtype"] == "bfloat16", config=config),
                    spec["batch"])
             for what in ("forward", "step")}
    timing.serve_tasks(tasks, **dense_vs_timm.timm_info())


def pruned_worker(spec: dict) -> None:
    """One (dense or pruned) model's forward pass at each batch size: tasks 'b{batch}'."""
    import jax
    import jax.numpy as jnp

    from vitjax.models import ViT, init_params
    from vitjax.pruning import identity_ranks
    from vitjax.pruning.prune import prune_params

    config = ViTConfig.from_dict(spec["config"])
    params = init_params(ViT(config), jax.random.key(0))
    if spec["reduction"]:
        variant = pruned_speedup.Variant(spec["reduction"], "static")
        policy = pruned_speedup.variant_policy(config, variant)
        config, params = prune_params(config, params, policy, identity_ranks(config), "static")
    model = ViT(config, dtype=jnp.dtype(spec["dtype"]), attention=spec["attention"])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    params = jax.device_put(params)
    tasks = {}
    for batch in spec["batches"]:
        size = config.image_size
        images = jax.random.normal(jax.random.key(batch), (batch, size, size, config.in_chans))
        tasks[f"b{batch}"] = (lambda x=images: forward(params, x).block_until_ready(), batch)
    timing.serve_tasks(tasks, **_jax_info(), attention=_attention_used(spec, config))


def hsic_worker(spec: dict) -> None:
    """Task 'score': score_model of the model at the batch (forward pass + every score)."""
    import jax
    import jax.numpy as jnp

    from vitjax.models import ViT, init_params
    from vitjax.scoring import score_model

    config = ViTConfig.from_dict(spec["config"])
    model = ViT(config, dtype=jnp.dtype(spec["dtype"]), attention=spec["attention"])
    params = init_params(model, jax.random.key(0))
    size = config.image_size
    images = jax.random.normal(jax.random.key(1), (spec["batch"], size, size, config.in_chans))

    def run_once():
        jax.block_until_ready(score_model(model, params, images))

    timing.serve_tasks({"score": (run_once, spec["batch"])}, warmup=1, **_jax_info(),
                       attention=_attention_used(spec, config))


def memory_worker(spec: dict) -> None:
    """Reports (no tasks) the compiled supernet step's memory for each remat setting."""
    import jax
    import jax.numpy as jnp

    from vitjax.models import init_params
    from vitjax.pruning import KeepCounts

    config = ViTConfig.from_dict(spec["config"])
    batch, size = spec["batch"], config.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, config.in_chans), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    keep = KeepCounts(*(jax.ShapeDtypeStruct((config.depth,), jnp.int32) for _ in range(3)))
    results = {}
    for remat in ("", "full", "dots"):
        model = dense_vs_timm.vitjax_model(config, dtype=spec["dtype"],
                                           attention=spec["attention"], remat=remat)
        step, init_state = dense_vs_timm.vitjax_train_step(model, spec["mode"])
        abstract_state = jax.eval_shape(lambda m=model, init=init_state: init(init_params(
            m, jax.random.key(0))))
        mode_keep = None if spec["mode"] == "dense" else keep
        stats = step.lower(abstract_state, images, labels, mode_keep).compile().memory_analysis()
        # Donated state: outputs reuse the argument buffers (alias), not counted twice.
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
        results[remat or "none"] = {"arguments": stats.argument_size_in_bytes,
                                    "temp": stats.temp_size_in_bytes, "total": total}
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    timing.serve_tasks({}, **_jax_info(), memory=results, bytes_limit=limit,
                       attention=_attention_used(spec, config))


WORKERS = {"vitjax": vitjax_worker, "timm": timm_worker, "pruned": pruned_worker,
           "hsic": hsic_worker, "memory": memory_worker}


# ------------------------------------------------------------------------------ parent side


def start(name: str, **spec) -> timing.Worker:
    return timing.Worker(name, [sys.executable, SCRIPT, "--worker", json.dumps(spec)],
                         wait=False)


def ready(workers) -> None:
    for worker in workers:
        worker.wait_ready()


def close(workers) -> None:
    for worker in workers:
        worker.close()


def median(values) -> float:
    return float(statistics.median(values))


def section_timm(plan: Plan, args, timm_skip: str | None) -> list[dict]:
    rows = []
    for variant, config in plan.variants.items():
        common = dict(variant=variant, batch=plan.batch, config=config, dtype=args.dtype,
                      attention=args.attention, threads=timing.available_cores())
        workers = [start(f"vitjax DeiT-{variant}", kind="vitjax", **common)]
        if not timm_skip:
            workers.append(start(f"timm DeiT-{variant}", kind="timm", **common))
        try:
            ready(workers)
            ours = workers[0]
            print(f"  DeiT-{variant}: {', '.join(w.info['versions'] for w in workers)}; vitjax "
                  f"attention {ours.info['attention']}", flush=True)
            for what, ours_task, theirs_task in (("forward", "forward", "forward"),
                                                 ("train step", "step dense", "step")):
                tasks = [ours.task(ours_task, "ours")]
                if not timm_skip:
                    tasks.append(workers[1].task(theirs_task, "timm"))
                samples = timing.alternate(tasks, args.reps, args.seconds)
                row = {"section": "timm", "model": f"DeiT-{variant}", "what": what,
                       "batch": plan.batch, "vitjax_img_s": median(samples["ours"]),
                       "attention": ours.info["attention"], "device": ours.info["device"]}
                if not timm_skip:
                    row.update(timm_img_s=median(samples["timm"]),
                               ratio=timing.median_ratio(samples["ours"], samples["timm"]),
                               timm_fused_attn=workers[1].info["fused_attn"])
                rows.append(row)
            tasks = [ours.task(f"step {mode}", mode) for mode in ("dense", "static", "attention")]
            samples = timing.alternate(tasks, args.reps, args.seconds)
            for mode in ("static", "attention"):
                rows.append({"section": "masked", "model": f"DeiT-{variant}",
                             "what": f"masked step ({mode} tokens)", "batch": plan.batch,
                             "vitjax_img_s": median(samples[mode]),
                             "dense_img_s": median(samples["dense"]),
                             "ratio": timing.median_ratio(samples[mode], samples["dense"])})
        finally:
            close(workers)
    return rows


def section_pruned(plan: Plan, args) -> list[dict]:
    config_dict = plan.variants[plan.pruned_model]
    config = ViTConfig.from_dict(config_dict)
    dense_gmacs = count_flops(config).total
    names = {0.0: "dense", **{r: f"-{r:.0%}" for r in plan.reductions}}
    gmacs = {0.0: dense_gmacs}
    for r in plan.reductions:
        policy = pruned_speedup.variant_policy(config, pruned_speedup.Variant(r, "static"))
        gmacs[r] = count_flops(config, policy).total
    workers = {r: start(names[r], kind="pruned", config=config_dict, reduction=r,
                        batches=list(plan.pruned_batches), dtype=args.dtype,
                        attention=args.attention)
               for r in names}
    rows = []
    try:
        ready(workers.values())
        for batch in plan.pruned_batches:
            tasks = [w.task(f"b{batch}", names[r]) for r, w in workers.items()]
            samples = timing.alternate(tasks, args.reps, args.seconds)
            for r in plan.reductions:
                speedup = timing.median_ratio(samples[names[r]], samples["dense"])
                flops_x = dense_gmacs / gmacs[r]
                rows.append({"section": "pruned", "model": f"DeiT-{plan.pruned_model}",
                             "what": f"pruned {names[r]} GMACs", "batch": batch,
                             "gmacs": gmacs[r], "flops_x": flops_x,
                             "dense_img_s": median(samples["dense"]),
                             "vitjax_img_s": median(samples[names[r]]), "ratio": speedup,
                             "quotient": speedup / flops_x,
                             "device": workers[0.0].info["device"]})
    finally:
        close(workers.values())
    return rows


def section_hsic(plan: Plan, args) -> list[dict]:
    model = "B" if "B" in plan.variants else next(iter(plan.variants))
    worker = start("hsic", kind="hsic", config=plan.variants[model], batch=plan.hsic_batch,
                   dtype=args.dtype, attention=args.attention)
    try:
        task = worker.task("score", "score")
        samples = timing.alternate([task], max(args.reps, 1), 0.0)
        seconds = [plan.hsic_batch / rate for rate in samples["score"]]
        return [{"section": "hsic", "model": f"DeiT-{model}", "what": "HSIC scoring",
                 "batch": plan.hsic_batch, "seconds": median(seconds), "all_seconds": seconds,
                 "device": worker.info["device"]}]
    finally:
        worker.close()


def section_memory(plan: Plan, args) -> list[dict]:
    model = "B" if "B" in plan.variants else next(iter(plan.variants))
    worker = start("memory", kind="memory", config=plan.variants[model],
                   batch=plan.memory_batch, dtype=args.dtype, attention=args.attention,
                   mode=args.memory_mode)
    try:
        info = worker.wait_ready()
    finally:
        worker.close()
    return [{"section": "memory", "model": f"DeiT-{model}",
             "what": f"{args.memory_mode} train step, remat {remat}", "batch": plan.memory_batch,
             "total_gib": stats["total"] / GIB, "temp_gib": stats["temp"] / GIB,
             "arguments_gib": stats["arguments"] / GIB,
             "device_limit_gib": info["bytes_limit"] / GIB if info["bytes_limit"] else None,
             "device": info["device"]}
            for remat, stats in info["memory"].items()]


def format_row(row: dict) -> str:
    head = f"{row['model']:<8}{row['what']:<34}{row['batch']:>6}  "
    if "error" in row:
        return head + f"FAILED: {row['error']}"
    section = row["section"]
    if section == "timm":
        timm_part = (f"{row['timm_img_s']:>11.1f}{row['ratio']:>8.2f}" if "ratio" in row
                     else f"{'-':>11}{'-':>8}")
        return head + f"{row['vitjax_img_s']:>11.1f}{timm_part}  vs timm ({row['attention']})"
    if section == "masked":
        return head + (f"{row['vitjax_img_s']:>11.1f}{row['dense_img_s']:>11.1f}"
                       f"{row['ratio']:>8.2f}  vs dense step")
    if section == "pruned":
        return head + (f"{row['vitjax_img_s']:>11.1f}{row['dense_img_s']:>11.1f}"
                       f"{row['ratio']:>8.2f}  vs dense; FLOPs x {row['flops_x']:.2f}, "
                       f"quotient {row['quotient']:.2f}")
    if section == "hsic":
        return head + f"{row['seconds']:>11.3f} s per scoring (median)"
    limit, total = row["device_limit_gib"], row["total_gib"]
    fits = "" if limit is None else \
        f" of {limit:.1f} GiB ({'fits' if total < limit else 'does NOT fit'})"
    return head + f"{_size(total):>11} per device (temp {_size(row['temp_gib'])}){fits}"


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def print_table(rows: list[dict]) -> None:
    header = f"{'model':<8}{'what':<34}{'batch':>6}  {'img/s':>11}{'ref img/s':>11}{'ratio':>8}"
    print("\n" + header)
    print("-" * len(header))
    for row in rows:
        print(format_row(row))
    print("\nratio: median over alternating rounds of (vitjax / reference) images per second, "
          "each contender in its own process; reference = timm (torch AMP), the dense step, or "
          "the dense model. quotient: speedup / FLOPs ratio. Goals: >= 1.0 vs timm; masked "
          ">= 0.9 of dense; DeiT-B -60% >= 2.2x dense at batch 256.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one short round: proves the script works anywhere")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--attention", default="auto",
                        help="ViT.attention for every vitjax contender: auto, xla, cudnn, explicit")
    parser.add_argument("--memory-mode", default="attention", choices=["dense", "static",
                                                                        "attention"],
                        help="which training step the memory section compiles")
    parser.add_argument("--reps", type=int, default=5, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="run time per turn")
    parser.add_argument("--json", default="accelerator_benchmark.json", help="results file")
    parser.add_argument("--no-timm", action="store_true", help="leave out the timm contenders")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        WORKERS[spec["kind"]](spec)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.attention not in ("auto", "xla", "cudnn", "explicit"):
        parser.error(f"--attention={args.attention!r}: choose auto, xla, cudnn or explicit")
    plan = smoke_plan() if args.smoke else real_plan()
    if args.smoke:
        args.reps, args.seconds = 1, 0.05
    timm_skip = "timm rows skipped (--no-timm)" if args.no_timm else dense_vs_timm.timm_missing()

    started = time.perf_counter()
    print(f"host: {timing.cpu_model()}, {timing.available_cores()} cores; python "
          f"{platform.python_version()}; {timing.load_average()} (before)")
    print(f"{'smoke test: tiny shapes' if args.smoke else 'DeiT-S/B, 224 px'}; compute "
          f"{args.dtype}, parameters/optimizer float32; attention {args.attention!r}; "
          f"{args.reps} alternating rounds of {args.seconds} s per contender")
    if timm_skip and "timm" in sections:
        print(timm_skip)
    runners = {"timm": lambda: section_timm(plan, args, timm_skip),
               "pruned": lambda: section_pruned(plan, args),
               "hsic": lambda: section_hsic(plan, args),
               "memory": lambda: section_memory(plan, args)}
    rows, failed = [], []
    for name in sections:
        print(f"[{time.perf_counter() - started:6.0f} s] section {name} ...", flush=True)
        try:
            rows += runners[name]()
        except Exception as e:  # noqa: BLE001 - report the section as failed, run the others
            failed.append(name)
            message = str(e).strip().splitlines()
            print(f"section {name} failed:\n{traceback.format_exc()[-3000:]}", flush=True)
            rows.append({"section": name, "model": "-", "what": name, "batch": 0,
                         "error": message[-1] if message else type(e).__name__})
        result = {"smoke": args.smoke, "dtype": args.dtype, "attention": args.attention,
                  "reps": args.reps, "seconds": args.seconds, "host": timing.cpu_model(),
                  "failed": failed, "rows": rows,
                  "elapsed_s": round(time.perf_counter() - started, 1)}
        # After every section, atomically: a killed run keeps the last complete results.
        fileio.write_text(args.json, json.dumps(result, indent=1))
    print_table(rows)
    devices = sorted({r["device"] for r in rows if r.get("device")})
    print(f"\nJAX device(s): {', '.join(devices) or 'none reported'}")
    print(f"\n{timing.load_average()} (after); {time.perf_counter() - started:.0f} s in all; "
          f"results in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
