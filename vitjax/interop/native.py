"""vitjax's own weight file: the flat Flax params tree plus the ViTConfig JSON that built it.

Format: a `.safetensors` file (preferred; `.npz` also works) whose tensor names are the
'/'-joined Flax paths ('blocks_0/attn/qkv/kernel', shapes exactly as in the params tree) and
whose header metadata holds {'format': 'vitjax', 'vitjax_config': ViTConfig JSON}. In an `.npz`
the metadata are string entries named '__metadata__format' and '__metadata__vitjax_config'.
Unlike a timm state dict it also stores physically pruned models (per-layer sizes live in the
config). Readable without vitjax: any safetensors reader plus json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitjax.interop import files
from vitjax.models.config import ViTConfig

FORMAT = "vitjax"
_CONFIG_KEY = "vitjax_config"
# JSON {'mean': [...], 'std': [...], 'known': bool, 'source': str}: the input normalisation the
# weights expect (vitjax.interop.checkpoints); absent in files written before it existed.
PREPROCESSING_KEY = "vitjax_preprocessing"
_NPZ_META = "__metadata__"
NATIVE_SUFFIXES = (files.SAFETENSORS_SUFFIX, files.NPZ_SUFFIX)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for name, value in params.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{path}/"))
        else:
            flat[path] = np.asarray(value)
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _read_metadata(path: Path) -> dict[str, str]:
    suffix = path.suffix.lower()
    try:
        if suffix == files.SAFETENSORS_SUFFIX:
            return files.read_safetensors_metadata(path)
        if suffix == files.NPZ_SUFFIX:
            with np.load(path, allow_pickle=False) as archive:
                return {
                    name[len(_NPZ_META):]: str(archive[name])
                    for name in archive.files
                    if name.startswith(_NPZ_META)
                }
    except Exception as err:  # a corrupt header: let the caller's reader report it
        raise ValueError(f"cannot read {path}: {err}") from err
    return {}


def is_native(path: str | os.PathLike) -> bool:
    """True for a file written by save_native (checked by content, not by name)."""
    path = Path(path)
    return path.is_file() and _read_metadata(path).get("format") == FORMAT


def save_native(
    path: str | os.PathLike, config: ViTConfig, params: Mapping[str, Any],
    preprocessing: Mapping[str, Any] | None = None,
) -> None:
    """Writes params (+ config, + the input normalisation they expect) as .safetensors or .npz;
    the file appears only when complete."""
    if Path(path).suffix.lower() not in NATIVE_SUFFIXES:
        raise ValueError(
            f"vitjax weights are written as {' or '.join(NATIVE_SUFFIXES)}, not {str(path)!r}"
        )
    if set(params) == {"params"}:
        params = params["params"]
    flat = {k: v.astype(np.float32) for k, v in flatten_params(params).items()}
    metadata = {"format": FORMAT, _CONFIG_KEY: config.to_json()}
    if preprocessing is not None:
        metadata[PREPROCESSING_KEY] = json.dumps(dict(preprocessing))
    files.write_arrays(path, flat, metadata=metadata)


def read_preprocessing(path: str | os.PathLike) -> dict[str, Any] | None:
    """The input normalisation stored by save_native, or None where the file has none."""
    text = _read_metadata(Path(path)).get(PREPROCESSING_KEY)
    return None if text is None else json.loads(text)


def load_native(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, Any]]:
    """(config, params with numpy leaves) from a file written by save_native."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    metadata = _read_metadata(path)
    if metadata.get("format") != FORMAT or _CONFIG_KEY not in metadata:
        raise ValueError(
            f"{path} is not a vitjax weight file (no '{_CONFIG_KEY}' metadata); for a timm / "
            "DeiT checkpoint use vitjax.interop.load_timm"
        )
    config = ViTConfig.from_json(metadata[_CONFIG_KEY])
    flat = files.read_state_dict(path)
    flat = {k: v for k, v in flat.items() if not k.startswith(_NPZ_META)}
    return config, unflatten_params(flat)
