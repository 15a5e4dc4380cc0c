"""HSIC (Hilbert-Schmidt independence criterion) kernels and estimators, Eq. (2) of the paper.

Every estimator used here is linear in the feature Gram matrix K:

    biased   (Eq. 2, Gretton et al. 2005):  tr(K C L C) / (B-1)^2          = sum(K * W_b)
    unbiased (Song et al. 2012, HSIC_1):    (tr(K~L~) + 1'K~1 1'L~1 / ((B-1)(B-2))
                                             - 2/(B-2) 1'K~L~1) / (B(B-3))  = sum(K * W_u)

with C = I - 11'/B, and K~, L~ the Gram matrices with zeroed diagonals. The weight matrix W
depends only on the output kernel L, so it is computed once per batch and scoring F features
costs F Gram matrices plus one elementwise product-and-sum each: no B x B x B products.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

SIGMA_MODES = ("fixed", "median", "multi")
OUTPUT_KERNELS = ("gaussian", "linear")
ESTIMATORS = ("biased", "unbiased")
# Bandwidths the authors' released code averages its Gaussian kernels over.
AUTHORS_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)


def centering_matrix(batch: int, dtype=jnp.float32) -> Array:
    """C = I - 11'/B."""
    return jnp.eye(batch, dtype=dtype) - jnp.full((batch, batch), 1.0 / batch, dtype)


def center(gram: Array) -> Array:
    """C G C without matrix products: subtract row and column means, add the grand mean."""
    return (
        gram
        - gram.mean(axis=-1, keepdims=True)
        - gram.mean(axis=-2, keepdims=True)
        + gram.mean(axis=(-2, -1), keepdims=True)
    )


def squared_distances(x: Array, precision=jax.lax.Precision.HIGHEST) -> Array:
    """Pairwise squared Euclidean distances of the rows of x [..., B, D] -> [..., B, B].

    ||zi - zj||^2 = |zi|^2 + |zj|^2 - 2 zi.zj: one batched matmul instead of a B x B x D
    difference tensor. Rounding can make the expansion slightly negative; it is clipped, and
    the diagonal is exactly zero.
    """
    sq = jnp.sum(x * x, axis=-1)
    inner = jnp.einsum("...id,...jd->...ij", x, x, precision=precision)
    d2 = jnp.maximum(sq[..., :, None] + sq[..., None, :] - 2.0 * inner, 0.0)
    eye = jnp.eye(x.shape[-2], dtype=bool)
    return jnp.where(eye, 0.0, d2)


def median_sigma(d2: Array) -> Array:
    """Median heuristic: sigma = median pairwise distance (off-diagonal), per leading index."""
    batch = d2.shape[-1]
    rows, cols = jnp.triu_indices(batch, k=1)
    return jnp.sqrt(jnp.median(d2[..., rows, cols], axis=-1))


def gaussian_from_distances(
    d2: Array, sigma_mode: str = "fixed", sigma: float = 1.0, sigmas: Sequence[float] = ()
) -> Array:
    """Gaussian kernel exp(-d2 / (2 sigma^2)) from squared distances d2 [..., B, B].

    sigma_mode 'fixed': the given sigma (paper: 1); 'median': per Gram matrix, sigma = the
    median pairwise distance times `sigma`; 'multi': the mean of the kernels with bandwidths
    `sigmas` (the authors' code: 1, 2, 4, 8, 16).
    """
    if sigma_mode == "fixed":
        return jnp.exp(-d2 / (2.0 * sigma**2))
    if sigma_mode == "median":
        # A constant feature has median distance 0; any positive bandwidth then gives K = 1.
        bandwidth = jnp.maximum(median_sigma(d2) * sigma, 1e-12)[..., None, None]
        return jnp.exp(-d2 / (2.0 * bandwidth**2))
    if sigma_mode == "multi":
        if not sigmas:
            raise ValueError("sigma_mode='multi' needs a non-empty `sigmas`, e.g. (1, 2, 4, 8, 16)")
        # One exp per bandwidth. (Squaring the widest kernel instead is 7x slower on x86: the
        # chain makes denormals.)
        return sum(jnp.exp(-d2 / (2.0 * s**2)) for s in sigmas) / len(sigmas)
    raise ValueError(f"sigma_mode must be one of {SIGMA_MODES}, got {sigma_mode!r}")


def gaussian_gram(
    x: Array, sigma: float = 1.0, *, sigma_mode: str = "fixed", sigmas: Sequence[float] = ()
) -> Array:
    """Gaussian Gram matrix of the rows of x [..., B, D] -> [..., B, B]."""
    return gaussian_from_distances(squared_distances(x), sigma_mode, sigma, sigmas)


def linear_gram(x: Array) -> Array:
    """Linear kernel y.y' of the rows of x [..., B, D]."""
    return jnp.einsum("...id,...jd->...ij", x, x, precision=jax.lax.Precision.HIGHEST)


def output_gram(outputs: Array, kernel: str = "gaussian", sigma: float = 1.0) -> Array:
    """Gram matrix L of the model outputs [B, C] (softmax probabilities in the paper)."""
    if kernel == "gaussian":
        return gaussian_gram(outputs, sigma)
    if kernel == "linear":
        return linear_gram(outputs)
    raise ValueError(f"output kernel must be one of {OUTPUT_KERNELS}, got {kernel!r}")


def hsic_weights(L: Array, estimator: str = "biased") -> Array:
    """The matrix W with HSIC(K, L) = sum(K * W) for any feature Gram matrix K [B, B]."""
    batch = L.shape[-1]
    if estimator == "biased":
        # Centring twice: float32 rounding leaves sum(W) ~ 1e-7, which the large constant part
        # of a Gaussian K turns into an error comparable to small HSIC values; a second pass
        # takes it down to ~1e-10 (W is exactly doubly centred in exact arithmetic anyway).
        return center(center(L)) / (batch - 1) ** 2
    if estimator == "unbiased":
        if batch < 4:
            raise ValueError(f"the unbiased HSIC estimator needs a batch of >= 4, got {batch}")
        eye = jnp.eye(batch, dtype=bool)
        L0 = jnp.where(eye, 0.0, L)
        row = L0.sum(axis=-1)
        total = row.sum()
        # K~ is symmetric, so 1'K~L~1 = sum_ij K~_ij (r_i + r_j) / 2 with r = L~1.
        W = (
            L0
            + total / ((batch - 1) * (batch - 2))
            - (row[:, None] + row[None, :]) / (batch - 2)
        ) / (batch * (batch - 3))
        W = jnp.where(eye, 0.0, W)  # K's diagonal never enters HSIC_1
        # Exactly, off-diagonal W sums to 0 (a constant kernel is independent of anything);
        # remove the float32 rounding remainder, for the same reason as above.
        return jnp.where(eye, 0.0, W - W.sum() / (batch * (batch - 1)))
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def hsic(K: Array, L: Array, estimator: str = "biased") -> Array:
    """HSIC of two Gram matrices K [..., B, B] and L [B, B] (broadcast over K's leading axes)."""
    W = hsic_weights(L, estimator)
    return jnp.einsum("...ij,ij->...", K, W, precision=jax.lax.Precision.HIGHEST)
