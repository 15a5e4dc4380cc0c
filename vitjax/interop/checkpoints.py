"""One entry point for every checkpoint vitjax reads: its own files, timm / DeiT state dicts,
and the JAX world's AugReg / big_vision .npz files, with the input normalisation each expects.

`load_checkpoint(path)` tells the format from the file's contents, converts through that
format's table (vitjax.interop.timm, vitjax.interop.npz) and reports the preprocessing:
AugReg and big_vision models are trained on pixels in [-1, 1] (mean = std = 0.5, stated by
those code bases); a timm state dict does not say, so ImageNet mean/std (DeiT, DeiT-III) is
assumed and marked as assumed unless the caller names it; a vitjax file carries what it was
converted with.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from vitjax.data.config import IMAGENET_MEAN, IMAGENET_STD
from vitjax.interop import native, npz
from vitjax.interop.timm import load_timm
from vitjax.models.config import ViTConfig

# timm's names for the two normalisations its pretrained configs use.
PREPROCESSING = {
    "imagenet": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "inception": npz.MINUS_ONE_TO_ONE,  # pixels scaled to [-1, 1]
}
VITJAX, TIMM = "vitjax", "timm"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A converted checkpoint: architecture, parameters (jax float32 / numpy for vitjax files),
    the format it came from, and the input normalisation it expects (None: unknown)."""

    config: ViTConfig
    params: dict[str, Any]
    source_format: str  # 'vitjax' | 'timm' | 'augreg' | 'big_vision'
    preprocessing: dict[str, Any] | None

    def describe_preprocessing(self) -> str:
        if self.preprocessing is None:
            return "input normalisation not recorded"
        p = self.preprocessing
        how = "" if p.get("known", True) else " (assumed: the checkpoint does not say)"
        return f"inputs normalised with mean {tuple(p['mean'])} std {tuple(p['std'])}{how}"


def preprocessing_named(name: str, *, known: bool = True, source: str = "") -> dict[str, Any]:
    if name not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {name!r}: expected one of "
                         f"{sorted(PREPROCESSING)} (imagenet: ImageNet mean/std; inception: "
                         "pixels scaled to [-1, 1])")
    stats = PREPROCESSING[name]
    return dict(mean=list(stats["mean"]), std=list(stats["std"]), known=known,
                source=source or name)


def _recorded_preprocessing(source) -> dict[str, Any] | None:
    """The normalisation a timm .safetensors written by `save_timm(..., preprocessing=)` states
    in its header (None: a file from elsewhere, which says nothing)."""
    if isinstance(source, Mapping) or not os.fspath(source).lower().endswith(".safetensors"):
        return None
    if "://" in os.fspath(source):
        return None  # a remote file: the loader copies it; its header is not read here
    stored = native.read_preprocessing(source)
    if stored is None:
        return None
    return dict(mean=list(stored["mean"]), std=list(stored["std"]), known=True,
                source="recorded in the file")


def checkpoint_format(source: str | os.PathLike | Mapping[str, Any]) -> str:
    """'vitjax', 'augreg', 'big_vision' or 'timm' (anything else: the timm loader says why)."""
    if isinstance(source, Mapping):
        try:
            return npz.NpzCheckpoint(source).layout
        except ValueError:
            return TIMM
    if "://" not in os.fspath(source) and native.is_native(source):
        return VITJAX
    if os.fspath(source).lower().endswith(".npz"):
        try:
            with npz.open_npz(source) as ckpt:
                return ckpt.layout
        except ValueError:
            return TIMM  # an .npz timm state dict
    return TIMM


def load_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    variant: str | None = None,
    strict: bool = True,
    image_size: int | None = None,
    num_classes: int | None = None,
    preprocessing: str | None = None,
    **overrides: Any,
) -> Checkpoint:
    """Any supported checkpoint as a `Checkpoint`.

    variant / num_heads (an override): timm state dicts only (they do not store the heads;
    the .npz formats do, and an override must agree). image_size / num_classes: resample the
    position embedding / replace the head (timm and .npz). preprocessing: 'imagenet' or
    'inception' states what a timm checkpoint expects (default: ImageNet, marked assumed).
    """
    kind = checkpoint_format(source)
    if kind == VITJAX:
        config, params = native.load_native(source)
        return Checkpoint(config, params, VITJAX, native.read_preprocessing(source))
    if kind == TIMM:
        model, params = load_timm(source, variant=variant, strict=strict, image_size=image_size,
                                  num_classes=num_classes, **overrides)
        recorded = None if preprocessing is not None else _recorded_preprocessing(source)
        if recorded is not None:
            return Checkpoint(model.config, params, TIMM, recorded)
        stated = preprocessing is not None
        stats = preprocessing_named(preprocessing or "imagenet", known=stated,
                                    source=preprocessing or "assumed for a timm state dict")
        return Checkpoint(model.config, params, TIMM, stats)
    if variant is not None:
        raise ValueError(f"variant= is for timm state dicts; a {kind} .npz stores its "
                         "architecture (pass fields such as num_heads= to check them)")
    model, params = npz.load_npz(source, strict=strict, image_size=image_size,
                                 num_classes=num_classes, **overrides)
    stats = preprocessing_named(preprocessing or "inception", source=preprocessing or kind)
    return Checkpoint(model.config, params, kind, stats)
