"""JAX-world ViT checkpoints -> the vitjax Flax tree: google-research/vision_transformer
(AugReg, the ViT paper's releases) and big_vision `.npz` files.

Both are flat `.npz` archives of '/'-joined Flax paths (optionally under 'params/' or
'opt/target/'). The conversion is a name-mapping table per layout (`Rule`s, as for timm in
vitjax.interop.timm) read by the same `convert_state`:

  npz (AugReg / big_vision)                                  vitjax
  embedding/kernel [P, P, C, d], /bias                       patch_embed/kernel, /bias
  cls [1, 1, d]                                              cls_token
  Transformer/posembed_input/pos_embedding (AugReg,          pos_embed
    class token included) | pos_embedding (big_vision, patches only: no_embed_class)
  Transformer/encoderblock_{l}/
    LayerNorm_0                                              blocks_l/norm1
    MultiHeadDotProductAttention_{1|0}/{query,key,value}/kernel [d, H, dh] (stacked)
                                                             blocks_l/attn/qkv/kernel [d, 3, H, dh]
    MultiHeadDotProductAttention_{1|0}/out/kernel [H, dh, d] blocks_l/attn/proj/kernel
    LayerNorm_{2|1}                                          blocks_l/norm2
    MlpBlock_{3|0}/Dense_{0,1}                               blocks_l/mlp/fc1, fc2
  Transformer/encoder_norm                                   norm
  head/kernel [d, classes]                                   head/kernel

The number of heads is stored (query kernel [d, H, dh]), so nothing is guessed. big_vision's
scanned layout ('Transformer/encoderblock/...' with a leading depth axis) is read block by
block. Pooling: a checkpoint with 'cls' pools the class token ('tok'); one without pools the
mean of all tokens after encoder_norm ('gap'). Both expect inputs in [-1, 1] (mean = std = 0.5).

Reading is lazy: np.load on an .npz opens the zip index only and decompresses a member when the
table asks for it, so converting holds the output tree plus one tensor (plus, for the scanned
layout, one stacked tensor). True memory mapping (np.load's mmap_mode) does not apply to members
of a zip archive, compressed or not, so it is not used. Paths go through etils.epath: gs://...
works where the matching filesystem package is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from etils import epath

from vitjax.interop.files import to_numpy
from vitjax.interop.timm import Rule, convert_state
from vitjax.models.config import ViTConfig

logger = logging.getLogger(__name__)

AUGREG, BIG_VISION = "augreg", "big_vision"
# What the models of both code bases are trained on: pixels scaled to [-1, 1].
MINUS_ONE_TO_ONE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_PREFIXES = ("", "opt/target/", "params/")
_SCANNED = "Transformer/encoderblock/"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


def _stack_qkv(values, cfg):  # 3 x [d, H, dh] -> [d, 3, H, dh]; biases 3 x [H, dh] -> [3, H, dh]
    return np.stack(values, axis=-3)


def _dense(npz: str, flax: str, applies=None) -> tuple[Rule, ...]:
    extra = {} if applies is None else {"applies": applies}
    return (Rule(f"{npz}/kernel", f"{flax}/kernel", to_timm=None, **extra),
            Rule(f"{npz}/bias", f"{flax}/bias", to_timm=None, **extra))


def _norm(npz: str, flax: str) -> tuple[Rule, ...]:
    return (Rule(f"{npz}/scale", f"{flax}/scale", to_timm=None),
            Rule(f"{npz}/bias", f"{flax}/bias", to_timm=None))


def _table(layout: str) -> tuple[Rule, ...]:
    """The conversion table of `layout`; its sub-module numbering is the only difference."""
    mha, norm2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
                       if layout == AUGREG else
                       ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    pos = "Transformer/posembed_input/pos_embedding" if layout == AUGREG else "pos_embedding"
    block = "Transformer/encoderblock_{l}"
    attn = f"{block}/{mha}"
    return (
        *_dense("embedding", "patch_embed"),
        Rule("cls", "cls_token", to_timm=None, applies=lambda cfg: cfg.class_token),
        Rule(pos, "pos_embed", to_timm=None),
        *_norm(f"{block}/LayerNorm_0", "blocks_{l}/norm1"),
        Rule(tuple(f"{attn}/{n}/kernel" for n in ("query", "key", "value")),
             "blocks_{l}/attn/qkv/kernel", _stack_qkv, None),
        Rule(tuple(f"{attn}/{n}/bias" for n in ("query", "key", "value")),
             "blocks_{l}/attn/qkv/bias", _stack_qkv, None),
        *_dense(f"{attn}/out", "blocks_{l}/attn/proj"),
        *_norm(f"{block}/{norm2}", "blocks_{l}/norm2"),
        *_dense(f"{block}/{mlp}/Dense_0", "blocks_{l}/mlp/fc1"),
        *_dense(f"{block}/{mlp}/Dense_1", "blocks_{l}/mlp/fc2"),
        *_norm("Transformer/encoder_norm", "norm"),
        *_dense("head", "head", applies=lambda cfg: cfg.num_classes > 0),
    )


class NpzCheckpoint(Mapping):
    """Read-on-access view of a JAX .npz checkpoint: names without the 'params/' (or
    'opt/target/') prefix, a scanned layout presented block by block."""

    def __init__(self, archive: Mapping[str, Any], name: str = "checkpoint"):
        self._archive, self.name = archive, name
        files = list(archive.keys())
        self.prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in files), None)
        if self.prefix is None:
            shown = ", ".join(sorted(files)[:6])
            raise ValueError(f"{name} is not a ViT .npz checkpoint (AugReg / big_vision): it "
                             f"has no 'embedding/kernel' (its names start with: {shown})")
        self._names: dict[str, tuple[str, int | None]] = {}
        stacked = {}
        for key in files:
            if not key.startswith(self.prefix):
                continue
            short = key[len(self.prefix):]
            if short.startswith(_SCANNED):
                stacked[short[len(_SCANNED):]] = key
            else:
                self._names[short] = (key, None)
        for rest, key in stacked.items():
            if hasattr(archive, "zip"):  # an NpzFile: read the header only
                depth = _member_shape(archive, key)[0]
            else:
                depth = np.shape(archive[key])[0]
            for layer in range(depth):
                self._names[f"Transformer/encoderblock_{layer}/{rest}"] = (key, layer)
        self.scanned = bool(stacked)
        self._cache: tuple[str, np.ndarray] | None = None
        pos = self._names.get("pos_embedding")
        self.layout = BIG_VISION if (self.prefix == "params/" or pos or self.scanned) else AUGREG

    def __getitem__(self, name: str) -> np.ndarray:
        key, layer = self._names[name]
        if layer is None:
            return to_numpy(self._archive[key])
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, to_numpy(self._archive[key]))
        return self._cache[1][layer]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name`, from the member's header where the archive is a file."""
        key, layer = self._names[name]
        if hasattr(self._archive, "zip"):
            full = _member_shape(self._archive, key)
        else:
            full = tuple(np.shape(self._archive[key]))
        return full if layer is None else full[1:]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _member_shape(archive, key: str) -> tuple[int, ...]:
    """Shape of an .npz member from its .npy header, without decompressing the data."""
    from numpy.lib import format as npy_format

    with archive.zip.open(f"{key}.npy") as handle:
        version = npy_format.read_magic(handle)
        read = (npy_format.read_array_header_1_0 if version == (1, 0)
                else npy_format.read_array_header_2_0)
        shape, _, _ = read(handle)
    return tuple(shape)


