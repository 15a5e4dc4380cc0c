"""timm / DeiT checkpoint interop, against timm-produced golden logits and (when installed) timm.

The golden fixtures come from tools/make_timm_fixtures.py; tests that need torch/timm are
skipped without them.
"""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from vitjax import convert
from vitjax.interop import (
    infer_config,
    is_native,
    load_checkpoint,
    load_native,
    load_timm,
    params_from_timm,
    parse_variant,
    read_state_dict,
    resample_pos_embed,
    save_native,
    save_timm,
    timm_state_dict,
)
from vitjax.models import ViT, ViTConfig

FIXTURES = Path(__file__).parent / "fixtures" / "timm"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["cases"]


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module blocked by sys.modules[name] = None
        return False


HAVE_TIMM = all(_importable(m) for m in ("torch", "timm"))
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="needs torch and timm")
GOLDEN_ATOL = 1e-5


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _logits(model, params, images):
    logits, _ = jax.jit(model.apply)({"params": params}, images)
    return np.asarray(logits)


def _random_params(cfg, seed=0):
    """Random params of the right shapes, without compiling an init (slow on small CPUs)."""
    images = np.zeros((1, cfg.image_size, cfg.image_size, cfg.in_chans), np.float32)
    shapes = jax.eval_shape(lambda: ViT(cfg).init(jax.random.key(0), images))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _fixture_state(case):
    """The timm state dict of a case (for an .npz case: what timm's own loader made of it)."""
    entry = MANIFEST[case]
    return read_state_dict(FIXTURES / entry.get("timm_state", entry["checkpoint"]))


# tools/ is not a package; load the fixture script's helpers by path so the live tests perturb
# exactly as the fixtures were made.
def _tools():
    spec = importlib.util.spec_from_file_location(
        "make_timm_fixtures", Path(__file__).parents[1] / "tools" / "make_timm_fixtures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", sorted(MANIFEST))
def test_golden_logits(case):
    """timm state dicts of every family, and AugReg / big_vision .npz files read by timm's own
    `_load_weights`: vitjax's logits equal timm's."""
    entry = MANIFEST[case]
    golden = np.load(FIXTURES / entry["io"])
    loaded = load_checkpoint(FIXTURES / entry["checkpoint"], **entry["load"])
    assert loaded.source_format == entry["format"]
    model, params = ViT(loaded.config), loaded.params
    logits = _logits(model, params, golden["images"])
    assert logits.shape == golden["logits"].shape
    assert np.abs(golden["logits"]).max() > 0.1  # the perturbation reached the logits
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=GOLDEN_ATOL)


@pytest.mark.parametrize("case", sorted(MANIFEST))
def test_round_trip_is_exact(case, tmp_path):
    """vitjax -> timm gives back timm's state dict exactly; for the .npz cases, loading the .npz
    into vitjax and writing a timm state dict equals what timm's own .npz loader made."""
    entry = MANIFEST[case]
    state = _fixture_state(case)
    if "timm_state" in entry:
        loaded = load_checkpoint(FIXTURES / entry["checkpoint"])
        model, params = ViT(loaded.config), loaded.params
    else:
        same_size = {k: v for k, v in entry["load"].items() if k != "image_size"}
        model, params = load_timm(state, **same_size)
    back = timm_state_dict(model, params)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    save_timm(model, params, tmp_path / "back.safetensors")
    again = read_state_dict(tmp_path / "back.safetensors")
    assert all(np.array_equal(again[k], v) for k, v in state.items())


def test_qkv_and_proj_layout():
    """timm rows [q heads..., k heads..., v heads...], each head contiguous -> [d, 3, H, dh]."""
    cfg = ViTConfig(num_classes=0, image_size=8, patch_size=4, embed_dim=6, depth=1,
                    num_heads=2, mlp_dim=4)
    d, heads, dh = 6, 2, 3
    state = timm_state_dict(cfg, _random_params(cfg))
    qkv = np.arange(3 * d * d, dtype=np.float32).reshape(3 * d, d)
    proj = np.arange(d * d, dtype=np.float32).reshape(d, d) + 1000
    state["blocks.0.attn.qkv.weight"], state["blocks.0.attn.proj.weight"] = qkv, proj
    params = params_from_timm(state, cfg)
    kernel = params["blocks_0"]["attn"]["qkv"]["kernel"]
    for s in range(3):
        for h in range(heads):
            for j in range(dh):
                np.testing.assert_array_equal(kernel[:, s, h, j], qkv[s * d + h * dh + j])
    out = params["blocks_0"]["attn"]["proj"]["kernel"]
    for h in range(heads):
        np.testing.assert_array_equal(out[h], proj[:, h * dh:(h + 1) * dh].T)


def test_wrappers_prefix_and_npz(tmp_path):
    state = _fixture_state("deit_distilled_c10_32px")
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    model, params = load_timm(wrapped, num_heads=4)
    assert model.config.distilled and model.config.num_classes == 10
    np.savez(tmp_path / "sd.npz", **state)
    _, from_npz = load_timm(tmp_path / "sd.npz", num_heads=4)
    jax.tree.map(np.testing.assert_array_equal, params, from_npz)


