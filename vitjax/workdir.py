"""Writing results into a workdir: JSON, CSV, npz and PNG on top of `vitjax.fileio`'s atomic
writer (the one way vitjax writes a file), to local folders and cloud buckets (gs://...) alike.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from vitjax.fileio import write_bytes, write_text

PathLike = str | epath.PathLike

__all__ = ["write_bytes", "write_text", "write_json", "read_json", "file_digest", "write_csv",
           "write_npz", "read_npz", "save_figure", "save_plot", "pyplot"]


def _json_default(value):
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_json(path: PathLike, data: Any) -> epath.Path:
    return write_text(path, json.dumps(data, indent=1, default=_json_default))


def read_json(path: PathLike) -> Any:
    return json.loads(epath.Path(path).read_text())


def file_digest(path: PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (weight files are hundreds of MB)."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]],
              fieldnames: Sequence[str] | None = None) -> epath.Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames or (rows[0] if rows else [])))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def write_npz(path: PathLike, arrays: Mapping[str, Any]) -> epath.Path:
    """np.savez's format, but byte-for-byte reproducible: np.savez stamps every member with the
    current time, so equal arrays saved twice would get different content hashes (the identity
    a finished stage records, see vitjax.stages.provenance)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
    return write_bytes(path, buffer.getvalue())


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_figure(figure, path: PathLike, dpi: int = 120) -> epath.Path:
    """A matplotlib figure as PNG (closed afterwards)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return write_bytes(path, buffer.getvalue())


def save_plot(figure, axes, path: PathLike, xlabel: str, ylabel: str) -> epath.Path:
    """The house style of every line plot (labels, light grid, small legend), saved as PNG."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
