"""The CPU profile tool: a training step's trace attributes time to the model's ops."""

import re

import pytest

from vitjax.export import profile_forward


def test_step_trace_attributes_forward_and_backward_ops(capsys):
    assert profile_forward.main(["--variant=Ti", "--batch=1", "--runs=1", "--part=trace",
                                 "--step"]) == 0
    out = capsys.readouterr().out
    assert "ms per training step" in out
    # Backward ops are named transpose(jvp(...)) and the weight matmuls dominate a DeiT step.
    assert "transpose(jvp(ViT))/mlp/dot_general" in out
    share = re.search(r"weight matmuls \(.*\)\s+[\d.]+ ms\s+([\d.]+)%", out)
    assert share and float(share.group(1)) > 30.0


def test_step_with_ablate_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        profile_forward.main(["--step", "--part=ablate"])
    assert info.value.code == 2
    assert "--part=trace only" in capsys.readouterr().err
