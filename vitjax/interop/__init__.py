"""Checkpoint interop: timm / official DeiT / DynamicViT PyTorch weights, AugReg / big_vision
.npz files, and vitjax's own files (`load_checkpoint` reads any of them).

torch is optional: it is imported only to read or write a `.pth` pickle.
"""

from vitjax.interop.checkpoints import Checkpoint, checkpoint_format, load_checkpoint
from vitjax.interop.files import read_state_dict
from vitjax.interop.native import is_native, load_native, read_preprocessing, save_native
from vitjax.interop.npz import is_jax_npz, load_npz
from vitjax.interop.timm import (
    infer_config,
    load_timm,
    params_from_timm,
    parse_variant,
    resample_pos_embed,
    save_timm,
    timm_keys,
    timm_state_dict,
)

__all__ = [
    "load_checkpoint",
    "checkpoint_format",
    "Checkpoint",
    "load_npz",
    "is_jax_npz",
    "read_preprocessing",
    "load_timm",
    "save_timm",
    "infer_config",
    "parse_variant",
    "params_from_timm",
    "timm_state_dict",
    "timm_keys",
    "resample_pos_embed",
    "read_state_dict",
    "load_native",
    "save_native",
    "is_native",
]
