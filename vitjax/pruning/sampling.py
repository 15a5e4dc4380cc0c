"""U_T, the paper's constrained uniform distribution over policies (Eq. 5), and its calibration.

`sample_policy` draws one policy per supernet training step; `vitjax.search.space.SearchSpace`
samples thousands of candidates from the same distribution restricted to a search space. Both
calibrate the box they draw from with `bisect_median` and refuse an unreachable target with
`check_reachable`, the one "target below the smallest model" message.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from vitjax.models.config import ViTConfig
from vitjax.pruning.policy import Policy

# Draws of the fixed calibration sample (seed 0): the median of 2048 sums of ratios is stable
# to well under 1% of the GMACs.
CALIBRATION_DRAWS = 2048


@dataclasses.dataclass(frozen=True)
class SamplingSpace:
    """Upper bounds of the uniform ratio distribution per dimension (lower bound is 0)."""

    neuron: float = 0.9
    head: float = 0.9
    token: float = 0.9


def calibration_draws(*shape: int) -> np.ndarray:
    """The fixed uniform sample [CALIBRATION_DRAWS, *shape] every calibration measures on."""
    return np.random.default_rng(0).uniform(0.0, 1.0, (CALIBRATION_DRAWS, *shape))


def bisect_median(median_gmacs: Callable[[float], float], target_gmacs: float,
                  steps: int = 30) -> tuple[float, float]:
    """(lo, hi): the bracket in [0, 1] around the factor at which `median_gmacs` (the median
    GMACs of the calibration draws scaled by it, decreasing in the factor) meets the target."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if median_gmacs(mid) > target_gmacs:
            lo = mid
        else:
            hi = mid
    return lo, hi


def in_band(gmacs: np.ndarray, target_gmacs: float, tol: float | None) -> np.ndarray:
    """U_T's acceptance of draws: GMACs <= target, and >= target * (1 - tol) with a band (the
    authors' released code samples in one)."""
    ok = gmacs <= target_gmacs
    if tol is not None:
        ok &= gmacs >= target_gmacs * (1.0 - tol)
    return ok


def check_reachable(target_gmacs: float, smallest_gmacs: float, *, of: str = "", fix: str,
                    detail: str = "", error: type[Exception] = ValueError) -> None:
    """The one error for a FLOPs target below the smallest model `of` can reach (or not
    finite): `error` with '...; {fix}'. `detail` goes after the smallest model's GMACs."""
    if not np.isfinite(target_gmacs) or target_gmacs < smallest_gmacs:
        model = f"the smallest model {of}" if of else "the smallest model"
        raise error(f"target {target_gmacs:.4f} GMACs is below {model} "
                    f"({smallest_gmacs:.4f} GMACs{detail}); {fix}")


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
    unit = calibration_draws(3, config.depth)

    def median_gmacs(scale: float) -> float:
        draws = (unit * (scale * upper)[None, :, None]).reshape(len(unit), -1)
        return np.median(count_flops_batch(config, draws))

    lo, hi = bisect_median(median_gmacs, target_gmacs)
    scale = (lo + hi) / 2
    return SamplingSpace(*(float(u) for u in scale * upper))


def sampling_space(config: ViTConfig, target_gmacs: float | None) -> SamplingSpace:
    """The box `sample_policy` draws from: calibrated to a target below the dense model,
    else the default 0.9 box."""
    from vitjax.pruning.flops import count_flops_batch

    if target_gmacs is not None and target_gmacs < count_flops_batch(
            config, np.zeros((1, 3 * config.depth)))[0]:
        return calibrated_space(config, float(target_gmacs))
    return SamplingSpace()


def smallest_gmacs(config: ViTConfig, space: SamplingSpace = SamplingSpace()) -> float:
    """GMACs of the smallest model U_T can draw from `space`: every ratio at its bound."""
    from vitjax.pruning.flops import count_flops_batch

    upper = np.array([space.neuron, space.head, space.token], np.float64)
    return float(count_flops_batch(config, np.repeat(upper, config.depth)[None])[0])


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
    `space=None` the box is `sampling_space(config, target_gmacs)`.
    """
    from vitjax.pruning.flops import count_flops_batch

    if space is None:
        space = sampling_space(config, target_gmacs)
    if config.is_pruned:
        raise ValueError("policies are sampled for a dense model; this config is already pruned")
    upper = np.array([space.neuron, space.head, space.token], np.float64)
    if np.any(upper < 0) or np.any(upper[:2] > 1) or upper[2] >= 1:
        raise ValueError(f"sampling space {space} must have bounds in [0,1] ([0,1) for tokens)")
    if target_gmacs is not None:
        check_reachable(target_gmacs, smallest_gmacs(config, space), of="of the sampling space",
                        detail=f" at ratios {space}", fix="raise the target or widen the space")
    tries = 0
    while tries < max_tries:
        ratios = rng.uniform(0.0, 1.0, (batch, 3, config.depth)) * upper[None, :, None]
        vectors = ratios.reshape(batch, -1)
        tries += batch
        if target_gmacs is None:
            return Policy.from_vector(vectors[0])
        hits = np.flatnonzero(in_band(count_flops_batch(config, vectors), target_gmacs, tol))
        if hits.size:
            return Policy.from_vector(vectors[hits[0]])
    raise ValueError(
        f"no policy with GMACs in the requested range after {max_tries} draws (target "
        f"{target_gmacs}, tol {tol}); widen the tolerance or the sampling space"
    )


def policy_rng(seed: int, step: int) -> np.random.Generator:
    """The generator for the policy of training step `step`: identical on every host."""
    return np.random.default_rng([seed, step])
