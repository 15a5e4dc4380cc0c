"""Two processes on this machine (2 fake CPU devices each) train one model in lockstep."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

# Two processes that import jax and train together: the second tier.
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent(
    """
    import json, os, sys
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from vitjax.parallel import local_batch_slice, make_mesh, maybe_initialize

    # Before anything touches the backend.
    maybe_initialize({"initialize": True, "coordinator_address": f"127.0.0.1:{port}",
                      "num_processes": 2, "process_id": process_id})
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from vitjax.evaluate import array_batches
    from vitjax.models import ViT, ViTConfig
    from vitjax.training import ArrayBatches, default_mesh_config, default_train_config, train

    config = ml_collections.ConfigDict()
    config.train = default_train_config()
    config.train.update(steps=4, batch_size=16, log_every=2, eval_every=0, ckpt_every=2,
                        warmup_steps=1, lr=3e-3)
    config.mesh = default_mesh_config()
    config.mesh.model = int(sys.argv[4])
    model = ViTConfig(num_classes=10, image_size=8, patch_size=4, embed_dim=32, depth=2,
                      num_heads=4, mlp_dim=64)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    mesh = make_mesh(config.mesh)
    rows = local_batch_slice(mesh, 16)
    batches = ArrayBatches(images, labels, 16, seed=0, rows=rows)
    eval_rows = local_batch_slice(mesh, 32)  # this process's rows of every eval batch
    result = train(config, workdir, model=ViT(model), train_batches=batches,
                   eval_sets={"test": lambda: array_batches(images, labels, 32, rows=eval_rows)},
                   mesh=mesh)
    checksum = jax.jit(
        lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )(result.params)
    print("RESULT", json.dumps({
        "process": jax.process_index(), "devices": jax.device_count(),
        "rows": [rows.start, rows.stop], "checksum": float(checksum),
        "metrics": result.metrics, "step": result.step,
    }), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(tmp_path, model_parallel: int):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    workdir = tmp_path / f"run_model{model_parallel}"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    # The persistent compilation cache set up in conftest.py is inherited through os.environ.
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(workdir), str(model_parallel)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out[-4000:]
        outputs.append(json.loads(out.split("RESULT", 1)[1]))
    return outputs, workdir


def test_two_processes_train_in_lockstep(tmp_path):
    (a, b), workdir = _run_pair(tmp_path, model_parallel=1)
    assert (a["devices"], a["rows"], b["rows"]) == (4, [0, 8], [8, 16])
    assert a["step"] == b["step"] == 4
    assert a["checksum"] == b["checksum"] and np.isfinite(a["checksum"])
    assert a["metrics"] == b["metrics"]
    # Only process 0 writes metrics; checkpoints are one directory shared by both.
    events = [n for n in os.listdir(workdir) if n.startswith("events.out")]
    assert len(events) == 1
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

    # The same run in one process on 4 devices gives the same parameters.
    import ml_collections

    from vitjax.models import ViT, ViTConfig
    from vitjax.parallel import make_mesh
    from vitjax.training import ArrayBatches, default_mesh_config, default_train_config, train

    config = ml_collections.ConfigDict()
    config.train = default_train_config()
    config.train.update(steps=4, batch_size=16, log_every=2, eval_every=0, ckpt_every=2,
                        warmup_steps=1, lr=3e-3)
    config.mesh = default_mesh_config()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    model = ViTConfig(num_classes=10, image_size=8, patch_size=4, embed_dim=32, depth=2,
                      num_heads=4, mlp_dim=64)
    result = train(config, str(tmp_path / "single"), model=ViT(model),
                   train_batches=ArrayBatches(images, labels, 16, seed=0),
                   mesh=make_mesh({"data": 4}))
    checksum = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(jax.device_get(result.params)))
    np.testing.assert_allclose(checksum, a["checksum"], rtol=1e-4)
