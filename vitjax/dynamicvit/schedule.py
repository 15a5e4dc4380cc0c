"""DynamicViT keep-ratio schedules: which fraction of the patch tokens each prediction stage keeps.

A ratio is cumulative: the fraction of the image's patch tokens (class/distillation tokens never
count and are never dropped) still alive after that stage. Two ways to derive them from one
number are in use:

  'original'  (rho, rho^2, rho^3): Rao et al. 2021, DeiT/LV-ViT (`KEEP_RATE` in their main.py);
              rho is their `--base_rate` and the paper's "keeping ratio".
  'base'      (b, b - 0.2, b - 0.4): the block/token pruning paper's "base rate" (their
              `SPARSE_RATIO`), which for b = 0.4 keeps no token at the last stage; `validate`
              refuses such schedules instead of training a model that sees nothing.

The arithmetic is the original's plain float arithmetic (0.7 - 0.4 is 0.29999999999999993), so
token counts agree with the released code: at inference stage i keeps int(N * ratio_i) tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from vitjax.models.config import ViTConfig

KINDS = ("original", "base")
BASE_STEP = 0.2  # how much the 'base' schedule lowers the ratio per stage


def keep_ratios(kind: str, rate: float, num_stages: int = 3) -> tuple[float, ...]:
    """Cumulative keep ratios of `num_stages` prediction stages from one rate (see module doc)."""
    if num_stages < 1:
        raise ValueError(f"a DynamicViT schedule needs at least one stage, got {num_stages}")
    if kind == "original":
        return tuple(rate ** (stage + 1) for stage in range(num_stages))
    if kind == "base":
        return tuple(rate - BASE_STEP * stage for stage in range(num_stages))
    raise ValueError(f"unknown keep-ratio schedule {kind!r}; choose one of {list(KINDS)}")


def keep_counts(ratios: Sequence[float], num_patches: int) -> tuple[int, ...]:
    """Patch tokens kept after each stage at inference: int(N * ratio), as the original does."""
    return tuple(int(num_patches * ratio) for ratio in ratios)


def validate(ratios: Sequence[float], locations: Sequence[int], config: ViTConfig) -> None:
    """Raises ValueError (one line: which stage, why, how to fix) unless the schedule can run.

    Requirements: one ratio per location; locations strictly increasing inside [1, depth - 1]
    (a predictor needs the features of at least one block and must leave one block to run);
    every ratio in (0, 1] and no larger than the one before (ratios are cumulative); every stage
    keeping at least one patch token at inference.
    """
    ratios, locations = tuple(ratios), tuple(locations)
    if not locations or len(ratios) != len(locations):
        raise ValueError(
            f"DynamicViT needs one keep ratio per pruning location and at least one location; "
            f"got {len(ratios)} ratios {ratios} for {len(locations)} locations {locations}"
        )
    depth = config.depth
    for stage, location in enumerate(locations):
        if not 1 <= location <= depth - 1:
            raise ValueError(
                f"DynamicViT stage {stage + 1}: pruning location {location} is outside "
                f"[1, {depth - 1}] for a {depth}-block model; predictors run before a block "
                "that is neither the first nor past the last"
            )
        if stage and location <= locations[stage - 1]:
            raise ValueError(
                f"DynamicViT pruning locations {locations} must be strictly increasing "
                f"(stage {stage + 1} at block {location} follows block {locations[stage - 1]})"
            )
    num_patches = config.num_patches
    counts = keep_counts(ratios, num_patches)
    for stage, (ratio, count) in enumerate(zip(ratios, counts, strict=True)):
        where = f"DynamicViT stage {stage + 1} (before block {locations[stage]})"
        if not 0.0 < ratio <= 1.0:
            raise ValueError(
                f"{where}: keep ratio {ratio:.4g} is not in (0, 1] (it would keep {count} of "
                f"{num_patches} patch tokens); use a higher rate or fewer stages"
            )
        if count < 1:
            raise ValueError(
                f"{where}: keep ratio {ratio:.4g} keeps int({num_patches} x {ratio:.4g}) = "
                f"{count} of {num_patches} patch tokens; every stage must keep one, so use a "
                f"ratio of at least 1/{num_patches} = {1 / num_patches:.4g}"
            )
        if stage and ratio > ratios[stage - 1]:
            raise ValueError(
                f"{where}: keep ratio {ratio:.4g} exceeds the previous stage's "
                f"{ratios[stage - 1]:.4g}; ratios are cumulative fractions of the patch tokens, "
                "so they must not increase"
            )
