"""Meshes and sharding rules; sharded training matches one device on 8 fake CPU devices."""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import TINY_TRAIN  # noqa: I001  (tests/ is on sys.path)

from vitjax.models import ViT
from vitjax.parallel import local_batch_slice, local_to_global, make_mesh, spec_for
from vitjax.parallel.distributed import environment_is_multiprocess, maybe_initialize
from vitjax.training import default_train_config
from vitjax.training.supernet import PolicySampler
from vitjax.training.train import Trainer

TINY = TINY_TRAIN


def test_rule_table_shards_heads_and_hidden_units_over_model():
    mesh = {"data": 4, "model": 2}
    assert spec_for("blocks_0/attn/qkv/kernel", (32, 3, 4, 8), mesh) == P(None, None, "model")
    assert spec_for("blocks_0/attn/qkv/bias", (3, 4, 8), mesh) == P(None, "model")
    assert spec_for("blocks_0/attn/proj/kernel", (4, 8, 32), mesh) == P("model")
    assert spec_for("blocks_1/mlp/fc1/kernel", (32, 64), mesh) == P(None, "model")
    assert spec_for("blocks_1/mlp/fc1/bias", (64,), mesh) == P("model")
    assert spec_for("blocks_1/mlp/fc2/kernel", (64, 32), mesh) == P("model")
    assert spec_for("blocks_1/mlp/fc2/bias", (32,), mesh) == P()
    assert spec_for("pos_embed", (1, 5, 32), mesh) == P()
    # Without a model axis everything is replicated.
    assert spec_for("blocks_0/attn/qkv/kernel", (32, 3, 4, 8), {"data": 8, "model": 1}) == P()


def test_fsdp_shards_the_largest_free_axis_over_data():
    mesh = {"data": 4, "model": 2}
    spec = spec_for("blocks_1/mlp/fc1/kernel", (32, 64), mesh, fsdp=True, fsdp_min_size=1)
    assert spec == P("data", "model")
    spec = spec_for("blocks_0/attn/qkv/kernel", (32, 3, 4, 8), mesh, fsdp=True, fsdp_min_size=1)
    assert spec == P("data", None, "model")
    # Too small, or no axis divisible by the data size: replicated.
    assert spec_for("head/kernel", (32, 10), mesh, fsdp=True) == P()
    assert spec_for("x", (3, 5), mesh, fsdp=True, fsdp_min_size=1) == P()


def test_indivisible_model_axis_is_replicated():
    # 6 heads on model=4: heads replicated; fc1's 64 neurons still split.
    assert spec_for("blocks_0/attn/qkv/kernel", (32, 3, 6, 8), {"data": 2, "model": 4}) == P()
    assert spec_for("blocks_0/attn/proj/kernel", (3, 8, 32), {"data": 2, "model": 2}) == P()
    assert spec_for("blocks_0/mlp/fc1/kernel", (32, 64), {"data": 2, "model": 4}) == P(
        None, "model")


def test_make_mesh_and_batch_rows():
    mesh = make_mesh({"data": -1, "model": 2})
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    assert local_batch_slice(mesh, 16) == slice(0, 16)  # one process holds every row
    assert dict(make_mesh({"data": 1, "model": 1}).shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"data": 8, "model": 2})
    with pytest.raises(ValueError, match="not divisible by the mesh's data axis"):
        local_batch_slice(mesh, 6)


def test_distributed_is_not_initialised_without_a_multiprocess_environment(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not environment_is_multiprocess()
    assert maybe_initialize({"initialize": None}) is False
    assert maybe_initialize({"initialize": False}) is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert environment_is_multiprocess()


def _losses(mesh_config, steps=3, sandwich=False):
    train_cfg = default_train_config()
    train_cfg.update(steps=10, warmup_steps=2, lr=3e-3, drop_path=0.1, sandwich=sandwich)
    mesh = make_mesh(mesh_config)
    trainer = Trainer(ViT(TINY), train_cfg, mesh, mesh_config)
    state = trainer.create_state(seed=0)
    sampler = PolicySampler(TINY, train_cfg)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(steps):
        images = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
        labels = rng.integers(0, 10, 16).astype(np.int32)
        keep, _ = sampler(step)
        state, metrics = trainer.train_step(
            state, local_to_global(images, mesh, 16), local_to_global(labels, mesh, 16), keep
        )
        losses.append(float(metrics["loss"]))
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    return np.asarray(losses), params, trainer


def test_data_and_model_parallel_training_match_one_device():
    base_losses, base_params, _ = _losses({"data": 1, "model": 1})
    for mesh_config in (
        {"data": 8, "model": 1},
        {"data": 4, "model": 2, "fsdp": True, "fsdp_min_size": 1},
    ):
        losses, params, trainer = _losses(mesh_config)
        np.testing.assert_allclose(losses, base_losses, rtol=1e-5, atol=1e-6)
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(base_params),
            strict=True,
        ):
            name = jax.tree_util.keystr(path)
            if name.endswith("['qkv']['bias']"):
                # The key bias (row 1 of [q, k, v]) has an exactly-zero true gradient (softmax
                # is shift-invariant): Adam turns its rounding noise into +-lr steps, so it is
                # left out. The query and value biases are compared as tightly as the rest.
                a, b = a[[0, 2]], b[[0, 2]]
                assert np.abs(b).max() > 1e-3  # they start at 0: the steps really moved them
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)
        assert trainer.train_step._cache_size() == 1
    # The parameters really are sharded under data + model (+ FSDP) parallelism.
    qkv = trainer.state_shardings.params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.spec == P("data", None, "model")
