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
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

_PREFIX = "@@timing "


class WorkerError(RuntimeError):
    pass


class Worker:
    """One contender in a child process started with `argv` (which must end up in `serve`)."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict | None = None):
        self.name = name
        self._log = tempfile.TemporaryFile(mode="w+")  # the child's stderr, shown on failure
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, bufsize=1, env=env,
        )
        self.info = self._receive("ready")

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

    def run_for(self, seconds: float) -> tuple[int, float]:
        """Runs the contender repeatedly for about `seconds`; returns (calls, elapsed)."""
        self._proc.stdin.write(f"run {seconds}\n")
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
    for _ in range(warmup):
        run_once()
    _send("ready", items_per_call=items_per_call, pid=os.getpid(), **info)
    for command in sys.stdin:
        parts = command.split()
        if not parts or parts[0] == "quit":
            return
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


def alternate(workers: Sequence[Worker], reps: int, seconds: float) -> dict[str, list[float]]:
    """`reps` rounds in which every worker runs for `seconds` in turn (A B A B ...); returns
    items per second of every round, per worker name."""
    samples: dict[str, list[float]] = {w.name: [] for w in workers}
    for _ in range(reps):
        for worker in workers:
            calls, elapsed = worker.run_for(seconds)
            samples[worker.name].append(calls * worker.info["items_per_call"] / elapsed)
    return samples


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
