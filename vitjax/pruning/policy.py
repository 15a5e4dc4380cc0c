"""Pruning policies: per-layer ratios of FFN neurons, attention heads and tokens to remove.

A `Policy` is the ω = {κ^l, ζ^l, ν^l} of the paper (Sec. 3.3). Kept counts follow Sec. 3.2:
ceil((1 - r) * size). Token ratios apply to the patch tokens that survive the previous layers
(compounding); the class and distillation tokens are never removed. A head or neuron ratio of 1
removes that sub-block of the layer (the residual passes through).
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class SamplingSpace:
    """Upper bounds of the uniform ratio distribution per dimension (lower bound is 0)."""

    neuron: float = 0.9
    head: float = 0.9
    token: float = 0.9


@functools.lru_cache(maxsize=64)
def calibrated_space(
    config: ViTConfig, target_gmacs: float, base: SamplingSpace = SamplingSpace()
) -> SamplingSpace:
    """Scales `base` by one factor so that the median GMACs of its uniform draws is the target.

    The sum of 3L independent ratios concentrates sharply (36 ratios for DeiT-S: the middle 80%
    of draws from [0, 0.9]^36 lie within 0.25-0.66 GMACs), so literal rejection sampling from a
    fixed box almost never lands near a realistic target. Shrinking the box keeps every ratio
    uniform and independent while putting the target in the bulk of the distribution.
    """
    from vitjax.pruning.flops import count_flops_batch

    upper = np.array([base.neuron, base.head, base.token], np.float64)
    unit = np.random.default_rng(0).uniform(0.0, 1.0, (2048, 3, config.depth))
    lo, hi = 0.0, 1.0
    for _ in range(30):
        scale = (lo + hi) / 2
        draws = (unit * (scale * upper)[None, :, None]).reshape(len(unit), -1)
        if np.median(count_flops_batch(config, draws)) > target_gmacs:
            lo = scale
        else:
            hi = scale
    scale = (lo + hi) / 2
    return SamplingSpace(*(float(u) for u in scale * upper))


def sample_policy(
    config: ViTConfig,
    rng: np.random.Generator,
    *,
    target_gmacs: float | None = None,
    tol: float | None = None,
    space: SamplingSpace | None = None,
    batch: int = 256,
    max_tries: int = 200_000,
) -> Policy:
    """Draws from the paper's constrained uniform distribution U_T.

    Every ratio is uniform in [0, space.<dim>]; draws are rejected until the pruned model's GMACs
    are <= target_gmacs (and >= target_gmacs * (1 - tol) when `tol` is given, the band the
    authors' released code samples in). Deterministic given the state of `rng`. With
    `space=None` the box is `SamplingSpace()` without a target and `calibrated_space` with one.
    """
    from vitjax.pruning.flops import count_flops_batch

    if space is None:
        space = SamplingSpace()
        if target_gmacs is not None and target_gmacs < count_flops_batch(
            config, np.zeros((1, 3 * config.depth))
        )[0]:
            space = calibrated_space(config, float(target_gmacs))

    if config.is_pruned:
        raise ValueError("policies are sampled for a dense model; this config is already pruned")
    upper = np.array([space.neuron, space.head, space.token], np.float64)
    if np.any(upper < 0) or np.any(upper[:2] > 1) or upper[2] >= 1:
        raise ValueError(f"sampling space {space} must have bounds in [0,1] ([0,1) for tokens)")
    if target_gmacs is not None:
        smallest = float(count_flops_batch(config, np.repeat(upper, config.depth)[None])[0])
        if target_gmacs < smallest:
            raise ValueError(
                f"target {target_gmacs:.4f} GMACs is below the smallest model of the sampling "
                f"space ({smallest:.4f} GMACs at ratios {space}); raise the target or widen "
                "the space"
            )
    tries = 0
    while tries < max_tries:
        ratios = rng.uniform(0.0, 1.0, (batch, 3, config.depth)) * upper[None, :, None]
        vectors = ratios.reshape(batch, -1)
        tries += batch
        if target_gmacs is None:
            return Policy.from_vector(vectors[0])
        gmacs = count_flops_batch(config, vectors)
        ok = gmacs <= target_gmacs
        if tol is not None:
            ok &= gmacs >= target_gmacs * (1.0 - tol)
        hits = np.flatnonzero(ok)
        if hits.size:
            return Policy.from_vector(vectors[hits[0]])
    raise ValueError(
        f"no policy with GMACs in the requested range after {max_tries} draws (target "
        f"{target_gmacs}, tol {tol}); widen the tolerance or the sampling space"
    )


def policy_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for the policy of training step `step`: identical on every host."""
    return np.random.default_rng([seed, step])
