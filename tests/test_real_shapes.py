"""What broke beyond the float32 digits default (issue 20, part B): bfloat16 models at prune,
finetune overrides on every config, a user's own image folder, and the smaller messages."""

import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from tiny import load_config, tiny_digits  # noqa: I001  (tests/ is on sys.path)

from vitjax.errors import UserError
from vitjax.stages import runner
from vitjax.workdir import read_json

REPO = Path(__file__).resolve().parents[1]


def _tiny_search(config):
    config.search.update(population=3, iterations=1, restarts=1, starts=1, candidates=16,
                         maxiter=10, baselines=())
    return config


# --- prune: the masked == pruned check of a bfloat16 model, and a real mismatch ---


def test_bfloat16_model_prunes_and_short_finetune_warms_up_less(tmp_path, capsys):
    """A bfloat16 model (as the DeiT configs ship) passes the masked == pruned check, which
    runs in float32; a finetune shorter than its warmup warms up for a tenth of the run."""
    config = _tiny_search(tiny_digits())
    config.model.dtype = "bfloat16"
    config.stages = "pretrain,search,prune,finetune"
    config.finetune.steps = 2  # configs/digits.py warms the finetune up for 10 steps
    runner.run_pipeline(config, tmp_path)
    prune = read_json(tmp_path / "prune" / "DONE.json")
    # float32 with full-precision matmuls: rounding-level, where bfloat16 differs by ~1e-2.
    assert prune["max_logit_diff_vs_masked"] < 1e-4
    assert read_json(tmp_path / "finetune" / "DONE.json")["steps"] == 2
    assert "finetune.warmup_steps=10 >= finetune.steps=2; warming up for 0 steps" in \
        capsys.readouterr().out


def test_pruned_model_that_differs_is_one_line_and_keeps_earlier_results(pretrained_copy,
                                                                         monkeypatch):
    import vitjax.pruning

    workdir = pretrained_copy

    config = _tiny_search(tiny_digits())
    config.stages = "pretrain,search"
    runner.run_pipeline(config, workdir)
    original = vitjax.pruning.prune_params

    def wrong(*args, **kwargs):  # a pruning bug: a weight of the pruned tree changed
        pruned_config, params = original(*args, **kwargs)
        params = jax.tree.map(np.array, params)
        params["head"]["bias"][0] += 1.0
        return pruned_config, params

    monkeypatch.setattr(vitjax.pruning, "prune_params", wrong)
    config.stages = "pretrain,search,prune"
    with pytest.raises(UserError) as info:
        runner.run_pipeline(config, workdir)
    message = str(info.value)
    assert "differ from the masked supernet's" in message and "\n" not in message
    assert "results of the earlier stages are kept" in message
    for stage in ("pretrain", "search"):
        assert (workdir / stage / "DONE.json").exists()
    assert not (workdir / "prune" / "DONE.json").exists()
    assert not (workdir / "prune" / "pruned.safetensors").exists()


# --- finetune: every key of config.train, on every config ---

SHIPPED = [("digits", None), ("digits", "expand=2"), ("digits_study", None), ("deit_ti", None),
           ("deit_s", "flops=0.4,compare"), ("deit_b", None), ("folder", None)]


def _value_for(value_type) -> str:
    return {int: "3", float: "0.25", bool: "True", str: "'x'"}.get(value_type, "3")


@pytest.mark.parametrize("name, arg", SHIPPED)
def test_finetune_overrides_every_train_key_from_the_command_line(name, arg):
    from vitjax.training.config import default_train_config

    train = default_train_config()
    spec = f"{REPO / 'configs' / name}.py" + (f":{arg}" if arg else "")
    argv = ["prog", f"--config={spec}"]
    for key in train:
        value_type = train.get_ref(key).get_type()
        argv.append(f"--config.finetune.{key}={_value_for(value_type)}")
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=False,
                                    sys_argv=argv)
    values(argv)
    finetune = values.config.finetune
    assert finetune.steps == 3 and finetune.lr == 0.25 and finetune.sandwich is True
    assert set(values.config.train) <= set(finetune)


def test_finetune_block_overrides_only_what_is_set(tmp_path):
    from vitjax.stages.context import Context
    from vitjax.stages.finetune import finetune_config

    config = load_config("deit_ti")
    config.finetune.steps = 3
    merged, _ = finetune_config(Context(config, tmp_path))
    assert merged.train.steps == 3
    assert merged.train.lr == config.train.lr and merged.train.warmup_steps == \
        config.train.warmup_steps  # unset: the training recipe's
    assert merged.train.sample_policies is False
    config.finetune.sandwich = True
    with pytest.raises(UserError, match=r"config.finetune sets \['sandwich'\].*leave them unset"):
        finetune_config(Context(config, tmp_path))


