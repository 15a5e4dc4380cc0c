"""Checkpoint interop: timm / official DeiT / DynamicViT PyTorch weights, and vitjax's own files.

torch is optional: it is imported only to read or write a `.pth` pickle.
"""

from vitjax.interop.files import read_state_dict
from vitjax.interop.native import is_native, load_native, save_native
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
