"""benchmarks/ab_checkouts.py: two checkouts of vitjax timed against each other."""

import os
import subprocess
import sys

import pytest

# Each test times checkouts in processes of their own: that is what the tool does.
pytestmark = pytest.mark.subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ab_checkouts.py")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=600)


def test_times_each_checkout_in_its_own_process(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "vitjax").symlink_to(os.path.join(ROOT, "vitjax"))
    result = _run(f"--base={base}", "--what=forward", "--variant=Ti", "--batch=1", "--reps=2",
                  "--seconds=0.05")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"base: vitjax from {base}," in result.stdout
    assert f"new: vitjax from {ROOT}," in result.stdout
    assert "new / base:" in result.stdout


def test_bad_checkouts_fail_in_one_line(tmp_path):
    missing = _run(f"--base={tmp_path}")
    assert missing.returncode == 1
    assert "is not a vitjax checkout" in missing.stderr.strip().splitlines()[-1]
    same = _run(f"--base={ROOT}")
    assert same.returncode == 2 and "the same checkout" in same.stderr
    assert _run().returncode == 2


def test_a_flag_against_the_same_checkout():
    result = _run(f"--base={ROOT}", "--xla-flags=--xla_cpu_enable_fast_math=false",
                  "--what=forward", "--variant=Ti", "--batch=1", "--reps=1", "--seconds=0.05")
    assert result.returncode == 0, result.stderr[-2000:]
    new = next(line for line in result.stdout.splitlines() if "new: vitjax" in line)
    assert new.endswith("--xla_cpu_enable_fast_math=false'")
