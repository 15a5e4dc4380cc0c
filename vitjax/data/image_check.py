"""Finding image files that TensorFlow cannot decode, so a run names them instead of failing
somewhere inside tf.data.

Two uses:

* `undecodable(paths)`: a parallel scan of a whole split (only with
  `config.data.skip_bad_images`), so the bad files can be dropped from the index before the
  epoch permutations are drawn; every restart and every process then sees the same examples.
  JPEGs are decoded at 1/8 scale (libjpeg still reads every coefficient, so truncated or
  corrupt data is caught at a fraction of the cost of a full decode).
* `decode_error(path)`: the full decode the evaluation transform does, one file at a time; the
  pipeline runs it on the files of a batch that failed, to name the culprit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from vitjax.errors import UserError


def _first_line(error: Exception) -> str:
    """TensorFlow's message without the '{{function_node ...}}' prefix and the graph context."""
    message = getattr(error, "message", None) or str(error)
    line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if line.startswith("{{function_node"):
        line = line.split("}}", 1)[-1].strip()
    return re.sub(r"\s*\[Op:\w+\].*$", "", line)  # eager ops append "[Op:DecodeJpeg] name:"


def decode_error(path: str, channels: int = 3) -> str | None:
    """None if `path` reads and decodes like the pipeline decodes it, else TF's reason."""
    try:
        raw = tf.io.read_file(path)
        if tf.io.is_jpeg(raw):
            tf.io.extract_jpeg_shape(raw)
            tf.io.decode_jpeg(raw, channels=channels)
        else:
            tf.io.decode_image(raw, channels=channels, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        return _first_line(e)
    return None


def find_bad(paths: Sequence[str], channels: int = 3) -> list[tuple[str, str]]:
    """(path, reason) of every file of `paths` that does not decode (full decode, eager)."""
    bad = []
    for path in paths:
        reason = decode_error(path, channels)
        if reason is not None:
            bad.append((path, reason))
    return bad


def undecodable(paths: Sequence[str], channels: int = 3) -> np.ndarray:
    """Sorted positions in `paths` of files that cannot be read or decoded (parallel scan)."""
    if not len(paths):
        return np.zeros([0], np.int64)
    table = tf.constant(list(paths))

    def check(position):
        raw = tf.io.read_file(tf.gather(table, position))

        def jpeg():
            return tf.shape(tf.io.decode_jpeg(raw, channels=channels, ratio=8))[:2]

        def other():
            image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
            return tf.shape(image)[:2]

        shape = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
        return position, shape

    good = (
        tf.data.Dataset.range(len(paths))
        .map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors()
        .map(lambda position, shape: position)
        .batch(65536)
    )
    keep = np.zeros([len(paths)], bool)
    for positions in good.as_numpy_iterator():
        keep[positions] = True
    return np.flatnonzero(~keep)


def report_skipped(skipped: Sequence[str], where: str, shown: int = 5) -> None:
    """The log line of `config.data.skip_bad_images`: how many, and the first few paths."""
    if skipped:
        more = f" (and {len(skipped) - shown} more)" if len(skipped) > shown else ""
        logging.warning(
            "skipped %d undecodable images in %s: %s%s",
            len(skipped),
            where,
            ", ".join(skipped[:shown]),
            more,
        )


def bad_image_error(bad: list[tuple[str, str]], *, scanned: bool) -> UserError:
    """The one-line error for undecodable files found in a failing batch."""
    path, reason = bad[0]
    more = f" (and {len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""
    if scanned:
        fix = (
            "it passed the skip_bad_images scan (a 1/8-scale decode) but fails a full decode; "
            "delete or replace it"
        )
    else:
        fix = (
            "delete or replace it, or set --config.data.skip_bad_images=True to skip "
            "undecodable images"
        )
    return UserError(f"cannot decode image {path}{more}: {reason}; {fix}")
