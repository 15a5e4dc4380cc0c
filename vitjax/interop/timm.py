"""timm / official DeiT checkpoints <-> the vitjax Flax parameter tree.

The conversion is a name-mapping table (`_RULES`) plus small transform pairs, one per tensor
layout, in the style of google/maxtext's checkpoint_conversion; both directions read the same
table, so the round trip is exact by construction (transposes and reshapes only).

Layouts (timm -> vitjax):
  patch_embed.proj.weight [d, C, P, P]           -> patch_embed/kernel [P, P, C, d]
  blocks.l.attn.qkv.weight [3*H*dh, d]           -> blocks_l/attn/qkv/kernel [d, 3, H, dh]
      rows are [q heads..., k heads..., v heads...], each head's dh rows contiguous, which is
      how timm's Attention reshapes the qkv output to (B, N, 3, H, dh)
  blocks.l.attn.proj.weight [d, H*dh]            -> blocks_l/attn/proj/kernel [H, dh, d]
  nn.Linear weight [out, in]                     -> Dense kernel [in, out]
  LayerNorm weight / bias                        -> scale / bias

The number of heads is not stored in a checkpoint (qkv has the same shape for any split of d);
it comes from `num_heads=`, from `variant=`, or from the standard widths of DeiT/ViT.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.interop import files, native
from vitjax.models.config import ViTConfig, decode_variant
from vitjax.models.vit import ViT

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray, ViTConfig], np.ndarray]

# Keys of other systems that share a timm backbone. Reported, left out of the backbone, and
# handed back on request: DynamicViT's token-scoring MLPs.
IGNORED_PREFIXES = ("score_predictor.",)

# Heads of the published DeiT/ViT widths (timm's tiny ... huge); other widths use head_dim 64.
_STANDARD_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}
_DEFAULT_HEAD_DIM = 64
# timm model-name size words -> vitjax variant letters (vitjax.models.config).
_SIZE_WORDS = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H"}


# ---------------------------------------------------------------------------------------------
# Transforms: (timm array, config) -> vitjax array and back.


def _identity(x: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    return x


def _transpose(x: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    return x.T


def _patch_to_flax(w, cfg):  # [d, C, P, P] -> [P, P, C, d]
    return w.transpose(2, 3, 1, 0)


def _patch_to_timm(k, cfg):  # [P, P, C, d] -> [d, C, P, P]
    return k.transpose(3, 2, 0, 1)


def _qkv_kernel_to_flax(w, cfg):  # [3*H*dh, d] -> [d, 3, H, dh]
    return w.reshape(3, cfg.num_heads, cfg.dim_per_head, w.shape[-1]).transpose(3, 0, 1, 2)


def _qkv_kernel_to_timm(k, cfg):  # [d, 3, H, dh] -> [3*H*dh, d]
    return k.transpose(1, 2, 3, 0).reshape(-1, k.shape[0])


def _qkv_bias_to_flax(b, cfg):  # [3*H*dh] -> [3, H, dh]
    return b.reshape(3, cfg.num_heads, cfg.dim_per_head)


def _flatten(x, cfg):
    return x.reshape(-1)


def _proj_kernel_to_flax(w, cfg):  # [d, H*dh] -> [H, dh, d]
    return w.T.reshape(cfg.num_heads, cfg.dim_per_head, w.shape[0])


def _proj_kernel_to_timm(k, cfg):  # [H, dh, d] -> [d, H*dh]
    return k.reshape(-1, k.shape[-1]).T


_always = lambda cfg: True
_distilled = lambda cfg: cfg.distilled
_has_head = lambda cfg: cfg.num_classes > 0
_has_dist_head = lambda cfg: cfg.distilled and cfg.num_classes > 0


_has_cls = lambda cfg: cfg.class_token
_has_reg = lambda cfg: cfg.reg_tokens > 0
_has_layer_scale = lambda cfg: cfg.layer_scale
_has_norm = lambda cfg: not cfg.fc_norm
_has_fc_norm = lambda cfg: cfg.fc_norm


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a conversion table: source name(s) -> Flax path, with the transform pair.

    `timm` is the checkpoint's name ('{l}' is the block index); in the JAX .npz tables
    (vitjax.interop.npz) it may be a tuple of names whose arrays `to_flax` receives as a list
    (query, key, value -> one qkv kernel). `to_timm` is None where the table is one-way.
    """

    timm: str | tuple[str, ...]
    flax: str  # '/'-joined path in the Flax params tree
    to_flax: Transform = _identity
    to_timm: Transform | None = _identity
    applies: Callable[[ViTConfig], bool] = _always

    def names(self) -> tuple[str, ...]:
        return self.timm if isinstance(self.timm, tuple) else (self.timm,)


