"""The search space: which pruning ratios the search varies, and how a unit-cube point maps to a
`Policy`.

Each dimension (neuron, head, token) is searched per layer (`'layer'`), with one ratio shared by
its layers (`'tied'`), or held at a fixed ratio (a float). The GP works on `u`, the free
coordinates only, each scaled to [0, 1] from its bounds [min_ratio, max_ratio]:

    space = SearchSpace.from_config(dict(neuron='layer', head='layer', token='tied',
                                         max_ratio=0.9), depth=12)
    policy = space.to_policy(u)          # u: [space.dim] in [0, 1]
    u = space.from_policy(policy)

`SearchSpace.paper(L)` is the paper's 3L ratios; `SearchSpace.authors_code(L)` is the authors'
released code: 12 neuron + 12 head ratios and one token ratio shared by the token selection
layers after blocks 3, 6 and 9 (0-based; it compounds, keeping (1-r)^k of the patches after the
k-th), ratios in [0, 0.5].

The map u -> 3L ratio vector is affine (a gather plus fixed values), so the relaxed FLOPs stay a
smooth function of u for SLSQP. Rounding to integer keep counts and sampling from U_T restricted
to the space live here too, because both need to know which layer a coordinate stands for.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import numpy as np

from vitjax.errors import UserError
from vitjax.models.config import ViTConfig
from vitjax.pruning.flops import count_flops_batch
from vitjax.pruning.policy import DIMENSIONS, Policy
from vitjax.pruning.sampling import (
    bisect_median,
    calibration_draws,
    check_reachable,
    in_band,
)

MODES = ("layer", "tied")
_TOKEN_CEILING = 0.99  # a token ratio must stay < 1: the class token needs company to attend to


def _per_dimension(value, name: str) -> tuple[float, float, float]:
    """A float for every dimension, or a mapping {neuron:, head:, token:} (missing: default)."""
    defaults = {"min_ratio": 0.0, "max_ratio": 0.9}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(DIMENSIONS))
        if unknown:
            raise UserError(f"search space {name} has unknown dimensions {unknown}; "
                            f"use {list(DIMENSIONS)}")
        return tuple(float(value.get(dim, defaults[name])) for dim in DIMENSIONS)
    try:
        return (float(value),) * 3
    except (TypeError, ValueError):
        raise UserError(f"search space {name} must be a number or a mapping per dimension, "
                        f"got {value!r}") from None


class InfeasibleTarget(UserError):
    """No policy of the space meets the target (within the band) in the draws allowed: the
    reachable region is empty or too thin a corner to sample."""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Which ratios are searched; hashable so jitted functions can close over it."""

    depth: int  # L
    neuron: str | float = "layer"  # 'layer' | 'tied' | a fixed ratio
    head: str | float = "layer"
    token: str | float = "layer"
    min_ratio: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per dimension (neuron, head, token)
    max_ratio: tuple[float, float, float] = (0.9, 0.9, 0.9)
    # Layers that have a token selection layer; the others keep every token (ratio 0).
    # None: every layer (the paper). The authors' code: (3, 6, 9).
    token_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if int(self.depth) < 1:
            raise UserError(f"search space depth must be >= 1, got {self.depth}")
        for dim in DIMENSIONS:
            mode = getattr(self, dim)
            if isinstance(mode, str):
                if mode not in MODES:
                    raise UserError(
                        f"search space {dim}={mode!r} is unknown; use 'layer' (one ratio per "
                        "layer), 'tied' (one ratio for all layers) or a number (a fixed ratio)"
                    )
            else:
                value = float(mode)
                ceiling_ok = value < 1.0 if dim == "token" else value <= 1.0
                if not (value >= 0.0 and ceiling_ok):
                    raise UserError(f"search space {dim}={value} is outside "
                                    f"{'[0, 1)' if dim == 'token' else '[0, 1]'}")
                object.__setattr__(self, dim, value)
        object.__setattr__(self, "min_ratio", tuple(float(v) for v in self.min_ratio))
        object.__setattr__(self, "max_ratio", tuple(float(v) for v in self.max_ratio))
        for dim, lo, hi in zip(DIMENSIONS, self.min_ratio, self.max_ratio, strict=True):
            ceiling = _TOKEN_CEILING if dim == "token" else 1.0
            if not 0.0 <= lo < hi <= ceiling:
                raise UserError(
                    f"search space bounds for {dim} are [{lo}, {hi}]; they need "
                    f"0 <= min_ratio < max_ratio <= {ceiling}"
                )
        if self.token_layers is not None:
            layers = tuple(sorted({int(layer) for layer in self.token_layers}))
            if not layers or layers[0] < 0 or layers[-1] >= self.depth:
                raise UserError(f"search space token_layers {self.token_layers} must be "
                                f"non-empty layer indices in [0, {self.depth})")
            object.__setattr__(self, "token_layers", layers)
        if self.dim == 0:
            raise UserError("the search space has no free ratio: every dimension is fixed")

    # ----------------------------------------------------------------- construction
    @classmethod
    def paper(cls, depth: int, max_ratio: float = 0.9) -> SearchSpace:
        """ω = {κ^l, ζ^l, ν^l}: 3L free ratios (Sec. 3.3)."""
        return cls(depth, max_ratio=(max_ratio,) * 3)

    @classmethod
    def authors_code(cls, depth: int = 12) -> SearchSpace:
        """The released code: 12 + 12 + 1 ratios in [0, 0.5], token layers 3, 6, 9."""
        return cls(depth, "layer", "layer", "tied", max_ratio=(0.5,) * 3,
                   token_layers=(depth // 4, depth // 2, 3 * depth // 4))

    @classmethod
    def from_config(cls, block, depth: int) -> SearchSpace:
        """From `config.search.space`, e.g. dict(neuron='layer', head='layer', token='tied',
        max_ratio=0.9, token_layers=(3, 6, 9)); `preset='paper'|'authors_code'` starts from a
        preset that the other keys override."""
        fields = dict(block.to_dict() if hasattr(block, "to_dict") else (block or {}))
        known = {"preset", "neuron", "head", "token", "min_ratio", "max_ratio", "token_layers"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise UserError(f"config.search.space has unknown keys {unknown}; known: "
                            f"{sorted(known)}")
        preset = fields.pop("preset", None) or "paper"
        presets = {"paper": cls.paper, "authors_code": cls.authors_code}
        if preset not in presets:
            raise UserError(f"config.search.space.preset={preset!r} is unknown; use one of "
                            f"{sorted(presets)}")
        base = dataclasses.asdict(presets[preset](depth))
        for name in ("min_ratio", "max_ratio"):
            if fields.get(name) is not None:
                base[name] = _per_dimension(fields.pop(name), name)
            fields.pop(name, None)
        if fields.get("token_layers") is not None:
            base["token_layers"] = tuple(fields.pop("token_layers"))
        fields.pop("token_layers", None)
        base.update({k: v for k, v in fields.items() if v is not None})
        return cls(**base)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["min_ratio"], data["max_ratio"] = list(self.min_ratio), list(self.max_ratio)
        if self.token_layers is not None:
            data["token_layers"] = list(self.token_layers)
        return data

    # ----------------------------------------------------------------- layout
    @functools.cached_property
    def _layout(self):
        """coordinate[3L]: which free coordinate sets each ratio (-1: fixed to offset[3L])."""
        L = self.depth
        coordinate = np.full(3 * L, -1, np.int64)
        offset = np.zeros(3 * L)
        names, dims, layers = [], [], []
        for d, dim in enumerate(DIMENSIONS):
            mode = getattr(self, dim)
            active = list(range(L))
            if dim == "token" and self.token_layers is not None:
                active = list(self.token_layers)
            if isinstance(mode, float):
                offset[d * L + np.asarray(active)] = mode
            elif mode == "tied":
                coordinate[d * L + np.asarray(active)] = len(names)
                names.append(f"{dim}[*]")
                dims.append(d)
                layers.append(tuple(active))
            else:
                for layer in active:
                    coordinate[d * L + layer] = len(names)
                    names.append(f"{dim}[{layer}]")
                    dims.append(d)
                    layers.append((layer,))
        return coordinate, offset, tuple(names), np.asarray(dims, np.int64), tuple(layers)

    @property
    def dim(self) -> int:
        """Number of free coordinates (the GP's input dimension)."""
        return len(self._layout[2])

    @property
    def coordinate_names(self) -> tuple[str, ...]:
        """'neuron[3]', 'head[0]', 'token[*]' (tied) ... in the order of u."""
        return self._layout[2]

    @property
    def coordinate_dimensions(self) -> np.ndarray:
        """Per coordinate, its dimension's index in DIMENSIONS (0 neuron, 1 head, 2 token)."""
        return self._layout[3]

    @property
    def is_full(self) -> bool:
        """The paper's space: every one of the 3L ratios is free."""
        return self.dim == 3 * self.depth

    def lower_upper(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounds of each free coordinate's ratio."""
        dims = self._layout[3]
        return np.asarray(self.min_ratio)[dims], np.asarray(self.max_ratio)[dims]

    # ----------------------------------------------------------------- maps
    def to_ratios(self, u, xp=np):
        """u [..., dim] in [0, 1] -> policy vectors [..., 3L] (`Policy.to_vector` order).
        Pass xp=jax.numpy to stay differentiable."""
        coordinate, offset, *_ = self._layout
        lo, hi = self.lower_upper()
        u = xp.asarray(u)
        scaled = lo + u * (hi - lo)
        gathered = xp.take(scaled, np.maximum(coordinate, 0), axis=-1)
        return xp.where(coordinate >= 0, gathered, offset)

    def to_policy(self, u) -> Policy:
        u = np.asarray(u, np.float64)
        if u.shape != (self.dim,):
            raise ValueError(f"u has shape {u.shape}; this space has {self.dim} coordinates")
        return Policy.from_vector(self.to_ratios(np.clip(u, 0.0, 1.0)))

    def from_policy(self, policy: Policy, atol: float = 1e-9) -> np.ndarray:
        """Inverse of `to_policy`; ValueError if the policy is not in the space."""
        if policy.depth != self.depth:
            raise ValueError(f"policy has depth {policy.depth}; the space has {self.depth}")
        vector = policy.to_vector()
        coordinate, offset, names, _, _ = self._layout
        lo, hi = self.lower_upper()
        u = np.zeros(self.dim)
        for c in range(self.dim):
            values = vector[coordinate == c]
            if np.ptp(values) > atol:
                raise ValueError(f"policy is not in the space: {names[c]} is tied but the "
                                 f"policy has different ratios {values.tolist()}")
            u[c] = (values[0] - lo[c]) / (hi[c] - lo[c])
        fixed = coordinate < 0
        if np.any(np.abs(vector[fixed] - offset[fixed]) > atol):
            raise ValueError("policy is not in the space: it changes a ratio the space fixes")
        if np.any(u < -atol) or np.any(u > 1 + atol):
            raise ValueError(f"policy is not in the space: a ratio lies outside the bounds "
                             f"{self.min_ratio}..{self.max_ratio}")
        return np.clip(u, 0.0, 1.0)

    def gmacs(self, config: ViTConfig, u) -> np.ndarray:
        """Exact GMACs (ceil keep counts) of u [..., dim]."""
        self._check_config(config)
        u = np.asarray(u, np.float64)
        return count_flops_batch(config, self.to_ratios(u.reshape(-1, self.dim))).reshape(
            u.shape[:-1])

    def _check_config(self, config: ViTConfig):
        if config.depth != self.depth:
            raise ValueError(f"model depth {config.depth} != search space depth {self.depth}")

    # ----------------------------------------------------------------- integer keep counts
    def _first_layer_sizes(self, config: ViTConfig, u: np.ndarray) -> np.ndarray:
        """Size [dim] that each coordinate's ratio applies to in its first layer at the point
        u: neurons and heads their dense count, tokens the patches the earlier layers leave."""
        _, _, _, dims, layers = self._layout
        token_ratios = self.to_ratios(u)[2 * self.depth:]
        patches_in, patches = np.empty(self.depth), float(config.num_patches)
        for layer in range(self.depth):
            patches_in[layer] = patches
            patches = np.ceil(np.round((1.0 - token_ratios[layer]) * patches, 9))
        first = np.array([group[0] for group in layers], np.int64)
        return np.where(dims == 0, float(config.mlp_dim),
                        np.where(dims == 1, float(config.num_heads), patches_in[first]))

    def _keep_range(self, config: ViTConfig, u: np.ndarray, upper=None):
        """Per coordinate at the point u: (size, fractional kept count of the first layer,
        smallest and largest integer count inside the bounds). `upper` [dim] (unit-cube
        units): a tighter upper bound per coordinate than max_ratio (a `Problem`'s region)."""
        lo, hi = self.lower_upper()
        size = self._first_layer_sizes(config, u)
        keep = (1.0 - (lo + u * (hi - lo))) * size
        top = hi if upper is None else lo + np.minimum(np.asarray(upper), 1.0) * (hi - lo)
        keep_min = np.ceil(np.round((1.0 - top) * size, 9))
        keep_max = np.floor(np.round((1.0 - lo) * size, 9))
        return size, keep, keep_min, keep_max

    def _unit_from_keep(self, keep, size, c):
        lo, hi = self.lower_upper()
        return np.clip(((1.0 - keep / size) - lo[c]) / (hi[c] - lo[c]), 0.0, 1.0)

    @functools.cached_property
    def _segments(self):
        """Free entries of the 3L vector grouped by coordinate, for np.maximum.reduceat."""
        coordinate = self._layout[0]
        entries = np.flatnonzero(coordinate >= 0)
        entries = entries[np.argsort(coordinate[entries], kind="stable")]
        starts = np.searchsorted(coordinate[entries], np.arange(self.dim))
        return entries, starts

    def canonical(self, config: ViTConfig, u) -> np.ndarray:
        """The same pruned models, each free ratio lowered to the smallest value that keeps the
        same counts in every layer it sets (1 - kept/size, the largest over a tied ratio's
        layers). Policies keep ceil((1 - r) * size), so many u give one model; the GP should
        see one point per model. Vectorised over u [..., dim]."""
        self._check_config(config)
        u = np.asarray(u, np.float64)
        points = u.reshape(-1, self.dim)
        ratios = self.to_ratios(points)
        L = self.depth
        exact = np.empty_like(ratios)
        for d, size in ((0, config.mlp_dim), (1, config.num_heads)):
            block = ratios[:, d * L:(d + 1) * L]
            exact[:, d * L:(d + 1) * L] = 1.0 - np.ceil(np.round((1 - block) * size, 9)) / size
        patches = np.full(len(points), float(config.num_patches))
        for layer in range(L):
            keep = np.ceil(np.round((1.0 - ratios[:, 2 * L + layer]) * patches, 9))
            exact[:, 2 * L + layer] = 1.0 - keep / patches
            patches = keep
        entries, starts = self._segments
        smallest = np.maximum.reduceat(exact[:, entries], starts, axis=1)
        lo, hi = self.lower_upper()
        return np.clip((smallest - lo) / (hi - lo), 0.0, 1.0).reshape(u.shape)

    def round(self, config: ViTConfig, u, upper=None) -> np.ndarray:
        """Snaps each free ratio so that its first layer keeps the nearest integer count (within
        the bounds, and `upper` if given), then `canonical`. Coordinates go in layer order so a
        token ratio sees the patches the earlier, already snapped, token layers leave. Rounding
        up a count adds FLOPs: `optimize.repair` restores the budget."""
        self._check_config(config)
        u = np.array(u, np.float64)
        for c in self._layer_order:
            size, keep, keep_min, keep_max = (v[c] for v in self._keep_range(config, u, upper))
            if size <= 0 or keep_min > keep_max:
                continue  # no integer count inside the bounds: leave the ratio as it is
            u[c] = self._unit_from_keep(np.clip(np.round(keep), keep_min, keep_max), size, c)
        return self.canonical(config, u)

    def units_to_bound(self, config: ViTConfig, u, upper=None) -> np.ndarray:
        """Per coordinate of the canonical point u: how many more units its first layer can
        drop before max_ratio (or `upper`)."""
        size, keep, keep_min, _ = self._keep_range(config, np.asarray(u, np.float64), upper)
        available = np.ceil(np.round(keep, 9)) - keep_min
        return np.where(size > 0, np.maximum(available, 0), 0).astype(np.int64)

    def step_down(self, config: ViTConfig, u, units, upper=None) -> np.ndarray:
        """Row c: the canonical point u with coordinate c keeping units[c] fewer in its first
        layer (at most down to its bound, or `upper`), canonical again (later token layers keep
        the ceil of their ratio of the fewer patches they now see). [dim, dim]."""
        u = np.asarray(u, np.float64)
        size, keep, keep_min, _ = self._keep_range(config, u, upper)
        kept = np.maximum(np.ceil(np.round(keep, 9)) - np.asarray(units), keep_min)
        lo, hi = self.lower_upper()
        rows = np.repeat(u[None], self.dim, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            stepped = np.clip(((1.0 - kept / size) - lo) / (hi - lo), 0.0, 1.0)
        diagonal = np.arange(self.dim)
        rows[diagonal, diagonal] = np.where(size > 0, stepped, u)
        return self.canonical(config, rows)

    @functools.cached_property
    def _layer_order(self) -> list[int]:
        """Coordinates sorted by their first layer (tokens compound front to back)."""
        _, _, _, dims, layers = self._layout
        return sorted(range(self.dim), key=lambda c: (layers[c][0], dims[c]))

    # ----------------------------------------------------------------- U_T in this space
    def smallest_gmacs(self, config: ViTConfig) -> float:
        """GMACs with every free ratio at its upper bound: the cheapest reachable model."""
        return float(self.gmacs(config, np.ones(self.dim)))

    def check_target(self, config: ViTConfig, target_gmacs: float, upper=None) -> None:
        smallest = self.smallest_gmacs(config)
        if upper is not None and np.isfinite(target_gmacs) and target_gmacs >= smallest:
            reachable = float(self.gmacs(config, np.minimum(np.asarray(upper), 1.0)))
            check_reachable(target_gmacs, reachable, of="of the search region",
                            detail=" with every ratio at its bound", error=UserError,
                            fix="raise the target or search the whole space "
                                "(config.search.region='cube')")
        check_reachable(target_gmacs, smallest, of="of the search space",
                        detail=f" with every ratio at its max_ratio {self.max_ratio}",
                        fix="raise the target or config.search.space.max_ratio",
                        error=UserError)

    def calibrated_scale(self, config: ViTConfig, target_gmacs: float) -> float:
        """One factor s for the unit box [0, s]^dim whose median draw meets the target.

        The same idea as `vitjax.pruning.sampling.calibrated_space` (see there why: a sum of many
        independent ratios concentrates), applied to the free coordinates of this space.
        """
        return _calibrated_scale(self, config, float(target_gmacs))

    def sampling_box(self, config: ViTConfig, target_gmacs: float, upper=None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) [dim]: the box `sample` draws uniformly from before rejecting by FLOPs.

        Without `upper`: U_T's calibrated box [0, s]^dim. With `upper` [dim] (a region inside
        the cube, e.g. the box the supernet was trained on): that box clipped to `upper`; if
        the clipped box's median draw is above the target (a target below the one `upper` was
        calibrated for), its lower corner is raised by one factor a (low = a * high) until the
        median meets the target, so rejection keeps a useful fraction of the draws instead of
        the corner's 1 in 4000 (measured on digits at 40% FLOPs in the 60% box)."""
        scale = self.calibrated_scale(config, target_gmacs)
        if upper is None or np.all(scale <= np.asarray(upper) * (1 + 1e-9)):
            return np.zeros(self.dim), np.full(self.dim, scale)
        return _raised_box(self, config, float(target_gmacs),
                           tuple(float(v) for v in np.minimum(scale, upper)))

    def sample(
        self,
        config: ViTConfig,
        rng: np.random.Generator,
        count: int,
        *,
        target_gmacs: float,
        tol: float | None = None,
        upper=None,
        batch: int = 4096,
        max_draws: int = 2_000_000,
        minimum: int | None = None,
    ) -> np.ndarray:
        """`count` draws of u from U_T: uniform in the calibrated box, rejected until the exact
        GMACs are <= target (and >= target*(1-tol) with a band). For the paper's space this is
        the distribution of `vitjax.pruning.sampling.sample_policy`; vectorised for thousands of
        candidates per search iteration. `upper` [dim]: stay inside [0, upper] (see
        `sampling_box`). Deterministic given `rng`. `minimum`: after `max_draws` draws return
        what was found if at least this many (default: `count`, else `InfeasibleTarget`)."""
        self.check_target(config, target_gmacs, upper)
        low, high = self.sampling_box(config, target_gmacs, upper)
        # The same draws as U_T's scalar box when the region does not cut it.
        scalar = not np.any(low) and np.all(high == high[0])
        found, draws = [], 0
        while sum(len(f) for f in found) < count:
            if draws >= max_draws:
                if minimum is not None and sum(len(f) for f in found) >= minimum:
                    break
                lowest = target_gmacs * (1 - tol) if tol is not None else 0.0
                raise InfeasibleTarget(
                    f"found only {sum(len(f) for f in found)} of {count} policies with GMACs "
                    f"in [{lowest:.4f}, {target_gmacs:.4f}] in {max_draws} random draws; raise "
                    "the target, widen the band (config.search.tol) or the search space"
                )
            u = (rng.uniform(0.0, high[0], (batch, self.dim)) if scalar
                 else rng.uniform(low, high, (batch, self.dim)))
            draws += batch
            found.append(u[in_band(self.gmacs(config, u), target_gmacs, tol)])
        return np.concatenate(found)[:count]


@functools.lru_cache(maxsize=64)
def _raised_box(space: SearchSpace, config: ViTConfig, target_gmacs: float,
                high: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    high = np.asarray(high)
    unit = calibration_draws(space.dim)
    if np.median(space.gmacs(config, unit * high)) <= target_gmacs:
        return np.zeros(space.dim), high
    _, hi = bisect_median(
        lambda a: np.median(space.gmacs(config, high * (a + (1 - a) * unit))), target_gmacs)
    return hi * high, high


@functools.lru_cache(maxsize=64)
def _calibrated_scale(space: SearchSpace, config: ViTConfig, target_gmacs: float) -> float:
    dense = float(space.gmacs(config, np.zeros(space.dim)))
    if target_gmacs >= dense:
        return 1.0  # every policy meets the target: sample the whole box, as sample_policy
    unit = calibration_draws(space.dim)
    lo, hi = bisect_median(lambda scale: np.median(space.gmacs(config, unit * scale)),
                           target_gmacs)
    return (lo + hi) / 2

