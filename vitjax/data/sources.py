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

from vitjax.data import image_check
from vitjax.data.config import IMAGE_EXTENSIONS
from vitjax.errors import UserError

_IMAGENET_HOWTO = (
    "To prepare ImageNet: download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
    "https://image-net.org into the manual_dir ({manual_dir}), then run "
    "`python -m vitjax.data.prepare imagenet2012 --data_dir={data_dir} "
    "--manual_dir={manual_dir}` once (or rerun with --config.data.prepare=True)."
)


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The configured dataset is not where the config says; the message says how to prepare it.

    A `UserError` (printed as one line by `vitjax.main`) and, for older callers, a
    FileNotFoundError."""


@dataclasses.dataclass
class IndexedSource:
    """A split whose examples are addressable by index: in-memory arrays or image files."""

    labels: np.ndarray  # int32 [n]
    num_classes: int
    images: np.ndarray | None = None  # uint8 [n, h, w, c] held in memory, or
    paths: Sequence[str] | None = None  # one encoded image file per example
    description: str = ""
    class_names: Sequence[str] | None = None  # label id -> name, for messages
    skipped: tuple[str, ...] = ()  # undecodable files left out (config.data.skip_bad_images)

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

    def paths_of(self, indices) -> list[str]:
        """The files of examples `indices` (empty for in-memory sources)."""
        if self.paths is None:
            return []
        return [self.paths[int(i)] for i in indices]

    def class_name(self, label: int) -> str:
        return repr(self.class_names[label]) if self.class_names else str(label)


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
        raise UserError(
            f"digits has splits 'train' and 'test', got {split!r}; set "
            "config.data.train_split='train' and config.data.eval_split='test'"
        )
    return IndexedSource(
        labels=labels[keep],
        num_classes=digits.NUM_CLASSES,
        images=images[keep],
        description=f"scikit-learn digits[{split}]",
    )


def _subdirs(path: str) -> list[str]:
    return sorted(
        d.rstrip("/")
        for d in tf.io.gfile.listdir(path)
        if tf.io.gfile.isdir(os.path.join(path, d.rstrip("/")))
    )


def _image_files(path: str) -> list[str]:
    return sorted(f for f in tf.io.gfile.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def _image_files_below(path: str) -> list[str]:
    """The image files in `path` and every folder below it (not hidden ones), as paths
    relative to `path`, sorted: a class folder may be organised in subfolders, as timm's and
    torchvision's ImageFolder read it."""
    found = []
    for folder, subfolders, files in tf.io.gfile.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.rstrip("/").startswith("."))
        relative = os.path.relpath(folder, path)
        found += [os.path.normpath(os.path.join(relative, f)) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _layout(root: str, split: str = "<split>") -> str:
    return os.path.join(root, split, "<class>", "<image>.jpg")


def folder_classes(root: str, split: str, field: str = "train_split") -> list[str]:
    """Sorted class directory names of `root/split`; these define the label ids.

    `field` names the config field that chose `split`, for the message when it is missing."""
    if not root:
        raise UserError(
            "config.data.root is empty: set --config.data.root to the folder that holds the "
            f"split folders ({_layout('DIR', 'train')})"
        )
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(root):
        raise DatasetNotFoundError(
            f"image folder not found: looked for {split_dir!r} but config.data.root={root!r} "
            f"does not exist; lay images out as {_layout(root)} and set config.data.root to "
            "that folder"
        )
    if not tf.io.gfile.isdir(split_dir):
        present = _subdirs(root)
        if any(_image_files(os.path.join(root, d)) for d in present[:50]):
            hint = f"{root} holds class folders of images directly; move them into {split_dir}/"
        elif present:
            hint = (
                f"{root} holds {present[:8]}: set config.data.{field} to one of them, or lay "
                f"images out as {_layout(root, split)}"
            )
        else:
            hint = f"{root} is empty; lay images out as {_layout(root, split)}"
        raise DatasetNotFoundError(
            f"image folder not found: looked for {split_dir!r} (config.data.{field}={split!r}); "
            f"{hint}"
        )
    classes = _subdirs(split_dir)
    if not classes:
        loose = _image_files(split_dir)
        what = f"images lie directly in {split_dir}" if loose else f"{split_dir} has no folders"
        raise DatasetNotFoundError(
            f"no class folders in {split_dir}: {what}; put each class's images in its own "
            f"folder, {os.path.join(split_dir, '<class>', '<image>.jpg')}"
        )
    return classes


def folder_source(
    root: str,
    split: str,
    classes: Sequence[str] | None = None,
    *,
    field: str = "train_split",
    skip_bad_images: bool = False,
    channels: int = 3,
) -> IndexedSource:
    """Images in `root/split/<class>/*`; label ids follow `classes` (default: this split's).

    Without `classes` (the training split) every class folder must hold images; with them (an
    evaluation split) a class may be absent but no unknown class may appear. With
    `skip_bad_images` every file is test-decoded first and the undecodable ones are left out
    (and logged), so the index, the hold-out and the epoch permutations never include them.
    """
    found = folder_classes(root, split, field)
    split_dir = os.path.join(root, split)
    is_train = classes is None
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(
            f"{split_dir} has class folders {unknown[:5]} that the training split does not "
            "have; every split must use the training split's class folder names"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not tf.io.gfile.isdir(class_dir):
            continue
        for file in _image_files_below(class_dir):
            paths.append(os.path.join(class_dir, file))
            labels.append(label)
    if not paths:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the {len(found)} class folders of "
            f"{split_dir}; lay images out as {os.path.join(split_dir, '<class>', '<image>.jpg')}"
        )
    labels = np.asarray(labels, np.int32)
    skipped: tuple[str, ...] = ()
    if skip_bad_images:
        bad = image_check.undecodable(paths, channels)
        skipped = tuple(paths[i] for i in bad)
        image_check.report_skipped(skipped, split_dir)
        keep = np.setdiff1d(np.arange(len(paths)), bad)
        paths, labels = [paths[i] for i in keep], labels[keep]
        if not paths:
            raise UserError(f"none of the {len(skipped)} images in {split_dir} can be decoded")
    if is_train and len(classes) < 2:
        raise UserError(
            f"{split_dir} has one class folder ({classes[0]!r}): a classifier needs at least "
            f"two classes, one folder each ({os.path.join(split_dir, '<class>', '<image>.jpg')})"
        )
    if is_train:
        empty = [name for c, name in enumerate(classes) if not np.any(labels == c)]
        if empty:
            what = "decodable images" if skipped else "images"
            raise UserError(
                f"class folders without {what} in {split_dir}: {empty[:5]}"
                f"{f' (and {len(empty) - 5} more)' if len(empty) > 5 else ''}; add images or "
                "remove those folders (every class folder of the training split is a class)"
            )
    return IndexedSource(
        labels=labels,
        num_classes=len(classes),
        paths=paths,
        description=f"image folder {split_dir}",
        class_names=classes,
        skipped=skipped,
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


def prepare_tfds(name: str, *, data_dir: str | None = None, manual_dir: str | None = None):
    """Builds TFDS dataset `name` into `data_dir` (ImageNet: from the tars in `manual_dir`).

    Uses the Python API (`download_and_prepare`), not the `tfds build` command line, which
    imports apache_beam even for datasets that do not need it."""
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        builder.download_and_prepare(download_config=download_config)
    except ModuleNotFoundError as e:
        raise UserError(
            f"preparing TFDS {name!r} needs the Python package {e.name!r}, which is not "
            f"installed: pip install {e.name}"
        ) from None
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        manual = manual_dir or os.path.join(
            str(data_dir or _default_data_dir()), "downloads", "manual"
        )
        reason = " ".join(str(e).split()).split(". ")[0]
        fix = (
            f"; put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
            f"https://image-net.org) in {manual} or point config.data.manual_dir at them"
            if name.startswith("imagenet")
            else ""
        )
        raise DatasetNotFoundError(
            f"cannot prepare TFDS {name!r} into {builder.data_dir}: {reason}{fix}"
        ) from None
    return builder


def _default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    if not name:
        raise UserError("config.data.name is empty: set it to a TFDS name, e.g. 'imagenet2012'")
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(
            f"unknown TFDS dataset {name!r}: it is not registered with tensorflow-datasets "
            f"{tfds.__version__} (see https://www.tensorflow.org/datasets/catalog)"
        ) from e


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    prepare: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    field: str = "train_split",
) -> TfdsSource:
    """Opens a prepared TFDS split, or fails with one message saying where it looked and how to
    prepare it. With `prepare=True` a missing dataset is built first (from `manual_dir` for
    datasets such as imagenet2012 that cannot be downloaded automatically)."""
    import tensorflow_datasets as tfds

    data_dir, manual_dir = data_dir or None, manual_dir or None
    builder = _builder(name, data_dir)
    if prepare and not builder.is_prepared():
        builder = prepare_tfds(name, data_dir=data_dir, manual_dir=manual_dir)
    try:
        probe = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        looked = data_dir or _default_data_dir()
        manual = manual_dir or os.path.join(str(looked), "downloads", "manual")
        howto = (
            _IMAGENET_HOWTO.format(manual_dir=manual, data_dir=looked)
            if name.startswith("imagenet")
            else f"Rerun with --config.data.prepare=True (or `tfds build {name} "
            f"--data_dir={looked}`)."
        )
        raise DatasetNotFoundError(
            f"TFDS dataset {name!r} split {split!r} is not prepared: looked in "
            f"{builder.data_dir} (config.data.data_dir={data_dir!r}). {howto}"
        ) from e
    except ValueError as e:  # unknown split name
        splits = sorted(builder.info.splits.keys()) if builder.info.splits else []
        raise UserError(
            f"TFDS dataset {name!r} has no split {split!r} (config.data.{field}); its splits "
            f"are {splits}"
        ) from e
    num_examples = int(probe.cardinality().numpy())
    if num_examples < 0:
        num_examples = int(builder.info.splits[split].num_examples)
    if label_key not in builder.info.features or image_key not in builder.info.features:
        raise UserError(
            f"TFDS dataset {name!r} has features {sorted(builder.info.features.keys())}; set "
            "config.data.image_key / config.data.label_key to its image and label features"
        )
    return TfdsSource(
        builder=builder,
        split=split,
        num_examples=num_examples,
        num_classes=int(builder.info.features[label_key].num_classes),
        image_key=image_key,
        label_key=label_key,
    )
