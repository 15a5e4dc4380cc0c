"""The `config.data` and `config.augment` blocks that select and shape the input pipeline.

Experiment configs (configs/*.py) start from one of these and override fields, e.g.

    config.data = imagenet_data_config(data_dir='gs://bucket/tfds')
    config.augment = deit_augment_config()

Every field is read by `vitjax.data.make_datasets`; nothing else in the pipeline has defaults of
its own, so a config file fully describes what a run reads.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what an image folder may hold


def default_data_config() -> ml_collections.ConfigDict:
    """All `config.data` fields with their meaning; presets below override a few."""
    return ml_collections.ConfigDict(
        dict(
            source="digits",  # 'digits' | 'tfds' | 'folder'
            # --- tfds ---
            name="",  # TFDS dataset name, e.g. 'imagenet2012'
            # Optional fields are typed placeholders (None until set), so that command-line
            # overrides such as --config.data.data_dir=/data work.
            data_dir=config_dict.placeholder(str),  # None: $TFDS_DATA_DIR, ~/tensorflow_datasets
            # The manually downloaded archives (ImageNet tars); None: data_dir/downloads/manual
            manual_dir=config_dict.placeholder(str),
            prepare=False,  # True: run TFDS download_and_prepare (from manual_dir) if missing
            image_key="image",
            label_key="label",
            # --- folder: root/<split>/<class name>/*.jpg|jpeg|png|bmp|gif ---
            root="",
            # Leave out images that cannot be decoded (found by test-decoding every file once at
            # start-up, logged as "skipped N undecodable images"); False: the first one met
            # stops the run with its path.
            skip_bad_images=False,
            # --- all sources ---
            train_split="train",
            eval_split="test",  # what finetuning/evaluation reports on ('validation' for ImageNet)
            image_size=32,  # model input resolution
            channels=3,  # grey sources are repeated to this many channels
            num_classes=config_dict.placeholder(int),  # None: from the source; else checked
            mean=(0.3, 0.3, 0.3),  # in [0, 1] pixel units
            std=(0.4, 0.4, 0.4),
            eval_crop_pct=0.875,  # eval: resize shorter side to image_size / crop_pct, centre crop
            # Search hold-out: a class-balanced sample of the TRAIN split, deterministic by seed,
            # never overlapping eval_split. 0 disables it.
            holdout_per_class=10,
            exclude_holdout_from_train=True,  # False: the paper's ImageNet setting
            # TFDS only: the hold-out is drawn from the last `holdout_pool_fraction` of the split
            # (TFDS stores examples shuffled, so that tail is a random sample); excluding the
            # hold-out from training then sets that whole tail aside.
            holdout_pool_fraction=0.1,
            seed=0,  # shuffling, hold-out choice and per-example augmentation
            shuffle_buffer=16_384,  # TFDS only; index-based sources shuffle exactly
            cache_eval=True,  # keep preprocessed hold-out/eval images in host memory
            # An evaluation set whose float32 images fit in this many MiB is also kept on the
            # host after its first pass by the stages (searches make hundreds of passes).
            cache_eval_mb=256,
            # digits only
            test_fraction=0.2,
            num_parallel_calls=-1,  # -1: tf.data AUTOTUNE
            prefetch=2,  # host-side batches tf.data keeps ready
        )
    )


def digits_data_config(image_size: int = 32, **overrides) -> ml_collections.ConfigDict:
    """scikit-learn's bundled digits: the embedded, offline default."""
    config = default_data_config()
    config.update(
        dict(
            source="digits",
            image_size=image_size,
            num_classes=10,
            mean=(0.3,) * 3,
            std=(0.4,) * 3,
            eval_crop_pct=1.0,  # 8x8 digits touch the border; a centre crop would cut strokes
            holdout_per_class=10,
            exclude_holdout_from_train=True,
        )
    )
    config.update(overrides)
    return config


def imagenet_data_config(**overrides) -> ml_collections.ConfigDict:
    """ImageNet-1k through TFDS (`imagenet2012`), DeiT statistics, paper's 50/class hold-out."""
    config = default_data_config()
    config.update(
        dict(
            source="tfds",
            name="imagenet2012",
            train_split="train",
            eval_split="validation",
            image_size=224,
            num_classes=1000,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            eval_crop_pct=0.875,  # 224 / 256
            holdout_per_class=50,
            exclude_holdout_from_train=False,
            cache_eval=False,  # 50k images at 224px are 7.5 GB; cache per host only if it fits
        )
    )
    config.update(overrides)
    return config


def folder_data_config(root: str, **overrides) -> ml_collections.ConfigDict:
    """A folder of images `root/train/<class>/*.jpg`, `root/val/<class>/*.jpg` with ImageNet
    statistics; the class count comes from the folder (`num_classes` unset)."""
    config = imagenet_data_config(
        source="folder",
        name="",
        root=root,
        train_split="train",
        eval_split="val",
    )
    config.num_classes = None
    config.update(overrides)
    return config


def folder_image_counts(root: str, split: str = "train") -> dict[str, int] | None:
    """{class folder name: number of image files} of `root/split`, read without TensorFlow
    (configs/folder.py sizes the model and the schedule from it). None for a cloud URL or a
    missing folder: make_datasets then reads the classes itself, or says what is wrong."""
    split_dir = os.path.join(root, split)
    if not root or "://" in root or not os.path.isdir(split_dir):
        return None
    counts = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir():  # images in subfolders of a class folder count, as the reader's
            counts[entry.name] = 0
            for _, subfolders, files in os.walk(entry.path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                counts[entry.name] += sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in files)
    return counts


def deit_augment_config(**overrides) -> ml_collections.ConfigDict:
    """DeiT's training recipe (DeiT Table 9; the compression paper's Table 7).

    `mixup` and `cutmix` are the Beta-distribution alphas as in DeiT's code (its tables call
    them "prob."): each batch gets cutmix with probability `switch_prob`, mixup otherwise.
    """
    config = ml_collections.ConfigDict(
        dict(
            random_resized_crop=True,
            crop_scale=(0.08, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip=True,
            # timm-style string 'rand-m9-mstd0.5-inc1', or None/'' to disable.
            randaugment="rand-m9-mstd0.5-inc1",
            random_erasing=0.25,  # probability per image ('pixel' mode, one box)
            mixup=0.8,  # Beta alpha; 0 disables
            cutmix=1.0,  # Beta alpha; 0 disables
            mix_prob=1.0,  # probability that a batch is mixed at all
            switch_prob=0.5,  # cutmix vs mixup when both are on
            # (label smoothing is the loss's: config.train.label_smoothing)
        )
    )
    config.update(overrides)
    return config


def light_augment_config(**overrides) -> ml_collections.ConfigDict:
    """Mild augmentation for tiny datasets (digits): no flips (digits are not mirror-symmetric)."""
    config = deit_augment_config(
        crop_scale=(0.6, 1.0),
        flip=False,
        randaugment="",
        random_erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
    )
    config.update(overrides)
    return config


def no_augment_config() -> ml_collections.ConfigDict:
    """Training batches preprocessed exactly like evaluation batches."""
    return deit_augment_config(
        random_resized_crop=False,
        flip=False,
        randaugment="",
        random_erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
    )
