"""Config builders shared by the experiment files in configs/ (each file stays one call)."""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from vitjax.data.config import deit_augment_config, imagenet_data_config
from vitjax.search.config import default_search_config
from vitjax.training.config import (
    IMAGENET_TRAIN_IMAGES,
    default_distributed_config,
    default_mesh_config,
    deit_train_config,
)

# The trained dense digits ViT the embedded default compresses (tools/make_digits_reference.py
# writes it in timm's format; package data, so installs carry it).
DIGITS_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                "digits_vit.safetensors")

# Table 3 left, in the paper's order (head pruning alone cannot reach 40% fewer FLOPs).
ABLATION_COMBINATIONS = ("neuron", "token", "head+neuron", "neuron+token", "head+token",
                         "head+neuron+token")


def parse_arg(arg: str | None) -> dict:
    """'distilled,flops=0.4' (a config file's argument) -> deit_imagenet_config keywords."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        if item in ("distilled", "compare", "scratch"):
            out[item] = True
        elif item.startswith("flops="):
            out["target_flops_fraction"] = float(item.split("=", 1)[1])
        elif item.startswith("expand="):
            out["expand"] = float(item.split("=", 1)[1])
        elif item.startswith("init="):
            out["init"] = item.split("=", 1)[1]
        else:
            raise ValueError(f"config argument {item!r}: expected 'distilled', 'compare', "
                             "'scratch', 'flops=F', 'expand=W' or 'init=CHECKPOINT'")
    if out.get("scratch") and out.get("init"):
        raise ValueError("config arguments 'scratch' and 'init=...' exclude each other")
    return out


def from_pretrained_recipe(config: ml_collections.ConfigDict, checkpoint: str, *,
                           steps: int, finetune_steps: int, lr: float, finetune_lr: float,
                           warmup_steps: int, finetune_warmup_steps: int,
                           distill: float = 0.5, temperature: float = 1.0,
                           ) -> ml_collections.ConfigDict:
    """The main road: compress a trained model. The supernet starts from `checkpoint` and is
    trained for a finetune-sized schedule with the frozen dense model as teacher; the pruned
    model's finetuning distils from the same teacher; the `baseline` stage measures what the
    supernet buys (the same policy cut from the dense model, trained as long without it).

    Distillation: logit KL with weight 0.5 and temperature 1, as DynamicViT distils a pruned
    DeiT from its own dense model (DeiT's soft distillation used T=3, weight 0.1, for a CNN
    teacher of another family). Mutates and returns config."""
    config.init.checkpoint = checkpoint
    config.train.update(steps=steps, lr=lr, warmup_steps=warmup_steps, distill=distill,
                        temperature=temperature)
    config.finetune.update(steps=finetune_steps, lr=finetune_lr,
                           warmup_steps=finetune_warmup_steps, distill=distill,
                           temperature=temperature)
    stages = [s.strip() for s in str(config.stages).split(",")]
    if "baseline" not in stages:
        stages.insert(stages.index("finetune") + 1, "baseline")
    config.stages = ",".join(stages)
    return config


def model_config_from(config: ml_collections.ConfigDict):
    """`config.model` -> ViTConfig: either `variant='S/16'` plus overrides, or every field."""
    from vitjax.errors import UserError
    from vitjax.models.config import ViTConfig

    fields = dict(config.model.to_dict())
    for key in ("variant", "drop_path_rate", "dtype", "remat", "remat_policy", "attention"):
        fields.pop(key, None)
    try:
        if config.model.get("variant"):
            return ViTConfig.from_variant(config.model.variant, **fields)
        return ViTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.model is invalid: {e}") from None


def expand_model_config(config: ml_collections.ConfigDict, width: float,
                        baseline_workdir: str = "") -> ml_collections.ConfigDict:
    """Expand-then-compress (Sec. 4.3, Table 2): widen config.model by `width` (embedding, heads
    at the same head size, FFN) and set the FLOPs budget to the original model's dense GMACs, so
    the pipeline compresses the wide model back to the small one's cost. `baseline_workdir`: a
    finished run of the small model, compared with in the report. Mutates and returns config."""
    from vitjax.pruning import count_flops

    if width <= 1.0:
        raise ValueError(f"expand={width}: the width factor must be > 1 (e.g. 2)")
    small = model_config_from(config)
    heads = round(small.num_heads * width)
    wide = dataclasses.replace(small, embed_dim=heads * small.dim_per_head, num_heads=heads,
                               mlp_dim=round(small.mlp_dim * width / 8) * 8)
    config.model.variant = ""
    for key in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "image_size",
                "num_classes", "distilled"):
        config.model[key] = getattr(wide, key)
    dense = count_flops(wide).total
    config.target_flops_fraction = count_flops(small).total / dense
    config.expand = ml_collections.ConfigDict(dict(width=float(width),
                                                   baseline_workdir=baseline_workdir))
    return config


def prune_config(round_to: int = 0) -> ml_collections.ConfigDict:
    """`config.prune`: which policy to cut, and optional hardware-friendly rounding."""
    return ml_collections.ConfigDict(dict(
        policy="",  # a policy JSON file; empty: the search stage's best policy
        round_to=round_to,  # round kept neurons/tokens to multiples of this (0: off)
    ))


def ablation_config(population: int = 20, iterations: int = 20) -> ml_collections.ConfigDict:
    """`config.ablation`: the dimension ablation at the search's FLOPs budget (Table 3 left) and
    the accuracy-vs-FLOPs front over budgets (Fig. 2); each is a small search on the supernet
    with `population` + `iterations` evaluations (other search settings from config.search)."""
    return ml_collections.ConfigDict(dict(
        dimensions=ABLATION_COMBINATIONS,  # '+'-joined dimensions searched together; () skips
        budgets=(0.4, 0.5, 0.7, 0.8),  # fractions of the dense FLOPs for the front; () skips
        population=population,
        iterations=iterations,
    ))


def compare_config(*methods: str, steps: int | None = None) -> ml_collections.ConfigDict:
    """`config.compare`: the second paper's systems at the pruned model's FLOPs (stage
    `compare`); no methods: the stage skips itself."""
    return ml_collections.ConfigDict(dict(
        methods=tuple(methods),  # of 'dynamicvit', 'block', 'block+token'
        # Training steps of each method (the finetuning recipe otherwise); block+token trains
        # twice (block pruning, then DynamicViT on the sliced model).
        steps=ml_collections.config_dict.placeholder(int) if steps is None else steps,
        # DynamicViT: predictors before these blocks (None: depth/4, depth/2, 3 depth/4, the
        # original's 3, 6, 9 for 12 blocks) and the keep schedule, 'original' (rho, rho^2,
        # rho^3) or 'base' (b, b-0.2, b-0.4); its rate is solved for the FLOPs target.
        locations=ml_collections.config_dict.placeholder(tuple),
        schedule="original",
        ratio_weight=2.0, distill_weight=0.5, token_distill_weight=0.5,  # the original's
        # Block pruning: vitjax.blockprune.MovementConfig fields ('soft' movement pruning).
        movement=ml_collections.ConfigDict(dict(mode="soft", neuron_block=1, threshold=0.1,
                                                reg_weight=1.0, score_lr_scale=100.0)),
        block_share=0.5,  # block+token: the part of the FLOPs cut taken by block pruning
    ))


def finetune_config(**train_overrides) -> ml_collections.ConfigDict:
    """`config.finetune`: keys of config.train to override for finetuning the pruned model
    (same recipe by default, Sec. 4), plus logit distillation from the dense teacher (the
    init checkpoint's model, else the dense supernet).

    Every key of config.train is here, as a typed placeholder (None: config.train's value) unless
    given, so that any of them can be set from the command line, e.g.
    --config.finetune.steps=3 on a config that keeps the whole training recipe."""
    from vitjax.training.config import default_train_config

    train = default_train_config()
    fields = {key: ml_collections.config_dict.placeholder(train.get_ref(key).get_type())
              for key in train}
    fields.update(
        distill=0.0,  # weight of the KL to the dense teacher's logits; 0: off (the paper)
        temperature=1.0,  # distillation temperature
    )
    fields.update(train_overrides)
    return ml_collections.ConfigDict(fields)


def baseline_config() -> ml_collections.ConfigDict:
    """`config.baseline`: the no-supernet baseline (stage `baseline`): the pruned model's policy
    cut out of the dense init checkpoint by the dense model's HSIC ranks, then finetuned with
    the finetuning recipe for as many steps as the supernet and the finetuning together."""
    return ml_collections.ConfigDict(dict(
        # Training steps; None: config.train.steps + config.finetune's steps (equal training).
        steps=ml_collections.config_dict.placeholder(int),
    ))


def export_config() -> ml_collections.ConfigDict:
    """`config.export`: which deployable artifacts the export stage writes."""
    return ml_collections.ConfigDict(dict(
        # 'auto': jax.export always, ONNX and TFLite when the 'export' extra is installed; or a
        # list like 'jax,onnx' (a format whose extra is missing is then an error).
        formats="auto",
        strict=True,  # fail when an artifact's logits differ from the JAX model's
    ))


def report_config() -> ml_collections.ConfigDict:
    """`config.report`: how the report stage times every model (forward images/s, one process,
    alternating): at these batch sizes, the median of `rounds` rounds of `seconds` per model.
    Fewer or smaller batches shorten the stage (a DeiT-B at batch 64 on a CPU takes minutes)."""
    return ml_collections.ConfigDict(dict(batch_sizes=(1, 64), rounds=5, seconds=0.2))


# From a trained DeiT (`init=`): supernet and finetuning epochs, peak learning rates per 512
# images, warmup epochs. Sized like DynamicViT's 30 epochs from a pretrained DeiT; the peak
# rate is half of DeiT's from-scratch 5e-4, the finetuning's a tenth of it.
DEIT_FROM_PRETRAINED = dict(epochs=30, finetune_epochs=10, lr=2.5e-4, finetune_lr=5e-5,
                            warmup_epochs=2, finetune_warmup_epochs=1)


def deit_imagenet_config(
    variant: str, *, distilled: bool = False, target_flops_fraction: float = 0.6,
    expand: float = 1.0, compare: bool = False, init: str = "", scratch: bool = False,
) -> ml_collections.ConfigDict:
    """DeiT-{Ti,S,B}/16 on ImageNet-1k.

    `init`: a trained DeiT/timm checkpoint (.pth/.safetensors or a vitjax file) to compress with
    `from_pretrained_recipe` (DEIT_FROM_PRETRAINED: 30 supernet + 10 finetuning epochs with the
    dense model as teacher, then the no-supernet baseline). Without it (or with `scratch`): the
    paper's Table 7 recipe, the supernet trained from scratch for 300 epochs at batch 1024.
    `target_flops_fraction`: the FLOPs budget T of the supernet and the search as a fraction of
    the dense model (0.6 is the paper's "40% reduction"). `expand` > 1: expand-then-compress
    (Table 2), the model `expand` times wider compressed to this variant's dense FLOPs.
    `compare`: also train DynamicViT, block pruning and block + token at the pruned model's
    FLOPs (the `compare` stage).
    """
    del scratch  # the default without init=
    config = ml_collections.ConfigDict()
    config.stages = "pretrain,score,criteria,search,ablation,prune,finetune,export,compare,report"
    config.seed = 0
    # Results of finished stages are reused on a rerun; with another config that would change
    # them the run stops, unless overwrite=True, which redoes the stages whose config changed.
    config.overwrite = False
    config.target_flops_fraction = target_flops_fraction
    config.model = ml_collections.ConfigDict(dict(
        variant=variant, num_classes=1000, image_size=224, distilled=distilled,
        dtype="bfloat16",  # compute; parameters, optimizer state, softmax, norms, loss: float32
        # Recompute block activations in the backward pass: DeiT-B at 128 images per device.
        remat=variant.startswith("B"),
        remat_policy="full",  # 'full': recompute all; 'dots': keep the matmul outputs
        # 'auto': cuDNN flash attention on NVIDIA GPUs, XLA on TPU, the einsum path on CPU;
        # or 'xla', 'cudnn', 'explicit'.
        attention="auto",
    ))
    # Path to an official DeiT/timm checkpoint, an AugReg / big_vision .npz or a vitjax file to
    # start from (e.g. for short supernet training).
    config.init = ml_collections.ConfigDict(dict(
        checkpoint="",
        # What a timm state dict expects: "imagenet" (mean/std) or "inception" ([-1, 1]); .npz
        # and vitjax files carry it. A mismatch with config.data.mean/std stops the run.
        preprocessing="", check_preprocessing=True))
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
    # Fig. 1: accuracy at these pruning ratios for every criterion and dimension.
    config.criteria = ml_collections.ConfigDict(dict(ratios=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5,
                                                             0.6, 0.7, 0.8, 0.9)))
    config.search = default_search_config()
    config.search.baselines = ()  # e.g. ('random', 'authors'): Table 5 at the same budget
    config.ablation = ablation_config()
    config.compare = compare_config(*(("dynamicvit", "block", "block+token") if compare else ()))
    config.prune = prune_config()
    # Sec. 4: the pruned model is finetuned "following the same training strategy".
    config.finetune = finetune_config()
    config.baseline = baseline_config()
    config.export = export_config()
    config.report = report_config()
    if expand != 1.0:
        expand_model_config(config, expand)
    if init:
        r = DEIT_FROM_PRETRAINED
        per_epoch = IMAGENET_TRAIN_IMAGES // int(config.train.batch_size)
        from_pretrained_recipe(
            config, init, steps=r["epochs"] * per_epoch,
            finetune_steps=r["finetune_epochs"] * per_epoch, lr=r["lr"],
            finetune_lr=r["finetune_lr"], warmup_steps=r["warmup_epochs"] * per_epoch,
            finetune_warmup_steps=r["finetune_warmup_epochs"] * per_epoch)
    return config
