"""Input pipeline: every source, DeiT augmentation, hold-out, resume determinism, sharding."""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh

from vitjax.data import (
    DatasetNotFoundError,
    deit_augment_config,
    digits_data_config,
    digits_splits,
    folder_data_config,
    imagenet_data_config,
    make_datasets,
    mixup_cutmix,
    prefetch_to_device,
    preprocess,
    process_slice,
)
from vitjax.data import augment as augment_lib

SIZE = 16


def _digits_config(**overrides):
    return digits_data_config(image_size=SIZE, **overrides)


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _all_eval(datasets, name):
    images, labels = [], []
    for batch in datasets.eval_batches(name):
        keep = batch["mask"] > 0
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{train,val}/<class>/*.jpg written from the digits (3 classes, 12 + 4 per class)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    images, labels = digits_splits(image_size=24, holdout_per_class=1)["train"]
    pixels = np.clip(images * 0.4 + 0.3, 0, 1)
    for c in range(3):
        for i, j in enumerate(np.flatnonzero(labels == c)[:16]):
            split = "train" if i < 12 else "val"
            os.makedirs(root / split / f"class_{c}", exist_ok=True)
            Image.fromarray((pixels[j] * 255).astype(np.uint8)).save(
                root / split / f"class_{c}" / f"{i:03d}.jpg", quality=95
            )
    return str(root)


def test_digits_splits_unchanged():
    splits = digits_splits(image_size=SIZE, holdout_per_class=5)
    assert {k: v[0].shape for k, v in splits.items()} == {
        "train": (1388, SIZE, SIZE, 3),
        "holdout": (50, SIZE, SIZE, 3),
        "test": (359, SIZE, SIZE, 3),
    }


def test_digits_path_shapes_holdout_and_determinism():
    config = _digits_config(holdout_per_class=5)
    data = make_datasets(
        config,
        deit_augment_config(flip=False),
        global_batch_size=32,
        process_index=0,
        process_count=1,
    )
    assert data.num_classes == 10 and data.steps_per_epoch == (1438 - 50) // 32
    batch = next(data.train_batches())
    assert batch["image"].shape == (32, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    # Hold-out: class balanced, disjoint from the training stream and from test.
    _, holdout_labels = _all_eval(data, "holdout")
    assert np.bincount(holdout_labels, minlength=10).tolist() == [5] * 10
    assert data.num_train_examples == 1438 - 50
    again = make_datasets(config, global_batch_size=32, process_index=0, process_count=1)
    np.testing.assert_array_equal(data.holdout_indices, again.holdout_indices)
    other = make_datasets(
        _digits_config(holdout_per_class=5, seed=1),
        global_batch_size=32,
        process_index=0,
        process_count=1,
    )
    assert not np.array_equal(data.holdout_indices, other.holdout_indices)
    test_images, test_labels = _all_eval(data, "test")
    assert len(test_labels) == 359 == data.eval_size("test")
    # Evaluation preprocessing is deterministic: same images on a second pass (cached).
    np.testing.assert_array_equal(_all_eval(data, "test")[0], test_images)


def test_holdout_kept_in_train_when_configured():
    config = _digits_config(holdout_per_class=3, exclude_holdout_from_train=False)
    data = make_datasets(config, global_batch_size=16, process_index=0, process_count=1)
    assert data.num_train_examples == 1438


def test_same_batches_after_restart():
    config = _digits_config(test_fraction=0.8)  # ~360 training images keep this fast
    data = make_datasets(
        config, deit_augment_config(), global_batch_size=64, process_index=0, process_count=1
    )
    steps = data.steps_per_epoch
    k = steps + 3  # a restart inside the second epoch
    uninterrupted = _take(data.train_batches(0), k + 2)[k:]
    restarted = make_datasets(
        config, deit_augment_config(), global_batch_size=64, process_index=0, process_count=1
    )
    resumed = _take(restarted.train_batches(start_step=k), 2)
    for a, b in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # Epochs are reshuffled.
    first, second = _take(data.train_batches(0), 1)[0], _take(data.train_batches(steps), 1)[0]
    assert not np.array_equal(first["label"], second["label"])


def test_two_processes_read_disjoint_complete_shards():
    assert process_slice(10, 0, 2) == (0, 5) and process_slice(10, 1, 2) == (5, 10)
    covered = [range(*process_slice(11, p, 3, drop_remainder=False)) for p in range(3)]
    assert sorted(itertools.chain(*covered)) == list(range(11))
    config = _digits_config(holdout_per_class=4)
    shards, holdouts = [], []
    for p in range(2):
        data = make_datasets(config, global_batch_size=32, process_index=p, process_count=2)
        assert data.local_batch_size == 16 and data.steps_per_epoch == (1438 - 40) // 2 // 16
        shards.append(data.train_indices(epoch=1))
        holdouts.append(data.holdout_indices)
        # The batches really are those indices: labels match the source order.
        labels = np.concatenate([b["label"] for b in _take(data.train_batches(0), 2)])
        assert len(labels) == 32
    np.testing.assert_array_equal(holdouts[0], holdouts[1])
    assert not set(shards[0]) & set(shards[1])
    covered = set(shards[0]) | set(shards[1])
    train = set(range(1438)) - set(holdouts[0])
    # Together the processes read the whole train split but the per-process batch remainders.
    assert covered <= train and len(train - covered) < 2 * 16 + 2
    # Another epoch is another permutation of the same examples.
    assert not np.array_equal(
        shards[0],
        make_datasets(config, global_batch_size=32, process_index=0, process_count=2).train_indices(
            epoch=2
        ),
    )


def test_eval_batches_padded_equally_across_processes():
    config = _digits_config()
    counts, totals = [], 0
    for p in range(3):
        data = make_datasets(
            config, global_batch_size=30, eval_batch_size=60, process_index=p, process_count=3
        )
        batches = list(data.eval_batches("test"))
        counts.append(len(batches))
        totals += sum(b["mask"].sum() for b in batches)
        assert all(b["image"].shape[0] == 20 for b in batches)
    assert len(set(counts)) == 1 and totals == 359


def test_image_folder_path(image_folder):
    config = folder_data_config(
        image_folder,
        image_size=SIZE,
        num_classes=3,
        holdout_per_class=2,
        exclude_holdout_from_train=True,
    )
    data = make_datasets(
        config, deit_augment_config(), global_batch_size=8, process_index=0, process_count=1
    )
    assert data.num_classes == 3 and data.num_train_examples == 36 - 6
    batch = next(data.train_batches())
    assert batch["image"].shape == (8, SIZE, SIZE, 3)
    images, labels = _all_eval(data, "test")
    assert images.shape == (12, SIZE, SIZE, 3)
    assert np.bincount(labels).tolist() == [4, 4, 4]


def test_missing_folder_and_tfds_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="looked for .*missing.*train"):
        make_datasets(
            folder_data_config(str(tmp_path / "missing")),
            global_batch_size=8,
            process_index=0,
            process_count=1,
        )
    config = imagenet_data_config(
        data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual")
    )
    with pytest.raises(DatasetNotFoundError) as error:
        make_datasets(config, global_batch_size=8, process_index=0, process_count=1)
    message = str(error.value)
    assert str(tmp_path / "tfds") in message and str(tmp_path / "manual") in message
    assert "ILSVRC2012_img_train.tar" in message


def test_tfds_path_with_mock_data():
    import tensorflow_datasets as tfds

    config = imagenet_data_config(image_size=SIZE, holdout_per_class=0, shuffle_buffer=8)
    with tfds.testing.mock_data(num_examples=24):
        data = make_datasets(
            config,
            deit_augment_config(),
            global_batch_size=8,
            eval_batch_size=16,
            process_index=0,
            process_count=1,
        )
        assert data.num_classes == 1000 and data.steps_per_epoch == 3
        batches = _take(data.train_batches(0), 5)  # crosses an epoch boundary
        assert all(b["image"].shape == (8, SIZE, SIZE, 3) for b in batches)
        resumed = _take(data.train_batches(4), 1)[0]
        np.testing.assert_array_equal(resumed["image"], batches[4]["image"])
        evals = list(data.eval_batches("test"))
        assert len(evals) == 2 and sum(b["mask"].sum() for b in evals) == 24
        assert evals[0]["image"].shape == (16, SIZE, SIZE, 3)


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    image = tf.constant(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], [32, 1, 3]))
    out = preprocess.eval_image(image, size=16, crop_pct=0.5, channels=3).numpy()
    # 32x64 -> shorter side 32 (16 / 0.5): unchanged size, centre 16x16 crop of columns 24..39.
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(24, 40))


def test_randaugment_ops_and_erasing():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    for op in range(len(augment_lib.OP_NAMES)):
        out = augment_lib.apply_op(image, tf.constant(op), tf.constant(0.9), tf.constant(1.0))
        assert out.shape == image.shape and out.dtype == tf.uint8, augment_lib.OP_NAMES[op]
    assert augment_lib.parse_randaugment("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5)
    assert augment_lib.parse_randaugment((3, 7)) == (3, 7.0, 0.0)
    # Invert and zero-magnitude enhancements behave like PIL.
    np.testing.assert_array_equal(augment_lib.invert(image), 255 - image.numpy())
    np.testing.assert_array_equal(augment_lib.brightness(image, 1.0), image)
    np.testing.assert_array_equal(augment_lib.posterize(image, 0), np.zeros_like(image))
    erased = augment_lib.random_erasing(
        tf.zeros([SIZE, SIZE, 3]), tf.constant([1, 2]), probability=1.0
    )
    assert 0 < np.mean(erased.numpy() != 0) <= 1 / 3 + 0.05


def test_mixup_cutmix_shapes_and_label_sums():
    rng = jax.random.key(0)
    images = jax.random.normal(rng, (8, SIZE, SIZE, 3))
    labels = jnp.arange(8) % 5
    mixed_fn = jax.jit(lambda k, x, y: mixup_cutmix(k, x, y, num_classes=5))
    switched = set()
    for step in range(6):
        mixed, targets = mixed_fn(jax.random.fold_in(rng, step), images, labels)
        assert mixed.shape == images.shape and targets.shape == (8, 5)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        assert float(targets.min()) >= 0.1 / 5 - 1e-6  # label smoothing floor
        pasted = np.mean(np.isclose(mixed, images) | np.isclose(mixed, images[::-1]))
        switched.add(bool(pasted > 0.999))
    assert switched == {True, False}  # both CutMix and Mixup batches occur
    plain, smooth = mixup_cutmix(
        rng, images, labels, num_classes=5, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1
    )
    np.testing.assert_array_equal(plain, images)
    np.testing.assert_allclose(smooth[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def test_prefetch_to_device_builds_sharded_global_batches():
    mesh = Mesh(np.asarray(jax.devices()), ("data",))  # Auto axes: the model is not sharding-typed
    data = make_datasets(_digits_config(), global_batch_size=32, process_index=0, process_count=1)
    batches = _take(prefetch_to_device(data.train_batches(), mesh, size=2), 3)
    image = batches[0]["image"]
    assert isinstance(image, jax.Array) and image.shape == (32, SIZE, SIZE, 3)
    assert image.sharding.spec[0] == "data" and len(image.addressable_shards) == len(jax.devices())
    reference = next(data.train_batches())
    np.testing.assert_array_equal(np.asarray(image), reference["image"])
