"""scikit-learn's bundled handwritten digits as a tiny image-classification dataset.

1797 grey 8x8 images in 10 classes ship inside scikit-learn, so the whole pipeline runs offline
on a laptop. Images are upsampled to the model's resolution, made RGB and normalised like the
ImageNet inputs the same code sees on a cluster.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
# Statistics of the upsampled digits in [0, 1]; used like ImageNet's mean/std.
MEAN = (0.3,)
STD = (0.4,)


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
    """[n, 8, 8] -> [n, size, size] by bilinear resampling (PIL), values kept in [0, 1]."""
    from PIL import Image

    out = np.empty((len(images), size, size), np.float32)
    for i, img in enumerate(images):
        out[i] = np.asarray(
            Image.fromarray(img.astype(np.float32), mode="F").resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
    return np.clip(out, 0.0, 1.0)


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 [n, 8, 8, 1] images in 0..255 and int32 labels.

    This is the raw form the tf.data pipeline reads (`source='digits'`): it resizes, crops and
    normalises them with the same code as ImageNet JPEGs.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    # Pixel values are 0..16; 255/16 maps them onto the full 8-bit range.
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, data.target.astype(np.int32)


def digits_test_indices(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced test split (`test_fraction` of each class)."""
    rng = np.random.default_rng(seed)
    test = []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: int(round(len(idx) * test_fraction))])
    return np.sort(np.concatenate(test))


def digits_splits(
    image_size: int = 32,
    *,
    holdout_per_class: int = 10,
    test_fraction: float = 0.2,
    seed: int = 0,
    channels: int = 3,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic, class-balanced train / holdout / test splits of the digits.

    holdout is the search's accuracy-evaluation set (the paper's 50-images-per-class sample of
    the training set); it is disjoint from both `train` and `test`. Images are float32
    [n, image_size, image_size, channels], normalised; labels int32.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    labels = data.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    splits = {"train": [], "holdout": [], "test": []}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if holdout_per_class + n_test >= len(idx):
            raise ValueError(
                f"holdout_per_class={holdout_per_class} leaves no training images for class {c}"
            )
        splits["test"].append(idx[:n_test])
        splits["holdout"].append(idx[n_test : n_test + holdout_per_class])
        splits["train"].append(idx[n_test + holdout_per_class :])
    upsampled = _upsample(images, image_size)
    normalised = (upsampled - MEAN[0]) / STD[0]
    out = {}
    for name, parts in splits.items():
        idx = np.sort(np.concatenate(parts))
        x = np.repeat(normalised[idx, :, :, None], channels, axis=-1)
        out[name] = (x, labels[idx])
    return out
