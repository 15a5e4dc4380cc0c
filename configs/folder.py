"""Any folder of images, one subfolder per class: DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg.

    python -m vitjax.main --config=configs/folder.py:root=/data/flowers,image_size=224 \
        --workdir=runs/flowers

Classes come from the data: the class subfolders of DIR/train (sorted names are the label ids;
val/ may lack a class but must not add one). The model is DeiT-Ti/16 at `image_size` (a
multiple of the patch size), trained from scratch with the DeiT recipe for `epochs` passes over
DIR/train, unless --config.init.checkpoint points at DeiT/timm weights. The search's hold-out
is up to 10 images per class of train/, kept out of training. How well it does depends on the
folder; the run's report.md says what it reached.

Argument: comma-separated key=value pairs (or just the root path):
  root        the folder holding train/ and val/ (required; also --config.data.root=...)
  image_size  input resolution, default 224
  variant     model, default 'Ti/16' (e.g. 'S/16', 'Ti/8', 'mu/4' for a quick trial)
  epochs      training length in passes over train/, default 100
  batch_size  global batch, default 128
  train, val  split folder names, default 'train' and 'val'

With root in the argument the class count, the hold-out size and the number of steps are read
from the folder here; set only through --config.data.root, config.model.num_classes stays -1
("from the data") and train.steps at 10000. Images that cannot be decoded stop the run with
their path; --config.data.skip_bad_images=True leaves them out (and logs how many).
"""

import ml_collections

from vitjax.data.config import deit_augment_config, folder_data_config, folder_image_counts
from vitjax.training.config import (
    default_distributed_config,
    default_mesh_config,
    default_train_config,
)

_DEFAULTS = dict(
    root="", image_size="224", variant="Ti/16", epochs="100", batch_size="128",
    train="train", val="val",
)


def _parse(arg: str | None) -> dict[str, str]:
    args = dict(_DEFAULTS)
    for part in (arg or "").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:  # a bare path
            key, value = "root", part
        if key not in _DEFAULTS:
            raise ValueError(
                f"configs/folder.py: unknown argument {key!r}; expected key=value pairs with "
                f"keys {sorted(_DEFAULTS)}"
            )
        args[key] = value
    return args


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg)
    image_size, batch_size = int(args["image_size"]), int(args["batch_size"])
    counts = folder_image_counts(args["root"], args["train"])
    known = bool(counts) and min(counts.values()) > 0

    config = ml_collections.ConfigDict()
    config.stages = "pretrain,score,criteria"
    config.seed = 0
    # The FLOPs budget T as a fraction of the dense model (0.6: the paper's "40% reduction").
    config.target_flops_fraction = 0.6

    config.model = ml_collections.ConfigDict(dict(
        variant=args["variant"],
        num_classes=len(counts) if known else -1,  # -1: the number of classes of the data
        image_size=image_size,
        distilled=False,
        dtype="float32",  # compute dtype; 'bfloat16' on accelerators
        remat=False,  # recompute block activations in the backward pass (saves memory)
        remat_policy="full",  # with remat: 'full' recomputes all, 'dots' keeps matmul outputs
        attention="auto",  # 'auto' | 'xla' | 'cudnn' | 'explicit' (see vitjax.models.vit)
    ))
    # Start from converted timm/DeiT weights instead of from scratch (path to .pth/.safetensors).
    config.init = ml_collections.ConfigDict(dict(
        checkpoint="",
        # What a timm state dict expects: "imagenet" (mean/std) or "inception" ([-1, 1]); .npz
        # and vitjax files carry it. A mismatch with config.data.mean/std stops the run.
        preprocessing="", check_preprocessing=True))

    holdout = min(10, max(1, min(counts.values()) // 5)) if known else 10
    config.data = folder_data_config(
        args["root"],
        train_split=args["train"],
        eval_split=args["val"],
        image_size=image_size,
        holdout_per_class=holdout,
        exclude_holdout_from_train=True,
    )
    if known:
        config.data.num_classes = len(counts)
    config.augment = deit_augment_config()

    config.train = default_train_config()
    train_images = sum(counts.values()) - holdout * len(counts) if known else 0
    steps_per_epoch = max(1, train_images // batch_size)
    config.train.steps = int(args["epochs"]) * steps_per_epoch if known else 10_000
    config.train.batch_size = batch_size
    config.train.eval_batch_size = batch_size
    config.train.lr = 5e-4
    config.train.lr_base_batch = 512  # DeiT: lr 5e-4 per 512 images
    config.train.warmup_steps = (
        min(5 * steps_per_epoch, config.train.steps // 10) if known else 500
    )
    config.train.drop_path = 0.1
    config.train.target_tol = 0.1
    config.train.token_mode = "attention"
    config.train.score_every = max(250, config.train.steps // 20)
    config.train.log_every = 100
    config.train.eval_every = max(500, config.train.steps // 10)
    config.train.ckpt_every = 1000
    config.mesh = default_mesh_config()
    config.distributed = default_distributed_config()

    # HSIC scoring (Sec. 3.2), as configs/digits.py: the authors' released kernel choice.
    config.score = ml_collections.ConfigDict(dict(preset="authors_code", batch_size=256))
    return config
