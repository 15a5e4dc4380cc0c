"""Export to jax.export, ONNX and TFLite: every artifact against the JAX model's logits.

Tiny models (embed 32, depth 2, 2 heads, 16px images, 4px patches): dense, pruned with static
token positions, and pruned with per-image top-k tokens by class attention; batches 1 and 8.
ONNX and TFLite tests are skipped when the 'export' extra is not installed.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.errors import UserError
from vitjax.export import (
    ExportMismatchError,
    export_all,
    jax_export,
    onnx,
    rewrite,
    tflite,
)
from vitjax.models import ViT, ViTConfig, init_params
from vitjax.pruning import Policy, count_flops, identity_ranks, round_policy_to_multiple
from vitjax.pruning.prune import prune_params

BATCHES = (1, 8)
TINY = ViTConfig.from_variant("mu", image_size=16, patch_size=4, num_classes=10)
POLICY = Policy.uniform(TINY.depth, neuron=0.5, head=0.5, token=0.4)


def _has(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_onnx = pytest.mark.skipif(
    not _has("jax2onnx", "onnx", "onnxruntime"), reason="the 'export' extra is not installed"
)
needs_tflite = pytest.mark.skipif(
    not _has("tensorflow", "ai_edge_litert"), reason="the 'export' extra is not installed"
)


@pytest.fixture(scope="module")
def models():
    """name -> (ViT, params): dense, pruned with static tokens, pruned with per-image top-k."""
    dense = ViT(TINY)
    params = init_params(dense, jax.random.key(0))
    out = {"dense": (dense, params)}
    for mode in ("static", "attention"):
        config, pruned = prune_params(TINY, params, POLICY, identity_ranks(TINY), mode)
        out[mode] = (ViT(config), pruned)
    return out


@pytest.fixture(scope="module")
def images():
    # Different images keep different tokens in 'attention' mode: that path must be exercised.
    return np.random.default_rng(1).standard_normal((8, 16, 16, 3), np.float32)


def _check_summary(summary, fmt, files):
    result = summary["formats"][fmt]
    assert sorted(result["files"]) == sorted(files)
    assert all(size > 0 for size in result["files"].values())
    assert set(result["max_abs_diff"]) == set(BATCHES)
    assert result["ok"], result
    # Far inside the 1e-4 tolerance: these runtimes compute the same float32 graph.
    assert max(result["max_abs_diff"].values()) < 1e-5 * summary["reference_scale"]


@pytest.mark.parametrize("kind", ["dense", "static", "attention"])
def test_jax_export_matches_model(models, images, kind, tmp_path):
    model, params = models[kind]
    summary = export_all(model, params, tmp_path, formats=("jax",), sample_images=images)
    _check_summary(summary, "jax", ["model.jax_exported"])


@needs_onnx
@pytest.mark.parametrize("kind", ["dense", "static", "attention"])
def test_onnx_export_matches_model(models, images, kind, tmp_path):
    model, params = models[kind]
    summary = export_all(model, params, tmp_path, formats=("onnx",), sample_images=images)
    _check_summary(summary, "onnx", ["model.onnx"])
    session = onnx.onnx_session(tmp_path / "model.onnx")
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape == ["B", 16, 16, 3]  # one file, any batch


@needs_tflite
@pytest.mark.parametrize("kind", ["dense", "static", "attention"])
def test_tflite_export_matches_model(models, images, kind, tmp_path):
    model, params = models[kind]
    summary = export_all(model, params, tmp_path, formats=("tflite",), sample_images=images)
    _check_summary(summary, "tflite", ["model_b1.tflite", "model_b8.tflite"])
    with pytest.raises(ValueError, match="fixed at export"):
        tflite.run_tflite(tmp_path / "model_b1.tflite", images[:2])


_STANDALONE = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("vitjax", "flax"):
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, Blocker())
    module_file, artifact, inputs, outputs = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("jax_export", module_file)
    jax_export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jax_export)

    import numpy as np

    images = np.load(inputs)
    np.savez(outputs, **{str(b): jax_export.load_and_run(artifact, images[:b]) for b in (1, 8)})
    loaded = [m for m in sys.modules if m.split(".")[0] in ("vitjax", "flax")]
    assert not loaded, loaded
    """
)


@pytest.mark.subprocess
def test_jax_artifact_runs_without_vitjax_or_flax(models, images, tmp_path):
    model, params = models["attention"]
    artifact = tmp_path / "model.jax_exported"
    jax_export.export_jax(model, params, artifact)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "-c", _STANDALONE, jax_export.__file__, str(artifact),
         str(tmp_path / "images.npy"), str(tmp_path / "logits.npz")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(tmp_path / "logits.npz")
    forward = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    for b in BATCHES:
        np.testing.assert_allclose(logits[str(b)], forward(images[:b]), rtol=0, atol=1e-6)


