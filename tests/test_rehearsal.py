"""The rehearsal (benchmarks/rehearse.py) of the cheap shipped configs: each one as a user runs
it (`python -m vitjax.main --config=configs/...`), every stage it lists, at its own model shapes
and dtype, on generated data, a few steps each. `python benchmarks/rehearse.py` runs all of
them, DeiT-S and DeiT-B included.

Here, besides the rehearsal's own shrinking, the ablation searches one combination and one
budget (instead of 6 + 3 or 4), and the run uses one of the 8 fake devices (the sharded paths
are tested elsewhere; 8 fake devices on two cores only slow the compiles down). The suite runs
digits and configs/folder.py at its quick-trial argument (variant=mu/4, 32 px); folder and
DeiT-Ti at 224 px only with VITJAX_REHEARSAL_FULL=1 (they take minutes even on idle cores).
"""

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rehearse", REPO / "benchmarks" / "rehearse.py")
rehearse = importlib.util.module_from_spec(_spec)
sys.modules["rehearse"] = rehearse
_spec.loader.exec_module(rehearse)

SUITE_EXTRA = {"mesh.data": 1, "ablation.dimensions": "('head+neuron+token',)",
               "ablation.budgets": "(0.5,)"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return rehearse.make_image_folder(tmp_path_factory.mktemp("rehearsal") / "images")


FULL = os.environ.get("VITJAX_REHEARSAL_FULL") == "1"
_full_only = pytest.mark.skipif(not FULL, reason=(
    "a 224 px DeiT-Ti compiles ~15 programs: minutes on 2 idle cores, half an hour under load; "
    "set VITJAX_REHEARSAL_FULL=1 or run python benchmarks/rehearse.py deit_ti folder"))
# The folder config at its quick-trial argument (the model its docstring suggests for a trial).
QUICK_FOLDER = dataclasses.replace(rehearse.REHEARSALS["folder"], name="folder:quick",
                                   argument="root={folder},variant=mu/4,image_size=32,"
                                            "epochs=1,batch_size=4")


# digits: the embedded default; folder: a user's images (DeiT-Ti/16, 224 px, float32);
# deit_ti: DeiT-Ti/16 as shipped (bfloat16, 224 px, 197 tokens), 2 images per batch.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "folder:quick",
                                  pytest.param("folder", marks=_full_only),
                                  pytest.param("deit_ti", marks=_full_only)])
def test_shipped_config_runs_every_stage_at_its_own_shapes(tmp_path, image_folder, name):
    rehearsal = QUICK_FOLDER if name == "folder:quick" else rehearse.REHEARSALS[name]
    result = rehearse.run_one(rehearsal, tmp_path / "run", image_folder, SUITE_EXTRA,
                              echo=lambda line: None)
    log = (tmp_path / "run" / "output.log").read_text()
    assert result["ok"], result["problem"] + "\n" + log[-3000:]
    assert "Traceback" not in log
    config = rehearse._load_config(rehearsal, image_folder)
    if name in ("folder", "deit_ti"):  # the shapes the config ships with reached the model
        from vitjax.workdir import read_json

        prune = read_json(tmp_path / "run" / "prune" / "DONE.json")
        assert prune["dense_gmacs"] > 1.0  # a 224 px DeiT-Ti (1.26 GMACs), not a shrunk one
        assert config.model.image_size == 224
    assert config.model.dtype == ("bfloat16" if name == "deit_ti" else "float32")
    stages = [s for s in str(config.stages).split(",") if s]
    from vitjax.stages import ORDER

    # Every stage of the pipeline (the supernet-free baseline only runs from a checkpoint).
    assert set(stages) >= set(ORDER) - {"baseline"}
    for stage in stages:
        assert f"[vitjax] {stage} (" in log


def test_rehearsals_keep_model_shapes_and_dtype():
    """The overrides shrink steps, batches, searches and sizes of data, never the model."""
    for rehearsal in rehearse.REHEARSALS.values():
        for key, _ in rehearsal.overrides:
            assert not key.startswith("model.") or key == "model.num_classes", (rehearsal, key)
    assert set(rehearse.REHEARSALS) >= {"digits", "digits_study", "folder", "deit_ti",
                                        "deit_ti:init", "deit_s:flops=0.4", "deit_b"}
    assert list(rehearse.REHEARSALS)[-1] == "deit_b"  # the slowest last
    for name in ("deit_ti", "deit_ti:init", "deit_b", "folder"):  # the report's timing, shrunk
        overrides = dict(rehearse.REHEARSALS[name].overrides)
        assert overrides["report.batch_sizes"] == "(1,4)" and overrides["report.rounds"] == 1


