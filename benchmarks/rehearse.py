"""Rehearsal: every shipped config through every stage it lists, at its own model shapes and
dtype, on generated data, a few steps each, as a user runs it.

    python benchmarks/rehearse.py                        # every rehearsal below, DeiT-B last
    python benchmarks/rehearse.py digits folder deit_ti  # some of them
    python benchmarks/rehearse.py --list                 # what each one runs
    python benchmarks/rehearse.py --workdir /tmp/rehearsal --keep deit_s

Each rehearsal is one `python -m vitjax.main --config=configs/<file>[:<argument>] --workdir=...`
in a fresh process, with `--config.x=y` overrides that shrink only what makes a run long:
training, finetuning and comparison steps, batch sizes, search populations and iterations,
criteria ratios, hold-out and scoring sizes, and the report's timing (DeiT: batch 1 and 4, one
round, instead of batch 1 and 64, five rounds). The model (variant, embedding, depth, heads, MLP,
patch, image size, tokens, dtype: bfloat16 at 224 px and 197 tokens for DeiT), the stages, the
augmentation, the recipe's other settings and the export formats stay as shipped. A rehearsal
passes when the command exits 0 without a traceback and every stage it lists has written its
DONE.json (the study: every seed's stages and study.md).

Data: digits configs read scikit-learn's bundled digits. The DeiT configs and configs/folder.py
read a generated image folder (random PNGs of other sizes than the model's, a class folder with
a subfolder), 4 classes, so the DeiT rehearsals also set config.model.num_classes=4: the
classifier head is the one shape that differs from ImageNet's, because a class-balanced hold-out
of ImageNet's 1000 classes would be 1000 images per evaluation. The TFDS input of the DeiT
configs is rehearsed by tests/test_stages.py on tfds.testing.mock_data. The from-pretrained
recipe (`deit_ti:init`) compresses a generated DeiT-Ti checkpoint in timm's format (random
weights, 4 classes, 224 px; written beside the images), so its frozen teacher and the baseline
stage run at real shapes too.

Prints each command, its progress lines, its time, and a table at the end; writes
<workdir>/rehearsal.json. Exit status 1 when any rehearsal failed. On two busy CPU cores the
digits ones take a few minutes each and DeiT-B the longest (BUILD_NOTES.md has measured times).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The configs this process loads (to list a rehearsal's stages, to write the init checkpoint)
# must come from the same checkout as the runs, which get PYTHONPATH=REPO; not from another
# installed vitjax (a config of this checkout may import what that one lacks).
sys.path.insert(0, str(REPO))
FOLDER_CLASSES = 4

# The expensive knobs, shrunk; nothing here changes a model's shapes or dtype.
_SEARCH = {"search.population": 3, "search.iterations": 1, "search.restarts": 1,
           "search.starts": 1, "search.candidates": 32, "search.maxiter": 20,
           "ablation.population": 2, "ablation.iterations": 1,
           "criteria.ratios": "(0.0,0.5)", "finetune.steps": 2, "compare.steps": 2}
DIGITS = {"train.steps": 3, "train.warmup_steps": 1, "train.batch_size": 32,
          "train.eval_batch_size": 128, "train.log_every": 1, "train.eval_every": 0,
          "train.ckpt_every": 3, "train.score_every": 2, "score.batch_size": 32, **_SEARCH}
# The report times every model at batch 1 and 64 by default: for DeiT-B on a CPU that alone
# outlasted the other stages, so DeiT rehearsals time batch 1 and 4, one round.
DEIT = {"train.steps": 2, "train.warmup_steps": 1, "train.batch_size": 2,
        "train.eval_batch_size": 4, "train.log_every": 1, "train.eval_every": 0,
        "train.ckpt_every": 2, "train.score_every": 1, "score.batch_size": 4,
        "report.batch_sizes": "(1,4)", "report.rounds": 1, **_SEARCH}
# A DeiT config reading the generated folder instead of ImageNet (see the module docstring).
# The `init=` rehearsal's "trained" DeiT-Ti: random weights in timm's format, with the folder's
# classes (the teacher must fit the student: classes, image size, patch).
CHECKPOINT = "deit_tiny_patch16_224_4classes.safetensors"
FOLDER_DATA = {"data.source": "folder", "data.root": "{folder}", "data.name": "",
               "data.eval_split": "val", "data.num_classes": FOLDER_CLASSES,
               "model.num_classes": FOLDER_CLASSES, "data.holdout_per_class": 1}


@dataclasses.dataclass(frozen=True)
class Rehearsal:
    name: str
    config: str  # file in configs/
    argument: str = ""  # the config file's argument (after ':')
    overrides: tuple[tuple[str, object], ...] = ()
    # A combination the up-front checks must refuse: passes when the command stops before any
    # stage with one `error:` line containing this text (and no traceback).
    refused: str = ""

    def command(self, workdir: str, folder: str, extra: dict) -> list[str]:
        spec = f"configs/{self.config}" + (f":{self.argument}" if self.argument else "")
        spec = _fill(spec, folder)
        flags = [f"--config.{k}={_fill(str(v), folder, workdir=workdir)}"
                 for k, v in (*self.overrides, *extra.items())]
        return [sys.executable, "-m", "vitjax.main", f"--config={spec}",
                f"--workdir={workdir}", *flags]


def checkpoint_path(folder: str) -> str:
    """Where the generated DeiT-Ti checkpoint of the `init=` rehearsal lies: beside the images."""
    return str(Path(folder).parent / CHECKPOINT)


def _fill(text: str, folder: str, **more) -> str:
    """An argument or override with {folder}, {checkpoint} (and {workdir}) filled in."""
    return text.format(folder=folder, checkpoint=checkpoint_path(folder), **more)


def _items(*blocks: dict, **more) -> tuple[tuple[str, object], ...]:
    merged: dict = {}
    for block in blocks:
        merged.update(block)
    merged.update({k.replace("__", "."): v for k, v in more.items()})
    return tuple(merged.items())


REHEARSALS = {r.name: r for r in (
    Rehearsal("digits", "digits.py", overrides=_items(DIGITS)),
    Rehearsal("digits:flops=0.5,compare,distilled", "digits.py", "flops=0.5,compare,distilled",
              _items(DIGITS)),
    # At 40% DynamicViT cannot reach the pruned model's FLOPs on the 4-block model with a
    # distillation token: refused before pretraining, not after every other stage.
    Rehearsal("digits:flops=0.4,compare,distilled", "digits.py", "flops=0.4,compare,distilled",
              _items(DIGITS), refused="DynamicViT with locations (1, 2, 3)"),
    # expand=2 compares with runs/digits; here with the digits rehearsal's workdir.
    Rehearsal("digits:expand=2", "digits.py", "expand=2",
              _items(DIGITS, expand__baseline_workdir="{workdir}/../digits")),
    Rehearsal("digits_study", "digits_study.py", overrides=_items(DIGITS, study__seeds="(0,1)")),
    Rehearsal("folder", "folder.py", "root={folder},epochs=1,batch_size=4",
              _items(DEIT, train__steps=2, train__batch_size=4, data__holdout_per_class=1)),
    Rehearsal("deit_ti", "deit_ti.py", overrides=_items(DEIT, FOLDER_DATA)),
    Rehearsal("deit_ti:distilled,compare", "deit_ti.py", "distilled,compare",
              _items(DEIT, FOLDER_DATA)),
    Rehearsal("deit_ti:expand=2", "deit_ti.py", "expand=2", _items(DEIT, FOLDER_DATA)),
    # The main road: compress a trained DeiT (frozen teacher, then the no-supernet baseline).
    Rehearsal("deit_ti:init", "deit_ti.py", "init={checkpoint}", _items(DEIT, FOLDER_DATA)),
    Rehearsal("deit_s:flops=0.4", "deit_s.py", "flops=0.4", _items(DEIT, FOLDER_DATA)),
    Rehearsal("deit_b", "deit_b.py", overrides=_items(DEIT, FOLDER_DATA)),
)}


def make_image_folder(root: str | os.PathLike, classes: int = FOLDER_CLASSES, train: int = 4,
                      val: int = 1, seed: int = 0) -> str:
    """root/{train,val}/class_<c>/ with random PNGs of varied sizes; class 0 keeps half of its
    training images in a subfolder (read like timm's ImageFolder). Returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            for i in range(count):
                nested = split == "train" and c == 0 and i % 2
                folder = Path(root, split, f"class_{c}", "more" if nested else "")
                folder.mkdir(parents=True, exist_ok=True)
                height, width = rng.integers(24, 72, size=2)
                # A class-dependent tint, so a few steps can already tell classes apart.
                pixels = rng.integers(0, 160, (height, width, 3)) + 30 * (np.arange(3) == c % 3)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.png")
    return str(root)


def make_timm_checkpoint(path: str | os.PathLike, variant: str = "Ti/16",
                         num_classes: int = FOLDER_CLASSES, seed: int = 0) -> str:
    """A timm state dict of `variant` with random weights and `num_classes` classes at the
    variant's image size (224 px), as `init=` expects a trained DeiT. Returns path."""
    import jax

    from vitjax.interop import save_timm
    from vitjax.models import ViT, ViTConfig, init_params

    config = ViTConfig.from_variant(variant, num_classes=num_classes)
    save_timm(config, jax.device_get(init_params(ViT(config), jax.random.key(seed))), str(path))
    return str(path)


def _load_config(rehearsal: Rehearsal, folder: str):
    path = REPO / "configs" / rehearsal.config
    spec = importlib.util.spec_from_file_location(f"rehearse_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(_fill(rehearsal.argument, folder) or None)


def expected_files(rehearsal: Rehearsal, folder: str, workdir: Path) -> list[Path]:
    """The DONE.json of every stage the config lists (per seed for a study)."""
    config = _load_config(rehearsal, folder)
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    if config.get("study") is None:
        return [workdir / s / "DONE.json" for s in stages]
    seeds = (0, 1)  # what REHEARSALS sets
    return [workdir / f"seed_{seed}" / s / "DONE.json" for seed in seeds for s in stages] + \
        [workdir / "study.md"]


def run_one(rehearsal: Rehearsal, workdir: Path, folder: str, extra: dict,
            timeout: float | None = None, echo=print) -> dict:
    """Runs one rehearsal in a fresh process; returns {name, ok, seconds, problem}."""
    workdir.mkdir(parents=True, exist_ok=True)
    uses = rehearsal.argument + "".join(str(v) for _, v in rehearsal.overrides)
    if "{checkpoint}" in uses and not Path(checkpoint_path(folder)).exists():
        make_timm_checkpoint(checkpoint_path(folder))
    command = rehearsal.command(str(workdir), folder, extra)
    echo(f"$ {' '.join(command[1:])}")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    problem = ""
    with open(workdir / "output.log", "a") as log:  # a resumed run appends
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines = []
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                lines.append(line)
                if line.startswith(("[vitjax]", "error:", "Traceback")):
                    echo(f"    {line.rstrip()}")
                if timeout and time.perf_counter() - started > timeout:
                    process.kill()
                    problem = f"killed after {timeout:.0f} s"
                    break
        finally:
            code = process.wait()
    seconds = time.perf_counter() - started
    text = "".join(lines)
    if not problem and code != 0:
        last = [line for line in lines if line.strip()][-1:] or ["(no output)"]
        problem = f"exit status {code}: {last[0].strip()[:300]}"
        if code < 0:  # e.g. SIGKILL from the kernel's OOM killer: the output does not say
            hint = "; out of memory? see dmesg" if -code == signal.SIGKILL else ""
            problem = f"killed by {signal.Signals(-code).name}{hint} (last line: " \
                f"{last[0].strip()[:300]})"
    elif "Traceback (most recent call last)" in text:
        problem = "a traceback in the output"
    if rehearsal.refused and problem.startswith("exit status"):
        errors = [line for line in lines if line.startswith("error:")]
        begun = [p.parent.name for p in workdir.glob("*/STARTED.json")]
        problem = ("" if len(errors) == 1 and rehearsal.refused in errors[0] and not begun
                   and "Traceback (most recent call last)" not in text
                   else f"{problem}; expected one 'error:' line with {rehearsal.refused!r} "
                   f"before any stage (stages started: {begun})")
    elif rehearsal.refused and not problem:
        problem = f"ran, but should have been refused up front ({rehearsal.refused!r})"
    elif not problem:
        missing = [str(p.relative_to(workdir)) for p in expected_files(rehearsal, folder, workdir)
                   if not p.exists()]
        if missing:
            problem = f"stages did not finish: {missing}"
    return {"name": rehearsal.name, "ok": not problem, "seconds": round(seconds, 1),
            "problem": problem, "log": str(workdir / "output.log")}


def _workdir_name(name: str) -> str:
    return name.replace(":", "_").replace(",", "_").replace("=", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="rehearsals to run (default: all); the name "
                        "of a config file that is not a rehearsal's name (deit_s) runs every "
                        "rehearsal of that file")
    parser.add_argument("--list", action="store_true", help="print the rehearsals and exit")
    parser.add_argument("--workdir", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workdirs of passed runs")
    parser.add_argument("--resume", action="store_true", help="rerun in the existing workdirs "
                        "(finished stages are skipped, as a user's rerun does)")
    parser.add_argument("--timeout", type=float, help="seconds per rehearsal before it is killed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more --config.KEY=VALUE for every rehearsal (e.g. mesh.data=1)")
    args = parser.parse_args(argv)
    if args.list:
        for r in REHEARSALS.values():
            print(f"{r.name}: configs/{r.config}{':' + r.argument if r.argument else ''} "
                  + " ".join(f"{k}={v}" for k, v in r.overrides))
        return 0
    chosen = []
    for name in args.names or list(REHEARSALS):
        matches = [REHEARSALS[name]] if name in REHEARSALS else [
            r for r in REHEARSALS.values() if r.config == f"{name}.py"]
        if not matches:
            parser.error(f"unknown rehearsal {name!r}; --list shows them")
        chosen += [r for r in matches if r not in chosen]
    extra = dict(item.split("=", 1) for item in args.set)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="vitjax_rehearsal_")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    folder = make_image_folder(base / "images") if not (base / "images").exists() \
        else str(base / "images")
    print(f"rehearsing {len(chosen)} config(s) in {base} (generated images in {folder})",
          flush=True)
    results = []
    for index, rehearsal in enumerate(chosen, 1):
        print(f"\n[{index}/{len(chosen)}] {rehearsal.name}", flush=True)
        workdir = base / _workdir_name(rehearsal.name)
        if workdir.exists() and not args.resume:
            shutil.rmtree(workdir)
        result = run_one(rehearsal, workdir, folder, extra, args.timeout,
                         echo=lambda s: print(s, flush=True))
        results.append(result)
        status = "passed" if result["ok"] else f"FAILED ({result['problem']})"
        print(f"[{index}/{len(chosen)}] {rehearsal.name}: {status} in "
              f"{result['seconds'] / 60:.1f} min", flush=True)
        if result["ok"] and not args.keep:
            shutil.rmtree(workdir)
    (base / "rehearsal.json").write_text(json.dumps(results, indent=1))
    print("\n| rehearsal | result | minutes |\n|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {'passed' if r['ok'] else 'FAILED: ' + r['problem']} | "
              f"{r['seconds'] / 60:.1f} |")
    print(f"\n{sum(r['ok'] for r in results)} of {len(results)} passed; "
          f"{base / 'rehearsal.json'}", flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
