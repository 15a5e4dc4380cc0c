"""Compressing a trained model: the teacher's loss, its placement in the train state, a teacher
that does not fit, and the from-pretrained recipe through the pipeline with its baseline."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from test_stages import tiny_digits  # noqa: I001  (tests/ is on sys.path)

from vitjax.errors import UserError
from vitjax.models import ViT, ViTConfig, init_params
from vitjax.parallel import local_to_global, make_mesh
from vitjax.stages import runner
from vitjax.training import default_train_config
from vitjax.training.losses import check_teacher, distillation_loss, logit_distillation
from vitjax.training.train import Trainer
from vitjax.workdir import read_json

TINY = ViTConfig(num_classes=5, image_size=8, patch_size=4, embed_dim=16, depth=2,
                 num_heads=2, mlp_dim=32)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_by_hand(student, teacher, t):
    """T^2 x mean_b sum_c p_t (log p_t - log p_s), in float64 from the definition."""
    p_t, p_s = _softmax(teacher / t), _softmax(student / t)
    return t * t * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_logit_distillation_is_the_tempered_kl_computed_by_hand(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 6, 7)) * 3
    got = float(logit_distillation(student.astype(np.float32), teacher.astype(np.float32),
                                   temperature))
    assert got == pytest.approx(_kl_by_hand(student, teacher, temperature), rel=1e-5)
    same = float(logit_distillation(teacher.astype(np.float32), teacher.astype(np.float32),
                                    temperature))
    assert abs(same) < 1e-6  # a student that matches its teacher pays nothing


def test_distillation_loss_weighs_cross_entropy_and_kl_like_a_hand_computation():
    student, teacher = ViT(TINY), ViT(dataclasses.replace(TINY, embed_dim=24, mlp_dim=40))
    s_params = init_params(student, jax.random.key(0))
    t_params = init_params(teacher, jax.random.key(1))
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    labels = np.array([0, 3, 1, 4])
    targets = np.eye(5, dtype=np.float32)[labels] * 0.9 + 0.02  # smoothed soft targets
    batch = {"image": images, "target": targets, "label": labels}
    loss, metrics = distillation_loss(student, teacher, weight=0.3, temperature=2.0)(
        s_params, t_params, batch, None, jax.random.key(2))
    s_logits = np.asarray(student.apply({"params": s_params}, images)[0], np.float64)
    t_logits = np.asarray(teacher.apply({"params": t_params}, images)[0], np.float64)
    ce = -np.mean(np.sum(targets * np.log(_softmax(s_logits)), axis=-1))
    kl = _kl_by_hand(s_logits, t_logits, 2.0)
    assert float(metrics["distill"]) == pytest.approx(kl, rel=1e-4)
    assert float(loss) == pytest.approx(0.7 * ce + 0.3 * kl, rel=1e-4)


@pytest.mark.parametrize("field,value", [("num_classes", 7), ("image_size", 16),
                                         ("patch_size", 2)])
def test_a_teacher_that_does_not_fit_is_named_in_one_line(field, value):
    teacher = dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ValueError, match=f"{field} {value} \\(student: ") as error:
        check_teacher(TINY, teacher)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="does not fit the student"):
        distillation_loss(ViT(TINY), ViT(teacher))


def test_the_teacher_is_frozen_sharded_like_the_parameters_and_has_no_optimizer_state():
    train_cfg = default_train_config()
    train_cfg.update(steps=4, warmup_steps=1, sample_policies=False, drop_path=0.0,
                     target_gmacs=None)
    mesh = make_mesh({"data": 2})
    model = ViT(TINY)
    teacher_params = jax.device_get(init_params(model, jax.random.key(5)))
    plain = Trainer(model, train_cfg, mesh)
    taught = Trainer(model, train_cfg, mesh, frozen=teacher_params,
                     loss_fn=distillation_loss(model, model, weight=0.5))
    # The optimizer's state covers the trainable parameters only.
    size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
    assert size(taught.abstract_state.opt_state) == size(plain.abstract_state.opt_state)
    assert jax.tree.map(lambda s: s.sharding, taught.abstract_state.frozen) == \
        jax.tree.map(lambda s: s.sharding, taught.abstract_state.params)
    state = taught.create_state(seed=0)
    rng = np.random.default_rng(0)
    images = local_to_global(rng.normal(size=(8, 8, 8, 3)).astype(np.float32), mesh, 8)
    labels = local_to_global(rng.integers(0, 5, 8).astype(np.int32), mesh, 8)
    before = jax.device_get(state.params)
    for _ in range(2):
        state, metrics = taught.train_step(state, images, labels, None)
    assert float(metrics["distill"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), teacher_params)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), jax.device_get(state.params), before)
    assert max(jax.tree.leaves(moved)) > 0


def _trained_checkpoint(tmp_path, config, **changes):
    """A timm-format checkpoint of config.model's architecture (with `changes`)."""
    from vitjax.interop import save_timm

    ctx = runner.Context(config, tmp_path / "probe")
    model_config = dataclasses.replace(ctx.model_config, **changes)
    params = jax.device_get(init_params(ViT(model_config), jax.random.key(3)))
    path = tmp_path / "dense.safetensors"
    save_timm(model_config, params, str(path))
    return str(path)