@contextlib.contextmanager
def open_npz(source: str | os.PathLike | Mapping[str, Any]) -> Iterator[NpzCheckpoint]:
    """An `NpzCheckpoint` of a local or remote (etils.epath: gs://...) .npz, or of a mapping."""
    if isinstance(source, Mapping):
        yield NpzCheckpoint(source)
        return
    path = epath.Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file: {source}")
    with path.open("rb") as handle:
        try:
            archive = np.load(handle, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {source} as an .npz archive: {err}") from err
        with archive:
            yield NpzCheckpoint(archive, name=str(source))


def is_jax_npz(source: str | os.PathLike) -> bool:
    """True for an .npz in the AugReg / big_vision layout (checked by its names)."""
    if not os.fspath(source).lower().endswith(".npz"):
        return False
    try:
        with open_npz(source):
            return True
    except (ValueError, OSError):
        return False


def infer_npz_config(ckpt: NpzCheckpoint, **overrides: Any) -> ViTConfig:
    """ViTConfig of an AugReg / big_vision checkpoint; the shapes determine every field."""
    def need(name):
        if name not in ckpt:
            raise ValueError(f"{ckpt.layout} checkpoint {ckpt.name} has no {name!r}")
        return ckpt.shape(name)

    patch = need("embedding/kernel")
    if len(patch) != 4 or patch[0] != patch[1]:
        raise ValueError(f"{ckpt.layout} 'embedding/kernel' has shape {patch}; expected a "
                         "square conv kernel [P, P, C, embed_dim] (hybrid ResNet stems are "
                         "not supported)")
    layers = {int(m.group(1)) for k in ckpt if (m := _BLOCK.match(k))}
    if not layers:
        raise ValueError(f"{ckpt.layout} checkpoint {ckpt.name} has no Transformer/encoderblock")
    mha = "MultiHeadDotProductAttention_1" if ckpt.layout == AUGREG else \
        "MultiHeadDotProductAttention_0"
    mlp = "MlpBlock_3" if ckpt.layout == AUGREG else "MlpBlock_0"
    query = need(f"Transformer/encoderblock_0/{mha}/query/kernel")  # [d, H, dh]
    class_token = "cls" in ckpt
    pos_name = ("Transformer/posembed_input/pos_embedding" if ckpt.layout == AUGREG
                else "pos_embedding")
    rows = need(pos_name)[-2]
    prefix = int(class_token)
    positions = rows - prefix if ckpt.layout == AUGREG else rows
    grid = round(positions**0.5) if positions > 0 else 0
    if not grid or grid * grid != positions:
        raise ValueError(f"{ckpt.layout} {pos_name!r} has {rows} rows, which is not "
                         f"{'the class token plus ' if positions != rows else ''}a square grid")
    fields = dict(
        embed_dim=patch[3], in_chans=patch[2], patch_size=patch[0], depth=max(layers) + 1,
        num_heads=query[1], head_dim=query[2] if query[1] * query[2] != patch[3] else None,
        mlp_dim=need(f"Transformer/encoderblock_0/{mlp}/Dense_0/kernel")[1],
        image_size=grid * patch[0],
        num_classes=ckpt.shape("head/kernel")[-1] if "head/kernel" in ckpt else 0,
        class_token=class_token,
        # big_vision adds the class token after the position embedding.
        no_embed_class=class_token and ckpt.layout == BIG_VISION,
        global_pool="token" if class_token else "avg",
    )
    fields = {k: (int(v) if isinstance(v, (np.integer, int)) and not isinstance(v, bool) else v)
              for k, v in fields.items()}
    clashes = [f"{k}={v} (checkpoint: {fields[k]})" for k, v in overrides.items()
               if k in fields and v != fields[k]]
    if clashes:
        raise ValueError(f"{ckpt.layout} checkpoint {ckpt.name} does not match: "
                         f"{', '.join(clashes)}; pass image_size= / num_classes= to load_npz "
                         "to run at another size or class count")
    return ViTConfig(**{**fields, **overrides})


def load_npz(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    image_size: int | None = None,
    num_classes: int | None = None,
    **overrides: Any,
):
    """Loads an AugReg (google-research/vision_transformer) or big_vision ViT .npz as
    `(ViT model, params)`; params are jax float32 arrays.

    image_size: run at another resolution (position embedding resampled as timm does).
    num_classes: 0 drops the head, another count replaces it by a zero one; either also drops
      an ImageNet-21k checkpoint's 'pre_logits' layer, as vision_transformer's fine-tuning does.
    overrides: other ViTConfig fields; they must agree with the tensors.
    """
    import jax
    import jax.numpy as jnp

    from vitjax.interop.timm import resample_pos_embed
    from vitjax.models.vit import ViT

    with open_npz(source) as ckpt:
        config = infer_npz_config(ckpt, **overrides)
        family = f"{ckpt.layout} {config.family}"
        state: Mapping[str, Any] = ckpt
        dropped = set()
        if "pre_logits/kernel" in ckpt:
            if num_classes is None:
                raise ValueError(
                    f"{family} checkpoint {ckpt.name} has a 'pre_logits' layer (the ViT paper's "
                    "ImageNet-21k representation layer), which vitjax and timm do not have; "
                    "pass num_classes= (CLI: --num-classes) to drop it with the head, as "
                    "vision_transformer's fine-tuning does"
                )
            dropped |= {"pre_logits/kernel", "pre_logits/bias"}
        # A head trained on pre_logits features is no use without them: replaced as well.
        replace_head = num_classes is not None and (num_classes != config.num_classes
                                                    or bool(dropped))
        if replace_head:
            dropped |= {"head/kernel", "head/bias"}
            logger.warning("replacing the checkpoint's %d-class head by %s", config.num_classes,
                           f"a zero-initialised {num_classes}-class head" if num_classes
                           else "no head (features)")
            config = dataclasses.replace(config, num_classes=num_classes)
        if dropped or image_size not in (None, config.image_size):
            state = _Overlay(ckpt, dropped)
        if image_size not in (None, config.image_size):
            pos_name = next(k for k in ckpt if k.endswith("pos_embedding"))
            grid_before = config.grid_size
            config = dataclasses.replace(config, image_size=image_size)
            prefix = 0 if config.no_embed_class else config.num_prefix_tokens
            pos = ckpt[pos_name]
            state.extra[pos_name] = resample_pos_embed(
                pos.reshape(1, -1, pos.shape[-1]), config.grid_size, prefix)
            logger.info("resampled %s from a %d to a %d grid", pos_name, grid_before,
                        config.grid_size)
        if replace_head and num_classes:
            state.extra["head/kernel"] = np.zeros((config.embed_dim, num_classes), np.float32)
            state.extra["head/bias"] = np.zeros((num_classes,), np.float32)
        params = convert_state(state, config, _table(ckpt.layout), what=f"a {ckpt.layout}",
                               strict=strict)
    return ViT(config), jax.tree.map(jnp.asarray, params)


class _Overlay(Mapping):
    """A checkpoint view with some names hidden and some replaced (resampled, new head)."""

    def __init__(self, base: Mapping[str, Any], hidden: set[str]):
        self._base, self._hidden, self.extra = base, hidden, {}

    def __getitem__(self, name):
        if name in self.extra:
            return self.extra[name]
        if name in self._hidden:
            raise KeyError(name)
        return self._base[name]

    def __iter__(self):
        yield from self.extra
        yield from (k for k in self._base if k not in self._hidden and k not in self.extra)

    def __len__(self):
        return sum(1 for _ in self)