def test_recorded_configs_of_older_runs_still_match():
    """A finetune stage finished before the block had every train key is not redone: a key
    missing from the record equals an unset (None) one."""
    from vitjax.stages import checks

    assert checks.config_changes({"finetune.steps": 100}, {"finetune.steps": 100,
                                                            "finetune.grad_clip": None}) == []
    assert checks.config_changes({}, {"finetune.lr": 0.1}) == ["finetune.lr: '<unset>' -> 0.1"]


# --- a user's own image folder ---


def _image(path, seed, size=(20, 24)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _load_folder_module():
    spec = importlib.util.spec_from_file_location("folder_cfg", REPO / "configs" / "folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folder_config_is_a_whole_pipeline_sized_from_the_folder(tmp_path):
    from vitjax.stages import ORDER, STAGES

    for c in range(3):
        for i in range(10):
            _image(tmp_path / "data" / "train" / f"c{c}" / f"{i}.png", 10 * c + i)
        _image(tmp_path / "data" / "val" / f"c{c}" / "0.png", 100 + c)
    config = _load_folder_module().get_config(f"root={tmp_path / 'data'},epochs=2,"
                                              "batch_size=8,flops=0.5")
    # Every stage (the supernet-free baseline runs when starting from a checkpoint).
    assert set(config.stages.split(",")) == set(ORDER) - {"baseline"}
    for name in STAGES:  # every block a stage reads is there
        assert name in ("pretrain", "score", "report") or name in config, name
    assert config.model.num_classes == 3 and config.target_flops_fraction == 0.5
    assert config.data.holdout_per_class == 2 and config.train.steps == 2 * ((30 - 6) // 8)
    assert config.search.objective == "accuracy_minus_loss"
    # --config.stages=search is a valid choice (it was an AttributeError on 'search').
    assert runner.parse_stages("search") == ["search"]
    assert config.search.population == 100


def test_images_in_subfolders_of_a_class_folder_are_read(tmp_path):
    from vitjax.data.config import folder_image_counts
    from vitjax.data.sources import folder_source

    root = tmp_path / "data"
    for i in range(3):
        _image(root / "train" / "cat" / f"{i}.jpg", i)
        _image(root / "train" / "dog" / "puppies" / f"{i}.png", 10 + i)  # nested only
    _image(root / "train" / "dog" / "old" / "deeper" / "x.png", 20)
    _image(root / "train" / "dog" / ".thumbnails" / "x.png", 21)  # hidden: not an image set
    source = folder_source(str(root), "train")
    assert len(source) == 7 and np.bincount(source.labels).tolist() == [3, 4]
    assert folder_image_counts(str(root)) == {"cat": 3, "dog": 4}
    assert all(os.path.isfile(p) for p in source.paths)


def test_a_single_class_folder_is_refused(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        _image(root / "train" / "only" / f"{i}.png", i)
    _image(root / "val" / "only" / "0.png", 9)
    config = _load_folder_module().get_config(f"root={root},image_size=32,variant=mu/4,"
                                              "epochs=1,batch_size=2")
    config.stages = "pretrain"
    with pytest.raises(UserError) as info:
        runner.run_pipeline(config, tmp_path / "run")
    message = str(info.value)
    assert "has one class folder ('only')" in message and "at least two classes" in message
    assert "\n" not in message and not (tmp_path / "run" / "pretrain").exists()


# --- the smaller ones ---


def test_policy_above_the_budget_or_without_heads_is_warned_about(tmp_path):
    from vitjax.pruning import Policy
    from vitjax.stages.context import Context
    from vitjax.stages.prune import policy_warnings

    ctx = Context(tiny_digits(), tmp_path)
    depth = ctx.model_config.depth
    dense = Policy.uniform(depth, 0.0, 0.0, 0.0)
    assert "above the FLOPs budget" in " ".join(policy_warnings(ctx, dense))
    headless = Policy.uniform(depth, 0.5, 1.0, 0.3)
    warned = policy_warnings(ctx, headless)
    assert any("removes every attention head" in w for w in warned)
    fits = Policy.uniform(depth, 0.6, 0.5, 0.4)
    assert policy_warnings(ctx, fits) == []


def test_misspelled_nested_field_is_a_clean_line(tmp_path, cli_in_process):
    result = cli_in_process("--config=configs/digits.py", "--config.train.stpes=5",
                            f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: --config: no config field 'stpes'; Did you mean \"steps\" instead "
                     "of \"stpes\"?"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_damaged_search_log_line_is_enough_to_drop(tmp_path):
    from vitjax.models import ViTConfig
    from vitjax.pruning import count_flops
    from vitjax.search import run_search

    config = ViTConfig(num_classes=3, image_size=16, patch_size=4, embed_dim=16, depth=2,
                       num_heads=2, mlp_dim=32)
    target = 0.6 * count_flops(config).total

    def objective(policies):  # smooth and deterministic
        return [float(-np.sum(np.square(np.asarray(p.neuron) - 0.3))) for p in policies]

    log = tmp_path / "log.jsonl"
    settings = dict(method="random", population=4, iterations=2, seed=3)
    whole = run_search(objective, config, target, log_path=log, **settings)
    lines = log.read_text().splitlines()
    broken = 3  # an evaluation record in the middle
    assert json.loads(lines[broken - 1])["type"] == "eval"
    log.write_text("\n".join(lines[:broken - 1] + ["{garbage"] + lines[broken:]) + "\n")
    with pytest.raises(UserError) as info:
        run_search(objective, config, target, log_path=log, **settings)
    assert f"line {broken} is not JSON; delete that line and rerun" in str(info.value)
    log.write_text("\n".join(lines[:broken - 1] + lines[broken:]) + "\n")  # as advised
    again = run_search(objective, config, target, log_path=log, **settings)
    assert again.best_value == whole.best_value and again.best_policy == whole.best_policy
    assert len(again.history) == len(whole.history)


def test_convert_names_its_own_flag_for_loading_anyway(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from vitjax.convert import main as convert_main
    from vitjax.interop import save_timm
    from vitjax.models import ViT, ViTConfig, init_params

    config = ViTConfig(num_classes=3, image_size=8, patch_size=4, embed_dim=16, depth=1,
                       num_heads=2, mlp_dim=32)
    path = tmp_path / "timm.safetensors"
    save_timm(ViT(config), jax.device_get(init_params(ViT(config), jax.random.key(0))),
              str(path))
    state = load_file(path)
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, path)
    assert convert_main([str(path), str(tmp_path / "out.safetensors"), "--num-heads=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['extra.weight']" in err and "--non-strict" in err
    assert "strict=False" not in err
    assert convert_main([str(path), str(tmp_path / "out.safetensors"), "--num-heads=2",
                         "--non-strict"]) == 0


def test_a_resumed_search_reports_the_time_of_every_run(tmp_path):
    from types import SimpleNamespace

    from vitjax.stages.search import SECONDS_FILE, SearchClock

    path = tmp_path / SECONDS_FILE
    first = SearchClock(path, True)
    first.start("gp")
    first.timed(lambda policies: [0.0] * len(policies))([None])
    first.save()  # a progress line, then the run is killed
    earlier = read_json(path)["gp"]
    assert earlier["objective_seconds"] > 0 and earlier["overhead_seconds"] >= 0
    resumed = SearchClock(path, True)
    resumed.start("gp")
    resumed.finish(SimpleNamespace(overhead_seconds=1.0, objective_seconds=2.0))
    totals = resumed.totals["gp"]
    assert totals["resumed"] is True
    assert totals["overhead_seconds"] == pytest.approx(earlier["overhead_seconds"] + 1.0)
    assert totals["objective_seconds"] == pytest.approx(earlier["objective_seconds"] + 2.0)
    fresh = SearchClock(tmp_path / "other.json", True)
    fresh.start("gp")
    fresh.finish(SimpleNamespace(overhead_seconds=1.0, objective_seconds=2.0))
    assert fresh.totals["gp"] == {"overhead_seconds": 1.0, "objective_seconds": 2.0,
                                  "resumed": False}


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                    reason="needs the 'export' extra (LiteRT)")
def test_bfloat16_model_exports_float32_tflite_and_bfloat16_jax(tmp_path):
    """LiteRT cannot convert bfloat16 transposes (a ConverterError traceback at the export
    stage of every DeiT config): TFLite/ONNX artifacts come from the float32 model."""
    from vitjax.interop import save_native
    from vitjax.models import init_params
    from vitjax.stages import export
    from vitjax.stages.context import Context
    from vitjax.workdir import write_json

    config = tiny_digits()
    config.model.dtype = "bfloat16"
    config.export.formats = "jax,tflite"
    ctx = Context(config, tmp_path)
    params = jax.device_get(init_params(ctx.model(), jax.random.key(0)))
    params["head"]["kernel"] = np.random.default_rng(0).normal(
        size=params["head"]["kernel"].shape).astype(np.float32)  # logits that are not all 0
    (tmp_path / "prune").mkdir()
    save_native(tmp_path / "prune" / "pruned.safetensors", ctx.model_config, params)
    write_json(tmp_path / "prune" / "DONE.json", {})
    summary = export.run(ctx)
    formats = summary["formats"]
    assert formats["jax"]["compute_dtype"] == "bfloat16" and formats["jax"]["ok"]
    assert formats["tflite"]["compute_dtype"] == "float32" and formats["tflite"]["ok"]
    assert (tmp_path / "export" / "model_b1.tflite").exists()
