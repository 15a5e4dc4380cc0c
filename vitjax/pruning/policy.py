"""Pruning policies: per-layer ratios of FFN neurons, attention heads and tokens to remove.

A `Policy` is the ω = {κ^l, ζ^l, ν^l} of the paper (Sec. 3.3). Kept counts follow Sec. 3.2:
ceil((1 - r) * size). Token ratios apply to the patch tokens that survive the previous layers
(compounding); the class and distillation tokens are never removed. A head or neuron ratio of 1
removes that sub-block of the layer (the residual passes through).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import flax.struct
import numpy as np

from vitjax.models.config import ViTConfig, ceil_keep

DIMENSIONS = ("neuron", "head", "token")


@flax.struct.dataclass
class KeepCounts:
    """What a policy keeps, per layer. token[l]: tokens (prefix included) after block l's TSL.

    A pytree: pass it to a jitted function as data and every policy shares one compilation.
    """

    neuron: np.ndarray  # [L] int
    head: np.ndarray  # [L] int
    token: np.ndarray  # [L] int


@dataclasses.dataclass(frozen=True)
class Policy:
    """Per-layer pruning ratios. `neuron`, `head`, `token` each hold L floats."""

    neuron: tuple[float, ...]
    head: tuple[float, ...]
    token: tuple[float, ...]

    def __post_init__(self):
        for name in DIMENSIONS:
            object.__setattr__(self, name, tuple(float(r) for r in getattr(self, name)))

    @property
    def depth(self) -> int:
        return len(self.neuron)

    @classmethod
    def dense(cls, depth: int) -> Policy:
        return cls.uniform(depth)

    @classmethod
    def uniform(cls, depth: int, neuron: float = 0.0, head: float = 0.0, token: float = 0.0):
        return cls((neuron,) * depth, (head,) * depth, (token,) * depth)

    @classmethod
    def from_vector(cls, vector: Sequence[float] | np.ndarray) -> Policy:
        """Inverse of `to_vector`: [neuron_1..L, head_1..L, token_1..L]."""
        v = np.asarray(vector, np.float64).reshape(3, -1)
        return cls(tuple(v[0]), tuple(v[1]), tuple(v[2]))

    def to_vector(self) -> np.ndarray:
        """The policy as the 3L-vector the search's GP works on."""
        return np.asarray(self.neuron + self.head + self.token, np.float64)

    def validate(self, config: ViTConfig) -> Policy:
        """Raises ValueError naming the first problem; returns self so calls can chain."""
        lengths = {name: len(getattr(self, name)) for name in DIMENSIONS}
        if set(lengths.values()) != {config.depth}:
            raise ValueError(
                f"policy has {lengths} ratios per dimension; the model has depth={config.depth}, "
                "so each dimension needs exactly that many ratios"
            )
        if config.is_pruned:
            raise ValueError("policies apply to a dense model; this config is already pruned")
        for name in DIMENSIONS:
            # Removing every head/neuron of a layer drops that sub-block; tokens need r < 1.
            upper_ok = (lambda r: r <= 1.0) if name != "token" else (lambda r: r < 1.0)
            for layer, ratio in enumerate(getattr(self, name)):
                if not (np.isfinite(ratio) and ratio >= 0.0 and upper_ok(ratio)):
                    bound = "[0, 1)" if name == "token" else "[0, 1]"
                    raise ValueError(
                        f"policy {name} ratio of layer {layer} is {ratio}; it must lie in {bound}"
                    )
        return self

    def keep_counts(self, config: ViTConfig) -> KeepCounts:
        self.validate(config)
        neuron = [ceil_keep(r, config.mlp_dim) for r in self.neuron]
        head = [ceil_keep(r, config.num_heads) for r in self.head]
        token, patches = [], config.num_patches
        for ratio in self.token:
            patches = ceil_keep(ratio, patches)
            token.append(patches + config.num_prefix_tokens)
        return KeepCounts(
            np.asarray(neuron, np.int32), np.asarray(head, np.int32), np.asarray(token, np.int32)
        )

    def pruned_config(self, config: ViTConfig) -> ViTConfig:
        """Architecture of the physically pruned model (tokens chosen per image by attention;
        the prune stage adds fixed token positions for the static HSIC mode)."""
        keep = self.keep_counts(config)
        return dataclasses.replace(
            config,
            layer_heads=tuple(int(h) for h in keep.head),
            layer_mlp_dims=tuple(int(f) for f in keep.neuron),
            layer_tokens=tuple(int(t) for t in keep.token),
        )

    def to_dict(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in DIMENSIONS}

    @classmethod
    def from_dict(cls, data: dict) -> Policy:
        missing = [name for name in DIMENSIONS if name not in data]
        extra = sorted(set(data) - set(DIMENSIONS))
        if missing or extra:
            raise ValueError(
                f"a policy needs exactly the keys {list(DIMENSIONS)}; missing {missing}, "
                f"unexpected {extra}"
            )
        return cls(*(tuple(data[name]) for name in DIMENSIONS))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Policy:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"policy JSON is malformed: {e}") from None
        return cls.from_dict(data)

    def describe(self, config: ViTConfig) -> str:
        """One line per layer: kept heads / neurons / tokens."""
        keep = self.keep_counts(config)
        rows = [
            f"layer {layer:2d}: heads {keep.head[layer]:3d}/{config.num_heads}  "
            f"neurons {keep.neuron[layer]:5d}/{config.mlp_dim}  "
            f"tokens {keep.token[layer]:4d}/{config.num_tokens}"
            for layer in range(config.depth)
        ]
        return "\n".join(rows)
