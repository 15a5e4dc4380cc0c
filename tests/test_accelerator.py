"""benchmarks/accelerator.py: its --smoke run works end to end, and neither it nor its worker
processes import what the accelerator machines lack (TensorFlow, clu, ml_collections, ...)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator.py"
# On the accelerator machines only jax, flax, optax, orbax, chex, einops, torch and timm (and
# their dependencies) are installed.
ABSENT = ("tensorflow", "tensorflow_datasets", "tf_keras", "clu", "ml_collections", "sklearn",
          "matplotlib", "onnx", "onnxruntime", "jax2onnx", "ai_edge_litert")
BLOCKER = f'''
import importlib.machinery
import sys

ABSENT = {ABSENT!r}


class _Absent(importlib.machinery.PathFinder):
    """The path finder, blind to these packages: importing one fails and find_spec says None,
    exactly as if it were not installed (torch and timm probe optional packages that way)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_Absent if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
'''


def _env(tmp_path) -> dict:
    """An environment whose every Python process (the script and the workers it starts)
    starts with the blocker installed, via a sitecustomize module first on the path."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


@pytest.mark.subprocess
def test_import_chain_has_no_tensorflow(tmp_path):
    code = """
import importlib, sys
sys.path.insert(0, "benchmarks")
import accelerator  # noqa: F401
# What the workers import lazily.
for name in ("vitjax.models.vit", "vitjax.pruning.prune", "vitjax.scoring", "dense_vs_timm",
             "pruned_speedup", "vitjax.bench.timing"):
    importlib.import_module(name)
try:
    import vitjax.training  # imports clu, hence TensorFlow: the blocker must stop it
except ImportError:
    pass
else:
    raise SystemExit("the blocker did not block")
bad = sorted(m for m in sys.modules if m.split('.')[0] in ABSENT)
assert not bad, bad
print("clean")
"""
    result = subprocess.run([sys.executable, "-c", f"ABSENT = {ABSENT!r}\n{code}"],
                            cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "clean" in result.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_smoke_run_prints_one_table_and_writes_json(tmp_path):
    out = tmp_path / "acc.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", f"--json={out}"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    data = json.loads(out.read_text())
    assert data["smoke"] and data["failed"] == []
    rows = data["rows"]
    sections = {row["section"] for row in rows}
    assert {"masked", "pruned", "hsic", "memory"} <= sections
    have_timm = all(importlib.util.find_spec(m) for m in ("torch", "timm"))
    assert ("timm" in sections) or not have_timm
    for row in rows:
        assert "error" not in row, row
    timm_rows = [r for r in rows if r["section"] == "timm"]
    assert {r["what"] for r in timm_rows} == {"forward", "train step"}
    if have_timm:
        assert all(r["timm_img_s"] > 0 and r["ratio"] > 0 for r in timm_rows)
    pruned = [r for r in rows if r["section"] == "pruned"]
    # Both paper-shaped policies really remove about the FLOPs they promise.
    assert sorted(round(1 - 1 / r["flops_x"], 1) for r in pruned) == [0.4, 0.6]
    memory = {r["what"].rsplit(" ", 1)[-1]: r for r in rows if r["section"] == "memory"}
    assert set(memory) == {"none", "full", "dots"}
    assert all(r["total_gib"] > 0 for r in memory.values())
    assert [r["seconds"] > 0 for r in rows if r["section"] == "hsic"] == [True]
    assert "ratio: median over alternating rounds" in result.stdout
