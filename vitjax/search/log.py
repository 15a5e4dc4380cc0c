"""The search's append-only JSONL log: one JSON object per line, written before the next
evaluation starts, so a killed search resumes from it without evaluating anything twice.

Records (all carry "type"):
  header   first line: what the search is (method, seed, target, space, model, population, q,
           tol, region), the `settings` that shape its proposals (kernel, priors, restarts,
           acquisition; the authors' screen), and, from the pipeline, its `provenance`: which
           supernet (its identity) and which objective its values measure. A resumed search
           must match it (a setting an older log does not record is not compared);
           `iterations` and `patience` may change between runs.
  propose  iteration t's policies (u in the space's unit cube, the policies, their GMACs) and,
           for the GP, the fitted hyper-parameters: the next iteration warm-starts from them, so
           replaying the log reproduces the uninterrupted search bit for bit.
  eval     one evaluated policy: iteration, slot within the iteration, global index, u,
           policy, GMACs, objective value, seconds.

Files are read and written with etils.epath, so the log can live in a bucket (gs://...). Local
files are appended to, flushed and fsync'ed; object stores cannot append, so there the whole
file is rewritten (a search writes a few hundred short lines). Only the writer (process 0 of a
multi-host job) writes; every process can read.
"""

from __future__ import annotations

import json
import os

from etils import epath

from vitjax import fileio
from vitjax.errors import UserError

FORMAT_VERSION = 1


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


def dumps(record: dict) -> str:
    # allow_nan=False: a NaN would not be valid JSON for other readers (the report stage).
    return json.dumps(record, sort_keys=True, allow_nan=False)


class SearchLog:
    """Reads and appends the records of one search (path None: keep them in memory only)."""

    def __init__(self, path: str | os.PathLike | None, *, is_writer: bool = True):
        self.path = None if path is None else epath.Path(path)
        self.is_writer = is_writer
        self._memory: list[str] = []

    def read(self) -> list[dict]:
        """All complete records. A torn last line (a crash mid-write) is dropped, and the
        writer removes it from the file so the next append starts on a fresh line."""
        if self.path is None:
            return [json.loads(line) for line in self._memory]
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # text after the last newline is unfinished
        records = []
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                fix = ("delete that line and rerun (the search redoes what it recorded, "
                       "every other record is kept)" if records else
                       "it is the header: delete the file to start the search afresh")
                raise UserError(f"search log {self.path} line {number} is not JSON; "
                                f"{fix}") from None
        if tail and self.is_writer:
            good = "".join(line + "\n" for line in complete)
            if _is_local(self.path):
                with open(os.fspath(self.path), "r+b") as f:
                    f.truncate(len(good.encode()))
                    f.flush()
                    os.fsync(f.fileno())
            else:
                fileio.write_text(self.path, good)
        return records

    def append(self, record: dict) -> None:
        """Writes one record durably (no-op for non-writers)."""
        if not self.is_writer:
            return
        line = dumps(record) + "\n"
        if self.path is None:
            self._memory.append(line)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _is_local(self.path):
            with self.path.open("a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        else:
            existing = self.path.read_text() if self.path.exists() else ""
            fileio.write_text(self.path, existing + line)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a search log (for reports); never modifies the file."""
    return SearchLog(path, is_writer=False).read()
