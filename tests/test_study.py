"""The multi-seed study: verdict rules on constructed numbers, and the seed loop on a tiny run."""

import numpy as np
import pytest
from tiny import load_config, tiny_digits

from vitjax.errors import UserError
from vitjax.interop import load_native
from vitjax.stages.study import _criteria_margin, _speed_rows, evaluate_claims, run_study
from vitjax.workdir import read_json


def _run(dense, finetuned, gp, random, three, best_other):
    return {"dense": dense, "finetuned": finetuned, "search": {"gp": gp, "random": random},
            "ablation": {"neuron": best_other, "neuron+token": best_other - 0.01,
                         "head+neuron+token": three}}


def _verdicts(runs, **kwargs):
    return {c["claim"]: c["verdict"] for c in evaluate_claims(runs, **kwargs)}


def test_verdicts_follow_the_per_seed_margins():
    holds = {s: _run(0.96, 0.958, 0.97 + s / 1000, 0.95, 0.95 + s / 1000, 0.94)
             for s in range(3)}
    verdicts = _verdicts(holds)
    assert verdicts["compression"] == "holds"  # 0.2 pp drop < 0.5 pp in every seed
    assert verdicts["search"] == "holds" and verdicts["dimensions"] == "holds"
    assert verdicts["criteria"] == "not measured"

    fails = {s: _run(0.96, 0.94 - s / 100, 0.95, 0.96 + s / 1000, 0.90, 0.93) for s in range(3)}
    verdicts = _verdicts(fails)
    assert verdicts == {"compression": "does not hold", "search": "does not hold",
                        "dimensions": "does not hold", "criteria": "not measured",
                        "supernet": "not measured"}

    # Signs that disagree between seeds: within noise.
    mixed = {0: _run(0.96, 0.95, 0.97, 0.96, 0.95, 0.94),
             1: _run(0.96, 0.959, 0.95, 0.96, 0.93, 0.94),
             2: _run(0.96, 0.958, 0.96, 0.96, 0.95, 0.95)}
    verdicts = _verdicts(mixed)
    assert verdicts["search"] == "within noise" and verdicts["dimensions"] == "within noise"
    assert verdicts["compression"] == "within noise"


def test_speed_rows_are_ratios_to_dense_per_seed():
    runs = {0: {"speed": {"dense": {"1": 100.0, "64": 200.0}, "pruned": {"1": 150.0, "64": 500.0},
                          "dynamicvit": {"1": 90.0, "64": 400.0}}},
            1: {"speed": {"dense": {"1": 100.0, "64": 100.0}, "pruned": {"1": 250.0, "64": 300.0},
                          "dynamicvit": {"1": 110.0, "64": 200.0}}},
            2: {}}  # a seed whose report did not run
    rows = _speed_rows(runs, ["dynamicvit", "block"])
    assert rows == [
        "| multi-dimensional (HSIC + GP) | 2.00 ± 0.71 | 1.50, 2.50, – | 2.75 ± 0.35 | "
        "2.50, 3.00, – |",
        "| dynamicvit | 1.00 ± 0.14 | 0.90, 1.10, – | 2.00 ± 0.00 | 2.00, 2.00, – |"]


def test_criteria_margin_compares_hsic_with_the_best_other_at_high_ratios():
    rows = [dict(dimension="head", criterion=c, ratio=r, accuracy=a)
            for c, r, a in [("hsic", 0.3, 0.5), ("random", 0.3, 0.9),  # low ratio: ignored
                            ("hsic", 0.6, 0.8), ("random", 0.6, 0.6), ("magnitude", 0.6, 0.7),
                            ("hsic-paper", 0.6, 0.99)]]  # a HSIC variant is no competitor
    assert _criteria_margin(rows, 0.5) == pytest.approx(0.1)