@pytest.mark.parametrize("changes,named", [({"num_classes": 4}, "num_classes 4 (student: 10)"),
                                           ({"image_size": 16}, "image_size 16 (student: 32)")])
def test_init_checkpoint_that_cannot_teach_is_a_one_line_error(tmp_path, changes, named):
    config = tiny_digits(distill=0.5)
    config.stages = "pretrain"
    config.init.checkpoint = _trained_checkpoint(tmp_path, config, **changes)
    with pytest.raises(UserError, match="as teacher: the teacher does not fit") as error:
        runner.run_pipeline(config, tmp_path / "run")
    assert named in str(error.value) and "\n" not in str(error.value)


def test_distill_without_a_checkpoint_is_refused_up_front(tmp_path):
    config = tiny_digits(distill=0.5)
    with pytest.raises(UserError, match=r"distill=0.5 needs a teacher: set config.init"):
        runner.run_pipeline(config, tmp_path / "run")


def test_the_from_pretrained_recipe_end_to_end_with_the_no_supernet_baseline(tmp_path):
    from vitjax.configs import from_pretrained_recipe

    config = tiny_digits()
    checkpoint = _trained_checkpoint(tmp_path, config)
    from_pretrained_recipe(config, checkpoint, steps=4, finetune_steps=2, lr=1e-3,
                           finetune_lr=1e-3, warmup_steps=1, finetune_warmup_steps=1)
    assert "finetune,baseline" in config.stages
    config.stages = "pretrain,search,prune,finetune,baseline,report"
    config.search.update(population=3, iterations=1, restarts=1, baselines=())
    config.finetune.update(ckpt_every=2)
    runner.run_pipeline(config, tmp_path / "run")
    pretrain = read_json(tmp_path / "run" / "pretrain" / "DONE.json")
    finetune = read_json(tmp_path / "run" / "finetune" / "DONE.json")
    baseline = read_json(tmp_path / "run" / "baseline" / "DONE.json")
    assert pretrain["teacher"].endswith("dense.safetensors")
    assert finetune["teacher"] == pretrain["teacher"] and finetune["distill"] == 0.5
    assert set(pretrain["init_accuracy"]) == {"holdout", "test"}
    assert baseline["steps"] == 4 + 2 and baseline["gmacs"] == pytest.approx(
        read_json(tmp_path / "run" / "prune" / "DONE.json")["pruned_gmacs"])
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "## What compressing cost" in report
    acc = baseline["accuracy"]["test"]
    assert f"| no supernet: the same policy cut from the dense model, trained {6} steps | " \
           f"{100 * acc:.1f} |" in report


def test_config_arguments_select_the_recipe():
    from test_stages import load_config

    default = load_config("digits")
    assert default.init.checkpoint.endswith("vitjax/assets/digits_vit.safetensors")
    assert default.train.distill > 0 and default.finetune.distill > 0
    assert "baseline" in default.stages
    scratch = load_config("digits", "scratch")
    assert scratch.init.checkpoint == "" and scratch.train.distill == 0
    assert scratch.train.steps == 700 and "baseline" not in scratch.stages
    deit = load_config("deit_s", "init=deit_small_patch16_224.pth")
    paper = load_config("deit_s")
    assert deit.init.checkpoint == "deit_small_patch16_224.pth" and paper.init.checkpoint == ""
    assert deit.train.steps == 30 * (1_281_167 // 1024) and paper.train.steps == 300 * 1251
    assert deit.model.dtype == "bfloat16" and deit.model.image_size == 224
    with pytest.raises(ValueError, match="exclude each other"):
        load_config("deit_s", "scratch,init=x.pth")
    assert isinstance(deit.baseline, ml_collections.ConfigDict)


def test_the_shipped_reference_states_the_digits_normalisation():
    """The reference is a timm state dict trained on digits statistics, not ImageNet's: its
    header says so, so the main command neither assumes ImageNet nor warns."""
    from test_stages import load_config

    from vitjax.interop import load_checkpoint

    config = load_config("digits")
    stats = load_checkpoint(config.init.checkpoint, num_heads=config.model.num_heads).preprocessing
    assert stats["known"] is True
    np.testing.assert_allclose(stats["mean"], config.data.mean)
    np.testing.assert_allclose(stats["std"], config.data.std)
