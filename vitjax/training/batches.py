"""The trainer's batch sources: `ArrayBatches`, a small deterministic batcher over in-memory
arrays (tests, tools), and `StepBatches` over the data pipeline's train stream (the stages).

The trainer's data boundary is `train_batches(step) -> (images, labels)`: this process's rows of
the global batch of step `step` (see `vitjax.parallel.local_batch_slice`). Batches are a pure
function of (seed, step), so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np


class ArrayBatches:
    """Epoch-wise shuffled batches of (images, labels); `batches(step)` is this process's part.

    Every epoch is a permutation drawn from (seed, epoch); the global batch of step s is items
    [s * B, (s + 1) * B) of the concatenated epochs, so every example is seen once per epoch.
    """

    def __init__(
        self, images, labels, global_batch: int, *, seed: int = 0, rows: slice | None = None
    ):
        self.images, self.labels = np.asarray(images), np.asarray(labels)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.images) == 0:
            raise ValueError("cannot batch an empty dataset")
        self.global_batch, self.seed = int(global_batch), int(seed)
        self.rows = rows if rows is not None else slice(0, self.global_batch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of `step`."""
        n = len(self.images)
        positions = step * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs = positions // n
        out = np.empty(self.global_batch, np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._epoch_order(int(epoch))[positions[where] % n]
        return out

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(step)[self.rows]
        return self.images[idx], self.labels[idx]


class StepBatches:
    """`step -> (images, labels)` over the data pipeline's sequential train stream
    (`vitjax.data.Datasets`): the trainer asks for consecutive steps, and a jump (a resumed run)
    restarts the stream at that step. Mixing (mixup/cutmix) happens in the jitted step, on
    device."""

    def __init__(self, datasets):
        self._datasets = datasets
        self._next_step: int | None = None
        self._iterator = None

    def __call__(self, step: int):
        if self._iterator is None or step != self._next_step:
            self._iterator = iter(self._datasets.train_batches(step))
        batch = next(self._iterator)
        self._next_step = step + 1
        return batch["image"], batch["label"]
