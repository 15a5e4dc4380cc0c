"""Reading and writing flat name -> array dictionaries: `.pth`/`.pt`/`.bin`, `.safetensors`, `.npz`.

Everything here is framework-neutral: tensors come back as numpy arrays (floating point as
float32), so the converters never see torch. torch is imported only to read or write a pickle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitjax.fileio import atomic_path

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
NPZ_SUFFIX = ".npz"
READABLE_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX, NPZ_SUFFIX)

# Training checkpoints nest the weights; the first of these keys that holds a mapping wins
# ('model' before 'model_ema': the official DeiT files keep the evaluated weights under 'model').
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
# DistributedDataParallel / DataParallel save every name with this prefix.
_PARALLEL_PREFIX = "module."


def import_torch(purpose: str):
    """torch, or an ImportError that says what needed it and how to get it."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs PyTorch, which is not installed: `pip install torch` (CPU build is "
            "enough), or convert the file to .safetensors where torch is available"
        ) from err
    return torch


def to_numpy(value: Any) -> np.ndarray:
    """numpy view of a numpy/jax/torch array; half-precision floats widen to float32."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype.itemsize < 4:
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
        if array.dtype != np.float64:
            array = array.astype(np.float32, copy=False)
    return array


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """Flat name -> numpy array dict from a checkpoint object.

    Accepts {'model': sd} / {'state_dict': sd} wrappers (nested any depth) and strips the
    'module.' prefix that (Distributed)DataParallel adds.
    """
    while isinstance(obj, Mapping) and not any(_is_array(v) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"checkpoint holds no tensors at the top level and none of the wrappers "
                f"{list(_WRAPPER_KEYS)}; its keys are {sorted(map(str, obj))[:10]}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a mapping of name -> tensor, got {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        if not _is_array(value):
            raise ValueError(
                f"checkpoint entry {name!r} is a {type(value).__name__}, not a tensor; pass the "
                "model's state dict"
            )
        name = str(name)
        if name.startswith(_PARALLEL_PREFIX):
            name = name[len(_PARALLEL_PREFIX):]
        state[name] = to_numpy(value)
    return state


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    # The numpy framework returns bfloat16 through ml_dtypes; to_numpy widens it.
    with safe_open(str(path), framework="numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def _read_torch(path: Path) -> Any:
    import argparse

    torch = import_torch(f"reading {path.name}")
    # weights_only keeps unpickling from running code; training checkpoints (DeiT's main.py)
    # also pickle their argparse.Namespace, which is harmless data.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError here
            raise ValueError(
                f"cannot read {path} as a PyTorch checkpoint: {str(err).splitlines()[0]}"
            ) from err


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat name -> numpy array dict from a file path or an in-memory mapping."""
    if isinstance(source, Mapping):
        return unwrap_state_dict(source)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in READABLE_SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its extension; expected one of "
            f"{', '.join(READABLE_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if suffix in TORCH_SUFFIXES:
        return unwrap_state_dict(_read_torch(path))
    try:
        if suffix == SAFETENSORS_SUFFIX:
            raw = _read_safetensors(path)
        else:
            with np.load(path, allow_pickle=False) as archive:
                raw = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    except Exception as err:  # safetensors raises its own SafetensorError on a bad header
        raise ValueError(f"cannot read {path}: {err}") from err
    return unwrap_state_dict(raw)


def write_arrays(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a flat dict atomically as .safetensors, .npz or (with torch) .pth/.pt/.bin.

    `metadata` goes into the safetensors header, or into the .npz as `__metadata__<key>` string
    entries; a torch pickle cannot carry it.
    """
    # Not pathlib: it would fold a bucket's "gs://" into "gs:/".
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    arrays = {name: np.ascontiguousarray(value) for name, value in arrays.items()}
    writer: Callable[[str], None]
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import save_file

        writer = lambda temp: save_file(arrays, str(temp), metadata=dict(metadata or {}))
    elif suffix == NPZ_SUFFIX:
        extra = {f"__metadata__{k}": np.asarray(v) for k, v in (metadata or {}).items()}
        writer = lambda temp: np.savez(temp, **arrays, **extra)
    elif suffix in TORCH_SUFFIXES:
        torch = import_torch(f"writing {os.path.basename(path)}")
        # Copies: arrays viewed from jax buffers are read-only, which torch warns about.
        tensors = {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}
        writer = lambda temp: torch.save(tensors, str(temp))
    else:
        raise ValueError(
            f"cannot write {str(path)!r}: unknown extension; use one of "
            f"{', '.join(READABLE_SUFFIXES)}"
        )
    with atomic_path(path) as temp:
        writer(temp)
