"""Input pipeline: sources (digits, image folders, TFDS), DeiT preprocessing and augmentation,
per-process sharding and device prefetch. Entry point: `make_datasets(config.data, ...)`."""

from vitjax.data.config import (
    default_data_config,
    deit_augment_config,
    digits_data_config,
    folder_data_config,
    imagenet_data_config,
    light_augment_config,
    no_augment_config,
)
from vitjax.data.digits import digits_splits
from vitjax.data.mixup import mix_batch, mixup_cutmix, smooth_labels
from vitjax.data.pipeline import Datasets, class_balanced_sample, make_datasets
from vitjax.data.sharding import global_batch, prefetch_to_device, process_slice
from vitjax.data.sources import DatasetNotFoundError

__all__ = [
    "Datasets",
    "DatasetNotFoundError",
    "class_balanced_sample",
    "deit_augment_config",
    "default_data_config",
    "digits_data_config",
    "digits_splits",
    "folder_data_config",
    "global_batch",
    "imagenet_data_config",
    "light_augment_config",
    "make_datasets",
    "mix_batch",
    "mixup_cutmix",
    "no_augment_config",
    "prefetch_to_device",
    "process_slice",
    "smooth_labels",
]