@pytest.mark.subprocess
def test_import_is_cheap():
    code = (
        "import sys, vitjax.export\n"
        "heavy = {'tensorflow', 'onnx', 'onnxruntime', 'jax2onnx', 'ai_edge_litert'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    ("blocked", "call", "message"),
    [
        ("jax2onnx", lambda m, p, d: onnx.export_onnx(m, p, d / "m.onnx"), "ONNX export"),
        ("onnxruntime", lambda m, p, d: onnx.onnx_session(d / "m.onnx"), "Running ONNX models"),
        ("tensorflow", lambda m, p, d: tflite.export_tflite(m, p, d / "m.tflite"), "TFLite"),
        ("ai_edge_litert.interpreter", lambda m, p, d: tflite.tflite_interpreter(d / "m.tflite"),
         "Running TFLite"),
    ],
)
def test_missing_extra_names_the_extra(models, tmp_path, monkeypatch, blocked, call, message):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    model, params = models["dense"]
    with pytest.raises(UserError) as err:
        call(model, params, tmp_path)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text
    assert text.endswith("needs the 'export' extra: pip install -e '.[export]'")


def test_onnx_error_message_is_the_documented_one(monkeypatch, tmp_path, models):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)
    with pytest.raises(UserError, match=r"^ONNX export needs the 'export' extra: "
                       r"pip install -e '\.\[export\]'$"):
        onnx.export_onnx(*models["dense"], tmp_path / "m.onnx")


def test_export_all_refuses_unknown_formats_and_reports_mismatches(
    models, images, tmp_path, monkeypatch
):
    import vitjax.export as export_pkg

    model, params = models["dense"]
    with pytest.raises(UserError, match="unknown export formats"):
        export_all(model, params, tmp_path, formats=("jax", "coreml"))
    # An exporter that writes other weights than the reference's: the check must catch it.
    original = export_pkg.export_jax
    other = jax.tree.map(lambda p: p * 1.5, params)
    monkeypatch.setattr(export_pkg, "export_jax", lambda m, p, path: original(m, other, path))
    with pytest.raises(ExportMismatchError, match="differ"):
        export_all(model, params, tmp_path, formats=("jax",), sample_images=images)
    lenient = export_all(model, params, tmp_path, formats=("jax",), sample_images=images,
                         strict=False)
    assert not lenient["formats"]["jax"]["ok"]


def test_sort_rewrite_is_a_stable_sort():
    def selection(x):  # what the per-image token selection does: argsort, then sort positions
        order = jnp.argsort(-x, axis=-1, stable=True)[:, :5]
        return jnp.sort(order, axis=-1), jnp.sort(x, axis=0)

    x = jnp.asarray(np.random.default_rng(0).integers(0, 4, (3, 11)).astype(np.float32))  # ties
    rewritten = tflite.without_sort(selection, x)
    assert rewritten is not selection
    for got, want in zip(rewritten(x), selection(x), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not rewrite.uses(jax.make_jaxpr(rewritten)(x).jaxpr, {"sort"})
    assert rewrite.uses(jax.make_jaxpr(selection)(x).jaxpr, {"sort"})
    plain = lambda v: v * 2  # noqa: E731
    assert tflite.without_sort(plain, x) is plain


DEIT_S = ViTConfig.from_variant("S/16")


@pytest.mark.parametrize("multiple", [8, 16, 64])
@pytest.mark.parametrize(
    "policy",
    [
        Policy.uniform(12, neuron=0.37, head=0.3, token=0.1),
        Policy(tuple(np.linspace(0.6, 0.1, 12)), tuple(np.linspace(0.5, 0.0, 12)),
               tuple(np.linspace(0.0, 0.2, 12))),
    ],
)
def test_round_policy_to_multiple_stays_within_budget(policy, multiple):
    budget = count_flops(DEIT_S, policy).total
    rounded = round_policy_to_multiple(DEIT_S, policy, multiple, budget)
    assert count_flops(DEIT_S, rounded).total <= budget
    before, after = policy.keep_counts(DEIT_S), rounded.keep_counts(DEIT_S)
    np.testing.assert_array_equal(after.head, before.head)
    for old, new in zip(before.neuron, after.neuron, strict=True):
        assert new % multiple == 0 or new == old < multiple or new == DEIT_S.mlp_dim
        assert abs(int(new) - int(old)) < multiple
    previous = DEIT_S.num_tokens
    for old, new in zip(before.token, after.token, strict=True):
        assert new <= previous  # still a valid compounding selection
        assert new % multiple == 0 or new in (old, previous)
        previous = new


def test_round_policy_to_multiple_refuses_a_policy_over_budget():
    policy = Policy.uniform(12, neuron=0.3)
    with pytest.raises(ValueError, match="above the budget"):
        round_policy_to_multiple(DEIT_S, policy, 8, count_flops(DEIT_S, policy).total * 0.9)


def test_export_files_are_written_atomically(models, tmp_path):
    """A write that fails half-way (here: the file-size limit, as a full disk would) leaves the
    previous artifact whole and no partial file; a plain open-and-write would truncate it."""
    import resource
    import signal

    model, params = models["dense"]
    path = tmp_path / "sub" / "m.jax_exported"
    jax_export.export_jax(model, params, path)
    assert [p.name for p in path.parent.iterdir()] == ["m.jax_exported"]
    before = path.read_bytes()
    assert len(before) > 4096
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError):
            jax_export.export_jax(model, params, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["m.jax_exported"]