def test_dynamicvit_extras_are_reported(caplog):
    state = _fixture_state("deit_c1000_64px")
    extras = {"score_predictor.0.in_conv.0.weight": np.ones((4, 32), np.float32),
              "score_predictor.0.out_conv.2.bias": np.ones((2,), np.float32)}
    with caplog.at_level(logging.WARNING):
        model, params, got = load_timm({**state, **extras}, num_heads=2, return_extras=True)
    assert "score_predictor" in caplog.text
    assert sorted(got) == sorted(extras)
    _, plain = load_timm(state, num_heads=2)
    jax.tree.map(np.testing.assert_array_equal, params, plain)


def test_missing_and_unknown_keys(caplog):
    state = _fixture_state("deit_c1000_64px")
    missing = {k: v for k, v in state.items() if k != "blocks.1.norm1.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.norm1.weight'\]"):
        load_timm(missing, num_heads=2)
    unknown = {**state, "blocks.0.attn.q_norm.weight": np.ones(32, np.float32)}
    with pytest.raises(ValueError, match=r"unknown keys \['blocks.0.attn.q_norm.weight'\]"):
        load_timm(unknown, num_heads=2)
    with caplog.at_level(logging.WARNING):
        _, params = load_timm({**missing, "blocks.0.attn.q_norm.weight": np.ones(32)}, num_heads=2,
                              strict=False)
    assert "blocks.1.norm1.weight" in caplog.text and "blocks.0.attn.q_norm.weight" in caplog.text
    assert params["blocks_1"]["norm1"]["scale"].shape == (32,)  # fresh init fills the gap
    with pytest.raises(ValueError, match="not a timm ViT/DeiT state dict"):
        load_timm({"conv1.weight": np.ones((3, 3))})
    bad_shape = {**state, "blocks.0.mlp.fc2.weight": np.ones((32, 7), np.float32)}
    with pytest.raises(ValueError, match="blocks.0.mlp.fc2.weight"):
        load_timm(bad_shape, num_heads=2)


def test_variants_and_heads(caplog):
    assert parse_variant("deit_base_distilled_patch16_224") == dict(
        embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, distilled=True, patch_size=16,
        image_size=224)
    assert parse_variant("S/16")["num_heads"] == 6
    state = _fixture_state("deit_c1000_64px")
    with pytest.raises(ValueError, match="embed_dim=768"):
        load_timm(state, variant="deit_base_patch16_224")
    with pytest.raises(ValueError, match="cannot read the architecture"):
        load_timm(state, variant="resnet50")
    with pytest.raises(ValueError, match="pass num_heads"):
        load_timm(state)  # embed_dim 32: no standard, not a multiple of 64
    # Standard widths need no heads; other multiples of 64 assume head_dim 64, with a warning.
    for width, heads in ((192, 3), (128, 2)):
        cfg = ViTConfig(num_classes=3, image_size=8, patch_size=4, embed_dim=width, depth=1,
                        num_heads=heads, mlp_dim=8)
        params = _random_params(cfg)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model, _ = load_timm(timm_state_dict(cfg, params))
        assert model.config == cfg
        assert ("head_dim 64" in caplog.text) == (width == 128)


def test_headless_and_new_class_counts():
    entry = MANIFEST["deit_c1000_64px"]
    images = np.load(FIXTURES / entry["io"])["images"]
    model, params = load_timm(FIXTURES / entry["checkpoint"], num_heads=2)
    logits, aux = jax.jit(model.apply)({"params": params}, images)
    headless, hparams = load_timm(FIXTURES / entry["checkpoint"], num_heads=2, num_classes=0)
    assert headless.config.num_classes == 0 and "head" not in hparams
    np.testing.assert_allclose(_logits(headless, hparams, images), aux["pre_logits"], atol=1e-6)
    model5, params5 = load_timm(FIXTURES / entry["checkpoint"], num_heads=2, num_classes=5)
    np.testing.assert_array_equal(_logits(model5, params5, images), 0.0)
    headless_fixture, _ = load_timm(FIXTURES / MANIFEST["vit_headless_16px"]["checkpoint"],
                                    num_heads=3)
    assert headless_fixture.config.num_classes == 0


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
    path = tmp_path / "deit.pth"
    path.write_bytes(b"any")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="needs PyTorch"):
        load_timm(path)


def test_image_size_must_fit_patches():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        load_timm(FIXTURES / MANIFEST["deit_c1000_64px"]["checkpoint"], num_heads=2,
                  image_size=72)