def test_from_pretrained_rehearsal_compresses_a_checkpoint_that_fits(tmp_path):
    """deit_ti:init runs the from-pretrained recipe (frozen teacher, baseline stage) on a
    generated DeiT-Ti checkpoint in timm's format, which loads into the rehearsal's model."""
    from vitjax.stages.context import Context
    from vitjax.stages.pretrain import load_init_checkpoint

    rehearsal = rehearse.REHEARSALS["deit_ti:init"]
    folder = str(tmp_path / "images")
    path = rehearse.checkpoint_path(folder)
    assert Path(path).parent == tmp_path
    assert rehearse.make_timm_checkpoint(path) == path
    command = rehearsal.command(str(tmp_path / "run"), folder, {})
    assert f"--config=configs/deit_ti.py:init={path}" in command
    config = rehearse._load_config(rehearsal, folder)
    assert config.init.checkpoint == path and float(config.train.distill) > 0
    assert "baseline" in str(config.stages).split(",")
    assert config.model.dtype == "bfloat16" and config.model.variant == "Ti/16"
    overrides = dict(rehearsal.overrides)
    config.model.num_classes = overrides["model.num_classes"]
    config.data.num_classes = overrides["data.num_classes"]
    params = load_init_checkpoint(Context(config, tmp_path / "run"), path)
    assert params["head"]["kernel"].shape == (192, rehearse.FOLDER_CLASSES)
    assert params["pos_embed"].shape[-2] == 197  # 224 px, patch 16, a class token


def _fake(monkeypatch, code: str):
    """Rehearsal commands replaced by a tiny Python program (no vitjax run)."""
    monkeypatch.setattr(rehearse.Rehearsal, "command",
                        lambda self, workdir, folder, extra: [sys.executable, "-c", code])


def test_a_refused_rehearsal_passes_only_when_refused_before_any_stage(tmp_path, monkeypatch):
    refused = rehearse.REHEARSALS["digits:flops=0.4,compare,distilled"]
    line = "error: DynamicViT with locations (1, 2, 3) and the 'original' schedule cannot reach"
    _fake(monkeypatch, f"import sys; print({line!r}, file=sys.stderr); sys.exit(1)")
    assert rehearse.run_one(refused, tmp_path / "a", "images", {}, echo=lambda s: None)["ok"]
    _fake(monkeypatch, "print('[vitjax] pretrain (1/10): running')")  # it ran instead
    result = rehearse.run_one(refused, tmp_path / "b", "images", {}, echo=lambda s: None)
    assert not result["ok"] and "should have been refused up front" in result["problem"]
    (tmp_path / "c" / "pretrain").mkdir(parents=True)  # refused, but after a stage started
    (tmp_path / "c" / "pretrain" / "STARTED.json").write_text("{}")
    _fake(monkeypatch, f"import sys; print({line!r}, file=sys.stderr); sys.exit(1)")
    result = rehearse.run_one(refused, tmp_path / "c", "images", {}, echo=lambda s: None)
    assert not result["ok"] and "stages started: ['pretrain']" in result["problem"]


def test_a_rehearsal_killed_by_a_signal_says_so(tmp_path, monkeypatch):
    """The kernel's OOM killer leaves no line in the output: the table names the signal."""
    _fake(monkeypatch, "import os, signal; print('[vitjax] export: running', flush=True); "
          "os.kill(os.getpid(), signal.SIGKILL)")
    result = rehearse.run_one(rehearse.REHEARSALS["digits"], tmp_path, "images", {},
                              echo=lambda s: None)
    assert not result["ok"]
    assert result["problem"].startswith("killed by SIGKILL; out of memory? see dmesg")
    assert "[vitjax] export: running" in result["problem"]


def test_the_script_loads_configs_with_the_vitjax_its_runs_use(tmp_path):
    """rehearse.py lists a rehearsal's stages by loading its config in its own process: that
    must be this checkout's vitjax (the runs get PYTHONPATH=REPO), not another installed one
    (digits_study's stage list failed on a config block the installed vitjax lacked)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (f"import runpy; runpy.run_path({str(REPO / 'benchmarks' / 'rehearse.py')!r}); "
            "import vitjax; print(vitjax.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve().is_relative_to(REPO / "vitjax")
