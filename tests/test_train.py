"""Supernet trainer: one compiled step for all policies, checkpoints, resume, NaN, preemption."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest
from tiny import TINY_TRAIN  # noqa: I001  (tests/ is on sys.path)

from vitjax.evaluate import array_batches, eval_step, evaluate
from vitjax.models import ViT, ViTConfig
from vitjax.parallel import local_to_global, make_mesh
from vitjax.pruning import Ranks
from vitjax.training import (
    ArrayBatches,
    CheckpointError,
    default_mesh_config,
    default_train_config,
    deit_train_config,
    train,
    weight_decay_mask,
)
from vitjax.training.optim import learning_rate_schedule, peak_learning_rate
from vitjax.training.supernet import PolicySampler, fixed_eval_policies
from vitjax.training.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TINY_TRAIN


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    # Class-dependent means so that a few steps already reduce the loss.
    images = rng.normal(size=(n, 8, 8, 3)).astype(np.float32) + labels[:, None, None, None] / 5
    return images, labels


def _config(steps=6, **train_overrides):
    config = ml_collections.ConfigDict()
    config.train = default_train_config()
    config.train.update(
        steps=steps, batch_size=16, eval_batch_size=32, warmup_steps=1, lr=3e-3, log_every=2,
        eval_every=0, ckpt_every=2, target_gmacs=None, **train_overrides,
    )
    config.mesh = default_mesh_config()
    config.mesh.data = 2
    return config


def _params_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_optimizer_recipe_and_weight_decay_mask():
    deit = deit_train_config("B/16")
    assert peak_learning_rate(deit) == pytest.approx(1e-3)  # Table 7: 1e-3 at batch 1024
    assert deit.warmup_steps == 5 * (1_281_167 // 1024) and deit.weight_decay == 0.05
    assert deit.label_smoothing == 0.1 and deit.drop_path == 0.1 and deit.sample_policies
    assert not deit_train_config("S/16", finetune=True).sample_policies
    schedule = learning_rate_schedule(dict(lr=1.0, batch_size=8, steps=10, warmup_steps=2,
                                           warmup_lr=0.0, min_lr=0.1))
    np.testing.assert_allclose([schedule(0), schedule(2), schedule(10)], [0.0, 1.0, 0.1], atol=1e-6)
    params = jax.eval_shape(lambda k: ViT(TINY).init(k, np.zeros((1, 8, 8, 3)))["params"],
                            jax.random.key(0))
    mask = weight_decay_mask(params)
    assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and mask["patch_embed"]["kernel"]
    assert not mask["blocks_0"]["attn"]["qkv"]["bias"] and not mask["blocks_0"]["norm1"]["scale"]
    assert not mask["pos_embed"] and not mask["cls_token"] and not mask["head"]["bias"]


def test_batches_are_a_function_of_seed_and_step():
    images, labels = _data(40)
    a = ArrayBatches(images, labels, 16, seed=3)
    b = ArrayBatches(images, labels, 16, seed=3)
    np.testing.assert_array_equal(a(7)[1], b(7)[1])
    # Every example once per epoch, epochs spliced across batch boundaries.
    seen = np.concatenate([a.indices(s) for s in range(5)])  # 80 items = 2 epochs
    assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:]) == list(range(40))
    halves = [ArrayBatches(images, labels, 16, seed=3, rows=slice(i * 8, i * 8 + 8))(7)[1]
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), a(7)[1])


@pytest.mark.parametrize("sandwich,token_mode", [(False, "attention"), (True, "static")])
def test_one_compiled_step_serves_every_policy(sandwich, token_mode):
    train_cfg = default_train_config()
    train_cfg.update(steps=10, warmup_steps=1, sandwich=sandwich, token_mode=token_mode,
                     target_gmacs=None)
    mesh = make_mesh({"data": 2})
    trainer = Trainer(ViT(TINY), train_cfg, mesh)
    state = trainer.create_state(seed=0)
    sampler = PolicySampler(TINY, train_cfg)
    images, labels = _data(16)
    policies = set()
    for step in range(4):
        keep, gmacs = sampler(step)
        assert keep["head"].shape == (3 if sandwich else 1, TINY.depth)
        policies.add(tuple(keep["neuron"][0]))
        state, metrics = trainer.train_step(
            state, local_to_global(images, mesh, 16), local_to_global(labels, mesh, 16), keep
        )
        assert np.isfinite(float(metrics["loss"])) and gmacs > 0
    assert len(policies) == 4  # a different sub-network every step ...
    assert trainer.train_step._cache_size() == 1  # ... from one compilation


def test_fixed_eval_policies_and_deterministic_sampling():
    cfg = ViTConfig.from_variant("S/16", num_classes=10)
    policies = fixed_eval_policies(cfg, {"target_gmacs": 2.3})
    from vitjax.pruning import count_flops

    assert count_flops(cfg, policies["target"]).total <= 2.3
    assert count_flops(cfg, policies["smallest"]).total < count_flops(cfg, policies["target"]).total
    sampler = PolicySampler(cfg, {"seed": 1, "target_gmacs": 2.3, "target_tol": 0.1})
    keep_a, gmacs = sampler(5)
    keep_b, _ = PolicySampler(cfg, {"seed": 1, "target_gmacs": 2.3, "target_tol": 0.1})(5)
    assert 2.3 * 0.9 <= gmacs <= 2.3
    jax.tree.map(np.testing.assert_array_equal, keep_a, keep_b)


def test_train_resume_and_checkpoint_errors(tmp_path):
    images, labels = _data()
    config = _config(steps=6)
    batches = ArrayBatches(images, labels, 16, seed=0)
    evals = {"test": lambda: array_batches(images[:40], labels[:40], 32)}
    result = train(config, str(tmp_path), model=ViT(TINY), train_batches=batches, eval_sets=evals)
    assert result.step == 6 and not result.preempted
    assert set(result.metrics) == {f"eval/test/{p}/{k}" for p in ("dense", "smallest")
                                   for k in ("accuracy", "loss")}
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))

    # Done already: a second call restores instead of training again.
    again = train(config, str(tmp_path), model=ViT(TINY), train_batches=batches, eval_sets=evals)
    assert again.step == 6
    _params_close(jax.device_get(again.params), jax.device_get(result.params), rtol=0, atol=0)

    # A checkpoint of another configuration is refused, naming what changed.
    other = _config(steps=6)
    other.train.lr = 1e-2
    with pytest.raises(CheckpointError, match="another configuration.*lr"):
        train(other, str(tmp_path), model=ViT(TINY), train_batches=batches)

    # A damaged checkpoint is an error, never a silent restart.
    for root, _, files in os.walk(tmp_path / "checkpoints" / "6" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoints/6"):
        train(config, str(tmp_path), model=ViT(TINY), train_batches=batches)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    images, labels = _data()
    clean = ArrayBatches(images, labels, 16, seed=0)

    def batches(step):
        x, y = clean(step)
        return (x * np.nan if step == 4 else x), y

    message = "non-finite at step 4.*last good checkpoint is step 4.*resume_overrides=lr"
    with pytest.raises(FloatingPointError, match=message):
        train(_config(steps=8), str(tmp_path), model=ViT(TINY), train_batches=batches)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]

    # Resuming with a lower learning rate is a named, logged exception to the config check.
    lower = _config(steps=8)
    lower.train.lr = 1e-3
    with pytest.raises(CheckpointError, match="another configuration.*lr"):
        train(lower, str(tmp_path), model=ViT(TINY), train_batches=clean)
    lower.train.resume_overrides = "lr"
    resumed = train(lower, str(tmp_path), model=ViT(TINY), train_batches=clean)
    assert resumed.step == 8


_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[3])
    import numpy as np
    import test_train as t
    from vitjax.models import ViT
    from vitjax.training import ArrayBatches, train

    workdir, delay = sys.argv[1], float(sys.argv[2])
    images, labels = t._data()
    clean = ArrayBatches(images, labels, 16, seed=0)

    def batches(step):
        time.sleep(delay)  # slow enough to be killed in the middle
        return clean(step)

    result = train(t._config(steps=12), workdir, model=ViT(t.TINY), train_batches=batches)
    print("RESULT", json.dumps({"step": result.step, "preempted": result.preempted}), flush=True)
    """
)


