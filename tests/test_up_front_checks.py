"""What the rehearsal of every shipped config found after issue 20's first part (issue 20,
last part): a config the compare stage would refuse after every other stage ran is refused
before pretraining; the report's timing is a config block (config.report), the same report
with its defaults; the from-pretrained DeiT recipe's generated teacher fits the student."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_stages import load_config, tiny_digits  # noqa: I001  (tests/ is on sys.path)

from vitjax.errors import UserError
from vitjax.stages import runner
from vitjax.workdir import read_json

REPO = Path(__file__).resolve().parents[1]


# --- compare: DynamicViT out of reach, refused up front ---


def _lowest_target(config, ctx) -> float:
    return ctx.target_gmacs * (1 - config.search.tol)


def test_dynamicvit_out_of_reach_is_refused_before_pretraining(tmp_path):
    """configs/digits.py:flops=0.4,compare,distilled: DynamicViT's smallest schedule on the
    4-block model with a distillation token costs more than the pruned model may; the compare
    stage said so after pretrain..prune had run. The same line now comes before any stage."""
    from vitjax.stages.compare import schedule_for_target

    config = load_config("digits", "flops=0.4,compare,distilled")
    with pytest.raises(UserError) as info:
        runner.run_pipeline(config, tmp_path / "run")
    message = str(info.value)
    assert message.startswith("DynamicViT with locations (1, 2, 3) and the 'original' "
                              "schedule cannot reach "), message
    assert "\n" not in message
    assert not (tmp_path / "run" / "pretrain").exists()  # nothing ran, nothing was written
    # The compare stage's own bisection, at the lowest FLOPs the search may land at, says the
    # same: one computation, not a copy.
    ctx = runner.Context(config, tmp_path / "run")
    with pytest.raises(UserError) as same:
        schedule_for_target(config.compare, ctx.model_config, _lowest_target(config, ctx))
    assert str(same.value) == message


@pytest.mark.parametrize("key, value, named", [("optimizer", "lbfgs", "optimizer"),
                                                ("screen_band", 1.5, "screen_band"),
                                                ("method", "bo", "method")])
def test_a_search_setting_mistake_is_refused_before_pretraining(tmp_path, key, value, named):
    """config.search was only read by the search stage, after pretraining (minutes here,
    days on ImageNet); now by the search stage's check, before any stage."""
    config = load_config("digits")
    config.search[key] = value
    with pytest.raises(UserError, match=named) as info:
        runner.run_pipeline(config, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_dynamicvit_out_of_reach_is_one_line_from_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "vitjax.main",
         "--config=configs/digits.py:flops=0.4,compare,distilled",
         f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "DynamicViT with locations (1, 2, 3)" in errors[0], \
        result.stderr[-2000:]
    assert not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.parametrize("name, arg", [("digits", "compare"), ("digits_study", None),
                                       ("digits", "flops=0.5,compare,distilled")])
def test_dynamicvit_in_reach_passes_the_check(tmp_path, name, arg):
    """The shipped combinations DynamicViT can reach are let through (digits_study compares at
    40% of the FLOPs without a distillation token)."""
    from vitjax.stages import checks

    config = load_config(name, arg)
    ctx = runner.Context(config, tmp_path)
    stages = runner.parse_stages(config.stages)
    assert "compare" in stages and "dynamicvit" in config.compare.methods
    checks.check_compare(config, ctx.model_config, ctx.target_gmacs, stages)


def test_dynamicvit_reaches_a_target_to_the_reports_precision(tmp_path):
    """digits_study: the search band starts at 38.000% of dense, DynamicViT's smallest schedule
    (keep rate 0.25: 16, 4, 1 of 64 patches) costs 38.003%; within REACH_RTOL it is matched,
    further below it is out of reach."""
    from vitjax.dynamicvit import DynamicViTConfig, dynamicvit_gmacs, keep_ratios
    from vitjax.stages.compare import REACH_RTOL, schedule_for_target

    config = load_config("digits_study")
    model_config = runner.Context(config, tmp_path).model_config
    floor = dynamicvit_gmacs(model_config, DynamicViTConfig(
        locations=(1, 2, 3), ratios=keep_ratios("original", 0.25, 3)))
    lowest = _lowest_target(config, runner.Context(config, tmp_path))
    assert lowest < floor <= lowest * (1 + REACH_RTOL)
    dyn = schedule_for_target(config.compare, model_config, floor * (1 - REACH_RTOL / 2))
    assert dynamicvit_gmacs(model_config, dyn) == pytest.approx(floor, rel=1e-12)
    with pytest.raises(UserError, match="cannot reach"):
        schedule_for_target(config.compare, model_config, floor * (1 - 2 * REACH_RTOL))


def test_dynamicvit_check_only_when_compare_runs(tmp_path):
    from vitjax.stages import checks

    config = load_config("digits", "flops=0.4,compare,distilled")
    ctx = runner.Context(config, tmp_path)
    checks.check_compare(config, ctx.model_config, ctx.target_gmacs, ["pretrain", "search"])
    config.compare.methods = ("block",)
    checks.check_compare(config, ctx.model_config, ctx.target_gmacs,
                         runner.parse_stages(config.stages))


# --- report: its timing from config.report ---


def test_every_shipped_config_declares_the_report_timing():
    for name, arg in [("digits", None), ("digits", "expand=2"), ("digits_study", None),
                      ("deit_ti", None), ("deit_s", "init=x.pth"), ("deit_b", None)]:
        report = load_config(name, arg).report
        assert tuple(report.batch_sizes) == (1, 64) and report.rounds == 5 \
            and report.seconds == 0.2, name


def test_report_times_the_configured_batches_and_defaults_keep_its_tables(tmp_path, capsys):
    config = tiny_digits()
    config.stages = "pretrain,report"
    config.report.update(batch_sizes=(2, 3), rounds=2, seconds=0.01)
    runner.run_pipeline(config, tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| img/s batch 2 | img/s batch 3 |\n|---|---|---|---|---|---|---|" in report
    assert "batch 64" not in report and "median of 2 rounds of 0.01 s" in report
    assert "timing dense at batch 2 and 3 (alternating, 2 rounds of 0.01 s)" in \
        capsys.readouterr().out
    speed = read_json(tmp_path / "report" / "DONE.json")["speed"]["dense"]
    assert set(speed) == {"2", "3"} and all(v > 0 for v in speed.values())
    # Other timing settings are another report: refused without overwrite, then redone.
    defaults = tiny_digits()
    defaults.stages = "pretrain,report"
    with pytest.raises(UserError, match="report.batch_sizes"):
        runner.run_pipeline(defaults, tmp_path)
    defaults.overwrite = True
    runner.run_pipeline(defaults, tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    # Word for word what the report said before config.report existed.
    assert ("in this process, alternating, median of 5 rounds of 0.2 s).\n\n"
            "| model | accuracy | GMACs | FLOPs kept | parameters | img/s batch 1 | "
            "img/s batch 64 |\n|---|---|---|---|---|---|---|\n| dense supernet |") in report
    assert "timing dense at batch 1 and 64 (alternating, 5 rounds of 0.2 s)" in \
        capsys.readouterr().out


def test_compare_and_cost_tables_with_default_timing_are_unchanged():
    from types import SimpleNamespace

    from vitjax.stages.report import compare_table, cost_section

    speed = {"dense": {1: 100.0, 64: 1000.0}, "pruned": {1: 150.0, 64: 1600.0},
             "dynamicvit": {1: 90.0, 64: 1200.0}}
    done = {"compare": {"target_gmacs": 0.5, "methods": {"dynamicvit": {
        "accuracy": {"test": 0.9}, "gmacs": 0.5, "params": 1000}}}}
    rows = [("dense supernet", 0.95, 1.0, 2000, speed["dense"])]
    assert compare_table(done, rows, "test", speed)[4:9] == [
        "| method | accuracy | GMACs | parameters | img/s batch 1 | img/s batch 64 |",
        "|---|---|---|---|---|---|",
        "| dense | 95.0 | 1 | 2,000 | 100 | 1000 |",
        "| dynamicvit | 90.0 | 0.5 | 1,000 | 90 | 1200 |",
        ""]
    assert "median of 1 round)." in compare_table(done, rows, "test", speed, (1, 64), 1)[2]
    assert compare_table(done, rows, "test", speed)[-2] == \
        "DynamicViT at batch 1 runs at 0.90x the dense model's speed (slower than dense)."
    ctx = SimpleNamespace(dense_gmacs=1.0)
    done = {"pretrain": {"metrics": {"eval/test/dense/accuracy": 0.95}},
            "prune": {"pruned_gmacs": 0.6, "accuracy_before_finetune": {"test": 0.9}},
            "finetune": None, "baseline": None, "ablation": None}
    lines, _ = cost_section(ctx, done, "test", speed)
    assert lines[4:7] == [
        "| model | accuracy | change vs dense (pp) | FLOPs saved | time saved batch 1 | "
        "time saved batch 64 |", "|---|---|---|---|---|---|",
        "| searched policy, no finetuning | 90.0 | -5.0 | 40% | 33% | 38% |"]


def test_ablation_row_of_a_budget_too_thin_to_sample_does_not_say_unreachable():
    """deit_ti:expand=2: head+neuron can go down to 0.63 GMACs, below the 1.25 budget, but the
    sampler found no policy in the band; the row said "cannot reach the budget"."""
    from vitjax.stages.report import ablation_table

    ablation = {"target_gmacs": 1.254, "evaluations_per_search": 3, "split": "test",
                "dimensions": {
                    "neuron": {"dims": ["neuron"], "reachable": False, "lowest_gmacs": 2.089},
                    "head+neuron": {"dims": ["neuron", "head"], "reachable": False,
                                    "lowest_gmacs": 0.6294, "reason": "found only 0 of 2"}}}
    lines = ablation_table(ablation, 4.6)
    assert "| ✓ | – | – | cannot reach the budget | 2.089 (most pruned) | – |" in lines
    assert "| ✓ | ✓ | – | no policy found at the budget (too few to sample) | 0.6294 (most " \
        "pruned) | – |" in lines
