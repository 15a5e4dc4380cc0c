"""Per-example tf.data preprocessing: DeiT evaluation transform and training transform.

Raw images are uint8 arrays or encoded bytes; JPEGs are decoded only inside the crop window
(`decode_and_crop_jpeg`), which is what keeps ImageNet training input-bound on few cores.
All randomness is stateless (`tf.random.stateless_*`) and seeded per example, so a batch is a
pure function of (seed, epoch, position): resumed runs see the same images.

Order of the training transform follows timm's `create_transform` as used by DeiT:
random resized crop (bicubic) -> horizontal flip -> RandAugment (uint8) -> normalise ->
random erasing (in normalised space, per-pixel N(0, 1) noise).
"""

from __future__ import annotations

import ml_collections
import tensorflow as tf

from vitjax.data import augment
from vitjax.errors import UserError


def image_shape(raw: tf.Tensor) -> tf.Tensor:
    """[h, w] of a raw image without decoding JPEG pixels."""
    if raw.dtype != tf.string:
        return tf.shape(raw)[:2]
    return tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.extract_jpeg_shape(raw)[:2],
        lambda: tf.shape(_decode_full(raw, 3))[:2],
    )


def _decode_full(raw: tf.Tensor, channels: int) -> tf.Tensor:
    image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1:
        return tf.repeat(image, channels, axis=-1)
    if channels == 1:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f"cannot turn {have}-channel images into {channels}-channel images")


def decode_crop(raw: tf.Tensor, window: tf.Tensor | None, channels: int) -> tf.Tensor:
    """uint8 [h', w', channels] of the window [y, x, h, w] (None: the whole image)."""
    if raw.dtype != tf.string:
        image = raw
        if window is not None:
            image = image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
        return _to_channels(image, channels)

    def jpeg():
        if window is None:
            return tf.io.decode_jpeg(raw, channels=channels)
        return tf.io.decode_and_crop_jpeg(raw, window, channels=channels)

    def other():
        image = _decode_full(raw, channels)
        if window is None:
            return image
        return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    image = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    image.set_shape([None, None, channels])
    return image


def _resize_uint8(image: tf.Tensor, size) -> tf.Tensor:
    # Bicubic with antialiasing matches PIL's BICUBIC resize that DeiT uses when downsampling.
    resized = tf.image.resize(image, size, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def normalise(image: tf.Tensor, mean, std) -> tf.Tensor:
    """uint8 -> float32 (x / 255 - mean) / std."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def eval_image(raw: tf.Tensor, *, size: int, crop_pct: float, channels: int) -> tf.Tensor:
    """DeiT evaluation transform, uint8: shorter side -> floor(size / crop_pct), centre crop."""
    image = decode_crop(raw, None, channels)
    scale_size = int(size / crop_pct)  # floor, as timm: 224 / 0.875 = 256
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    ratio = scale_size / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * ratio), tf.int32), scale_size)
    image = _resize_uint8(image, new_shape)
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    image = image[top : top + size, left : left + size]
    image.set_shape([size, size, channels])
    return image


def random_crop_window(shape, seed, *, scale, ratio) -> tf.Tensor:
    """[y, x, h, w] of an Inception-style random resized crop (area and aspect ranges)."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [1]], 0),
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def train_image(
    raw: tf.Tensor, seed: tf.Tensor, *, size: int, channels: int, augment_config
) -> tf.Tensor:
    """DeiT training transform up to (not including) normalisation; returns uint8."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    if augment_config.random_resized_crop:
        window = random_crop_window(
            image_shape(raw),
            seeds[0],
            scale=augment_config.crop_scale,
            ratio=augment_config.crop_ratio,
        )
        image = _resize_uint8(decode_crop(raw, window, channels), (size, size))
    else:
        image = eval_image(raw, size=size, crop_pct=1.0, channels=channels)
    if augment_config.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if augment_config.randaugment:
        num_ops, magnitude, magnitude_std = augment.parse_randaugment(augment_config.randaugment)
        rgb = _to_channels(image, 3)
        rgb = augment.rand_augment(
            rgb, seeds[2], num_ops=num_ops, magnitude=magnitude, magnitude_std=magnitude_std
        )
        image = _to_channels(rgb, channels)
    image.set_shape([size, size, channels])
    return image


def make_train_fn(data_config: ml_collections.ConfigDict, augment_config):
    """(raw, label, seed) -> {'image': float32 normalised, 'label'} for tf.data.map."""
    size, channels = data_config.image_size, data_config.channels
    mean, std = _stats(data_config)
    erase = float(augment_config.random_erasing)

    def fn(raw, label, seed):
        crop_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = train_image(
            raw, crop_seed, size=size, channels=channels, augment_config=augment_config
        )
        image = normalise(image, mean, std)
        if erase > 0:
            image = augment.random_erasing(image, erase_seed, probability=erase)
        return {"image": image, "label": label}

    return fn


def make_eval_fn(data_config: ml_collections.ConfigDict):
    """(raw, label) -> {'image': float32 normalised, 'label'} for tf.data.map."""
    size, channels = data_config.image_size, data_config.channels
    mean, std = _stats(data_config)
    crop_pct = float(data_config.eval_crop_pct)

    def fn(raw, label):
        image = eval_image(raw, size=size, crop_pct=crop_pct, channels=channels)
        return {"image": normalise(image, mean, std), "label": label}

    return fn


def _stats(data_config):
    mean, std = tuple(data_config.mean), tuple(data_config.std)
    channels = data_config.channels
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise UserError(
            f"config.data.mean/std have {len(mean)}/{len(std)} entries for {channels} channels; "
            f"give one value or {channels} values each"
        )
    return mean, std
