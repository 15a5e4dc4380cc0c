"""The command line end to end on the embedded digits: stages, resume, clear errors.

The bad-input cases run `vitjax.main` in process (the `cli_in_process` fixture); the tests
marked `subprocess` run `python -m vitjax.main`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.embed_dim=16", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.mlp_dim=32", "--config.model.patch_size=8", "--config.train.steps=6",
    "--config.train.warmup_steps=2", "--config.train.batch_size=32",
    "--config.train.eval_batch_size=128", "--config.train.log_every=3",
    "--config.train.eval_every=6", "--config.train.ckpt_every=3",
    "--config.train.score_every=3", "--config.score.batch_size=32",
]


def _main(workdir, *args):
    cmd = [sys.executable, "-m", "vitjax.main", "--config=configs/digits.py:scratch",
           f"--workdir={workdir}", *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.subprocess
def test_main_runs_the_stages_and_skips_finished_ones(tmp_path):
    result = _main(tmp_path, "--config.stages=pretrain,score,criteria")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("pretrain", "score", "criteria"):
        assert (tmp_path / stage / "DONE.json").exists()
    assert (tmp_path / "pretrain" / "supernet.safetensors").exists()
    summary = json.loads((tmp_path / "pretrain" / "DONE.json").read_text())
    assert set(summary["metrics"]) == {
        f"eval/{split}/{policy}/{metric}" for split in ("holdout", "test")
        for policy in ("dense", "target", "smallest") for metric in ("accuracy", "loss")}
    assert (tmp_path / "pretrain" / "ranks.npz").exists()
    rows = json.loads((tmp_path / "criteria" / "DONE.json").read_text())["rows"]
    assert {r["dimension"] for r in rows} == {"neuron", "head", "token"}
    assert (tmp_path / "criteria" / "criteria.png").stat().st_size > 0

    again = _main(tmp_path, "--config.stages=pretrain,score")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain (1/2): done earlier with this config, skipped" in again.stdout
    assert "score (2/2): done earlier with this config, skipped" in again.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.stages=prune"], "needs a policy: run the search stage first"),
        (["--config.stages=bogus"], "unknown stage"),
        (["--config.stages=score"], "run the pretrain stage first"),
        (["--config.model.image_size=48"], "config.data.image_size"),
        (["--config.ablation.dimensions=('neuron+foo',)"], "combine ['neuron', 'head', 'token']"),
        (["--config.compare.methods=('dynamicvit','x')"], "choose from ['dynamicvit', 'block'"),
        (["--config.ablation.budgets=(1.5,)"], "fractions of the dense FLOPs in (0, 1)"),
    ],
)
def test_bad_input_is_one_clear_error_and_a_nonzero_exit(tmp_path, cli_in_process, args,
                                                         message):
    result = cli_in_process("--config=configs/digits.py:scratch", f"--workdir={tmp_path}",
                            *TINY, *args)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_run_the_pipeline_through_the_local_launcher(tmp_path):
    """launch/local_multiprocess.sh: 2 processes x 2 CPU devices, one shared workdir."""
    cmd = ["bash", "launch/local_multiprocess.sh", "2", "2", "--", sys.executable, "-m",
           "vitjax.main", "--config=configs/digits.py:scratch", f"--workdir={tmp_path}", *TINY,
           "--config.stages=pretrain,score"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for process in ("[p0]", "[p1]"):
        assert f"{process} [vitjax] score (2/2): finished" in result.stdout + result.stderr
    assert (tmp_path / "score" / "DONE.json").exists()
