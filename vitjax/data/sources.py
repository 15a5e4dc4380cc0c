"""Where examples come from: bundled digits, a folder of images, or any TFDS dataset.

Two kinds of source, because they allow different guarantees:

* `IndexedSource` (digits, image folders): every example of a split is addressable by an integer
  index, so shuffling is an exact seeded permutation, the hold-out is an exact class-balanced
  sample, and resuming at any step costs nothing.
* `TfdsSource`: examples are streamed from record files, so shuffling is TFDS's seeded file order
  plus a seeded shuffle buffer, and resuming skips (undecoded) records of the current epoch.

Both hand raw images to `preprocess`: either uint8 arrays or encoded bytes (JPEG/PNG).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_IMAGENET_HOWTO = (
    "To prepare ImageNet: download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
    "https://image-net.org into the manual_dir ({manual_dir}), then run "
    "`tfds build imagenet2012 --data_dir={data_dir} --manual_dir={manual_dir}` once "
    "(or rerun with --config.data.prepare=True)."
)


class DatasetNotFoundError(FileNotFoundError):
    """The configured dataset is not where the config says; the message says how to prepare it."""


@dataclasses.dataclass
class IndexedSource:
    """A split whose examples are addressable by index: in-memory arrays or image files."""

    labels: np.ndarray  # int32 [n]
    num_classes: int
    images: np.ndarray | None = None  # uint8 [n, h, w, c] held in memory, or
    paths: Sequence[str] | None = None  # one encoded image file per example
    description: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """tf.data map function: index -> (raw image, label)."""
        return self._load_fn()(index)

    def _load_fn(self):
        labels = tf.constant(self.labels, tf.int32)
        if self.images is not None:
            images = tf.constant(self.images)
            return lambda i: (tf.gather(images, i), tf.gather(labels, i))
        paths = tf.constant(list(self.paths))
        return lambda i: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i))

    def dataset(self, indices: tf.data.Dataset) -> tf.data.Dataset:
        """Maps a dataset of int64 indices to {'image': raw, 'label': int32}."""
        load = self._load_fn()

        def element(i):
            image, label = load(i)
            return {"image": image, "label": label}

        return indices.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def digits_source(split: str, *, test_fraction: float, seed: int) -> IndexedSource:
    """'train' or 'test' part of scikit-learn's digits (class-balanced, seeded)."""
    from vitjax.data import digits

    images, labels = digits.load_digits_uint8()
    test = digits.digits_test_indices(labels, test_fraction, seed)
    if split == "test":
        keep = test
    elif split == "train":
        keep = np.setdiff1d(np.arange(len(labels)), test)
    else:
        raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
    return IndexedSource(
        labels=labels[keep],
        num_classes=digits.NUM_CLASSES,
        images=images[keep],
        description=f"scikit-learn digits[{split}]",
    )


def folder_classes(root: str, split: str) -> list[str]:
    """Sorted class directory names of `root/split`; these define the label ids."""
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise DatasetNotFoundError(
            f"image folder not found: looked for {split_dir!r}. Lay images out as "
            f"{os.path.join(root, '<split>', '<class name>', '<image>.jpg')} (one directory per "
            "class, the same class names in every split) and set config.data.root to the folder "
            "that holds the split directories."
        )
    return sorted(
        d.rstrip("/")
        for d in tf.io.gfile.listdir(split_dir)
        if tf.io.gfile.isdir(os.path.join(split_dir, d))
    )


def folder_source(root: str, split: str, classes: Sequence[str] | None = None) -> IndexedSource:
    """Images in `root/split/<class>/*`; label ids follow `classes` (default: this split's)."""
    found = folder_classes(root, split)
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"{os.path.join(root, split)} has classes {unknown[:5]} that the training split does "
            "not have; every split must use the training split's class directories"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(root, split, name)
        if not tf.io.gfile.isdir(class_dir):
            continue
        for file in sorted(tf.io.gfile.listdir(class_dir)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(class_dir, file))
                labels.append(label)
    if not paths:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
            f"{os.path.join(root, split, '<class name>')}/"
        )
    return IndexedSource(
        labels=np.asarray(labels, np.int32),
        num_classes=len(classes),
        paths=paths,
        description=f"image folder {os.path.join(root, split)}",
    )


@dataclasses.dataclass
class TfdsSource:
    """A split of a prepared TFDS dataset, read as a stream of records."""

    builder: object  # tfds.core.DatasetBuilder
    split: str
    num_examples: int
    num_classes: int
    image_key: str = "image"
    label_key: str = "label"

    @property
    def description(self) -> str:
        return f"TFDS {self.builder.name}[{self.split}]"

    def dataset(
        self, start: int, end: int, *, shuffle_seed: int | None = None, labels_only: bool = False
    ) -> tf.data.Dataset:
        """Examples [start, end) of the split as {'image': encoded bytes, 'label': int32}.

        With `shuffle_seed` the record files are read in a seeded order (TFDS `shuffle_files`);
        without, in the stored order, so positions are stable. `labels_only` skips the images.
        """
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed,
            # Multi-host determinism: never let TFDS pick a different interleave per host.
            interleave_cycle_length=16,
            interleave_block_length=1,
        )
        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        ds = self.builder.as_dataset(
            split=f"{self.split}[{start}:{end}]",
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
            decoders=decoders,
        )
        image_key, label_key = self.image_key, self.label_key
        if labels_only:
            return ds.map(lambda ex: tf.cast(ex[label_key], tf.int32))
        return ds.map(
            lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32)}
        )


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    prepare: bool = False,
    image_key: str = "image",
    label_key: str = "label",
) -> TfdsSource:
    """Opens a prepared TFDS split, or fails with one message saying where it looked and how to
    prepare it. With `prepare=True` a missing dataset is built first (from `manual_dir` for
    datasets such as imagenet2012 that cannot be downloaded automatically)."""
    import tensorflow_datasets as tfds

    if not name:
        raise ValueError("config.data.name is empty: set it to a TFDS name, e.g. 'imagenet2012'")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(
            f"unknown TFDS dataset {name!r}: it is not registered with tensorflow-datasets "
            f"{tfds.__version__} (see https://www.tensorflow.org/datasets/catalog)"
        ) from e
    if prepare:
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=download_config)
    try:
        probe = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        looked = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        manual = manual_dir or os.path.join(str(looked), "downloads", "manual")
        howto = (
            _IMAGENET_HOWTO.format(manual_dir=manual, data_dir=looked)
            if name.startswith("imagenet")
            else f"Run `tfds build {name} --data_dir={looked}` or set --config.data.prepare=True."
        )
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} split {split!r} is not prepared: looked in "
            f"{builder.data_dir} (config.data.data_dir={data_dir!r}). {howto}"
        ) from e
    except ValueError as e:  # unknown split name
        raise ValueError(f"TFDS dataset {name!r}: {e}") from e
    num_examples = int(probe.cardinality().numpy())
    if num_examples < 0:
        num_examples = int(builder.info.splits[split].num_examples)
    return TfdsSource(
        builder=builder,
        split=split,
        num_examples=num_examples,
        num_classes=int(builder.info.features[label_key].num_classes),
        image_key=image_key,
        label_key=label_key,
    )