def _start(tmp_path, workdir, delay):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, str(script), str(workdir), str(delay), os.path.dirname(__file__)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _wait_for_checkpoint(workdir, min_step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = workdir / "checkpoints"
        steps = [int(n) for n in os.listdir(path) if n.isdigit()] if path.exists() else []
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early:\n{proc.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.subprocess
def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(tmp_path):
    images, labels = _data()
    batches = ArrayBatches(images, labels, 16, seed=0)
    reference = train(_config(steps=12), str(tmp_path / "reference"), model=ViT(TINY),
                      train_batches=batches)

    # kill -9 after the first checkpoint: the unfinished save (if any) is never picked up.
    workdir = tmp_path / "interrupted"
    proc = _start(tmp_path, workdir, delay=0.5)
    _wait_for_checkpoint(workdir, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # Resume, then preempt with SIGTERM: it saves where it stands and exits cleanly.
    proc = _start(tmp_path, workdir, delay=0.5)
    seen = _wait_for_checkpoint(workdir, 6, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    status = json.loads(out.split("RESULT", 1)[1])
    assert status["preempted"] and seen <= status["step"] < 12, status
    assert str(status["step"]) in os.listdir(workdir / "checkpoints")

    resumed = train(_config(steps=12), str(workdir), model=ViT(TINY), train_batches=batches)
    assert resumed.step == 12
    _params_close(jax.device_get(resumed.params), jax.device_get(reference.params),
                  rtol=0, atol=0)


def test_finetune_mode_trains_a_pruned_model_without_masks(tmp_path):
    from vitjax.pruning import Policy

    pruned = Policy.uniform(TINY.depth, 0.5, 0.5, 0.3).pruned_config(TINY)
    images, labels = _data()
    config = _config(steps=2, sample_policies=False)
    result = train(
        config, str(tmp_path), model=ViT(pruned), train_batches=ArrayBatches(images, labels, 16),
        eval_sets={"x": lambda: array_batches(images, labels, 32)},
    )
    assert set(result.metrics) == {"eval/x/model/accuracy", "eval/x/model/loss"}
    assert result.ranks is None
    initial = Trainer(ViT(pruned), config.train, make_mesh({"data": 2})).create_state(0).params
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(result.params), jax.device_get(initial))
    assert min(jax.tree.leaves(moved)) > 0  # every parameter was trained
    again = train(config, str(tmp_path), model=ViT(pruned),
                  train_batches=ArrayBatches(images, labels, 16))  # restores the final state
    assert again.step == 2 and again.ranks is None


def test_rank_fn_refreshes_ranks_on_schedule(tmp_path):
    import jax.numpy as jnp

    from vitjax.pruning import Ranks, ranks_from_scores

    calls = []

    def rank_fn(params, images):
        calls.append(images.shape)
        blocks = [params[f"blocks_{layer}"] for layer in range(TINY.depth)]
        head = jnp.stack([jnp.abs(b["attn"]["proj"]["kernel"]).sum(axis=(1, 2)) for b in blocks])
        neuron = jnp.stack([jnp.abs(b["mlp"]["fc2"]["kernel"]).sum(axis=1) for b in blocks])
        token = jnp.tile(-jnp.arange(TINY.num_tokens, dtype=jnp.float32), (TINY.depth, 1))
        return Ranks(ranks_from_scores(head), ranks_from_scores(neuron), ranks_from_scores(token))

    images, labels = _data()
    config = _config(steps=5, score_every=2, token_mode="static")
    result = train(config, str(tmp_path), model=ViT(TINY), train_batches=ArrayBatches(
        images, labels, 16), rank_fn=rank_fn, score_batch=(images[:8], labels[:8]))
    assert calls == [(8, 8, 8, 3)] * 3  # before steps 0, 2 and 4
    assert result.ranks.token[0].tolist() == list(range(TINY.num_tokens))
    assert result.ranks.neuron.shape == (TINY.depth, TINY.mlp_dim)
    assert sorted(np.asarray(result.ranks.head[1]).tolist()) == list(range(TINY.num_heads))


@pytest.mark.parametrize("batch", [16, 40, 64])
def test_evaluator_matches_a_direct_numpy_computation(batch):
    """Padded, sharded, streamed evaluation equals accuracy/loss computed directly."""
    train_cfg = default_train_config()
    train_cfg.update(steps=10, warmup_steps=1, target_gmacs=None)
    mesh = make_mesh({"data": 2})
    trainer = Trainer(ViT(TINY), train_cfg, mesh)
    params = jax.device_get(trainer.create_state(seed=0).params)
    images, labels = _data(40, seed=3)
    logits = np.asarray(ViT(TINY).apply({"params": params}, images)[0], np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    expected_loss = -log_probs[np.arange(40), labels].mean()
    expected_acc = (logits.argmax(-1) == labels).mean()
    result = evaluate(ViT(TINY), params, None, array_batches(images, labels, batch), mesh)
    assert result["count"] == 40
    assert result["accuracy"] == pytest.approx(expected_acc)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_evaluated_subnetwork_equals_the_physically_pruned_model():
    from vitjax.pruning import Policy, prune_params, ranks_from_scores

    mesh = make_mesh({"data": 2})
    params = jax.device_get(Trainer(ViT(TINY), default_train_config(), mesh).create_state(1).params)
    rng = np.random.default_rng(0)
    ranks = Ranks(ranks_from_scores(rng.normal(size=(2, 4))),
                  ranks_from_scores(rng.normal(size=(2, 64))),
                  ranks_from_scores(rng.normal(size=(2, TINY.num_tokens))))
    images, labels = _data(32, seed=5)
    policy = Policy.uniform(TINY.depth, 0.5, 0.25, 0.5)
    masked = evaluate(ViT(TINY), params, policy.keep_counts(TINY), array_batches(
        images, labels, 16), mesh, ranks=ranks, token_mode="static")
    small_config, small_params = prune_params(TINY, params, policy, ranks, "static")
    pruned = evaluate(ViT(small_config), small_params, None, array_batches(images, labels, 16),
                      mesh)
    assert masked["accuracy"] == pruned["accuracy"]
    assert masked["loss"] == pytest.approx(pruned["loss"], rel=1e-5)
    # One compilation serves every policy.
    before = eval_step._cache_size()
    for ratio in (0.1, 0.3, 0.7):
        evaluate(ViT(TINY), params, Policy.uniform(TINY.depth, ratio, ratio, ratio).keep_counts(
            TINY), array_batches(images, labels, 16), mesh, ranks=ranks, token_mode="static")
    assert eval_step._cache_size() == before


def test_mixing_runs_inside_the_step_and_is_deterministic():
    augment = ml_collections.ConfigDict(dict(mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    train_cfg = default_train_config()
    train_cfg.update(steps=10, warmup_steps=1, target_gmacs=None, sample_policies=False)
    mesh = make_mesh({"data": 2})
    images, labels = _data(16)
    losses = []
    for _ in range(2):
        trainer = Trainer(ViT(TINY), train_cfg, mesh, augment_config=augment)
        state = trainer.create_state(seed=0)
        state, metrics = trainer.train_step(
            state, local_to_global(images, mesh, 16), local_to_global(labels, mesh, 16), None)
        losses.append(float(metrics["loss"]))
    assert losses[0] == losses[1]
    plain = Trainer(ViT(TINY), train_cfg, mesh)
    _, metrics = plain.train_step(plain.create_state(seed=0), local_to_global(images, mesh, 16),
                                  local_to_global(labels, mesh, 16), None)
    assert float(metrics["loss"]) != losses[0]  # the mixed targets changed the loss


@pytest.mark.parametrize("dtype,remat", [("bfloat16", False), ("float32", True)])
def test_bfloat16_and_remat_steps_track_the_float32_step(dtype, remat):
    import jax.numpy as jnp

    train_cfg = default_train_config()
    # No warmup: the step is taken at the peak learning rate, so that it moves every weight by
    # about lr (Adam's first step) and a wrong gradient shows in the parameters.
    train_cfg.update(steps=10, warmup_steps=0, lr=1e-2, target_gmacs=None, drop_path=0.0)
    mesh = make_mesh({"data": 2})
    images, labels = _data(16)
    args = (local_to_global(images, mesh, 16), local_to_global(labels, mesh, 16))
    keep, _ = PolicySampler(TINY, train_cfg)(0)
    results = []
    for model in (ViT(TINY), ViT(TINY, dtype=jnp.dtype(dtype), remat=remat)):
        trainer = Trainer(model, train_cfg, mesh)
        state = trainer.create_state(seed=0)
        start = jax.device_get(state.params)
        state, metrics = trainer.train_step(state, *args, keep)
        moved = jax.tree.map(np.subtract, jax.device_get(state.params), start)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), moved))
    (loss, grad_norm, moved), (loss_b, grad_norm_b, moved_b) = results
    # On CPU bfloat16 stays within ~1e-4 of float32 here; remat recomputes the same float32.
    tol = 2e-3 if dtype == "bfloat16" else 1e-6
    assert loss_b == pytest.approx(loss, rel=tol)
    assert grad_norm_b == pytest.approx(grad_norm, rel=tol)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(moved)[0],
                            jax.tree.leaves(moved_b), strict=True):
        name = jax.tree_util.keystr(path)
        assert np.abs(a).max() > 0.5 * train_cfg.lr, name  # the step really moved it
        if name.endswith("['qkv']['bias']"):
            # Not the key bias (row 1 of [q, k, v]): its true gradient is exactly 0, so the
            # sign of its rounding noise decides its move.
            a, b = a[[0, 2]], b[[0, 2]]
        # Adam's first step is about lr * sign(gradient): a weight moves the other way where
        # its gradient is too small for bfloat16 to get its sign right, and only there.
        agree = np.mean(np.abs(a - b) <= 0.1 * train_cfg.lr)
        assert agree >= (0.95 if dtype == "bfloat16" else 0.99), (name, agree)


def test_a_pruned_model_with_3_heads_trains_on_a_model_parallel_mesh_of_2(tmp_path):
    from vitjax.pruning import Policy

    pruned = Policy.uniform(TINY.depth, 0.5, 0.25, 0.0).pruned_config(TINY)
    assert pruned.layer_heads == (3, 3)
    config = _config(steps=2, sample_policies=False)
    config.mesh.data, config.mesh.model = 4, 2
    images, labels = _data()
    result = train(config, str(tmp_path), model=ViT(pruned),
                   train_batches=ArrayBatches(images, labels, 16))
    qkv = result.params["blocks_0"]["attn"]["qkv"]["kernel"]
    fc1 = result.params["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec()  # 3 heads: replicated
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "model")  # 32 neurons: split
