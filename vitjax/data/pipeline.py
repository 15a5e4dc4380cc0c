"""`make_datasets`: the one entry point from a config to train / hold-out / test batches.

    from vitjax.data import MixConfig, make_datasets, prefetch_to_device, mix_batch
    data = make_datasets(config.data, config.augment, global_batch_size=1024)
    mix = MixConfig.from_config(config.augment, config.train.label_smoothing)
    for step, batch in zip(range(start, total), prefetch_to_device(
            data.train_batches(start_step=start), mesh)):
        images, targets = mix_batch(jax.random.fold_in(key, step), batch['image'],
                                    batch['label'], mix, data.num_classes)  # in jit
    for batch in data.eval_batches('holdout'): ...   # batch['mask'] marks padding rows

Determinism. Batch `s` of a process is a pure function of (config.data.seed, s, process_index,
process_count): epoch e = s // steps_per_epoch reads a permutation seeded by (seed, e) and each
example's augmentation is seeded by (seed, e, its position in the epoch). A run resumed at step
s therefore sees exactly the batches of an uninterrupted run.
  * digits / image folders (index-based): the permutation is exact (numpy, seeded) over the whole
    train set and every process takes its contiguous slice of it; resuming costs nothing.
  * TFDS (streamed records): each process reads a fixed contiguous slice of the split
    (`split[a:b]`, equal sizes, like tfds.split_for_jax_process); an epoch reads its record
    files in a seeded order (TFDS shuffle_files) through a seeded shuffle buffer. Resuming in
    the middle of an epoch skips the already-seen records before decoding (cheap: no JPEG work).
Epochs never straddle a batch: each epoch contributes steps_per_epoch full batches.

No Python runs inside a tf.data graph (no tf.numpy_function / py_function): the epoch
permutations are computed in Python and handed to tf.data as constants, a chunk of epochs at a
time. A Python callback in the graph deadlocks at interpreter exit (the callback's thread is
killed when it asks for the GIL while the iterator's destructor waits for it), which hung runs
that ended with an error. An image that cannot be decoded stops the run with a `UserError`
naming the file (the files of the failing batch are test-decoded); with
`config.data.skip_bad_images` undecodable files are found up front and left out of the index.

Hold-out (the search's accuracy set): `holdout_per_class` images of every class sampled from
the TRAIN split by seed; it never touches `eval_split`. With `exclude_holdout_from_train` the
train stream never shows hold-out images (for TFDS, the whole hold-out pool, see config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from vitjax.data import image_check, preprocess, sharding, sources
from vitjax.data.config import no_augment_config
from vitjax.errors import UserError

_SHUFFLE, _AUGMENT, _HOLDOUT = 1, 2, 3  # streams derived from config.data.seed
# Training indices handed to one tf.data pipeline: whole epochs, about this many examples but
# at most this many epochs (a new pipeline per chunk bounds the constant and the up-front
# permutation work without putting a Python callback in the graph).
_CHUNK_EXAMPLES, _CHUNK_EPOCHS = 1 << 18, 256


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed for (seed, *keys); stable across numpy versions (SeedSequence)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] >> 1)


def class_balanced_sample(
    labels: np.ndarray,
    per_class: int,
    seed: int,
    num_classes: int,
    what: str = "train split",
    class_name=str,
) -> np.ndarray:
    """Sorted indices of `per_class` examples of every class, chosen uniformly by `seed`."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    if num_classes and counts.min() < per_class:
        smallest = int(np.argmin(counts))
        raise UserError(
            f"config.data.holdout_per_class={per_class} but class {class_name(smallest)} has "
            f"only {counts[smallest]} examples in the {what}; lower "
            f"config.data.holdout_per_class to at most {counts.min()}"
        )
    rng = np.random.default_rng(derive_seed(seed, _HOLDOUT))
    chosen = []
    for c in range(num_classes):
        candidates = np.flatnonzero(labels == c)
        chosen.append(rng.choice(candidates, per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros([0], np.int64)


@dataclasses.dataclass
class _EvalSet:
    dataset: tf.data.Dataset  # batched, preprocessed, this process's examples only
    size: int  # examples over all processes
    num_batches: int  # batches every process yields (padded), equal on all processes
    # The files of this process's batch k (for naming an undecodable one); None: not files.
    batch_paths: Callable[[int], list[str]] | None = None


@dataclasses.dataclass
class Datasets:
    """What `make_datasets` returns. Batches are dicts of numpy arrays local to this process:
    'image' float32 [local_batch, size, size, channels] (normalised), 'label' int32, and for
    evaluation 'mask' float32 (0 on padding rows). Use `prefetch_to_device(batches, mesh)` to
    turn them into global arrays sharded over the mesh's 'data' axis."""

    num_classes: int
    image_size: int
    channels: int
    global_batch_size: int
    local_batch_size: int
    eval_batch_size: int  # local (per-process) eval batch size
    process_index: int
    process_count: int
    num_train_examples: int  # over all processes, after excluding the hold-out if configured
    steps_per_epoch: int
    holdout_indices: np.ndarray = dataclasses.field(repr=False)  # hold-out positions in train
    description: str
    # Undecodable files left out by config.data.skip_bad_images (train and eval splits).
    skipped_images: tuple[str, ...] = dataclasses.field(repr=False)
    _train: Callable[[int], tf.data.Dataset] = dataclasses.field(repr=False)
    _eval: dict[str, _EvalSet] = dataclasses.field(repr=False)
    _indices: Callable[[int], np.ndarray] | None = dataclasses.field(default=None, repr=False)
    _scanned: bool = dataclasses.field(default=False, repr=False)  # skip_bad_images was on

    def train_indices(self, epoch: int) -> np.ndarray:
        """Train-split positions this process reads in `epoch`, in order (digits/folder only)."""
        if self._indices is None:
            raise ValueError(f"{self.description} is streamed; it has no per-epoch index list")
        return self._indices(epoch)

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(self._eval)

    def eval_size(self, name: str) -> int:
        return self._eval_set(name).size

    def num_eval_batches(self, name: str) -> int:
        return self._eval_set(name).num_batches

    def train_batches(self, start_step: int = 0) -> Iterator[dict]:
        """Endless iterator of local training batches, the first being global step `start_step`."""
        if start_step < 0:
            raise UserError(f"start_step must be >= 0, got {start_step}")
        return self._train(start_step)

    def eval_batches(self, name: str = "test") -> Iterator[dict]:
        """One pass over an evaluation set ('holdout' or 'test'), padded to full batches."""
        eval_set = self._eval_set(name)
        size = self.eval_batch_size
        count = 0
        batches = _named_errors(
            eval_set.dataset, eval_set.batch_paths, scanned=self._scanned, channels=self.channels
        )
        for batch in batches:
            yield _pad(batch, size)
            count += 1
        empty = None
        while count < eval_set.num_batches:  # keep all processes in lockstep
            empty = empty or self._empty_batch(size)
            yield empty
            count += 1

    def _eval_set(self, name):
        if name not in self._eval:
            raise ValueError(f"no evaluation set {name!r}; available: {sorted(self._eval)}")
        return self._eval[name]

    def _empty_batch(self, size):
        shape = (size, self.image_size, self.image_size, self.channels)
        return {
            "image": np.zeros(shape, np.float32),
            "label": np.zeros([size], np.int32),
            "mask": np.zeros([size], np.float32),
        }


def _named_errors(
    ds: tf.data.Dataset,
    batch_paths: Callable[[int], list[str]] | None,
    *,
    scanned: bool,
    channels: int,
    first_batch: int = 0,
) -> Iterator:
    """Iterates `ds` as numpy; an error of batch k caused by an undecodable file becomes a
    one-line UserError naming it (`batch_paths(first_batch + k)` gives the batch's files).

    The TF iterator is released before the error is raised, so nothing of the failed pipeline
    outlives the exception."""
    iterator = ds.as_numpy_iterator()
    count = 0
    bad = None
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError:
            if batch_paths is None:
                raise
            # Batches come out in order, so batch `count` failed; look one further in case.
            paths = [p for k in (count, count + 1) for p in batch_paths(first_batch + k)]
            bad = image_check.find_bad(paths, channels)
            if not bad:
                raise
            break
        yield batch
        count += 1
    del iterator
    raise image_check.bad_image_error(bad, scanned=scanned)


def _pad(batch: dict, size: int) -> dict:
    n = len(batch["label"])
    batch["mask"] = np.ones([n], np.float32)
    if n == size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }


def _options(data_config) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    options.autotune.enabled = True
    return options


def _parallel(data_config) -> int:
    n = data_config.get("num_parallel_calls", -1)
    return tf.data.AUTOTUNE if n in (None, -1) else int(n)


def _hide_accelerators_from_tf() -> None:
    """tf.data runs on the host; without this TensorFlow grabs GPU memory that JAX needs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing left to do
        pass


def make_datasets(
    data_config: ml_collections.ConfigDict,
    augment_config: ml_collections.ConfigDict | None = None,
    *,
    global_batch_size: int,
    eval_batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Datasets:
    """Builds the train stream and the 'holdout' / 'test' evaluation sets of `config.data`.

    global_batch_size: training batch over all processes (each process yields
      global_batch_size // process_count rows). eval_batch_size: global too (default: the
      training one). process_index/process_count default to jax's; pass them explicitly to
      simulate other processes. augment_config: `config.augment` (None: no augmentation).
    Every mistake in the config or the data (missing or empty folders, a dataset smaller than a
    batch, a class count that disagrees, an undecodable image met while iterating) raises
    `vitjax.errors.UserError` with a one-line message; sources.DatasetNotFoundError (also a
    FileNotFoundError) names where the data was looked for and how to prepare it.
    """
    _hide_accelerators_from_tf()
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    augment_config = augment_config if augment_config is not None else no_augment_config()
    local_batch = sharding.local_batch_size(global_batch_size, process_count)
    local_eval = sharding.local_batch_size(
        global_batch_size if eval_batch_size is None else eval_batch_size,
        process_count,
        what="evaluation batch size (config.train.eval_batch_size)",
    )
    cfg = data_config
    _check_config(cfg)
    seed = int(cfg.seed)

    train_src, eval_src = _open_sources(cfg)
    num_classes = train_src.num_classes
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise UserError(
            f"config.data.num_classes={cfg.num_classes} but {train_src.description} has "
            f"{num_classes} classes; set config.data.num_classes={num_classes} (and "
            f"config.model.num_classes={num_classes})"
        )
    common = dict(process_index=process_index, process_count=process_count)
    train_fn = preprocess.make_train_fn(cfg, augment_config)
    eval_fn = preprocess.make_eval_fn(cfg)
    hpc = int(cfg.holdout_per_class)
    eval_sets = {}
    if isinstance(train_src, sources.IndexedSource):
        holdout = (
            class_balanced_sample(
                train_src.labels, hpc, seed, num_classes, class_name=train_src.class_name
            )
            if hpc
            else np.zeros([0], np.int64)
        )
        train_idx = np.arange(len(train_src))
        if cfg.exclude_holdout_from_train:
            train_idx = np.setdiff1d(train_idx, holdout)
        train, steps, indices = _indexed_train(
            cfg, train_src, train_idx, train_fn, local_batch, global_batch_size, **common
        )
        if hpc:
            eval_sets["holdout"] = _indexed_eval(
                cfg, train_src, holdout, eval_fn, local_eval, **common
            )
        if eval_src is not None:
            eval_sets["test"] = _indexed_eval(
                cfg, eval_src, np.arange(len(eval_src)), eval_fn, local_eval, **common
            )
        num_train = len(train_idx)
    else:
        n = train_src.num_examples
        pool_start = n - math.ceil(float(cfg.holdout_pool_fraction) * n) if hpc else n
        holdout = np.zeros([0], np.int64)
        if hpc:
            pool_labels = _read_labels(train_src, pool_start, n)
            holdout = pool_start + class_balanced_sample(
                pool_labels,
                hpc,
                seed,
                num_classes,
                what=f"hold-out pool (last {cfg.holdout_pool_fraction:.0%} of the train split; "
                "raise config.data.holdout_pool_fraction)",
            )
            eval_sets["holdout"] = _tfds_eval(
                cfg, train_src, holdout, eval_fn, local_eval, **common
            )
        train_end = pool_start if cfg.exclude_holdout_from_train else n
        train, steps = _tfds_train(
            cfg, train_src, train_end, train_fn, local_batch, global_batch_size, **common
        )
        indices = None
        if eval_src is not None:
            eval_sets["test"] = _tfds_eval(cfg, eval_src, None, eval_fn, local_eval, **common)
        num_train = train_end
    return Datasets(
        num_classes=num_classes,
        image_size=int(cfg.image_size),
        channels=int(cfg.channels),
        global_batch_size=global_batch_size,
        local_batch_size=local_batch,
        eval_batch_size=local_eval,
        process_index=process_index,
        process_count=process_count,
        num_train_examples=int(num_train),
        steps_per_epoch=steps,
        holdout_indices=np.asarray(holdout, np.int64),
        description=train_src.description,
        skipped_images=tuple(getattr(train_src, "skipped", ()))
        + tuple(getattr(eval_src, "skipped", ())),
        _train=train,
        _eval=eval_sets,
        _indices=indices,
        _scanned=bool(cfg.get("skip_bad_images", False)),
    )


def _check_config(cfg) -> None:
    """Config values that would otherwise fail deep inside tf.data."""
    if int(cfg.image_size) <= 0:
        raise UserError(f"config.data.image_size must be positive, got {cfg.image_size}")
    if int(cfg.channels) not in (1, 3):
        raise UserError(f"config.data.channels must be 1 or 3, got {cfg.channels}")
    if int(cfg.holdout_per_class) < 0:
        raise UserError(
            f"config.data.holdout_per_class must be >= 0 (0 disables the hold-out), got "
            f"{cfg.holdout_per_class}"
        )
    if not 0 < float(cfg.eval_crop_pct) <= 1:
        raise UserError(f"config.data.eval_crop_pct must lie in (0, 1], got {cfg.eval_crop_pct}")


def _open_sources(cfg):
    """(train source, eval source or None) for config.data.source."""
    if cfg.source == "digits":
        kw = dict(test_fraction=float(cfg.test_fraction), seed=int(cfg.seed))
        train = sources.digits_source(cfg.train_split, **kw)
        return train, sources.digits_source(cfg.eval_split, **kw) if cfg.eval_split else None
    if cfg.source == "folder":
        kw = dict(skip_bad_images=bool(cfg.get("skip_bad_images", False)), channels=cfg.channels)
        train = sources.folder_source(cfg.root, cfg.train_split, **kw)
        evals = None
        if cfg.eval_split:
            evals = sources.folder_source(
                cfg.root, cfg.eval_split, train.class_names, field="eval_split", **kw
            )
        return train, evals
    if cfg.source == "tfds":
        kw = dict(
            data_dir=cfg.data_dir,
            manual_dir=cfg.manual_dir,
            prepare=bool(cfg.prepare),
            image_key=cfg.image_key,
            label_key=cfg.label_key,
        )
        train = sources.tfds_source(cfg.name, cfg.train_split, **kw)
        evals = None
        if cfg.eval_split:
            evals = sources.tfds_source(cfg.name, cfg.eval_split, field="eval_split", **kw)
        return train, evals
    raise UserError(
        f"config.data.source={cfg.source!r} is not a data source; set it to 'digits', 'folder' "
        "(with config.data.root) or 'tfds' (with config.data.name)"
    )


def _augment_seeds(seed, epoch, position):
    """Stateless per-example seed [2] from (config seed, epoch, position in the epoch)."""
    base = tf.constant(derive_seed(seed, _AUGMENT), tf.int64)
    return tf.stack([base + tf.cast(epoch, tf.int64) * 1_000_003, tf.cast(position, tf.int64)])


def _finish_train(ds, cfg, train_fn, local_batch, seed):
    def element(example, epoch, position):
        return train_fn(example["image"], example["label"], _augment_seeds(seed, epoch, position))

    ds = ds.map(element, num_parallel_calls=_parallel(cfg), deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(int(cfg.prefetch)).with_options(_options(cfg))


def _steps_per_epoch(cfg, num_local, local_batch, global_batch, process_count, what):
    steps = num_local // local_batch
    if steps == 0:
        per_process = f" per process ({process_count} processes)" if process_count > 1 else ""
        holdout = int(cfg.holdout_per_class) > 0 and cfg.exclude_holdout_from_train
        raise UserError(
            f"the train split ({what}) has {num_local} training examples{per_process}"
            f"{' after setting the hold-out aside' if holdout else ''}, fewer than one batch of "
            f"{global_batch}; lower config.train.batch_size to at most "
            f"{num_local * process_count}"
            + (f" (a multiple of {process_count})" if process_count > 1 else "")
            + (" or lower config.data.holdout_per_class" if holdout else "")
        )
    return steps


def _indexed_train(
    cfg, src, train_idx, train_fn, local_batch, global_batch, *, process_index, process_count
):
    seed = int(cfg.seed)
    start, end = sharding.process_slice(len(train_idx), process_index, process_count)
    steps = _steps_per_epoch(
        cfg, end - start, local_batch, global_batch, process_count, src.description
    )
    per_epoch = steps * local_batch
    train_idx = np.asarray(train_idx, np.int64)
    epochs_per_chunk = min(_CHUNK_EPOCHS, max(1, _CHUNK_EXAMPLES // per_epoch))
    scanned = bool(cfg.get("skip_bad_images", False))

    def local_indices(epoch):
        rng = np.random.default_rng(derive_seed(seed, _SHUFFLE, int(epoch)))
        return rng.permutation(train_idx)[start : start + per_epoch]

    def batch_paths(step):
        epoch, offset = divmod(step, steps)
        return src.paths_of(local_indices(epoch)[offset * local_batch : (offset + 1) * local_batch])

    def chunk_dataset(first_epoch, offset):
        """Epochs [first_epoch, first_epoch + epochs_per_chunk) from batch `offset` on."""
        skip = offset * local_batch
        epochs = range(first_epoch, first_epoch + epochs_per_chunk)
        idx = np.concatenate([local_indices(e) for e in epochs])[skip:]

        def with_epoch_and_position(k, i):
            k = k + skip
            epoch = first_epoch + k // per_epoch
            return i, epoch, start + k % per_epoch

        def load(i, epoch, position):
            image, label = src.load(i)
            return {"image": image, "label": label}, epoch, position

        ds = tf.data.Dataset.from_tensor_slices(idx).enumerate().map(with_epoch_and_position)
        ds = ds.map(load, num_parallel_calls=_parallel(cfg), deterministic=True)
        return _finish_train(ds, cfg, train_fn, local_batch, seed)

    def make(start_step):
        epoch, offset = divmod(start_step, steps)
        while True:
            yield from _named_errors(
                chunk_dataset(epoch, offset),
                batch_paths if src.paths is not None else None,
                scanned=scanned,
                channels=int(cfg.channels),
                first_batch=epoch * steps + offset,
            )
            epoch, offset = epoch + epochs_per_chunk, 0

    return make, steps, local_indices


def _tfds_train(
    cfg, src, train_end, train_fn, local_batch, global_batch, *, process_index, process_count
):
    seed = int(cfg.seed)
    start, end = sharding.process_slice(train_end, process_index, process_count)
    steps = _steps_per_epoch(
        cfg, end - start, local_batch, global_batch, process_count, src.description
    )
    per_epoch = steps * local_batch

    def epoch_dataset(epoch, offset):
        epoch_seed = derive_seed(seed, _SHUFFLE, epoch, process_index)
        ds = src.dataset(start, end, shuffle_seed=epoch_seed)
        ds = ds.shuffle(int(cfg.shuffle_buffer), seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.take(per_epoch).enumerate().skip(offset * local_batch)
        ds = ds.map(lambda i, ex: (ex, tf.cast(epoch, tf.int64), start + i))
        return _finish_train(ds, cfg, train_fn, local_batch, seed)

    def make(start_step):
        epoch, offset = divmod(start_step, steps)
        while True:
            yield from epoch_dataset(epoch, offset).as_numpy_iterator()
            epoch, offset = epoch + 1, 0

    return make, steps


def _eval_set(ds, cfg, eval_fn, local_eval, size, process_count, batch_paths=None):
    ds = ds.map(
        lambda ex: eval_fn(ex["image"], ex["label"]),
        num_parallel_calls=_parallel(cfg),
        deterministic=True,
    )
    ds = ds.batch(local_eval)
    if cfg.cache_eval:
        ds = ds.cache()
    ds = ds.prefetch(int(cfg.prefetch)).with_options(_options(cfg))
    largest_local = -(-size // process_count)
    return _EvalSet(
        dataset=ds,
        size=size,
        num_batches=-(-largest_local // local_eval),
        batch_paths=batch_paths,
    )


def _indexed_eval(cfg, src, indices, eval_fn, local_eval, *, process_index, process_count):
    start, end = sharding.process_slice(
        len(indices), process_index, process_count, drop_remainder=False
    )
    mine = np.asarray(indices[start:end], np.int64)

    def batch_paths(k):
        return src.paths_of(mine[k * local_eval : (k + 1) * local_eval])

    local = tf.data.Dataset.from_tensor_slices(mine)
    return _eval_set(
        src.dataset(local),
        cfg,
        eval_fn,
        local_eval,
        len(indices),
        process_count,
        batch_paths if src.paths is not None else None,
    )


def _read_labels(src, start, end) -> np.ndarray:
    """Labels of examples [start, end) of a TFDS split in stored order (images not decoded)."""
    ds = src.dataset(start, end, labels_only=True).take(end - start).batch(8192)
    return np.concatenate([np.zeros([0], np.int32), *ds.as_numpy_iterator()])


def _tfds_eval(cfg, src, positions, eval_fn, local_eval, *, process_index, process_count):
    """Examples of a TFDS split: all of them (positions None) or the sorted `positions`."""
    size = src.num_examples if positions is None else len(positions)
    start, end = sharding.process_slice(size, process_index, process_count, drop_remainder=False)
    if positions is None:
        ds = src.dataset(start, end).take(end - start)
    elif start == end:
        ds = src.dataset(0, 0).take(0)
    else:
        mine = positions[start:end]
        lo, hi = int(mine[0]), int(mine[-1]) + 1
        member = np.zeros([hi - lo], bool)
        member[mine - lo] = True
        member = tf.constant(member)
        ds = src.dataset(lo, hi).take(hi - lo).enumerate()

        def is_member(position, example):
            del example
            return tf.gather(member, position)

        def drop_position(position, example):
            del position
            return example

        ds = ds.filter(is_member).map(drop_position)
    return _eval_set(ds, cfg, eval_fn, local_eval, size, process_count)
