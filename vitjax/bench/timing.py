"""Timing contenders side by side: each in its own process, alternating A B A B.

The repository's rule for speed claims: a figure is a ratio of contenders measured in the same
run, in separate processes (no shared allocator, thread pool or JIT cache), taking turns so that
a change of machine load hits all of them alike. The benchmark scripts in `benchmarks/` use this
module as follows:

    parent:  workers = [Worker("dense", argv_a), Worker("pruned", argv_b)]
             samples = alternate(workers, reps=5, seconds=1.0)   # images/s per repetition
             median_ratio(samples["pruned"], samples["dense"])
    worker:  serve(run_once, batch)   # the process started by argv_a / argv_b

A worker builds its contender, warms it up (compilation, allocation), says it is ready, and then
runs only when the parent asks it to, so at most one contender computes at any time.

Inside one process (the report's quick reading, step-time ratios of two jitted steps):

    samples = alternate_rounds({"dense": measure_a, "pruned": measure_b}, rounds=5)

where each `measure()` returns one sample (e.g. `rate(run_once, items, seconds)`), in turn.

A worker may also serve several tasks (e.g. one model at three batch sizes, or its forward pass
and its training step), so that one process compiles them all:

    worker:  serve_tasks({"b1": (run_b1, 1), "b64": (run_b64, 64)})
    parent:  w = Worker("dense", argv); alternate([w.task("b64"), other.task("b64")], ...)
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

_PREFIX = "@@timing "


class WorkerError(RuntimeError):
    pass


class Worker:
    """One contender in a child process started with `argv` (which must end up in `serve`)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict | None = None,
                 wait: bool = True):
        """wait=False returns at once; call `wait_ready()` before using the worker (several
        workers then build and warm up at the same time)."""
        self.name = name
        self._log = tempfile.TemporaryFile(mode="w+")  # the child's stderr, shown on failure
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, bufsize=1, env=env,
        )
        self.info: dict | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> dict:
        if self.info is None:
            self.info = self._receive("ready")
        return self.info

    def task(self, task: str, name: str | None = None) -> Task:
        """One of the worker's tasks (see `serve_tasks`), usable wherever a Worker is timed."""
        items = self.wait_ready()["tasks"].get(task)
        if items is None:
            raise WorkerError(f"worker {self.name!r} has no task {task!r} "
                              f"(it serves {sorted(self.info['tasks'])})")
        return Task(name or f"{self.name} {task}", self, task, {"items_per_call": items})

    def _receive(self, kind: str) -> dict:
        # Blocks until the child answers or exits (a child that hangs hangs the benchmark).
        for line in self._proc.stdout:
            if line.startswith(_PREFIX):
                message = json.loads(line[len(_PREFIX):])
                if message.get("kind") == kind:
                    return message
        self._log.seek(0)
        tail = self._log.read()[-4000:]
        self.close()
        raise WorkerError(f"worker {self.name!r} stopped before sending {kind!r}:\n{tail}")

    def run_for(self, seconds: float, task: str = "") -> tuple[int, float]:
        """Runs the contender (or its `task`) repeatedly for about `seconds`; returns (calls,
        elapsed)."""
        self.wait_ready()
        self._proc.stdin.write(f"run {seconds} {task}".rstrip() + "\n")
        self._proc.stdin.flush()
        message = self._receive("result")
        return int(message["calls"]), float(message["elapsed"])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Task:
    """A named task of a Worker: what `alternate` times (it has name, info and run_for)."""

    def __init__(self, name: str, worker: Worker, task: str, info: dict):
        self.name, self.worker, self.task, self.info = name, worker, task, info

    def run_for(self, seconds: float) -> tuple[int, float]:
        return self.worker.run_for(seconds, self.task)


def cpu_model() -> str:
    """The processor's model name, for benchmark headers."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _send(kind: str, **fields) -> None:
    sys.stdout.write(_PREFIX + json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def serve(run_once: Callable[[], object], items_per_call: int, *, warmup: int = 2,
          **info) -> None:
    """Worker side: warm up, report ready, then time `run_once` (which must block until its
    work is done) whenever the parent asks. `items_per_call` (images) turns calls into rates."""
    serve_tasks({"": (run_once, items_per_call)}, warmup=warmup, **info)


def serve_tasks(tasks: Mapping[str, tuple[Callable[[], object], int]], *, warmup: int = 2,
                **info) -> None:
    """`serve` for several tasks {name: (run_once, items_per_call)}: all are warmed up before
    the worker reports ready; the parent picks one per request (`Worker.task(name)`). No tasks
    at all: a worker that only reports `info` (e.g. a measurement made while starting)."""
    for run_once, _ in tasks.values():
        for _ in range(warmup):
            run_once()
    items = {name: items_per_call for name, (_, items_per_call) in tasks.items()}
    _send("ready", items_per_call=items.get(""), tasks=items, pid=os.getpid(), **info)
    for command in sys.stdin:
        parts = command.split(maxsplit=2)  # run SECONDS [TASK NAME, spaces allowed]
        if not parts or parts[0] == "quit":
            return
        run_once = tasks[parts[2].strip() if len(parts) > 2 else ""][0]
        calls, elapsed = timed_calls(run_once, float(parts[1]))
        _send("result", calls=calls, elapsed=elapsed)


def timed_calls(run_once: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Calls `run_once` (blocking) again and again until `seconds` have passed, at least once;
    returns (calls, elapsed seconds)."""
    calls, start = 0, time.perf_counter()
    while True:
        run_once()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed


def alternate_rounds(measures: Mapping[str, Callable[[], float]], rounds: int
                     ) -> dict[str, list[float]]:
    """`rounds` rounds in which every contender's `measure()` takes one sample in turn
    (A B C A B C ...), so a change of machine load hits all of them alike; the samples per
    name. The one alternation loop: `alternate` runs it over worker processes."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            samples[name].append(measure())
    return samples


def rate(run_once: Callable[[], object], items_per_call: int, seconds: float) -> float:
    """Items per second of `run_once` (blocking) called repeatedly for about `seconds`."""
    calls, elapsed = timed_calls(run_once, seconds)
    return calls * items_per_call / elapsed


def seconds_of(run_once: Callable[[], object], repeats: int = 1) -> float:
    """Wall seconds of one call of `run_once` (blocking): the best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        best = min(best, time.perf_counter() - start)
    return best


def alternate(workers: Sequence[Worker], reps: int, seconds: float) -> dict[str, list[float]]:
    """`reps` rounds in which every worker runs for `seconds` in turn (A B A B ...); returns
    items per second of every round, per worker name."""

    def measure(worker):
        calls, elapsed = worker.run_for(seconds)
        return calls * worker.info["items_per_call"] / elapsed

    return alternate_rounds({w.name: functools.partial(measure, w) for w in workers}, reps)


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: each pair ran back to back, under the same load."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unavailable"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
