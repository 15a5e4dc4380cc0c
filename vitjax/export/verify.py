"""Checking an exported artifact against the JAX model it came from, on the same images."""

from __future__ import annotations

import numpy as np

# Largest accepted |artifact - jax| logit difference, relative to max(1, max |jax logit|).
# float32 runtimes reorder sums (fused matmuls, other GEMM blockings): ~1e-6 is typical.
DEFAULT_TOLERANCE = 1e-4


def reference_logits(model, params, images) -> np.ndarray:
    """Logits of the JAX model itself (jit, float32) for images [B, H, W, C]."""
    import jax
    import jax.numpy as jnp

    from vitjax.export.artifact import inference_fn

    return np.asarray(jax.jit(inference_fn(model, params))(jnp.asarray(images, jnp.float32)))


def max_abs_diff(logits, reference) -> float:
    logits, reference = np.asarray(logits), np.asarray(reference)
    if logits.shape != reference.shape:
        raise ValueError(f"logits have shape {logits.shape}, the reference {reference.shape}")
    return float(np.max(np.abs(logits.astype(np.float64) - reference)))


def within_tolerance(diff: float, reference, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    scale = max(1.0, float(np.max(np.abs(reference))))
    return diff <= tolerance * scale


def sample_batches(model, batches, sample_images=None, seed: int = 0) -> dict[int, np.ndarray]:
    """Images for each batch size: the first b of `sample_images` (cycled when there are fewer),
    or standard normal images (already 'normalised' inputs) when none are given."""
    cfg = model.config
    largest = max(batches)
    if sample_images is None:
        shape = (largest, cfg.image_size, cfg.image_size, cfg.in_chans)
        sample_images = np.random.default_rng(seed).standard_normal(shape, np.float32)
    sample_images = np.asarray(sample_images, np.float32)
    if sample_images.ndim != 4 or not len(sample_images):
        raise ValueError(f"sample_images must be a non-empty [B, H, W, C] batch, got "
                         f"{sample_images.shape}")
    index = np.arange(largest) % len(sample_images)
    return {b: sample_images[index[:b]] for b in batches}
