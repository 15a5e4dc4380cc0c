"""RandAugment and random erasing as stateless TensorFlow ops on single images.

RandAugment follows timm's `rand-m9-mstd0.5-inc1` policy that DeiT trains with: `num_ops` ops are
drawn uniformly with replacement from the 15 "increasing" transforms below, each is applied with
probability 0.5, and each draws its magnitude from N(m, mstd) clipped to [0, 10]. Magnitude
mappings are timm's (`_LEVEL_DENOM = 10`):

  AutoContrast, Equalize, Invert            no magnitude
  Rotate                                    +-30 deg * m/10
  Posterize (increasing)                    keep 4 - int(4 m/10) bits
  Solarize (increasing)                     threshold 256 - 256 m/10
  SolarizeAdd                               +110 m/10 to pixels below 128
  Color, Contrast, Brightness, Sharpness    factor 1 +- 0.9 m/10 (PIL ImageEnhance semantics)
  ShearX, ShearY                            +-0.3 m/10
  TranslateXRel, TranslateYRel              +-0.45 m/10 of the image side

Differences from timm: geometric ops fill uncovered pixels with grey 128 (timm: the dataset mean,
(124, 116, 104)) and always interpolate bilinearly (timm picks bilinear or bicubic at random).
"""

from __future__ import annotations

import math
import re

import tensorflow as tf

_MAX_LEVEL = 10.0
_FILL = 128.0


def parse_randaugment(spec) -> tuple[int, float, float]:
    """'rand-m9-mstd0.5-inc1' or (num_ops, magnitude[, magnitude_std]) -> (n, m, mstd)."""
    if isinstance(spec, (tuple, list)):
        return int(spec[0]), float(spec[1]), float(spec[2]) if len(spec) > 2 else 0.0
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment {spec!r}: expected 'rand-m<M>[-n<N>][-mstd<S>][-inc1]'")
    num_ops, magnitude, magnitude_std = 2, 9.0, 0.0
    for part in parts[1:]:
        key, value = re.match(r"([a-z]+)([\d.]*)", part).groups()
        if key == "m":
            magnitude = float(value)
        elif key == "n":
            num_ops = int(value)
        elif key == "mstd":
            magnitude_std = float(value)
        elif key == "inc":
            if value != "1":
                raise ValueError("only the increasing transforms (inc1) are implemented")
        else:
            raise ValueError(f"randaugment {spec!r}: unknown part {part!r}")
    return num_ops, magnitude, magnitude_std


# ---------------------------------------------------------------- colour ops on uint8 [h, w, 3]
def _blend(degenerate, image, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to uint8."""
    image = tf.cast(image, tf.float32)
    out = degenerate + factor * (image - degenerate)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _grey(image):
    return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))


def color(image, factor):
    return _blend(tf.tile(_grey(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
    mean = tf.round(tf.reduce_mean(_grey(image)))
    return _blend(mean, image, factor)


def brightness(image, factor):
    return _blend(0.0, image, factor)


def sharpness(image, factor):
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.round(smooth)
    # PIL leaves the one-pixel border unfiltered.
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + 0.0
    mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    degenerate = mask * degenerate + (1 - mask) * x[0]
    return _blend(degenerate, image, factor)


def autocontrast(image):
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.cast(tf.clip_by_value(tf.round((x - offset) * scale), 0, 255), tf.uint8)


def equalize(image):
    """PIL ImageOps.equalize per channel."""

    def channel(c):
        c = tf.cast(c, tf.int32)
        hist = tf.math.bincount(c, minlength=256, maxlength=256)
        last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
        step = (tf.reduce_sum(hist) - last) // 255

        def apply():
            lut = (tf.cumsum(hist) + step // 2) // step
            lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
            return tf.gather(lut, c)

        return tf.cast(tf.cond(step == 0, lambda: c, apply), tf.uint8)

    return tf.stack([channel(image[..., i]) for i in range(3)], axis=-1)


def invert(image):
    return 255 - image


def posterize(image, bits):
    # Keep the top `bits` bits: x & ~(2**(8 - bits) - 1); bits = 0 gives black, as PIL.
    mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image, threshold):
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def solarize_add(image, addition, threshold=128.0):
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.float32) + addition, 0, 255), tf.uint8)
    return tf.where(tf.cast(image, tf.float32) < threshold, added, image)


# ------------------------------------------------------------------------- geometric ops
def _affine(image, matrix):
    """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f), like PIL's affine."""
    a, b, c, d, e, f = matrix
    transform = tf.cast(tf.stack([a, b, c, d, e, f, 0.0, 0.0]), tf.float32)[None]
    shape = tf.shape(image)[:2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None],
        transforms=transform,
        output_shape=shape,
        fill_value=_FILL,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def rotate(image, degrees):
    h, w = [tf.cast(s, tf.float32) for s in tf.unstack(tf.shape(image)[:2])]
    cx, cy = w / 2.0, h / 2.0
    angle = degrees * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Inverse map around the centre (counter-clockwise rotation of the content, as PIL).
    return _affine(image, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy))


