"""Which examples each process reads, and feeding its batches to the devices.

Every process runs the same input pipeline on its own slice of the data (`process_slice`) and
produces a local batch of `global_batch // process_count` examples (`local_batch_size`);
`vitjax.parallel.batch_to_global` stitches the local batches of all processes into arrays
sharded over the mesh's 'data' axis (the one home of shardings). A small background thread
(`prefetch_to_device`) keeps the next batches already transferred while the step runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator

from jax.sharding import Mesh

from vitjax.errors import UserError
from vitjax.parallel.mesh import batch_to_global


def process_slice(
    num_examples: int, process_index: int, process_count: int, *, drop_remainder: bool = True
) -> tuple[int, int]:
    """[start, end) of this process's contiguous part of `num_examples` items.

    drop_remainder=True (training) gives every process exactly num_examples // process_count
    items so all processes run the same number of steps; False (evaluation) covers every item,
    the first `num_examples % process_count` processes getting one more.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if drop_remainder:
        per = num_examples // process_count
        return process_index * per, (process_index + 1) * per
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def local_batch_size(
    global_batch_size: int, process_count: int, what: str = "batch size (config.train.batch_size)"
) -> int:
    """Rows each process contributes to a global batch; a UserError for impossible sizes."""
    if int(global_batch_size) <= 0:
        raise UserError(f"{what} must be a positive number of images, got {global_batch_size}")
    if global_batch_size % process_count:
        raise UserError(
            f"{what} {global_batch_size} is not divisible by the {process_count} processes; "
            "choose a multiple of the process count"
        )
    return global_batch_size // process_count


class _Stop:
    pass


def prefetch_to_device(batches: Iterable[dict], mesh: Mesh, size: int = 2) -> Iterator[dict]:
    """Yields `batch_to_global(b, mesh)` for each b, with up to `size` batches in flight.

    The transfers are started by a daemon thread (jax dispatch is thread-safe), so host-to-device
    copies overlap the train step. Errors of the producer are re-raised in the consumer.
    """
    buffer: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                item = batch_to_global(batch, mesh)
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_Stop())
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            buffer.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_device")
    thread.start()
    try:
        while True:
            item = buffer.get()
            if isinstance(item, _Stop):
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
