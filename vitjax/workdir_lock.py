"""One writer per workdir: `<workdir>/LOCK.json` names the run that holds it.

Two runs on one workdir would overwrite each other's results (pretrain at 60 and at 30 steps
started 5 s apart both "finished", leaving the 30-step model; two searches interleaved their
records). The pipeline therefore holds this lock from start to end; a second run stops at once
with one line naming the holder (host, pid, start time, command).

Guarantees:
  * Local and shared POSIX filesystems: the lock file is created with O_CREAT | O_EXCL, which
    is atomic on local disks and on NFSv3 or later (Linux), so of two runs that start together
    exactly one wins.
  * Object stores (gs://...): etils.epath offers no conditional create, so the lock is
    check-then-write and read back: it stops a second run started after the first (the usual
    mistake), not two started within the same second.
  * Stale locks: the holder rewrites its `heartbeat` every HEARTBEAT_S seconds. A lock is taken
    over when its process is gone (same host, pid no longer alive: a kill -9, a crash) or when
    its heartbeat is older than STALE_AFTER_S (a run on another host that died, or a host that
    went down). Taking over moves the stale file aside under a unique name first (an atomic
    rename: of two runs taking over together, one wins) and then creates the lock anew.
  * Multi-host jobs: only process 0 takes the lock; the job's other processes share the workdir
    legitimately (they only read, process 0 writes) and are never refused.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from vitjax import fileio
from vitjax.errors import UserError

LOCK_FILE = "LOCK.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _command() -> str:
    text = " ".join(sys.argv) or sys.executable
    return text if len(text) <= 240 else text[:237] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OSError:
        return True
    return True


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class WorkdirLock:
    """The lock of one workdir; `acquire()` raises UserError naming the holder if it is held."""

    def __init__(self, workdir: epath.Path | str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                       "command": _command(), "token": self.token, "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- file operations -------------------------------------------------------------------
    def _text(self) -> str:
        return json.dumps(self.record, indent=1)

    def _create(self) -> bool:
        """Creates the lock file if none exists; False if one does."""
        if _is_local(self.path):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self._text())
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.path.exists():
            return False
        self.path.write_text(self._text())
        return self._read_holder().get("token") == self.token

    def _read_holder(self) -> dict:
        """The holder's record; {} if the file vanished, {'damaged': ...} if unreadable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError("not an object")
            return holder
        except ValueError:
            return {"damaged": text[:80]}

    def _age(self, holder: dict) -> float:
        beat = holder.get("heartbeat")
        if isinstance(beat, (int, float)):
            return time.time() - float(beat)
        try:  # a file half-written by a killed run: judge by its modification time
            return time.time() - self.path.stat().mtime
        except (FileNotFoundError, OSError):
            return 0.0

    def _stale(self, holder: dict) -> str | None:
        """Why the holder's lock may be taken over, or None while it is live."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        age = self._age(holder)
        if age > self.stale_after_s:
            return f"no heartbeat for {age / 60:.0f} min"
        return None

    def _take_over(self, holder: dict) -> bool:
        """Moves the stale lock aside; True if this run moved exactly the one it judged."""
        aside = self.path.parent / f".{LOCK_FILE}.stale-{self.token}"
        try:
            self.path.rename(aside)
        except (FileNotFoundError, OSError):
            return False  # another run took it over first
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = {"damaged": True}
        if moved.get("token") != holder.get("token"):
            # Another run replaced the stale lock between our read and the rename: put its
            # fresh lock back (link fails if a third run has created one meanwhile).
            if _is_local(self.path):
                with contextlib.suppress(OSError):
                    os.link(os.fspath(aside), os.fspath(self.path))
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # -- public --------------------------------------------------------------------------------
    def acquire(self) -> None:
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            holder = self._read_holder()
            if not holder:
                continue  # released in between: try again
            reason = self._stale(holder)
            if reason is None:
                raise UserError(self._held_message(holder))
            if self._take_over(holder):
                print(f"[vitjax] taking over the lock of {self.path.parent} from "
                      f"{self._describe(holder)}: {reason}", flush=True)
        raise UserError(f"could not lock {self.path.parent}: other runs keep taking the lock "
                        f"{self.path}; make sure only one run uses this workdir")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._read_holder().get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _describe(self, holder: dict) -> str:
        if "damaged" in holder:
            return f"an unreadable lock file {self.path}"
        return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                f"{holder.get('started', '?')} UTC ({holder.get('command', '?')})")

    def _held_message(self, holder: dict) -> str:
        return (f"workdir {self.path.parent} is in use by another vitjax run: "
                f"{self._describe(holder)}; wait for it to finish or stop it, or use another "
                f"--workdir (a lock whose process is gone is taken over automatically; one "
                f"from another host after {self.stale_after_s / 60:.0f} min without heartbeat, "
                f"or delete {self.path} once you are sure that run is dead)")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                if self._read_holder().get("token") != self.token:
                    print(f"[vitjax] warning: the lock {self.path} was taken over by another "
                          "run; two runs may now write this workdir", flush=True)
                    return
                self.record["heartbeat"] = time.time()
                with contextlib.suppress(OSError):
                    fileio.write_text(self.path, self._text())

        self._thread = threading.Thread(target=beat, name="vitjax-workdir-lock", daemon=True)
        self._thread.start()


@contextlib.contextmanager
def hold(workdir: epath.Path | str, *, enabled: bool = True):
    """Holds the workdir's lock for the duration (a no-op when not `enabled`: processes other
    than 0 of a multi-host job)."""
    if not enabled:
        yield None
        return
    lock = WorkdirLock(workdir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