_Rule = Rule


def _linear(timm_prefix: str, flax_prefix: str, applies=_always) -> tuple[_Rule, ...]:
    return (
        _Rule(f"{timm_prefix}.weight", f"{flax_prefix}/kernel", _transpose, _transpose, applies),
        _Rule(f"{timm_prefix}.bias", f"{flax_prefix}/bias", applies=applies),
    )


def _layer_norm(timm_prefix: str, flax_prefix: str, applies=_always) -> tuple[_Rule, ...]:
    return (
        _Rule(f"{timm_prefix}.weight", f"{flax_prefix}/scale", applies=applies),
        _Rule(f"{timm_prefix}.bias", f"{flax_prefix}/bias", applies=applies),
    )


_RULES: tuple[_Rule, ...] = (
    _Rule("patch_embed.proj.weight", "patch_embed/kernel", _patch_to_flax, _patch_to_timm),
    _Rule("patch_embed.proj.bias", "patch_embed/bias"),
    _Rule("cls_token", "cls_token", applies=_has_cls),
    _Rule("dist_token", "dist_token", applies=_distilled),
    _Rule("reg_token", "reg_token", applies=_has_reg),
    _Rule("pos_embed", "pos_embed"),
    *_layer_norm("blocks.{l}.norm1", "blocks_{l}/norm1"),
    _Rule("blocks.{l}.attn.qkv.weight", "blocks_{l}/attn/qkv/kernel",
          _qkv_kernel_to_flax, _qkv_kernel_to_timm),
    _Rule("blocks.{l}.attn.qkv.bias", "blocks_{l}/attn/qkv/bias", _qkv_bias_to_flax, _flatten),
    _Rule("blocks.{l}.attn.proj.weight", "blocks_{l}/attn/proj/kernel",
          _proj_kernel_to_flax, _proj_kernel_to_timm),
    _Rule("blocks.{l}.attn.proj.bias", "blocks_{l}/attn/proj/bias"),
    _Rule("blocks.{l}.ls1.gamma", "blocks_{l}/ls1/gamma", applies=_has_layer_scale),
    *_layer_norm("blocks.{l}.norm2", "blocks_{l}/norm2"),
    *_linear("blocks.{l}.mlp.fc1", "blocks_{l}/mlp/fc1"),
    *_linear("blocks.{l}.mlp.fc2", "blocks_{l}/mlp/fc2"),
    _Rule("blocks.{l}.ls2.gamma", "blocks_{l}/ls2/gamma", applies=_has_layer_scale),
    *_layer_norm("norm", "norm", _has_norm),
    *_layer_norm("fc_norm", "fc_norm", _has_fc_norm),
    *_linear("head", "head", _has_head),
    *_linear("head_dist", "head_dist", _has_dist_head),
)


def expand_rules(table: tuple[Rule, ...], cfg: ViTConfig) -> list[Rule]:
    """`table` with '{l}' filled in for every block, restricted to what `cfg` has."""
    rules = []
    for rule in table:
        if not rule.applies(cfg):
            continue
        layers = range(cfg.depth) if "{l}" in rule.flax else [None]
        for layer in layers:
            names = tuple(name.format(l=layer) for name in rule.names())
            rules.append(dataclasses.replace(
                rule, timm=names if isinstance(rule.timm, tuple) else names[0],
                flax=rule.flax.format(l=layer)))
    return rules


def _expanded_rules(cfg: ViTConfig) -> list[_Rule]:
    return expand_rules(_RULES, cfg)


def timm_keys(cfg: ViTConfig) -> list[str]:
    """State-dict names timm uses for this architecture."""
    return [rule.timm for rule in _expanded_rules(cfg)]


