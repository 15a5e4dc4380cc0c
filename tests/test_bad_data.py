"""Data-side user mistakes: each is a one-line `UserError` saying what is wrong and how to fix
it; undecodable images end the run with their path (or are skipped on request); ImageNet is
prepared from its tars through TFDS's Python API."""

from __future__ import annotations

import io
import itertools
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from vitjax.data import (
    deit_augment_config,
    digits_data_config,
    folder_data_config,
    imagenet_data_config,
    make_datasets,
)
from vitjax.errors import UserError

SIZE = 16
ONE_PROCESS = dict(process_index=0, process_count=1)


def _image(path, seed=0, size=(20, 24), mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def _folder(root, per_class=(4, 4, 4), val_per_class=1, splits=("train", "val")):
    """root/{train,val}/class_<c>/<i>.jpg|png; returns root as str."""
    for split in splits:
        counts = per_class if split == "train" else (val_per_class,) * len(per_class)
        for c, n in enumerate(counts):
            os.makedirs(root / split / f"class_{c}", exist_ok=True)
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                _image(str(root / split / f"class_{c}" / f"{i:03d}.{ext}"), seed=100 * c + i)
    return str(root)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _not_an_image(path):
    with open(path, "w") as f:
        f.write("this is not an image\n")


def _make(config, batch=4, **kw):
    return make_datasets(config, global_batch_size=batch, **{**ONE_PROCESS, **kw})


def _folder_config(root, **overrides):
    return folder_data_config(
        str(root), **{"image_size": SIZE, "holdout_per_class": 1, **overrides}
    )


# --- each user mistake: (how to set it up, fields of the config, make_datasets kwargs, message)


def _setup_none(tmp_path):
    return _folder(tmp_path / "data")


def _setup_missing(tmp_path):
    return str(tmp_path / "nowhere")


def _setup_empty_root(tmp_path):
    os.makedirs(tmp_path / "data")
    return str(tmp_path / "data")


def _setup_other_splits(tmp_path):
    _folder(tmp_path / "data", splits=("training",))
    return str(tmp_path / "data")


def _setup_no_split_layer(tmp_path):
    root = _folder(tmp_path / "data", splits=("train",))
    return os.path.join(root, "train")  # the user pointed root at the split itself


def _setup_loose_images(tmp_path):
    for i in range(3):
        _image(str(tmp_path / "data" / "train" / f"{i}.jpg"), seed=i)
    return str(tmp_path / "data")


def _setup_no_images(tmp_path):
    for c in range(2):
        os.makedirs(tmp_path / "data" / "train" / f"class_{c}")
        _not_an_image(str(tmp_path / "data" / "train" / f"class_{c}" / "notes.txt"))
    return str(tmp_path / "data")


def _setup_empty_class(tmp_path):
    root = _folder(tmp_path / "data")
    os.makedirs(tmp_path / "data" / "train" / "class_9")
    return root


def _setup_no_val(tmp_path):
    return _folder(tmp_path / "data", splits=("train",))


def _setup_unknown_val_class(tmp_path):
    root = _folder(tmp_path / "data")
    _image(str(tmp_path / "data" / "val" / "zebra" / "0.jpg"))
    return root


CASES = {
    "bad source": (
        _setup_none,
        dict(source="folders"),
        {},
        ["config.data.source='folders'", "'folder'"],
    ),
    "empty root": (lambda tmp: "", {}, {}, ["config.data.root is empty"]),
    "missing root": (_setup_missing, {}, {}, ["nowhere", "does not exist"]),
    "empty root folder": (_setup_empty_root, {}, {}, ["is empty", "<class>"]),
    "wrong split names": (_setup_other_splits, {}, {}, ["['training']", "config.data.train_split"]),
    "root is a split": (_setup_no_split_layer, {}, {}, ["holds class folders of images directly"]),
    "no class folders": (
        _setup_loose_images,
        {},
        {},
        ["no class folders", "images lie directly in"],
    ),
    "no images": (_setup_no_images, {}, {}, ["no images (.jpg"]),
    "empty class folder": (_setup_empty_class, {}, {}, ["class folders without images", "class_9"]),
    "missing eval split": (_setup_no_val, {}, {}, ["config.data.eval_split='val'", "['train']"]),
    "unknown eval class": (_setup_unknown_val_class, {}, {}, ["zebra", "training split"]),
    "smaller than a batch": (
        _setup_none,
        {},
        dict(batch=16),
        ["train split", "has 12 training examples", "fewer than one batch of 16", "at most 12"],
    ),
    "smaller than a batch after the hold-out": (
        _setup_none,
        dict(exclude_holdout_from_train=True),
        dict(batch=16),
        ["has 9 training examples", "at most 9", "or lower config.data.holdout_per_class"],
    ),
    "zero batch": (_setup_none, {}, dict(batch=0), ["must be a positive", "got 0"]),
    "negative batch": (_setup_none, {}, dict(batch=-8), ["must be a positive"]),
    "zero eval batch": (_setup_none, {}, dict(eval_batch_size=0), ["evaluation batch size"]),
    "batch not divisible": (
        _setup_none,
        {},
        dict(batch=6, process_index=0, process_count=4),
        ["not divisible by the 4 processes"],
    ),
    "holdout too large": (
        _setup_none,
        dict(holdout_per_class=5),
        {},
        ["holdout_per_class=5", "'class_0' has only 4", "at most 4"],
    ),
    "negative holdout": (_setup_none, dict(holdout_per_class=-1), {}, ["must be >= 0"]),
    "class count mismatch": (
        _setup_none,
        dict(num_classes=5),
        {},
        ["num_classes=5", "has 3 classes", "num_classes=3"],
    ),
    "bad channels": (_setup_none, dict(channels=4), {}, ["channels must be 1 or 3"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_user_mistakes_are_one_line_user_errors(tmp_path, case):
    setup, overrides, kwargs, expected = CASES[case]
    config = _folder_config(setup(tmp_path), **overrides)
    with pytest.raises(UserError) as error:
        _make(config, **kwargs)
    message = str(error.value)
    assert "\n" not in message and len(message.replace(str(tmp_path), "T")) < 300, message
    for text in expected:
        assert text in message, (text, message)


def test_digits_and_tfds_mistakes(tmp_path):
    with pytest.raises(UserError, match="digits has splits 'train' and 'test'"):
        _make(digits_data_config(image_size=SIZE, eval_split="val"))
    with pytest.raises(UserError, match="config.data.name is empty"):
        _make(imagenet_data_config(name=""))
    with pytest.raises(UserError, match="unknown TFDS dataset 'no_such_set'"):
        _make(imagenet_data_config(name="no_such_set"))
    with pytest.raises(UserError, match=r"holdout_per_class=999 .*at most"):
        _make(digits_data_config(image_size=SIZE, holdout_per_class=999))
    # Old callers that catch FileNotFoundError still work.
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        _make(imagenet_data_config(data_dir=str(tmp_path / "tfds")))


def test_optional_fields_can_be_overridden_from_the_command_line():
    """Fields that default to None are typed placeholders: ml_collections refuses to override
    a plain None ("Type <class 'NoneType'> ... is not supported for overriding")."""
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    argv = [
        "prog",
        "--config.data.data_dir=/data/tfds",
        "--config.data.manual_dir=/data/tars",
        "--config.data.num_classes=100",
    ]
    flag_values = flags.FlagValues()
    config = ml_collections.ConfigDict({"data": imagenet_data_config()})
    config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    data = flag_values.config.data
    assert (data.data_dir, data.manual_dir, data.num_classes) == ("/data/tfds", "/data/tars", 100)
    # Unset, they read as None.
    assert folder_data_config("/x").num_classes is None
    assert imagenet_data_config().data_dir is None


# --- undecodable images ---


@pytest.fixture
def bad_folder(tmp_path):
    """3 classes x 4 train images, one of them a truncated JPEG and one a text file '.jpg'."""
    root = _folder(tmp_path / "data")
    _truncate(os.path.join(root, "train", "class_1", "000.jpg"))
    _not_an_image(os.path.join(root, "train", "class_2", "002.jpg"))
    return root


@pytest.mark.subprocess
def test_undecodable_image_ends_the_run_with_its_path(tmp_path, bad_folder):
    """In a subprocess, as `vitjax.main` runs it: the error names the file and the process
    exits at once, although other tf.data iterators are still alive (before the fix, a Python
    callback inside the pipeline deadlocked their destructors at interpreter exit)."""
    script = textwrap.dedent(
        f"""
        import itertools, sys
        from vitjax.data import folder_data_config, make_datasets
        from vitjax.errors import UserError

        config = folder_data_config({bad_folder!r}, image_size=16, holdout_per_class=0)
        data = make_datasets(config, global_batch_size=2, process_index=0, process_count=1)
        alive = data.train_batches(0)  # left mid-epoch, collected at exit
        next(alive)
        try:
            for _ in itertools.islice(data.train_batches(0), 200):
                pass
        except UserError as e:
            print(f"error: {{e}}", file=sys.stderr)
            sys.exit(2)
        print("no error", file=sys.stderr)
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert time.monotonic() - start < 60
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith("error: cannot decode image ")
    assert "class_1/000.jpg" in last or "class_2/002.jpg" in last, last
    assert "skip_bad_images=True" in last


def test_no_python_callbacks_inside_tf_data(tmp_path, monkeypatch):
    """The cause of the hang: a tf.numpy_function in the training pipeline. At interpreter
    exit its thread is stopped when it asks for the GIL, and the iterator's destructor waits
    for it forever. Every py_func / numpy_function / eager_py_func goes through
    `_internal_py_func`; none may be built while making or reading the datasets."""
    from tensorflow.python.ops import script_ops

    def refuse(*args, **kwargs):
        raise AssertionError("a Python callback was put into a tf.data graph")

    monkeypatch.setattr(script_ops, "_internal_py_func", refuse)
    data = make_datasets(
        _folder_config(_folder(tmp_path / "data")),
        deit_augment_config(randaugment=""),  # RandAugment is pure TF but slow to trace
        global_batch_size=4,
        **ONE_PROCESS,
    )
    next(data.train_batches(data.steps_per_epoch + 1))
    next(data.eval_batches("test"))
    next(data.eval_batches("holdout"))


def test_undecodable_eval_image_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    _not_an_image(os.path.join(root, "val", "class_0", "000.jpg"))
    data = _make(_folder_config(root, holdout_per_class=0))
    with pytest.raises(UserError, match=r"cannot decode image .*val/class_0/000\.jpg: Unknown"):
        list(data.eval_batches("test"))


def test_skip_bad_images_counts_reports_and_keeps_epochs_exact(bad_folder, caplog):
    config = _folder_config(bad_folder, skip_bad_images=True, exclude_holdout_from_train=True)
    with caplog.at_level(logging.WARNING):
        data = make_datasets(config, global_batch_size=4, **ONE_PROCESS)
    skipped = sorted(os.path.relpath(p, bad_folder) for p in data.skipped_images)
    assert skipped == ["train/class_1/000.jpg", "train/class_2/002.jpg"]
    assert "skipped 2 undecodable images" in caplog.text and "000.jpg" in caplog.text
    # 12 - 2 undecodable - 3 hold-out; 7 // 4 = 1 step per epoch, and every epoch is exact.
    assert data.num_train_examples == 7 and data.steps_per_epoch == 1
    batches = list(itertools.islice(data.train_batches(0), 6))
    assert all(b["image"].shape == (4, SIZE, SIZE, 3) for b in batches)
    assert sum(1 for _ in data.eval_batches("test")) == 1
    assert sum(1 for _ in data.eval_batches("holdout")) == 1
    # Deterministic: a second pipeline over the same folder picks the same hold-out and batches.
    again = make_datasets(config, global_batch_size=4, **ONE_PROCESS)
    np.testing.assert_array_equal(again.holdout_indices, data.holdout_indices)
    resumed = next(again.train_batches(5))
    np.testing.assert_array_equal(resumed["image"], batches[5]["image"])


def test_good_folder_with_mixed_formats_and_grey_images(tmp_path):
    root = _folder(tmp_path / "data")
    _image(os.path.join(root, "train", "class_0", "grey.png"), mode="L")
    _image(os.path.join(root, "train", "class_0", "rgba.png"), mode="RGBA")
    _image(os.path.join(root, "train", "class_1", "pic.bmp"))
    _image(os.path.join(root, "train", "class_2", "pic.JPEG"))
    (tmp_path / "data" / "train" / "class_2" / "README.txt").write_text("ignored")
    data = _make(_folder_config(root, skip_bad_images=True), batch=8)
    assert data.skipped_images == () and data.num_classes == 3
    assert data.num_train_examples == 16  # the preset keeps the hold-out in training
    assert all(
        b["image"].shape == (8, SIZE, SIZE, 3) for b in itertools.islice(data.train_batches(0), 4)
    )


def test_folder_config_reads_classes_and_sizes_from_the_data(tmp_path):
    import importlib.util

    root = _folder(tmp_path / "data", per_class=(10, 12, 14, 16))
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "folder.py")
    spec = importlib.util.spec_from_file_location("folder_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"root={root},image_size=32,epochs=2,batch_size=8")
    assert config.model.num_classes == config.data.num_classes == 4
    assert (config.model.image_size, config.data.image_size) == (32, 32)
    assert config.data.holdout_per_class == 2  # a fifth of the smallest class, at most 10
    assert config.train.steps == 2 * ((52 - 8) // 8)
    data = make_datasets(config.data, config.augment, global_batch_size=8, **ONE_PROCESS)
    assert data.num_classes == 4 and data.eval_size("test") == 4
    unknown = module.get_config(None)
    assert unknown.model.num_classes == -1 and unknown.data.num_classes is None
    assert (unknown.data.train_split, unknown.data.eval_split) == ("train", "val")
    with pytest.raises(ValueError, match="unknown argument 'imagesize'"):
        module.get_config("imagesize=3")


# --- ImageNet preparation from the downloaded tars ---


def _jpeg_bytes(seed):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _fake_imagenet_tars(manual_dir, synsets=("n01440764", "n01443537", "n01484850"), per=4, val=6):
    """The two archives TFDS's imagenet2012 builder reads: a train tar of per-synset tars, and
    a val tar whose sorted names are matched to TFDS's bundled validation_labels.txt."""
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
        for s, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as images:
                for i in range(per):
                    _add(images, f"{synset}_{i}.JPEG", _jpeg_bytes(10 * s + i))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
        for i in range(1, val + 1):
            _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg_bytes(1000 + i))


def test_imagenet_prepared_from_tars_and_read(tmp_path):
    manual = tmp_path / "manual"
    _fake_imagenet_tars(str(manual))
    config = imagenet_data_config(
        data_dir=str(tmp_path / "tfds"),
        manual_dir=str(manual),
        prepare=True,
        image_size=SIZE,
        holdout_per_class=0,  # the fake archive has 3 of the 1000 classes
        shuffle_buffer=16,
    )
    data = make_datasets(config, global_batch_size=4, **ONE_PROCESS)
    assert data.num_classes == 1000 and data.num_train_examples == 12
    batch = next(data.train_batches())
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    # Synsets map to TFDS's label ids: n01440764, n01443537, n01484850 are classes 0, 1, 2.
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    assert data.eval_size("test") == 6
    # Prepared once: a second config without `prepare` reads the same records.
    config.prepare = False
    assert make_datasets(config, global_batch_size=4, **ONE_PROCESS).num_train_examples == 12


def test_imagenet_prepare_without_tars_says_where_to_put_them(tmp_path):
    config = imagenet_data_config(
        data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "empty"), prepare=True
    )
    with pytest.raises(UserError, match=r"put ILSVRC2012_img_train.tar .* in .*empty"):
        _make(config)