def test_study_runs_each_seed_in_its_own_workdir(tmp_path):
    config = tiny_digits()
    config.stages = "pretrain"
    study = load_config("digits_study")
    config.study = study.study
    config.study.seeds = (0, 1)
    summary = run_study(config, tmp_path)
    for seed in (0, 1):
        recorded = read_json(tmp_path / f"seed_{seed}" / "config.json")
        assert recorded["train"]["seed"] == seed and recorded["search"]["seed"] == seed
        assert "study" not in recorded
    weights = [load_native(tmp_path / f"seed_{s}" / "pretrain" / "supernet.safetensors")[1]
               for s in (0, 1)]
    assert not np.allclose(weights[0]["cls_token"], weights[1]["cls_token"])  # seeds differ
    dense = [summary["runs"][s]["dense"] for s in (0, 1)]
    text = (tmp_path / "study.md").read_text()
    assert f"{100 * dense[0]:.2f}, {100 * dense[1]:.2f}" in text
    assert "| GP search beats random search at equal evaluations | – | **not measured**" in text
    # Run time: the stages' own seconds summed over seeds (a resumed study counts each once).
    minutes = [summary["runs"][s]["stage_seconds"] / 60 for s in (0, 1)]
    assert all(m > 0 for m in minutes)
    assert f"{sum(minutes):.1f} min in all ({minutes[0]:.1f}, {minutes[1]:.1f} min per seed)" \
        in text

    config.study.seeds = (0,)
    with pytest.raises(UserError, match="at least 2 distinct seeds"):
        run_study(config, tmp_path)


def test_supernet_verdict_compares_with_the_no_supernet_baseline():
    runs = {s: {"dense": 0.98, "finetuned": 0.975 + s / 1000, "baseline": 0.96} for s in range(3)}
    claim = next(c for c in evaluate_claims(runs) if c["claim"] == "supernet")
    assert claim["verdict"] == "holds"
    assert claim["margins"] == pytest.approx([0.015, 0.016, 0.017])
    worse = {s: {**r, "baseline": 0.99} for s, r in runs.items()}
    assert _verdicts(worse)["supernet"] == "does not hold"


@pytest.mark.slow  # two seeds of the whole from-pretrained recipe
def test_study_of_the_from_pretrained_recipe_reports_the_baseline(tmp_path):
    """Two seeds of a tiny run from a trained checkpoint: dense is the checkpoint's accuracy,
    the baseline appears per seed with the supernet verdict."""
    import jax

    from vitjax.configs import from_pretrained_recipe
    from vitjax.interop import save_timm
    from vitjax.models import init_params
    from vitjax.stages import runner

    config = tiny_digits()
    ctx = runner.Context(config, tmp_path / "probe")
    save_timm(ctx.model_config, jax.device_get(init_params(ctx.model(), jax.random.key(0))),
              str(tmp_path / "dense.safetensors"))
    from_pretrained_recipe(config, str(tmp_path / "dense.safetensors"), steps=2,
                           finetune_steps=2, lr=1e-3, finetune_lr=1e-3, warmup_steps=1,
                           finetune_warmup_steps=1)
    config.stages = "pretrain,search,prune,finetune,baseline"
    config.search.update(population=2, iterations=1, restarts=1, baselines=())
    config.train.update(ckpt_every=2, eval_every=2)
    config.finetune.update(ckpt_every=2)
    config.study = load_config("digits_study").study
    config.study.seeds = (0, 1)
    summary = run_study(config, tmp_path / "study")
    runs = summary["runs"]
    init = [read_json(tmp_path / "study" / f"seed_{s}" / "pretrain" / "DONE.json")
            ["init_accuracy"]["test"] for s in (0, 1)]
    assert [runs[s]["dense"] for s in (0, 1)] == init and init[0] == init[1]
    text = (tmp_path / "study" / "study.md").read_text()
    baseline = [runs[s]["baseline"] for s in (0, 1)]
    assert ("| no supernet: same policy cut from the dense model, trained as long | "
            f"{100 * np.mean(baseline):.2f}") in text
    assert "| the supernet beats the no-supernet baseline at equal training steps |" in text
