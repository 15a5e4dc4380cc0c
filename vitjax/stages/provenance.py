"""What a stage's results were made from, so that no result is reused after its inputs changed.

A finished stage's DONE.json records, besides its summary and config:
  files     {relative path: size} of every result file in its folder (checkpoint folders,
            TensorBoard event files and DONE.json itself excluded);
  identity  a sha256 over those files' contents: the identity later stages record when they
            read these results (equal files give an equal identity, so a stage redone from its
            final checkpoint does not invalidate what was built on it);
  inputs    {stage: identity} of every finished stage it could read (its upstream in the stage
            table, plus any other stage whose summary it read).
A stage that starts writes STARTED.json ({inputs, config}) first, so that its unfinished results
(a search log, training checkpoints) say what they were made from too.

The runner (`vitjax.stages.runner`) uses these records: a finished stage whose recorded files are
missing or changed in size is redone; one whose inputs have changed since (an upstream stage
redone, or finished after it: a report run early) is redone; unfinished results made from other
inputs are discarded before the stage starts again.
"""

from __future__ import annotations

import hashlib
import json

from etils import epath

from vitjax import workdir as workdir_lib

DONE_FILE = "DONE.json"
STARTED_FILE = "STARTED.json"
_SKIPPED_DIRS = {"checkpoints"}  # orbax's own, validated by orbax on restore
_SKIPPED_PREFIXES = ("events.out.tfevents", ".")  # TensorBoard logs; temporaries


def result_files(folder: epath.Path, prefix: str = "") -> dict[str, int]:
    """{relative path: size} of the result files under a stage's folder."""
    out: dict[str, int] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name
        # DONE.json, and DONE.json.invalid: one the runner moved aside
        if name.startswith(_SKIPPED_PREFIXES) or (
                not prefix and (name.startswith(DONE_FILE) or name == STARTED_FILE)):
            continue
        if path.is_dir():
            if name not in _SKIPPED_DIRS:
                out.update(result_files(path, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = int(path.stat().length)
    return out


def content_digest(path: epath.Path) -> str:
    """sha256 of a result file's content. A safetensors file's JSON header is hashed with its
    keys sorted: the writer (a Rust hash map) orders the metadata differently in every process,
    so equal weights would otherwise give different digests."""
    if not path.name.endswith(".safetensors"):
        return workdir_lib.file_digest(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        try:
            header = json.dumps(json.loads(header), sort_keys=True).encode()
        except ValueError:  # not a valid header: hash the bytes as they are
            pass
        digest.update(header)
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def identity(folder: epath.Path, files: dict[str, int]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{content_digest(folder / name)}\n".encode())
    return digest.hexdigest()[:16]


def read_record(path: epath.Path) -> tuple[dict | None, str | None]:
    """(record, None), (None, None) when absent, or (None, why it cannot be read)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    try:
        record = json.loads(text)
    except ValueError as e:
        return None, f"is not valid JSON ({e.msg} at line {e.lineno})" if hasattr(e, "msg") \
            else "is not valid JSON"
    if not isinstance(record, dict):
        return None, "is not a JSON object"
    return record, None


def damaged_files(folder: epath.Path, record: dict) -> list[str]:
    """'name (why)' for each file a finished stage recorded that is now missing or resized."""
    out = []
    for name, size in sorted((record.get("files") or {}).items()):
        path = folder / name
        if not path.exists():
            out.append(f"{name} (missing)")
            continue
        actual = int(path.stat().length)
        if actual != int(size):
            out.append(f"{name} ({actual} bytes, {size} when the stage finished)")
    return out