def test_pruned_models_are_refused(tmp_path):
    cfg = ViTConfig.from_variant("mu/8", num_classes=3, image_size=16, layer_heads=(1, 2))
    with pytest.raises(ValueError, match="pruned"):
        save_timm(cfg, {}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_native_format_round_trip(tmp_path):
    model, params = load_timm(FIXTURES / MANIFEST["deit_distilled_c10_32px"]["checkpoint"],
                              num_heads=4)
    for suffix in (".safetensors", ".npz"):
        path = tmp_path / f"w{suffix}"
        save_native(path, model.config, params)
        assert is_native(path)
        config, loaded = load_native(path)
        assert config == model.config
        jax.tree.map(np.testing.assert_array_equal, params, loaded)
    assert not is_native(FIXTURES / MANIFEST["deit_distilled_c10_32px"]["checkpoint"])


def test_convert_cli_both_ways(tmp_path, capsys):
    checkpoint = FIXTURES / MANIFEST["deit_distilled_c10_32px"]["checkpoint"]
    native, timm_out = tmp_path / "ours.safetensors", tmp_path / "timm.safetensors"
    assert convert.main([str(checkpoint), str(native), "--num-heads", "4"]) == 0
    printed = capsys.readouterr().out
    assert "num_heads=4" in printed and "distilled=True" in printed and "parameters" in printed
    assert convert.main([str(native), str(timm_out)]) == 0
    original, back = read_state_dict(checkpoint), read_state_dict(timm_out)
    assert sorted(original) == sorted(back)
    assert all(np.array_equal(back[k], v) for k, v in original.items())


def test_convert_cli_bad_input(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    for argv in (
        [str(tmp_path / "missing.pth"), str(out)],
        [str(garbage), str(out)],
        [str(FIXTURES / MANIFEST["deit_c1000_64px"]["checkpoint"]), str(out)],  # heads unknown
        [str(FIXTURES / MANIFEST["deit_c1000_64px"]["checkpoint"]), str(tmp_path / "o.txt")],
    ):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.safetensors"]


def test_resample_matches_fixture_shape_rules():
    state = _fixture_state("deit_resample_32to48px")
    cfg = infer_config(state, num_heads=2)
    assert (cfg.image_size, cfg.grid_size) == (32, 4)
    pos = state["pos_embed"]
    same = resample_pos_embed(pos, 4, 1)
    np.testing.assert_array_equal(same, pos)
    up = resample_pos_embed(pos, 6, 1)
    assert up.shape == (1, 37, 32)
    np.testing.assert_array_equal(up[:, :1], pos[:, :1])  # prefix tokens untouched


# ----------------------------------------------------------------------------- live timm tests


@needs_timm
@pytest.mark.parametrize("old,new,prefix", [(4, 6, 1), (14, 24, 2), (14, 7, 1), (5, 3, 2)])
def test_resample_matches_timm(old, new, prefix):
    import torch
    from timm.layers import resample_abs_pos_embed

    pos = np.random.default_rng(old * new).standard_normal((1, prefix + old * old, 8))
    pos = pos.astype(np.float32)
    expected = resample_abs_pos_embed(torch.from_numpy(pos), [new, new],
                                      num_prefix_tokens=prefix).numpy()
    np.testing.assert_allclose(resample_pos_embed(pos, new, prefix), expected, atol=2e-6)


@needs_timm
def test_pth_and_timm_pretrained_file(tmp_path):
    """save_timm .pth / .safetensors load in timm both ways: load_state_dict and
    create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))."""
    import timm
    import torch

    entry = MANIFEST["deit_distilled_c10_32px"]
    golden = np.load(FIXTURES / entry["io"])
    model, params = load_timm(FIXTURES / entry["checkpoint"], **entry["load"])
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"deit{suffix}"
        save_timm(model, params, path)
        timm_model = timm.create_model(entry["timm"], pretrained=True,
                                       pretrained_cfg_overlay=dict(
                                           file=str(path), num_classes=10),
                                       **entry["timm_kwargs"]).eval()
        from_timm = _tools().timm_logits(timm_model, golden["images"])
        # torch's CPU kernels differ by an ulp across builds/thread counts: the fixture's
        # logits agree to float tolerance (test_round_trip_is_exact compares the weights exactly).
        np.testing.assert_allclose(from_timm, golden["logits"], rtol=0, atol=GOLDEN_ATOL)
    # An official-style training checkpoint: {'model': ..., 'args': Namespace} with DDP prefixes.
    import argparse

    state = torch.load(tmp_path / "deit.pth", weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                "args": argparse.Namespace(lr=1e-3)}, tmp_path / "train.pth")
    model2, params2 = load_timm(tmp_path / "train.pth", num_heads=4)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


@needs_timm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_distilled_patch16_224",
                                  "deit_base_patch16_224", "deit3_small_patch16_224"])
def test_full_size_deit_live(name, tmp_path):
    """Full-size DeiT (random init, perturbed) vs timm, then save_timm -> timm -> same logits."""
    import timm
    import torch

    tools = _tools()
    timm_model = tools.perturbed_timm_model(name, seed=0, noise=0.02)
    images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    expected = tools.timm_logits(timm_model, images)
    model, params = load_timm(timm_model.state_dict(), variant=name)  # torch tensors in memory
    logits = _logits(model, params, images)
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * max(scale, 1.0))
    path = tmp_path / f"{name}.pth"
    save_timm(model, params, path)
    del timm_model
    reloaded = timm.create_model(name, pretrained=False).eval()
    reloaded.load_state_dict(torch.load(path, weights_only=True), strict=True)
    np.testing.assert_array_equal(tools.timm_logits(reloaded, images), expected)