# ---------------------------------------------------------------------------------------------
# Tree helpers.


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _check_convertible(cfg: ViTConfig) -> None:
    if cfg.is_pruned:
        raise ValueError(
            "timm has no layout for a physically pruned ViT (per-layer head/FFN/token counts); "
            "save it with vitjax.interop.save_native instead"
        )
    if cfg.num_heads * cfg.dim_per_head != cfg.embed_dim:
        raise ValueError(
            f"timm requires num_heads * head_dim == embed_dim; this config has {cfg.num_heads} * "
            f"{cfg.dim_per_head} != {cfg.embed_dim}"
        )


def _config_of(model_or_config: ViT | ViTConfig) -> ViTConfig:
    return model_or_config if isinstance(model_or_config, ViTConfig) else model_or_config.config


def _unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return params["params"] if set(params) == {"params"} else params


# ---------------------------------------------------------------------------------------------
# Architecture inference.


def parse_variant(variant: str) -> dict[str, Any]:
    """Architecture fields named by a timm model name or a vitjax variant.

    'deit_base_distilled_patch16_224' -> embed_dim, depth, num_heads, mlp_dim, patch_size,
    image_size, distilled. 'B/16' (vitjax.models.config.decode_variant) works too.
    """
    if "/" in variant or variant in _SIZE_WORDS.values():
        return decode_variant(variant)
    parts = variant.lower().split("_")
    sizes = [p for p in parts if p in _SIZE_WORDS]
    if not parts[0].startswith(("deit", "vit")) or len(sizes) != 1:
        raise ValueError(
            f"cannot read the architecture from variant {variant!r}: expected a timm DeiT/ViT "
            "name such as 'deit_base_distilled_patch16_224' or 'vit_small_patch16_384', or a "
            "vitjax variant such as 'B/16'"
        )
    fields: dict[str, Any] = decode_variant(_SIZE_WORDS[sizes[0]])
    fields["distilled"] = "distilled" in parts
    for part in parts:
        if match := re.fullmatch(r"patch(\d+)", part):
            fields["patch_size"] = int(match.group(1))
    if parts[-1].isdigit():
        fields["image_size"] = int(parts[-1])
    return fields


