"""The pipeline's stages in process, as Flax's train_test.py does: real configs, tiny sizes."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import load_config, tiny_digits  # noqa: I001  (tests/ is on sys.path)

from vitjax.evaluate import evaluate
from vitjax.scoring import load_ranks
from vitjax.stages import runner
from vitjax.workdir import read_json

REPO = Path(__file__).resolve().parents[1]


def _is_permutation(rows):
    rows = np.asarray(rows)
    return all(sorted(r.tolist()) == list(range(rows.shape[-1])) for r in rows)


def test_deit_ti_config_runs_on_mock_imagenet(tmp_path):
    """configs/deit_ti.py as shipped (bfloat16, DeiT mixup/cutmix in the step, TFDS input) with
    only the sizes shrunk."""
    import tensorflow_datasets as tfds

    config = load_config("deit_ti")
    config.model.update(variant="mu/8", image_size=32)
    config.data.update(image_size=32, holdout_per_class=0, shuffle_buffer=8)
    config.train.update(steps=2, batch_size=8, eval_batch_size=16, warmup_steps=1, log_every=1,
                        eval_every=0, ckpt_every=2, score_every=1)
    config.score.batch_size = 8
    config.stages = "pretrain,score"
    assert config.model.dtype == "bfloat16" and config.augment.mixup > 0
    with tfds.testing.mock_data(num_examples=24):
        ctx = runner.run_pipeline(config, tmp_path)
        metrics = read_json(tmp_path / "pretrain" / "DONE.json")["metrics"]
        dense = evaluate(ctx.model(), ctx.load_supernet(replicate=True), None,
                         ctx.eval_batches("test")(), ctx.mesh)
    # The stage's final evaluation is the evaluator's result on the saved supernet.
    assert metrics["eval/test/dense/accuracy"] == pytest.approx(dense["accuracy"])
    assert metrics["eval/test/dense/loss"] == pytest.approx(dense["loss"], rel=1e-3)
    ranks = load_ranks(tmp_path / "pretrain" / "ranks.npz")
    assert ranks.token is None  # attention token mode: tokens are chosen per image
    assert _is_permutation(ranks.head) and _is_permutation(ranks.neuron)
    scores = np.load(tmp_path / "score" / "scores.npz")
    assert scores["head"].shape == (2, 2) and scores["neuron"].shape == (2, 64)


def test_static_token_mode_and_stored_ranks_through_the_pipeline(tmp_path):
    config = tiny_digits(token_mode="static")
    config.stages = "pretrain,score,criteria"
    ctx = runner.run_pipeline(config, tmp_path)
    stored = load_ranks(tmp_path / "pretrain" / "ranks.npz")
    assert stored.token is not None and _is_permutation(stored.token)
    # Later stages select by the ranks the supernet was trained with, unless told to rescore.
    np.testing.assert_array_equal(ctx.ranks().neuron, stored.neuron)
    config.score.rescore = True
    rescored = runner.Context(config, ctx.workdir).ranks()
    np.testing.assert_array_equal(rescored.token,
                                  load_ranks(tmp_path / "score" / "scores.npz").token)
    rows = read_json(tmp_path / "criteria" / "DONE.json")["rows"]
    dense = {round(r["accuracy"], 6) for r in rows if r["ratio"] == 0.0}
    assert len(dense) == 1  # ratio 0 is the whole supernet whatever the criterion
    assert {r["dimension"] for r in rows} == {"neuron", "head", "token"}


@pytest.mark.parametrize("fmt", ["vitjax", "timm"])
def test_init_checkpoint_is_what_pretraining_starts_from(tmp_path, fmt):
    """With a zero learning rate the supernet is exactly the checkpoint it started from."""
    from vitjax.interop import load_native, save_native, save_timm
    from vitjax.models import init_params

    config = tiny_digits(lr=0.0, min_lr=0.0, warmup_lr=0.0, weight_decay=0.0)
    config.stages = "pretrain"
    ctx = runner.Context(config, tmp_path / "run")
    params = jax.device_get(init_params(ctx.model(), jax.random.key(7)))
    path = tmp_path / ("init.safetensors" if fmt == "vitjax" else "timm.safetensors")
    if fmt == "vitjax":
        save_native(path, ctx.model_config, params)
    else:
        save_timm(ctx.model(), params, str(path))
    config.init.checkpoint = str(path)
    runner.run_pipeline(config, tmp_path / "run")
    _, trained = load_native(tmp_path / "run" / "pretrain" / "supernet.safetensors")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), trained,
                 params)


def test_init_checkpoint_of_another_architecture_names_the_fields(tmp_path):
    from vitjax.errors import UserError
    from vitjax.interop import save_native
    from vitjax.models import ViT, init_params

    config = tiny_digits()
    ctx = runner.Context(config, tmp_path / "run")
    other = dataclasses.replace(ctx.model_config, mlp_dim=48)
    save_native(tmp_path / "other.safetensors", other,
                jax.device_get(init_params(ViT(other), jax.random.key(0))))
    config.init.checkpoint = str(tmp_path / "other.safetensors")
    config.stages = "pretrain"
    with pytest.raises(UserError, match=r"mlp_dim=48 \(config.model: 32\)"):
        runner.run_pipeline(config, tmp_path / "run")


def test_every_stage_end_to_end_and_the_report_reads_the_stage_outputs(pretrained_copy,
                                                                       monkeypatch):
    import vitjax.search
    from vitjax.search.space import InfeasibleTarget

    workdir = pretrained_copy  # pretrain finished with this config: the stages after it run

    real_search = vitjax.search.run_search

    def search_or_thin_corner(*args, log_path, **kwargs):
        # A combination reachable only in a corner too thin to sample (seen with deit_ti at
        # :expand=2) is a row of the table, not the end of the run.
        if log_path.name == "dims_head+neuron.jsonl":
            raise InfeasibleTarget("found only 0 of 2 policies with GMACs in [a, b]")
        return real_search(*args, log_path=log_path, **kwargs)

    monkeypatch.setattr(vitjax.search, "run_search", search_or_thin_corner)
    config = tiny_digits()
    config.stages = "pretrain,score,search,ablation,prune,finetune,export,report"
    config.search.update(population=3, iterations=2, restarts=1, baselines=("random",))
    # Neuron pruning alone cannot remove 40% of this model's FLOPs (its FFN is narrow).
    config.ablation.update(dimensions=("neuron", "head+neuron", "head+neuron+token"),
                           budgets=(0.5,), population=2, iterations=1)
    config.finetune.update(steps=2, warmup_steps=1, ckpt_every=2)
    config.export.formats = "jax"
    runner.run_pipeline(config, workdir)
    search = read_json(workdir / "search" / "DONE.json")
    assert search["evaluations"] == 5 and set(search["methods"]) == {"gp", "random"}
    assert search["best_gmacs"] <= search["target_gmacs"]
    log = (workdir / "search" / "log.jsonl").read_text().splitlines()
    assert sum('"type": "eval"' in line for line in log) == 5
    prune = read_json(workdir / "prune" / "DONE.json")
    assert prune["policy"] == search["best_policy"] and prune["policy_source"] == "search stage"
    assert prune["max_logit_diff_vs_masked"] < 1e-4
    finetune = read_json(workdir / "finetune" / "DONE.json")
    export = read_json(workdir / "export" / "DONE.json")
    assert export["formats"]["jax"]["ok"] and export["source"].endswith("finetuned.safetensors")
    report = (workdir / "report" / "report.md").read_text()
    # The report's numbers are the stage outputs' numbers.
    assert f"| pruned, no finetuning | {100 * prune['accuracy_before_finetune']['test']:.1f} |" \
        in report
    assert f"| pruned + finetuned | {100 * finetune['accuracy']['test']:.1f} |" in report
    assert f"| gp | {search['methods']['gp']['best_value']:.4f} |" in report
    assert f"{prune['pruned_gmacs']:.4g}" in report
    summary = read_json(workdir / "report" / "DONE.json")
    assert summary["rows"][1]["gmacs"] == prune["pruned_gmacs"]
    ablation = read_json(workdir / "ablation" / "DONE.json")
    assert not ablation["dimensions"]["neuron"]["reachable"]
    assert "| ✓ | – | – | cannot reach the budget |" in report
    thin = ablation["dimensions"]["head+neuron"]
    assert not thin["reachable"] and "found only 0 of 2" in thin["reason"]
    assert "| ✓ | ✓ | – | no policy found at the budget (too few to sample) |" in report
    full = ablation["dimensions"]["head+neuron+token"]
    assert full["evaluations"] == 3 and full["best_gmacs"] <= ablation["target_gmacs"]
    assert f"| ✓ | ✓ | ✓ | {100 * full['accuracy']:.1f} | {full['best_gmacs']:.4g} |" in report
    front = ablation["front"][0]
    assert front["best_gmacs"] <= 0.5 * ablation["dense_gmacs"] + 1e-9
    assert f"| sub-network at 50% budget | {front['best_gmacs']:.4g} |" in report
    assert (workdir / "report" / "pareto.png").stat().st_size > 0


def test_a_killed_search_resumes_without_reevaluating(pretrained_copy, monkeypatch):
    from vitjax.stages import search as search_stage

    workdir = pretrained_copy

    config = tiny_digits()
    config.stages = "pretrain,search"
    config.search.update(population=3, iterations=2, restarts=1, baselines=())
    calls = []
    original = search_stage.make_objective

    def counting(ctx, params, ranks, **kw):
        objective = original(ctx, params, ranks, **kw)

        def wrapped(policies):
            if len(calls) == 4:
                raise KeyboardInterrupt  # killed during the 5th evaluation
            calls.extend(policies)
            return objective(policies)
        return wrapped

    monkeypatch.setattr(search_stage, "make_objective", counting)
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(config, workdir)
    assert not (workdir / "search" / "DONE.json").exists()
    monkeypatch.setattr(search_stage, "make_objective", original)
    resumed_calls = []

    def counting_resumed(ctx, params, ranks, **kw):
        objective = original(ctx, params, ranks, **kw)

        def wrapped(policies):
            resumed_calls.extend(policies)
            return objective(policies)
        return wrapped

    monkeypatch.setattr(search_stage, "make_objective", counting_resumed)
    runner.run_pipeline(config, workdir)
    assert len(resumed_calls) == 1  # only the evaluation the kill interrupted
    resumed = read_json(workdir / "search" / "DONE.json")
    fresh = tiny_digits()
    fresh.stages = "pretrain,search"
    fresh.search.update(population=3, iterations=2, restarts=1, baselines=())
    monkeypatch.setattr(search_stage, "make_objective", original)
    import shutil

    shutil.copytree(workdir / "pretrain", workdir.parent / "fresh" / "pretrain")
    shutil.copy(workdir / "config.json", workdir.parent / "fresh" / "config.json")
    runner.run_pipeline(fresh, workdir.parent / "fresh")
    uninterrupted = read_json(workdir.parent / "fresh" / "search" / "DONE.json")
    assert resumed["best_policy"] == uninterrupted["best_policy"]
    assert resumed["best_value"] == uninterrupted["best_value"]


@pytest.mark.slow  # trains three methods of the second paper: the longest pipeline test
def test_compare_stage_trains_the_second_papers_systems_and_the_report_times_them(tmp_path,
                                                                                   capsys):
    config = tiny_digits()
    config.model.depth = 4  # DynamicViT predictors before blocks 1, 2, 3
    # At this width a predictor costs as much as a block: 60% of the FLOPs is out of reach.
    config.target_flops_fraction = 0.8
    config.stages = "pretrain,compare,report"
    config.compare.update(methods=("dynamicvit", "block", "block+token"), steps=2)
    runner.run_pipeline(config, tmp_path)
    compare = read_json(tmp_path / "compare" / "DONE.json")
    target = compare["target_gmacs"]
    assert set(compare["methods"]) == {"dynamicvit", "block", "block+token"}
    for method, result in compare["methods"].items():
        assert result["gmacs"] <= target * (1 + 1e-9), method
        assert max(result["export_max_abs_diff"].values()) < 1e-4, method
        folder = tmp_path / "compare" / method.replace("+", "_")
        assert (folder / "export" / "model.jax_exported").exists()
    combined = compare["methods"]["block+token"]
    assert combined["block_gmacs"] > target  # block pruning took part of the cut, tokens the rest
    assert len(compare["methods"]["dynamicvit"]["dynamicvit"]["locations"]) == 3
    report = (tmp_path / "report" / "report.md").read_text()
    for method, result in compare["methods"].items():
        assert f"| {method} | {100 * result['accuracy']['test']:.1f} | {result['gmacs']:.4g} |" \
            in report
    # A run stopped after its methods finished but before the stage did: the rerun reuses every
    # finished method (same results, model files untouched) instead of training it again.
    (tmp_path / "compare" / "DONE.json").unlink()
    models = sorted((tmp_path / "compare").rglob("model.safetensors"))
    written = [path.stat().st_mtime_ns for path in models]
    capsys.readouterr()
    runner.run_pipeline(config, tmp_path)
    out = capsys.readouterr().out
    for index, method in enumerate(("dynamicvit", "block", "block+token"), 1):
        assert f"compare {index}/3 {method}: done earlier, reused" in out
    assert "training at" not in out
    assert [path.stat().st_mtime_ns for path in models] == written
    assert read_json(tmp_path / "compare" / "DONE.json")["methods"] == compare["methods"]
