"""Config builders shared by the experiment files in configs/ (each file stays one call)."""

from __future__ import annotations

import ml_collections

from vitjax.data.config import deit_augment_config, imagenet_data_config
from vitjax.search.config import default_search_config
from vitjax.training.config import (
    default_distributed_config,
    default_mesh_config,
    deit_train_config,
)


def parse_arg(arg: str | None) -> dict:
    """'distilled,flops=0.4' (a config file's argument) -> deit_imagenet_config keywords."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        if item == "distilled":
            out["distilled"] = True
        elif item.startswith("flops="):
            out["target_flops_fraction"] = float(item.split("=", 1)[1])
        else:
            raise ValueError(f"config argument {item!r}: expected 'distilled' or 'flops=F'")
    return out


def prune_config(round_to: int = 0) -> ml_collections.ConfigDict:
    """`config.prune`: which policy to cut, and optional hardware-friendly rounding."""
    return ml_collections.ConfigDict(dict(
        policy="",  # a policy JSON file; empty: the search stage's best policy
        round_to=round_to,  # round kept neurons/tokens to multiples of this (0: off)
    ))


def finetune_config(**train_overrides) -> ml_collections.ConfigDict:
    """`config.finetune`: keys of config.train to override for finetuning the pruned model
    (same recipe by default, Sec. 4), plus logit distillation from the dense supernet."""
    return ml_collections.ConfigDict(dict(
        distill=0.0,  # weight of the KL to the dense supernet's logits; 0: off (the paper)
        temperature=1.0,  # distillation temperature
        **train_overrides,
    ))


def export_config() -> ml_collections.ConfigDict:
    """`config.export`: which deployable artifacts the export stage writes."""
    return ml_collections.ConfigDict(dict(
        # 'auto': jax.export always, ONNX and TFLite when the 'export' extra is installed; or a
        # list like 'jax,onnx' (a format whose extra is missing is then an error).
        formats="auto",
        strict=True,  # fail when an artifact's logits differ from the JAX model's
    ))


def deit_imagenet_config(
    variant: str, *, distilled: bool = False, target_flops_fraction: float = 0.6
) -> ml_collections.ConfigDict:
    """DeiT-{Ti,S,B}/16 on ImageNet-1k with the paper's Table 7 recipe (300 epochs, batch 1024).

    `target_flops_fraction`: the FLOPs budget T of the supernet and the search as a fraction of
    the dense model (0.6 is the paper's "40% reduction").
    """
    config = ml_collections.ConfigDict()
    config.stages = "pretrain,score,criteria,search,prune,finetune,export,report"
    config.seed = 0
    # Results of finished stages are reused on a rerun; with another config that would change
    # them the run stops, unless overwrite=True, which redoes the stages whose config changed.
    config.overwrite = False
    config.target_flops_fraction = target_flops_fraction
    config.model = ml_collections.ConfigDict(dict(
        variant=variant, num_classes=1000, image_size=224, distilled=distilled,
        dtype="bfloat16",
        # Recompute block activations in the backward pass: DeiT-B at 128 images per device.
        remat=variant.startswith("B"),
    ))
    # Path to an official DeiT/timm checkpoint to start from (e.g. for short supernet training).
    config.init = ml_collections.ConfigDict(dict(checkpoint=""))
    config.data = imagenet_data_config()
    config.augment = deit_augment_config()
    config.train = deit_train_config(variant)
    config.train.token_mode = "attention"
    config.train.target_tol = 0.1
    config.train.score_every = 5000
    config.mesh = default_mesh_config()
    config.distributed = default_distributed_config()
    # rescore=True: later stages select by the score stage's ranks instead of the supernet's.
    config.score = ml_collections.ConfigDict(dict(preset="authors_code", batch_size=256,
                                                  rescore=False))
    # Sec. 4: population 100, 100 GP iterations on 50 hold-out images per class.
    config.search = default_search_config()
    config.search.baselines = ()  # e.g. ('random', 'authors'): Table 5 at the same budget
    config.prune = prune_config()
    # Sec. 4: the pruned model is finetuned "following the same training strategy".
    config.finetune = finetune_config()
    config.export = export_config()
    return config
