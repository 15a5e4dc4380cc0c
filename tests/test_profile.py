"""The CPU profile tool: a training step's trace attributes time to the model's ops."""

import re

import pytest

from vitjax.bench import profile_forward


def test_step_trace_attributes_forward_and_backward_ops(capsys):
    assert profile_forward.main(["--variant=Ti", "--batch=1", "--runs=1", "--part=trace",
                                 "--step"]) == 0
    out = capsys.readouterr().out
    assert "ms per training step" in out
    # Backward ops are named transpose(jvp(...)); both directions of the MLP matmuls are found.
    assert "transpose(jvp(ViT))/mlp/dot_general" in out
    assert "\njvp(ViT)/mlp/dot_general" in out
    # Every thunk's time is attributed to exactly one kind: the kinds add up to the total.
    # (Shares themselves depend on the machine's load, so they are not asserted.)
    total = float(re.search(r"thunk CPU time (\d+) ms", out).group(1))
    kinds = out.split("by kind:")[1]
    ms = [float(m) for m in re.findall(r"\s([\d.]+) ms\s+[\d.]+%", kinds)]
    shares = [float(s) for s in re.findall(r"ms\s+([\d.]+)%", kinds)]
    assert any("weight matmuls" in line for line in kinds.splitlines())
    assert sum(ms) == pytest.approx(total, abs=1.0 + 0.05 * len(ms))
    assert sum(shares) == pytest.approx(100.0, abs=0.1 * len(shares))


def test_step_with_ablate_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        profile_forward.main(["--step", "--part=ablate"])
    assert info.value.code == 2
    assert "--part=trace only" in capsys.readouterr().err
