"""The one way vitjax writes a file: atomically, to a local folder or a bucket (etils.epath).

Every writer puts its bytes under a temporary sibling name and renames it, so a killed run never
leaves a half-written file under the final name that a rerun would take for a finished result.
This module sits below every other one (it imports only etils), so that interop, export,
training and the stages all write through it; `vitjax.workdir` adds the formats (JSON, CSV,
npz, PNG) on top.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def _temporary_sibling(path: epath.Path) -> epath.Path:
    # The process id keeps two processes writing the same file (hosts of one run sharing a
    # folder) from renaming each other's half-written bytes; the real extension stays last
    # because some writers (np.savez) append one otherwise.
    return path.parent / f".{path.stem}.tmp{os.getpid()}{path.suffix}"


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _give_umask_mode(path: str | os.PathLike) -> None:
    # Some writers (safetensors) create files 0600; give the file the mode the umask sets.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A local temporary file name for a writer that wants a path (safetensors, torch.save,
    np.savez): what the block writes there replaces `path` only if the block succeeds.

    For a bucket path the file is written locally and copied next to its final name first."""
    final = epath.Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remote_tmp = _temporary_sibling(final)
    with tempfile.TemporaryDirectory() as scratch:
        local = (os.fspath(remote_tmp) if _is_local(final)
                 else os.path.join(scratch, remote_tmp.name))
        try:
            yield local
            _give_umask_mode(local)
            if not _is_local(final):
                epath.Path(local).copy(remote_tmp, overwrite=True)
            remote_tmp.replace(final)
        finally:
            if remote_tmp.exists():
                remote_tmp.unlink()


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Writes `data` under `path` so that the file appears only complete."""
    final = epath.Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        tmp.write_bytes(data)
        tmp.replace(final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def write_text(path: PathLike, text: str) -> epath.Path:
    return write_bytes(path, text.encode())


def read_bytes(path: PathLike) -> bytes:
    return epath.Path(path).read_bytes()
