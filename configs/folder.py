"""Any folder of images, one subfolder per class: DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg.

    python -m vitjax.main --config=configs/folder.py:root=/data/flowers,image_size=224 \
        --workdir=runs/flowers

The whole compression pipeline, as the DeiT configs run it (pretrain, score, criteria, search,
ablation, prune, finetune, export, compare when asked, report), on your images. Classes come
from the data: the class subfolders of DIR/train (sorted names are the label ids; at least two;
val/ may lack a class but must not add one; images in subfolders of a class folder belong to
it, as in timm's ImageFolder). The model is DeiT-Ti/16 at `image_size` (a multiple of the patch
size), trained as a supernet from scratch with the DeiT recipe for `epochs` passes over
DIR/train, unless --config.init.checkpoint points at DeiT/timm weights; the pruned model is
finetuned with the same recipe. The search's hold-out is up to 10 images per class of train/,
kept out of training, and its objective is hold-out accuracy minus 0.05 x loss (few images tie
on accuracy). How well it does depends on the folder; the run's report.md says what it reached.

Argument: comma-separated key=value pairs (or just the root path):
  root        the folder holding train/ and val/ (required; also --config.data.root=...)
  image_size  input resolution, default 224
  variant     model, default 'Ti/16' (e.g. 'S/16', 'Ti/8', 'mu/4' for a quick trial)
  epochs      training length in passes over train/, default 100
  batch_size  global batch, default 128
  train, val  split folder names, default 'train' and 'val'
  flops       the FLOPs budget as a fraction of the dense model, default 0.6
  compare     1: also train DynamicViT, block pruning and block + token (default 0)

With root in the argument the class count, the hold-out size and the number of steps are read
from the folder here; set only through --config.data.root, config.model.num_classes stays -1
("from the data") and train.steps at 10000. Images that cannot be decoded stop the run with
their path; --config.data.skip_bad_images=True leaves them out (and logs how many).
"""

import ml_collections

from vitjax.configs import deit_imagenet_config
from vitjax.data.config import deit_augment_config, folder_data_config, folder_image_counts

_DEFAULTS = dict(
    root="", image_size="224", variant="Ti/16", epochs="100", batch_size="128",
    train="train", val="val", flops="0.6", compare="0",
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

    # Every stage and block of the DeiT configs (criteria, search, ablation, prune, finetune,
    # export, compare, report); the model, the data and the schedule are the folder's.
    config = deit_imagenet_config(args["variant"], target_flops_fraction=float(args["flops"]),
                                  compare=args["compare"] not in ("", "0", "false", "False"))
    config.model.update(
        num_classes=len(counts) if known else -1,  # -1: the number of classes of the data
        image_size=image_size,
        dtype="float32",  # compute dtype; 'bfloat16' on accelerators
        remat=False,  # recompute block activations in the backward pass (saves memory)
    )

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

    train = config.train  # the DeiT recipe (lr 5e-4 per 512 images, AdamW, cosine)
    train_images = sum(counts.values()) - holdout * len(counts) if known else 0
    steps_per_epoch = max(1, train_images // batch_size)
    train.steps = int(args["epochs"]) * steps_per_epoch if known else 10_000
    train.batch_size = batch_size
    train.eval_batch_size = batch_size
    train.warmup_steps = min(5 * steps_per_epoch, train.steps // 10) if known else 500
    train.score_every = max(250, train.steps // 20)
    train.log_every = 100
    train.eval_every = max(500, train.steps // 10)
    train.ckpt_every = 1000
    # The hold-out is at most 10 images per class: sub-networks near the budget often tie on
    # accuracy, and the loss breaks the ties (as configs/digits.py).
    config.search.update(objective="accuracy_minus_loss", loss_weight=0.05)
    config.score.batch_size = min(256, max(batch_size, 32))
    return config
