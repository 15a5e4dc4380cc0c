"""Trains the dense digits ViT that the embedded default compresses, and ships it in timm's format.

    python tools/make_digits_reference.py [--steps 2000] [--workdir /tmp/digits_reference] \
        [--out vitjax/assets/digits_vit.safetensors]

The model is configs/digits.py's (32 px, 4 px patches, embed 96, depth 4, 4 heads, MLP 384),
trained as a plain dense classifier (no policy sampling) on the pipeline's own train stream and
augmentation, so the digits pipeline starts from a converged model the way a user starts from
official DeiT weights. The hold-out split (30 images per class, excluded from training, the
search's evaluation set) is the validation set every choice here was made on; the test split is
only reported. The file is written with `save_timm` (a timm state dict in safetensors), and
configs/digits.py loads it through `config.init.checkpoint`, the conversion path a DeiT
checkpoint takes. Resumable: rerunning the command continues from the workdir's checkpoints.
BUILD_NOTES.md has the command, run time and accuracy of the shipped file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "vitjax", "assets", "digits_vit.safetensors")


def digits_config():
    path = os.path.join(ROOT, "configs", "digits.py")
    spec = importlib.util.spec_from_file_location("vitjax_config_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def reference_config(steps: int, lr: float, seed: int):
    """configs/digits.py's model, data and augmentation; a dense training recipe."""
    config = digits_config()
    config.init.checkpoint = ""  # trained from scratch: this *is* the checkpoint
    config.seed = seed
    train = config.train
    train.sample_policies = False
    train.target_gmacs = None
    train.steps = steps
    train.lr = lr
    train.warmup_steps = max(steps // 20, 1)
    train.min_lr = 1e-5
    train.drop_path = 0.1
    train.label_smoothing = 0.1
    train.seed = seed
    train.score_every = 0  # no policy sampling: nothing is scored while training
    train.log_every = 100
    train.eval_every = 200
    train.ckpt_every = 200
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/digits_reference")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--resume-overrides", default="",
                        help="resume a run with these train keys changed, e.g. 'steps'")
    args = parser.parse_args(argv)

    import jax
    from absl import logging
    from etils import epath

    logging.set_verbosity(logging.INFO)  # the trainer's progress and evaluation lines

    from vitjax.interop import load_timm, save_timm
    from vitjax.stages.context import Context
    from vitjax.stages.pretrain import StepBatches
    from vitjax.training import train

    config = reference_config(args.steps, args.lr, args.seed)
    config.train.resume_overrides = args.resume_overrides
    ctx = Context(config, epath.Path(os.path.abspath(args.workdir)))
    datasets = ctx.datasets
    started = time.perf_counter()
    result = train(config, args.workdir, model=ctx.model(train=True),
                   train_batches=StepBatches(datasets),
                   eval_sets={name: ctx.eval_batches(name) for name in datasets.eval_names},
                   mesh=ctx.mesh, num_classes=datasets.num_classes)
    if result.preempted:
        print("stopped early; rerun the same command to resume", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    params = jax.device_get(result.params)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # The digits statistics (not ImageNet's) go into the header, so loading it needs no flag.
    save_timm(ctx.model_config, params, args.out, preprocessing=ctx.preprocessing)
    # Read it back through the path the pipeline takes, so the shipped file is the one measured.
    from vitjax.evaluate import evaluate

    _, loaded = load_timm(args.out, num_heads=ctx.model_config.num_heads)
    accuracy = {name: evaluate(ctx.model(), loaded, None, ctx.eval_batches(name)(),
                               ctx.mesh)["accuracy"] for name in datasets.eval_names}
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB) after {args.steps} "
          f"steps in {seconds / 60:.1f} min; "
          + ", ".join(f"{name} accuracy {acc:.2%}" for name, acc in accuracy.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
