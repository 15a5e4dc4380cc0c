"""Input pipeline: sources (digits, image folders, TFDS), DeiT preprocessing and augmentation,
per-process sharding and device prefetch. Entry point: `make_datasets(config.data, ...)`.

The config presets and the digits loader import without TensorFlow; the pipeline names
(`make_datasets`, `mix_batch`, ...) load TensorFlow on first use (PEP 562), so `import
vitjax.data.digits` or a config file stays fast.
"""

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

_TENSORFLOW_EXPORTS = {
    "Datasets": "pipeline",
    "class_balanced_sample": "pipeline",
    "make_datasets": "pipeline",
    "MixConfig": "mixup",
    "mix_batch": "mixup",
    "mixup_cutmix": "mixup",
    "smooth_labels": "mixup",
    "prefetch_to_device": "sharding",
    "process_slice": "sharding",
    "DatasetNotFoundError": "sources",
}


def __getattr__(name):
    if name in _TENSORFLOW_EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"vitjax.data.{_TENSORFLOW_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vitjax.data' has no attribute {name!r}")


__all__ = [
    "deit_augment_config", "default_data_config", "digits_data_config", "digits_splits",
    "folder_data_config", "imagenet_data_config", "light_augment_config", "no_augment_config",
    *_TENSORFLOW_EXPORTS,
]