def _require(state: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in state:
        if any(k.endswith("embedding/kernel") for k in state):
            raise ValueError("this is an AugReg / big_vision .npz checkpoint, not a timm state "
                             "dict: read it with vitjax.interop.load_checkpoint (or load_npz)")
        shown = ", ".join(sorted(state)[:8])
        raise ValueError(
            f"not a timm ViT/DeiT state dict: it has no {name!r} (its names start with: {shown})"
        )
    return state[name]


def _shape_fields(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Everything the tensor shapes determine; num_heads is not among it."""
    patch = _require(state, "patch_embed.proj.weight")
    if patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
        raise ValueError(
            f"patch_embed.proj.weight has shape {patch.shape}; expected a square conv kernel "
            "[embed_dim, in_chans, P, P]"
        )
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        _require(state, "blocks.0.attn.qkv.weight")
    depth = max(layers) + 1
    distilled = "dist_token" in state
    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    prefix = int(class_token) + int(distilled) + reg_tokens
    rows = _require(state, "pos_embed").shape[1]
    no_embed_class, grid = _position_grid(rows, prefix, "pos_embed")
    head = state.get("head.weight")
    fc_norm = "fc_norm.weight" in state
    return dict(
        class_token=class_token,
        reg_tokens=reg_tokens,
        no_embed_class=no_embed_class,
        layer_scale="blocks.0.ls1.gamma" in state,
        fc_norm=fc_norm,
        # Not stored: timm pools by average where there is no class token and (by default)
        # where fc_norm exists; global_pool= overrides the guess.
        global_pool="avg" if fc_norm or not class_token else "token",
        embed_dim=int(embed_dim),
        in_chans=int(in_chans),
        patch_size=int(patch_size),
        depth=depth,
        mlp_dim=int(_require(state, "blocks.0.mlp.fc1.weight").shape[0]),
        distilled=distilled,
        image_size=int(grid * patch_size),
        num_classes=0 if head is None else int(head.shape[0]),
    )


def _position_grid(rows: int, prefix: int, name: str) -> tuple[bool, int]:
    """(no_embed_class, grid side) of a position embedding with `rows` rows: prefix tokens plus
    a square grid, or (DeiT-III, big_vision, register models) the square grid alone."""
    for no_embed_class, positions in ((False, rows - prefix), (True, rows)):
        grid = round(positions**0.5) if positions > 0 else 0
        if grid and grid * grid == positions:
            return no_embed_class, grid
    raise ValueError(
        f"{name} has {rows} rows, which is neither {prefix} prefix token(s) plus a square "
        "grid of patches nor a square grid alone"
    )


# Fields infer_config guesses rather than reads: an override replaces the guess.
_GUESSED = ("global_pool",)


def infer_config(
    state: Mapping[str, np.ndarray], *, variant: str | None = None, **overrides: Any
) -> ViTConfig:
    """ViTConfig of a timm state dict: shapes give everything but the number of heads.

    Heads come from `num_heads=` (an override), else from `variant`, else from the standard
    DeiT/ViT widths (192->3, 384->6, 768->12, 1024->16, 1280->16), else head_dim 64 (logged as
    a warning, since a wrong guess gives wrong outputs without any shape error).
    Any other override must agree with the tensors.
    """
    fields = _shape_fields(state)
    named = parse_variant(variant) if variant else {}
    for source, given in ((f"variant {variant!r}", named), ("override", overrides)):
        clashes = [
            f"{name}={given[name]} (checkpoint: {fields[name]})"
            for name in given
            if name in fields and name not in _GUESSED and given[name] != fields[name]
        ]
        if clashes:
            raise ValueError(
                f"{source} does not match the checkpoint: {', '.join(clashes)}; to run at another "
                "image size or class count pass image_size= / num_classes= to load_timm"
            )
    heads = overrides.get("num_heads", named.get("num_heads"))
    if heads is None:
        d = fields["embed_dim"]
        heads = _STANDARD_HEADS.get(d)
        if heads is None:
            heads = d // _DEFAULT_HEAD_DIM
            if heads == 0 or d % _DEFAULT_HEAD_DIM:
                raise ValueError(
                    f"the checkpoint does not store its number of heads and embed_dim {d} is "
                    f"not a multiple of {_DEFAULT_HEAD_DIM}; pass num_heads= (CLI: --num-heads) "
                    "or variant="
                )
            logger.warning(
                "num_heads is not stored in the checkpoint: assuming head_dim %d, i.e. %d heads "
                "for embed_dim %d; pass num_heads= or variant= if that is wrong",
                _DEFAULT_HEAD_DIM, heads, d,
            )
        else:
            logger.info("num_heads not given: %d, the standard for embed_dim %d", heads, d)
    fields.update({k: v for k, v in overrides.items() if k in _GUESSED})
    extra = {k: v for k, v in overrides.items() if k not in fields and k != "num_heads"}
    return ViTConfig(**fields, num_heads=int(heads), **extra)


# ---------------------------------------------------------------------------------------------
# Position embedding resampling.


def resample_pos_embed(
    pos_embed: np.ndarray, new_grid: int, num_prefix_tokens: int
) -> np.ndarray:
    """timm's `resample_abs_pos_embed`: bicubic on the patch grid, prefix tokens untouched.

    torch's antialiased bicubic (timm's default, antialias=True) is the Keys kernel with a=-0.5
    and weights renormalised at the borders, which is what jax.image.resize('cubic') computes.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = round(grid.shape[1] ** 0.5)
    if old_grid == new_grid:
        return pos_embed
    d = grid.shape[-1]
    image = jnp.asarray(grid, jnp.float32).reshape(1, old_grid, old_grid, d)
    resized = jax.image.resize(image, (1, new_grid, new_grid, d), "cubic", antialias=True)
    resized = np.asarray(resized).reshape(1, new_grid * new_grid, d).astype(pos_embed.dtype)
    return np.concatenate([prefix, resized], axis=1)


# ---------------------------------------------------------------------------------------------
# Conversion.


def params_from_timm(
    state: Mapping[str, np.ndarray], config: ViTConfig, *, strict: bool = True
) -> dict[str, Any]:
    """Flax params (numpy leaves) from a timm state dict whose shapes match `config`.

    Missing or unknown names raise a ValueError naming them; with strict=False they are logged
    as a warning and missing parameters keep a fresh initialisation (seed 0). Names under
    IGNORED_PREFIXES are never an error here; load_timm reports them.
    """
    _check_convertible(config)
    return convert_state(state, config, _RULES, what="a timm", strict=strict,
                         ignored=IGNORED_PREFIXES)


def convert_state(
    state: Mapping[str, np.ndarray], config: ViTConfig, table: tuple[Rule, ...], *, what: str,
    strict: bool = True, ignored: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Flax params (numpy leaves) of `config` from `state` through conversion table `table`.

    Only the tensors the table names are read (a lazy `state` reads nothing else). `what`
    names the source format in messages ('a timm', 'a big_vision').
    """
    model = ViT(config)
    images = jnp.zeros((1, config.image_size, config.image_size, config.in_chans), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))["params"]
    rules = expand_rules(table, config)
    params: dict[str, Any] = {}
    missing = []
    for rule in rules:
        absent = [name for name in rule.names() if name not in state]
        if absent:
            missing.extend(absent)
            continue
        values = [state[name] for name in rule.names()]
        value = values if isinstance(rule.timm, tuple) else values[0]
        expected = tuple(_get(shapes, rule.flax).shape)
        try:
            converted = rule.to_flax(value, config)
        except ValueError:
            converted = None
        if converted is None or converted.shape != expected:
            shown = " ".join(str(tuple(np.shape(v))) for v in values)
            raise ValueError(
                f"checkpoint tensor {rule.timm!r} has shape {shown}, which does not "
                f"fit {rule.flax} {expected} of the inferred architecture ({config.family}, "
                f"embed_dim={config.embed_dim}, num_heads={config.num_heads}, "
                f"mlp_dim={config.mlp_dim})"
            )
        _set(params, rule.flax, np.asarray(converted, np.float32))
    known = {name for rule in rules for name in rule.names()}
    unknown = sorted(k for k in state if k not in known and not k.startswith(ignored))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if problems:
        message = (
            f"checkpoint does not match {what} {config.family} with {config.depth} blocks, "
            f"distilled={config.distilled}, num_classes={config.num_classes}: "
            + "; ".join(problems)
        )
        if strict:
            raise CheckpointMismatchError(message)
        logger.warning("%s; ignoring unknown keys, missing ones keep a fresh init", message)
        if missing:
            fresh = jax.jit(lambda key: model.init(key, images)["params"])(jax.random.PRNGKey(0))
            for rule in rules:
                if any(name in missing for name in rule.names()):
                    _set(params, rule.flax, np.asarray(_get(fresh, rule.flax)))
    return params


def timm_state_dict(model_or_config: ViT | ViTConfig, params: Mapping[str, Any]) -> dict:
    """timm state dict (name -> float32 numpy array) of a dense vitjax model."""
    cfg = _config_of(model_or_config)
    _check_convertible(cfg)
    params = _unwrap_params(params)
    state = {}
    for rule in _expanded_rules(cfg):
        try:
            value = np.asarray(_get(params, rule.flax), np.float32)
        except KeyError as err:
            raise ValueError(f"params have no {rule.flax!r}, which {cfg} needs") from err
        state[rule.timm] = np.ascontiguousarray(rule.to_timm(value, cfg))
    return state


def _replace_head(state: dict[str, np.ndarray], config: ViTConfig, num_classes: int) -> ViTConfig:
    """Drops a checkpoint's classifier for one of another size (zeros: ready to fine-tune)."""
    heads = ("head", "head_dist") if config.distilled else ("head",)
    for head in heads:
        state.pop(f"{head}.weight", None)
        state.pop(f"{head}.bias", None)
        if num_classes:
            state[f"{head}.weight"] = np.zeros((num_classes, config.embed_dim), np.float32)
            state[f"{head}.bias"] = np.zeros((num_classes,), np.float32)
    logger.warning(
        "replacing the checkpoint's %d-class head by %s",
        config.num_classes,
        f"a zero-initialised {num_classes}-class head" if num_classes else "no head (features)",
    )
    return dataclasses.replace(config, num_classes=num_classes)


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensor names do not fit the inferred architecture; `details` names them
    (callers add how to load anyway: strict=False here, --non-strict in vitjax.convert)."""

    def __init__(self, details: str):
        super().__init__(details + " (pass strict=False to load anyway)")
        self.details = details


def load_timm(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    variant: str | None = None,
    strict: bool = True,
    image_size: int | None = None,
    num_classes: int | None = None,
    return_extras: bool = False,
    **overrides: Any,
):
    """Loads a timm / official DeiT / DynamicViT checkpoint as `(ViT model, params)`.

    source: path to .pth/.pt/.bin (needs torch), .safetensors or .npz, or a mapping
      name -> numpy/torch array; {'model': ...}/{'state_dict': ...} wrappers and 'module.'
      prefixes are handled.
    variant: timm name ('deit_base_distilled_patch16_224') or vitjax variant ('B/16'); states
      the number of heads and is checked against the tensors. `num_heads=` does the same alone.
    image_size: run at another resolution; the position embedding is resampled as timm does.
    num_classes: 0 drops the classifier (logits are the pre-logit features); another count
      replaces it with a zero-initialised head.
    return_extras: also return the ignored DynamicViT `score_predictor.*` tensors as a dict.
    overrides: other ViTConfig fields (e.g. num_heads); they must agree with the tensors.
    Returns (model, params) or (model, params, extras); params are jax arrays (float32).
    """
    state = files.read_state_dict(source)
    extras = {k: v for k, v in state.items() if k.startswith(IGNORED_PREFIXES)}
    if extras:
        logger.warning(
            "ignoring %d tensors that are not part of the ViT backbone (%s...): DynamicViT's "
            "score predictors; pass return_extras=True to get them",
            len(extras), sorted(extras)[0],
        )
        state = {k: v for k, v in state.items() if k not in extras}
    config = infer_config(state, variant=variant, **overrides)
    if num_classes is not None and num_classes != config.num_classes:
        config = _replace_head(state, config, num_classes)
    if image_size is not None and image_size != config.image_size:
        config = dataclasses.replace(config, image_size=image_size)  # validates divisibility
        state["pos_embed"] = resample_pos_embed(
            state["pos_embed"], config.grid_size,
            0 if config.no_embed_class else config.num_prefix_tokens,
        )
    params = jax.tree.map(jnp.asarray, params_from_timm(state, config, strict=strict))
    model = ViT(config)
    return (model, params, extras) if return_extras else (model, params)


def save_timm(model_or_config: ViT | ViTConfig, params: Mapping[str, Any], path,
              preprocessing: Mapping[str, Any] | None = None) -> None:
    """Writes a timm state dict: .safetensors always, .pth/.pt/.bin when torch is installed.

    preprocessing ({'mean': [...], 'std': [...]}): the input normalisation the weights were
    trained with, stored in a .safetensors header (timm ignores it; `load_checkpoint` reads it,
    so a model trained on other statistics than ImageNet's says so). A .pth cannot carry it.

    timm's `model.load_state_dict(...)` (strict) and
    `create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))` accept it;
    with a class count other than 1000 add `num_classes=C` to the overlay too, or timm drops
    the head it thinks does not fit.
    The file appears only once fully written.
    """
    suffix = os.fspath(path).lower().rsplit(".", 1)[-1]
    if f".{suffix}" not in (files.SAFETENSORS_SUFFIX, *files.TORCH_SUFFIXES):
        raise ValueError(f"save_timm writes .safetensors or .pth/.pt/.bin, not {str(path)!r}")
    state = timm_state_dict(model_or_config, params)
    # 'format': 'pt' is what torch-side safetensors readers (transformers, timm) expect.
    metadata = {"format": "pt"}
    if preprocessing is not None and suffix == files.SAFETENSORS_SUFFIX[1:]:
        metadata[native.PREPROCESSING_KEY] = json.dumps(
            dict(mean=list(preprocessing["mean"]), std=list(preprocessing["std"]))
        )
    files.write_arrays(path, state, metadata=metadata)
