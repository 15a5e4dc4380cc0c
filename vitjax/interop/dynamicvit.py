"""Released DynamicViT (Rao et al. 2021) DeiT checkpoints -> vitjax DynamicViT parameters.

A DynamicViT state dict is a timm DeiT backbone (converted by vitjax.interop.timm) plus one
PredictorLG per stage under `score_predictor.{i}.`, mapped by the table below:

  score_predictor.i.in_conv.0   LayerNorm   -> predictor_i/in_norm  (weight/bias -> scale/bias)
  score_predictor.i.in_conv.1   Linear      -> predictor_i/in_fc    (weight [out, in] -> kernel
  score_predictor.i.out_conv.0  Linear      -> predictor_i/out_fc1   [in, out], bias -> bias)
  score_predictor.i.out_conv.2  Linear      -> predictor_i/out_fc2
  score_predictor.i.out_conv.4  Linear      -> predictor_i/out_fc3
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.dynamicvit import schedule
from vitjax.dynamicvit.model import DynamicViTConfig, Predictor
from vitjax.interop import files
from vitjax.interop.timm import params_from_timm
from vitjax.models.config import ViTConfig

PREDICTOR_PREFIX = "score_predictor."

# torch submodule of PredictorLG -> (Flax submodule, {torch tensor: (Flax leaf, transpose?)}).
_LINEAR = {"weight": ("kernel", True), "bias": ("bias", False)}
_LAYER_NORM = {"weight": ("scale", False), "bias": ("bias", False)}
_PREDICTOR_TABLE = {
    "in_conv.0": ("in_norm", _LAYER_NORM),
    "in_conv.1": ("in_fc", _LINEAR),
    "out_conv.0": ("out_fc1", _LINEAR),
    "out_conv.2": ("out_fc2", _LINEAR),
    "out_conv.4": ("out_fc3", _LINEAR),
}


def _predictor_from_torch(state: Mapping[str, np.ndarray], stage: int,
                          shapes: Mapping[str, Any]) -> dict[str, Any]:
    """Flax params of predictor `stage` from its `score_predictor.{stage}.*` tensors."""
    params: dict[str, Any] = {}
    for torch_module, (flax_module, leaves) in _PREDICTOR_TABLE.items():
        for torch_leaf, (flax_leaf, transpose) in leaves.items():
            name = f"{PREDICTOR_PREFIX}{stage}.{torch_module}.{torch_leaf}"
            if name not in state:
                raise ValueError(f"DynamicViT checkpoint has no {name!r}")
            value = np.asarray(state[name], np.float32)
            value = value.T if transpose else value
            expected = tuple(shapes[flax_module][flax_leaf].shape)
            if value.shape != expected:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(state[name].shape)}, which "
                    f"does not fit predictor_{stage}/{flax_module}/{flax_leaf} {expected}"
                )
            params.setdefault(flax_module, {})[flax_leaf] = value
    return params


def load_dynamicvit_torch(
    state_dict_or_path: str | os.PathLike | Mapping[str, Any],
    config: ViTConfig,
    dyn: DynamicViTConfig,
) -> dict[str, Any]:
    """Parameters of `DynamicViT(config, dyn)` from a released DynamicViT DeiT checkpoint.

    state_dict_or_path: a .pth/.safetensors/.npz path or a name -> tensor mapping; {'model': ...}
      wrappers and 'module.' prefixes are handled (vitjax.interop.files).
    config: the backbone's ViTConfig (num_heads is not stored in the checkpoint; DeiT-S is
      ViTConfig.from_variant('S/16')); dyn: its pruning locations and keep ratios (DynamicViT-S
      /0.7: DynamicViTConfig()). Neither the locations nor the ratios are stored in the file.
    Returns the parameter tree as jax float32 arrays; a missing, surplus or misshapen tensor
    raises a ValueError naming it.
    """
    schedule.validate(dyn.ratios, dyn.locations, config)
    state = files.read_state_dict(state_dict_or_path)
    backbone = {k: v for k, v in state.items() if not k.startswith(PREDICTOR_PREFIX)}
    predictor_state = {k: v for k, v in state.items() if k.startswith(PREDICTOR_PREFIX)}
    stages = sorted({int(k[len(PREDICTOR_PREFIX):].split(".", 1)[0]) for k in predictor_state})
    if stages != list(range(dyn.num_stages)):
        raise ValueError(
            f"the checkpoint has score predictors {stages} but DynamicViTConfig has "
            f"{dyn.num_stages} locations {dyn.locations}; pass the locations it was trained with"
        )
    expected = {
        f"{PREDICTOR_PREFIX}{stage}.{module}.{leaf}"
        for stage in stages for module, (_, leaves) in _PREDICTOR_TABLE.items() for leaf in leaves
    }
    unknown = sorted(set(predictor_state) - expected)
    if unknown:
        raise ValueError(f"unknown score predictor tensors in the checkpoint: {unknown}")

    params = params_from_timm(backbone, config)
    tokens = jax.ShapeDtypeStruct((1, config.num_patches, config.embed_dim), jnp.float32)
    shapes = jax.eval_shape(lambda x: Predictor().init(jax.random.key(0), x)["params"], tokens)
    for stage in stages:
        params[f"predictor_{stage}"] = _predictor_from_torch(predictor_state, stage, shapes)
    return jax.tree.map(jnp.asarray, params)
