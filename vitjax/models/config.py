"""Architecture description of a ViT/DeiT: dense sizes plus optional per-layer pruned sizes.

A `ViTConfig` is hashable and JSON-serialisable: it is the "architecture JSON" that the prune
stage writes next to a physically smaller parameter tree, and the static argument that FLOPs
counting, model construction and checkpoint conversion all read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

GLOBAL_POOLS = ("token", "avg")

# Width, depth, heads and MLP size of the standard variants (ViT paper Table 1, DeiT Table 1).
_VARIANTS = {
    "mu": dict(embed_dim=32, depth=2, num_heads=2, mlp_dim=64),  # for tests only
    "Ti": dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "M": dict(embed_dim=512, depth=12, num_heads=8, mlp_dim=2048),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def decode_variant(variant: str) -> dict[str, int]:
    """Turns 'B/16' (or 'B') into the architecture fields of that variant."""
    name, _, patch = variant.partition("/")
    if name not in _VARIANTS:
        raise ValueError(
            f"unknown ViT variant {variant!r}: expected one of {sorted(_VARIANTS)} "
            "optionally followed by '/<patch size>', e.g. 'B/16'"
        )
    fields = dict(_VARIANTS[name])
    if patch:
        fields["patch_size"] = int(patch)
    return fields


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static architecture of a (possibly pruned) ViT/DeiT."""

    num_classes: int = 1000  # 0: no classifier; logits are the pre-logit features
    image_size: int = 224  # square input resolution in pixels
    patch_size: int = 16  # square patch side; image_size must be a multiple of it
    in_chans: int = 3
    embed_dim: int = 768  # d
    depth: int = 12  # L
    num_heads: int = 12  # H of the dense model
    head_dim: int | None = None  # d_h; None means embed_dim // num_heads
    mlp_dim: int = 3072  # d' (FFN hidden size) of the dense model
    distilled: bool = False  # DeiT distillation token + second head
    # Newer ViT families (timm's names): no class token (GAP models), register tokens (prefix
    # tokens that are always kept, Darcet et al. 2024), a position embedding over the patches
    # only with the prefix tokens added after it (DeiT-III, big_vision), LayerScale on both
    # residual branches (DeiT-III), and how the final features are pooled.
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # pos_embed covers the patches only
    layer_scale: bool = False  # blocks_l/ls1, ls2 per-channel gammas (timm ls1.gamma)
    global_pool: str = "token"  # 'token': the class token; 'avg': mean of the patch tokens
    fc_norm: bool = False  # final LayerNorm after pooling ('fc_norm') instead of before ('norm')
    # Per-layer sizes of a physically pruned model; None keeps the dense size in every layer.
    layer_heads: tuple[int, ...] | None = None
    layer_mlp_dims: tuple[int, ...] | None = None
    # Tokens (class/distillation tokens included) that survive the token selection layer of each
    # block. With `layer_token_indices` the survivors are fixed positions (indices into the
    # sequence entering that block); without, each image keeps its top tokens by class attention.
    layer_tokens: tuple[int, ...] | None = None
    layer_token_indices: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"invalid ViTConfig: {msg}")

        if self.global_pool not in GLOBAL_POOLS:
            fail(f"global_pool {self.global_pool!r} must be one of {GLOBAL_POOLS}")
        if self.global_pool == "token" and not self.class_token:
            fail("global_pool='token' needs class_token=True; a model without a class token "
                 "pools with global_pool='avg'")
        if self.distilled and not (self.class_token and self.global_pool == "token"
                                   and not self.reg_tokens):
            fail("distilled (DeiT) models have a class token, token pooling and no registers")
        if self.reg_tokens < 0:
            fail(f"reg_tokens {self.reg_tokens} must be >= 0")
        if self.image_size % self.patch_size:
            fail(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.head_dim is None and self.embed_dim % self.num_heads:
            fail(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("layer_heads", "layer_mlp_dims", "layer_tokens", "layer_token_indices"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, list) or any(isinstance(v, list) for v in value):
                    # Keep the dataclass hashable when built from JSON lists.
                    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                    object.__setattr__(self, name, value)
                if len(value) != self.depth:
                    fail(f"{name} has {len(value)} entries, expected depth={self.depth}")
        if self.layer_heads and any(not 0 <= h <= self.num_heads for h in self.layer_heads):
            fail(f"layer_heads {self.layer_heads} must lie in [0, {self.num_heads}]")
        if self.layer_mlp_dims and any(not 0 <= f <= self.mlp_dim for f in self.layer_mlp_dims):
            fail(f"layer_mlp_dims {self.layer_mlp_dims} must lie in [0, {self.mlp_dim}]")
        if self.layer_token_indices is not None:
            counts = tuple(len(ix) for ix in self.layer_token_indices)
            if self.layer_tokens is not None and counts != tuple(self.layer_tokens):
                fail("layer_tokens disagrees with the lengths of layer_token_indices")
            object.__setattr__(self, "layer_tokens", counts)
        if self.layer_tokens is not None:
            previous = self.num_tokens
            # Without any prefix token, pooling needs at least one token left.
            least = max(self.num_prefix_tokens, 1)
            for layer, count in enumerate(self.layer_tokens):
                if not least <= count <= previous:
                    fail(
                        f"layer_tokens[{layer}]={count} must lie in "
                        f"[{least}, {previous}] (class/distillation/register tokens are "
                        "always kept and a layer can only keep tokens that reached it)"
                    )
                previous = count

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> ViTConfig:
        """`ViTConfig.from_variant('S/16', num_classes=10, image_size=32)`."""
        return cls(**{**decode_variant(variant), **overrides})

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches, in this order: class, distillation, registers."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_pos_embed(self) -> int:
        """Rows of pos_embed: every token, or the patches only (no_embed_class)."""
        return self.num_patches if self.no_embed_class else self.num_tokens

    @property
    def num_tokens(self) -> int:
        """N: the sequence length entering the first block (patches + class [+ distillation])."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def family(self) -> str:
        """A short name of the architecture family, for messages."""
        deit3 = (self.layer_scale and self.no_embed_class and self.class_token
                 and not self.reg_tokens and self.global_pool == "token")
        parts = ["DeiT-III" if deit3 else ("DeiT" if self.distilled else "ViT")]
        if self.layer_scale and not deit3:
            parts.append("with LayerScale")
        if not self.class_token:
            parts.append("without class token")
        if self.reg_tokens:
            parts.append(f"with {self.reg_tokens} register tokens")
        if self.global_pool == "avg":
            parts.append("with average pooling" + (" and fc_norm" if self.fc_norm else ""))
        return " ".join(parts)

    @property
    def is_pruned(self) -> bool:
        return any(
            v is not None for v in (self.layer_heads, self.layer_mlp_dims, self.layer_tokens)
        )

    def heads_at(self, layer: int) -> int:
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    def mlp_dim_at(self, layer: int) -> int:
        return self.mlp_dim if self.layer_mlp_dims is None else self.layer_mlp_dims[layer]

    def tokens_in(self, layer: int) -> int:
        """Sequence length entering block `layer` (after the previous token selections)."""
        if self.layer_tokens is None or layer == 0:
            return self.num_tokens
        return self.layer_tokens[layer - 1]

    def tokens_out(self, layer: int) -> int:
        """Sequence length after the token selection layer of block `layer` (the FFN's input)."""
        return self.num_tokens if self.layer_tokens is None else self.layer_tokens[layer]

    def dense(self) -> ViTConfig:
        """The same architecture without any per-layer pruning."""
        return dataclasses.replace(
            self, layer_heads=None, layer_mlp_dims=None, layer_tokens=None,
            layer_token_indices=None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))

    def num_params(self) -> int:
        """Parameter count of this (possibly pruned) architecture, in closed form."""
        d, dh = self.embed_dim, self.dim_per_head
        n = self.patch_size**2 * self.in_chans * d + d  # patch embedding
        n += self.num_prefix_tokens * d + self.num_pos_embed * d  # prefix tokens, positions
        scales = d if self.layer_scale else 0
        for layer in range(self.depth):
            heads, hidden = self.heads_at(layer), self.mlp_dim_at(layer)
            # A sub-block with nothing kept is gone whole: norm, weights and LayerScale.
            if heads:
                n += 2 * d + d * 3 * heads * dh + 3 * heads * dh + heads * dh * d + d + scales
            if hidden:
                n += 2 * d + d * hidden + hidden + hidden * d + d + scales
        n += 2 * d  # final norm (or fc_norm)
        if self.num_classes:
            n += (d * self.num_classes + self.num_classes) * (2 if self.distilled else 1)
        return n


def ceil_keep(ratio: float, size: int) -> int:
    """ceil((1 - ratio) * size) without float noise turning 3.0000000000000004 into 4."""
    return math.ceil(round((1.0 - ratio) * size, 9))
