"""User mistakes end in one line naming the problem, exit status 2, and nothing half-written.

In process where possible (`run_pipeline` raises `UserError`, which `vitjax.main` prints as one
line with exit status 2; the command-line cases run `vitjax.main` in process too); the tests
marked `subprocess` run `python -m vitjax.main`. The data-side
cases (bad images, missing folders, ImageNet preparation) are in tests/test_bad_data.py.
"""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import load_config, tiny_digits  # noqa: I001  (tests/ is on sys.path)

from vitjax.errors import UserError
from vitjax.stages import checks, runner
from vitjax.workdir import read_json

REPO = Path(__file__).resolve().parents[1]


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) \
        if path.exists() else []


CONFIG_CASES = {
    "steps <= 0": ({"train.steps": 0}, "train.steps=0: training needs at least one step"),
    "batch size 0": ({"train.batch_size": 0}, "train.batch_size=0: must be a positive"),
    "token mode": ({"train.token_mode": "dynamic"}, "token_mode='dynamic': choose one of"),
    "dtype": ({"model.dtype": "float17"}, "model.dtype='float17'"),
    "attention": ({"model.attention": "flash"}, "model.attention='flash': choose one of"),
    "cudnn in float32": ({"model.attention": "cudnn"}, "attention='cudnn' needs"),
    "remat policy": ({"model.remat_policy": "most"}, "model.remat_policy='most': choose one of"),
    "target above dense": ({"target_flops_fraction": 1.5}, "fraction of the dense model in (0, 1)"),
    "target below smallest": ({"target_flops_fraction": 0.01},
                              "below the smallest model the supernet can sample"),
    "class count": ({"model.num_classes": 5}, "config.model.num_classes=5 but config.data has 10"),
    "image size": ({"model.image_size": 48}, "config.data.image_size"),
    "mesh": ({"mesh.model": 3}, "config.mesh: mesh.model=3 does not divide the 8 devices"),
    "resume overrides": ({"train.resume_overrides": "lr,model"}, "resume_overrides names"),
    "stage name": ({"stages": "pretrain,bogus"}, "unknown stage(s) ['bogus']"),
    "missing input stage": ({"stages": "score"}, "run the pretrain stage first"),
    "report batch sizes": ({"report.batch_sizes": (0, 64)}, "config.report.batch_sizes=(0, 64)"),
    "report rounds": ({"report.rounds": 0}, "config.report.rounds=0: must be an integer >= 1"),
    "label smoothing moved": ({"augment.label_smoothing": 0.1},
                              "config.augment.label_smoothing is no longer read"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes_are_one_line_errors_and_write_nothing(tmp_path, case):
    overrides, message = CONFIG_CASES[case]
    config = tiny_digits()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    with pytest.raises(UserError) as info:
        runner.run_pipeline(config, tmp_path / "run")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert _files(tmp_path / "run") == []


def test_warmup_longer_than_a_short_run_is_clamped_with_a_warning(capsys):
    config = tiny_digits()
    config.train.update(steps=20, warmup_steps=100)
    checks.check_config(config)
    assert config.train.warmup_steps == 2
    assert "warming up for 2 steps instead" in capsys.readouterr().out


def test_workdir_that_is_a_file_or_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        runner.run_pipeline(tiny_digits(), tmp_path / "file")
    with pytest.raises(UserError, match="cannot be used|not writable"):
        runner.run_pipeline(tiny_digits(), tmp_path / "file" / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir(tmp_path):
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(UserError, match="not writable"):
            runner.run_pipeline(tiny_digits(), tmp_path / "run")
    finally:
        tmp_path.chmod(stat.S_IRWXU)


def test_finished_results_are_never_silently_reused_with_another_config(tmp_path, capsys):
    config = tiny_digits()
    config.stages = "pretrain"
    runner.run_pipeline(config, tmp_path)
    recorded = read_json(tmp_path / "config.json")
    done = read_json(tmp_path / "pretrain" / "DONE.json")
    assert done["config"]["train.steps"] == 4

    changed = tiny_digits()
    changed.stages = "pretrain"
    changed.train.steps = 6
    with pytest.raises(UserError) as info:
        runner.run_pipeline(changed, tmp_path)
    assert "train.steps: 4 -> 6" in str(info.value) and "--config.overwrite=True" in str(
        info.value)
    assert read_json(tmp_path / "config.json") == recorded  # never rewritten to what did not run
    # A later stage that would read those results is refused too.
    changed.stages = "score"
    with pytest.raises(UserError, match="stage 'pretrain'.*another config"):
        runner.run_pipeline(changed, tmp_path)

    # Bookkeeping keys (logging, checkpoint cadence) do not change results: reused.
    relogged = tiny_digits()
    relogged.stages = "pretrain"
    relogged.train.log_every = 1
    runner.run_pipeline(relogged, tmp_path)
    assert "pretrain (1/1): done earlier with this config, skipped" in capsys.readouterr().out

    # overwrite=True redoes the stage with the new config.
    changed.stages = "pretrain"
    changed.overwrite = True
    runner.run_pipeline(changed, tmp_path)
    assert read_json(tmp_path / "pretrain" / "DONE.json")["config"]["train.steps"] == 6
    assert read_json(tmp_path / "config.json")["train"]["steps"] == 6


def _cli(*args, cwd=REPO, timeout=300):
    cmd = [sys.executable, "-m", "vitjax.main", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()
             and not line.startswith(("I0000", "W0000", "WARNING: All log"))]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


COMMAND_LINE_CASES = [
    (["--config=configs/nope.py"], "no such config file: configs/nope.py"),
    (["--config=configs/digits.py", "--config.trian.steps=5"],
     "no config field 'trian'; Did you mean \"train\""),
    (["--config=configs/digits.py", "--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.train.steps=5"], "--config is required"),
    (["--config=configs/digits.py:bogus"], "config argument 'bogus': expected 'distilled'"),
    (["--config=configs/digits.py:expand=0.5"], "expand=0.5: the width factor must be > 1"),
]


@pytest.mark.parametrize("args, message", COMMAND_LINE_CASES)
def test_command_line_mistakes(tmp_path, cli_in_process, args, message):
    result = cli_in_process(*args, f"--workdir={tmp_path / 'run'}")
    _assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.subprocess
def test_command_line_mistake_in_its_own_process(tmp_path):
    """The real command: one line on stderr and exit status 2 from the process itself."""
    args, message = COMMAND_LINE_CASES[1]
    _assert_one_line_error(_cli(*args, f"--workdir={tmp_path / 'run'}"), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.subprocess
def test_damaged_checkpoint_is_one_line(pretrained_copy):
    """A corrupt orbax checkpoint: one line, not pages of TensorStore and asyncio noise."""
    workdir = pretrained_copy  # the same tiny run as _TINY_FLAGS, pretrain finished
    for name in ("DONE.json", "supernet.safetensors", "ranks.npz"):
        (workdir / "pretrain" / name).unlink()
    shutil.rmtree(workdir / "pretrain" / "checkpoints" / "2")
    for path in (workdir / "pretrain" / "checkpoints" / "4").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    args = ["--config=configs/digits.py:scratch", f"--workdir={workdir}",
            "--config.stages=pretrain",
            *(f"--config.{k}={v}" for k, v in _TINY_FLAGS.items())]
    _assert_one_line_error(_cli(*args), "checkpoints/4 is unreadable")


_TINY_FLAGS = {
    "model.embed_dim": 16, "model.depth": 2, "model.num_heads": 2, "model.mlp_dim": 32,
    "model.patch_size": 8, "train.steps": 4, "train.warmup_steps": 1, "train.batch_size": 32,
    "train.eval_batch_size": 128, "train.log_every": 2, "train.eval_every": 4,
    "train.ckpt_every": 2, "train.score_every": 2, "score.batch_size": 32,
}


def test_tiny_flags_match_the_in_process_config():
    config = tiny_digits()
    flat = checks.flatten(config.to_dict())
    assert {k: flat[k] for k in _TINY_FLAGS} == _TINY_FLAGS
    assert load_config("digits").train.steps == 200  # the shipped default is untouched


def test_convert_refuses_a_missing_output_directory_and_keeps_the_umask(tmp_path):
    import jax

    from vitjax.convert import main as convert_main
    from vitjax.interop import save_native
    from vitjax.models import ViT, ViTConfig, init_params

    config = ViTConfig(num_classes=3, image_size=8, patch_size=4, embed_dim=16, depth=1,
                       num_heads=2, mlp_dim=32)
    source = tmp_path / "model.safetensors"
    save_native(source, config, jax.device_get(init_params(ViT(config), jax.random.key(0))))
    old = os.umask(0o022)
    try:
        assert convert_main([str(source), str(tmp_path / "missing" / "timm.safetensors")]) == 2
        assert not (tmp_path / "missing").exists()
        assert convert_main([str(source), str(tmp_path / "timm.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "timm.safetensors").stat().st_mode) == 0o644