def shear_x(image, amount):
    return _affine(image, (1.0, amount, 0.0, 0.0, 1.0, 0.0))


def shear_y(image, amount):
    return _affine(image, (1.0, 0.0, 0.0, amount, 1.0, 0.0))


def translate_x(image, fraction):
    pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(image, fraction):
    pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def _ops():
    """(name, fn(image, level in [0, 1], sign)) of timm's increasing RandAugment transforms."""
    enhance = lambda fn: lambda im, lv, s: fn(im, 1.0 + s * 0.9 * lv)  # noqa: E731
    return (
        ("AutoContrast", lambda im, lv, s: autocontrast(im)),
        ("Equalize", lambda im, lv, s: equalize(im)),
        ("Invert", lambda im, lv, s: invert(im)),
        ("Rotate", lambda im, lv, s: rotate(im, s * 30.0 * lv)),
        ("PosterizeIncreasing", lambda im, lv, s: posterize(im, 4 - tf.cast(4 * lv, tf.int32))),
        ("SolarizeIncreasing", lambda im, lv, s: solarize(im, 256.0 - tf.floor(256.0 * lv))),
        ("SolarizeAdd", lambda im, lv, s: solarize_add(im, tf.floor(110.0 * lv))),
        ("ColorIncreasing", enhance(color)),
        ("ContrastIncreasing", enhance(contrast)),
        ("BrightnessIncreasing", enhance(brightness)),
        ("SharpnessIncreasing", enhance(sharpness)),
        ("ShearX", lambda im, lv, s: shear_x(im, s * 0.3 * lv)),
        ("ShearY", lambda im, lv, s: shear_y(im, s * 0.3 * lv)),
        ("TranslateXRel", lambda im, lv, s: translate_x(im, s * 0.45 * lv)),
        ("TranslateYRel", lambda im, lv, s: translate_y(im, s * 0.45 * lv)),
    )


OP_NAMES = tuple(name for name, _ in _ops())


def apply_op(image, op_index, level, sign):
    """Applies op number `op_index` (traced int) of `OP_NAMES`; level in [0, 1]."""
    branches = [lambda fn=fn: fn(image, level, sign) for _, fn in _ops()]
    out = tf.switch_case(op_index, branches)
    out.set_shape(image.shape)
    return out


def rand_augment(image, seed, *, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """timm RandAugment on uint8 [h, w, 3]; `seed` is a stateless seed of shape [2]."""
    for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
        s = tf.unstack(tf.random.experimental.stateless_split(op_seed, 4))
        op = tf.random.stateless_uniform([], s[0], 0, len(OP_NAMES), dtype=tf.int32)
        m = magnitude
        if magnitude_std > 0:
            m = m + magnitude_std * tf.random.stateless_normal([], s[1])
        level = tf.clip_by_value(m, 0.0, _MAX_LEVEL) / _MAX_LEVEL
        sign = tf.where(tf.random.stateless_uniform([], s[2]) < 0.5, -1.0, 1.0)
        apply = tf.random.stateless_uniform([], s[3]) < prob
        image = tf.cond(
            apply,
            lambda image=image, op=op, level=level, sign=sign: apply_op(image, op, level, sign),
            lambda image=image: image,
        )
    return image


_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def random_erasing(image, seed, *, probability=0.25, area=(0.02, 1 / 3), log_ratio=_LOG_RATIO):
    """timm RandomErasing(mode='pixel', max_count=1) on a normalised float [h, w, c] image.

    With `probability`, one box (area fraction and log-aspect uniform, up to 10 tries to fit)
    is replaced by N(0, 1) noise, i.e. random colours in normalised space.
    """
    h, w = image.shape[0], image.shape[1]
    s = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    tries = 10
    target = tf.random.stateless_uniform([tries], s[0], area[0], area[1]) * (h * w)
    ratio = tf.exp(tf.random.stateless_uniform([tries], s[1], log_ratio[0], log_ratio[1]))
    box_h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
    fits = (box_h < h) & (box_w < w)
    first = tf.argmax(tf.cast(fits, tf.int32))
    bh, bw = box_h[first], box_w[first]
    top = tf.random.stateless_uniform([], s[2], 0, tf.maximum(h - bh + 1, 1), dtype=tf.int32)
    left = tf.random.stateless_uniform([], s[3], 0, tf.maximum(w - bw + 1, 1), dtype=tf.int32)
    rows = tf.range(h)[:, None]
    cols = tf.range(w)[None, :]
    box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
    erase = (tf.random.stateless_uniform([], s[4]) < probability) & tf.reduce_any(fits)
    noise = tf.random.stateless_normal(tf.shape(image), s[5])
    return tf.where((box & erase)[:, :, None], noise, image)
