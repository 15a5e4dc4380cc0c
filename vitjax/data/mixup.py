"""Mixup, CutMix and label smoothing on device, in JAX (timm's `Mixup`, mode='batch'): the one
place a batch's targets are made (`mix_batch`, which the train step calls).

These run inside the jitted train step on the global batch, so they cost no host time and are
deterministic given the step's PRNG key. As in DeiT, `mixup_alpha=0.8` and `cutmix_alpha=1.0`
are Beta-distribution concentrations; the partner of image i is image B-1-i (the flipped batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Mixup/CutMix and label smoothing (static, hashable: part of the jitted step's config);
    alphas 0 disable mixing, and the targets are then only smoothed."""

    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, augment, label_smoothing: float = 0.0) -> MixConfig:
        """From `config.augment` (mixup, cutmix, mix_prob, switch_prob; None: no mixing) and
        the loss's `config.train.label_smoothing`."""
        augment = augment or {}
        return cls(mixup=float(augment.get("mixup", 0.0)),
                   cutmix=float(augment.get("cutmix", 0.0)),
                   prob=float(augment.get("mix_prob", 1.0)),
                   switch_prob=float(augment.get("switch_prob", 0.5)),
                   label_smoothing=float(label_smoothing))


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """int [B] or distribution [B, C] -> [B, C] with `smoothing` spread uniformly (timm's)."""
    if labels.ndim == 1:
        labels = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    off = smoothing / num_classes
    return labels * (1.0 - smoothing) + off


def _cutmix_box(rng, lam, height, width):
    """Mask [H, W] of a box covering about (1 - lam) of the image; returns (mask, corrected lam).

    The box centre is uniform and the box is clipped at the borders, so lam is recomputed from
    the clipped area (timm's correct_lam=True).
    """
    cut = jnp.sqrt(1.0 - lam)
    cut_h = (height * cut).astype(jnp.int32)
    cut_w = (width * cut).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    corrected = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return mask, corrected.astype(jnp.float32)


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int | None = None,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a batch [B, H, W, C] and its labels (int [B] or one-hot/soft [B, C]).

    With probability `prob` the batch is mixed: CutMix with probability `switch_prob` (when both
    alphas are > 0), else Mixup. Returns (images, soft labels [B, C]); every label row sums to 1.
    The alphas and probabilities are Python numbers (static), so one compilation serves all steps.
    """
    if labels.ndim == 1 and num_classes is None:
        raise ValueError("mixup_cutmix: integer labels need num_classes")
    num_classes = num_classes or labels.shape[-1]
    targets = smooth_labels(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    key_apply, key_switch, key_mix, key_cut, key_box = jax.random.split(rng, 5)
    apply = jax.random.uniform(key_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    flipped = images[::-1]
    height, width = images.shape[1], images.shape[2]

    lam_mix = (
        jax.random.beta(key_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
    )
    if cutmix_alpha > 0:
        lam_cut = jax.random.beta(key_cut, cutmix_alpha, cutmix_alpha)
        box, lam_cut = _cutmix_box(key_box, lam_cut, height, width)
    else:
        box, lam_cut = jnp.zeros((height, width), bool), jnp.float32(1)

    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    box = box & apply & use_cutmix
    blended = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * flipped
    pasted = jnp.where(box[None, :, :, None], flipped, images)
    mixed = jnp.where(use_cutmix, pasted, blended)
    mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed, mixed_targets


def mix_batch(rng, images, labels, mix: MixConfig, num_classes: int):
    """(images, soft targets [B, C]): `mixup_cutmix` with the settings of `mix`."""
    return mixup_cutmix(rng, images, labels, num_classes=num_classes, mixup_alpha=mix.mixup,
                        cutmix_alpha=mix.cutmix, prob=mix.prob, switch_prob=mix.switch_prob,
                        label_smoothing=mix.label_smoothing)
