"""Newer ViT families (DeiT-III LayerScale, average pooling + fc_norm, no class token, register
tokens) through masks, physical pruning, FLOPs, HSIC scores, export and the converters; and the
AugReg / big_vision .npz loader's edges (golden logits are in test_interop.py)."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import convert
from vitjax.interop import (
    checkpoint_format,
    load_checkpoint,
    load_npz,
    read_preprocessing,
    read_state_dict,
    timm_state_dict,
)
from vitjax.interop.npz import NpzCheckpoint, open_npz
from vitjax.models import Masks, ViT, ViTConfig, init_params
from vitjax.pruning import Policy, Ranks, count_flops, policy_masks, ranks_from_scores
from vitjax.pruning.prune import prune_params

FIXTURES = Path(__file__).parent / "fixtures" / "timm"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["cases"]
BASE = dict(num_classes=5, image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4,
            mlp_dim=48)
FAMILIES = {
    "deit3": dict(layer_scale=True, no_embed_class=True),
    "gap_fc_norm": dict(class_token=False, global_pool="avg", fc_norm=True),
    "cls_avg": dict(global_pool="avg"),
    "reg4_gap": dict(class_token=False, reg_tokens=4, no_embed_class=True, global_pool="avg",
                     fc_norm=True),
    "reg2_ls_token": dict(reg_tokens=2, no_embed_class=True, layer_scale=True),
}


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _setup(config, seed=0):
    params = init_params(ViT(config), jax.random.key(seed))
    # LayerScale starts at 1e-5 and biases at 0: perturb so every parameter shows in the logits.
    params = jax.tree.map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(seed + 1), a.shape), params)
    images = jax.random.normal(jax.random.key(seed + 2), (3, 32, 32, 3))
    return ViT(config), params, images


def _ranks(config, seed):
    rng = np.random.default_rng(seed)
    return Ranks(head=ranks_from_scores(rng.normal(size=(config.depth, config.num_heads))),
                 neuron=ranks_from_scores(rng.normal(size=(config.depth, config.mlp_dim))),
                 token=ranks_from_scores(rng.normal(size=(config.depth, config.num_tokens))))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masked_equals_physically_pruned(family):
    config = ViTConfig(**BASE, **FAMILIES[family])
    model, params, images = _setup(config, seed=3)
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(params))
    dense, _ = model.apply({"params": params}, images)
    L, N = config.depth, config.num_tokens
    ones = Masks(head=jnp.ones((L, 4)), neuron=jnp.ones((L, 48)), token=jnp.ones((L, N)))
    np.testing.assert_array_equal(model.apply({"params": params}, images, ones)[0], dense)
    ranks = _ranks(config, seed=4)
    policy = Policy(neuron=(0.5, 1.0, 0.8), head=(0.25, 0.5, 1.0), token=(0.3, 0.0, 0.5))
    modes = ["static"] + (["attention"] if config.class_token else [])
    for mode in modes:
        masked, _ = model.apply({"params": params}, images, policy_masks(config, policy, ranks,
                                                                          mode))
        pruned_config, pruned_params = prune_params(config, params, policy, ranks, mode)
        pruned, aux = ViT(pruned_config).apply({"params": pruned_params}, images)
        np.testing.assert_allclose(masked, pruned, atol=2e-5, rtol=1e-5)
        assert pruned_config.num_params() == sum(x.size for x in jax.tree.leaves(pruned_params))
        # LayerScale gammas are per channel of d: kept whole with their sub-block.
        if config.layer_scale:
            block = pruned_params["blocks_0"]
            assert block["ls1"]["gamma"].shape == block["ls2"]["gamma"].shape == (32,)
            assert "ls2" not in pruned_params["blocks_1"] and "ls1" not in pruned_params[
                "blocks_2"]
        # Prefix tokens (class, registers) are always kept.
        assert aux["blocks"][-1]["ffn_hidden"].shape[1] == policy.keep_counts(config).token[-1]
        assert policy.keep_counts(config).token[-1] >= config.num_prefix_tokens


def test_a_dropped_token_leaves_the_average_pool():
    """With average pooling, a token dropped at the last layer changes the mean like a
    physically removed one (the masked model averages only alive tokens)."""
    config = ViTConfig(**BASE, **FAMILIES["gap_fc_norm"])
    model, params, images = _setup(config)
    token = np.ones((3, config.num_tokens), np.float32)
    token[2, 5] = 0
    masks = Masks(token=jnp.asarray(token))
    _, aux = model.apply({"params": params}, images, masks)
    _, dense_aux = model.apply({"params": params}, images)
    assert not np.allclose(aux["pre_logits"], dense_aux["pre_logits"])


def test_class_attention_token_selection_is_refused_without_a_class_token():
    config = ViTConfig(**BASE, **FAMILIES["reg4_gap"])
    model, params, images = _setup(config)
    ranks = _ranks(config, 0)
    policy = Policy.uniform(3, neuron=0.0, head=0.0, token=0.3)
    with pytest.raises(ValueError, match="no class token; use token_mode='static'"):
        policy_masks(config, policy, ranks, "attention")
    with pytest.raises(ValueError, match="no class token"):
        prune_params(config, params, policy, ranks, "attention")
    with pytest.raises(ValueError, match="has no class token"):
        model.apply({"params": params}, images, Masks(token_keep=jnp.full((3,), 10)))
    per_image = ViTConfig(**BASE, **FAMILIES["reg4_gap"], layer_tokens=(14, 14, 10))
    with pytest.raises(ValueError, match="class attention"):
        ViT(per_image).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="needs class_token=True"):
        ViTConfig(**BASE, class_token=False)


@pytest.mark.parametrize("family", ["deit3", "reg4_gap"])
def test_flops_match_xla_for_pruned_families(family):
    from vitjax.pruning.flops import xla_matmul_macs

    config = ViTConfig(**BASE, **FAMILIES[family])
    policy = Policy(neuron=(0.5, 0.0, 0.8), head=(0.25, 0.5, 0.0), token=(0.3, 0.0, 0.5))
    _, params, images = _setup(config)
    pruned_config, pruned_params = prune_params(config, params, policy, _ranks(config, 1))
    model = ViT(pruned_config)
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(
        pruned_params, images[:2]).compile()
    assert xla_matmul_macs(compiled.as_text()) / 2 == pytest.approx(
        count_flops(pruned_config).total * 1e9, rel=1e-9)
    assert count_flops(config, policy).total == pytest.approx(count_flops(pruned_config).total)


def test_hsic_scores_cover_register_tokens_and_export_runs(tmp_path):
    from vitjax.export import export_jax, load_and_run
    from vitjax.scoring import ScoreConfig, score_model

    config = ViTConfig(**BASE, **FAMILIES["reg2_ls_token"])
    model, params, images = _setup(config)
    images = jnp.concatenate([images] * 4)
    scores = score_model(model, params, images, config=ScoreConfig())
    assert scores.head.shape == (3, 4) and scores.neuron.shape == (3, 48)
    assert scores.token.shape == (3, config.num_tokens)
    assert np.all(np.isfinite(scores.token))
    policy = Policy.uniform(3, neuron=0.3, head=0.25, token=0.3)
    pruned_config, pruned_params = prune_params(config, params, policy, scores.ranks())
    path = tmp_path / "model.jax_exported"
    export_jax(ViT(pruned_config), pruned_params, path)
    expected, _ = ViT(pruned_config).apply({"params": pruned_params}, images)
    np.testing.assert_allclose(load_and_run(path, images), expected, atol=1e-5)


def test_timm_round_trip_of_every_family():
    for family, fields in FAMILIES.items():
        config = ViTConfig(**BASE, **fields)
        _, params, _ = _setup(config)
        state = timm_state_dict(config, params)
        loaded = load_checkpoint(state, num_heads=4,
                                 **({"global_pool": "avg"} if family == "cls_avg" else {}))
        assert loaded.config == config, family
        jax.tree.map(np.testing.assert_array_equal, loaded.params, params)


# ------------------------------------------------------------------------------ .npz edges


def _tools():
    spec = importlib.util.spec_from_file_location(
        "make_timm_fixtures", Path(__file__).parents[1] / "tools" / "make_timm_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_npz_is_read_lazily_member_by_member(tmp_path):
    """Only the members the table asks for are decompressed; the shapes come from headers."""
    state = _tools().random_jax_npz("augreg", class_token=True, num_classes=3, seed=0)
    state["extra/unused"] = np.zeros((4,), np.float32)
    np.savez_compressed(tmp_path / "w.npz", **state)
    read = []
    with open_npz(tmp_path / "w.npz") as ckpt:
        original = ckpt._archive.__class__.__getitem__
        ckpt._archive.__class__.__getitem__ = lambda self, k: (read.append(k), original(self,
                                                                                        k))[1]
        try:
            assert ckpt.layout == "augreg" and ckpt.shape("embedding/kernel") == (8, 8, 3, 24)
            assert read == []
        finally:
            ckpt._archive.__class__.__getitem__ = original
    with pytest.raises(ValueError, match=r"unknown keys \['extra/unused'\]"):
        load_npz(tmp_path / "w.npz")
    model, params = load_npz(tmp_path / "w.npz", strict=False)
    assert model.config.num_heads == 3 and model.config.num_classes == 3


def test_npz_pre_logits_head_and_size(tmp_path, caplog):
    tools = _tools()
    state = tools.random_jax_npz("augreg", class_token=True, num_classes=3, seed=1,
                                 pre_logits=True)
    np.savez(tmp_path / "in21k.npz", **state)
    with pytest.raises(ValueError, match="pre_logits.*pass num_classes="):
        load_npz(tmp_path / "in21k.npz")
    model, params = load_npz(tmp_path / "in21k.npz", num_classes=10, image_size=48)
    assert model.config.num_classes == 10 and model.config.image_size == 48
    assert params["pos_embed"].shape == (1, 37, 24)
    np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
    with pytest.raises(ValueError, match="not a ViT .npz checkpoint"):
        NpzCheckpoint({"conv/kernel": np.ones(3)})
    from vitjax.interop import load_timm

    with pytest.raises(ValueError, match="AugReg / big_vision .npz.*load_checkpoint"):
        load_timm(tmp_path / "in21k.npz")


def test_convert_cli_records_preprocessing(tmp_path, capsys):
    npz = FIXTURES / MANIFEST["big_vision_tok_c7_32px"]["checkpoint"]
    assert checkpoint_format(npz) == "big_vision"
    out = tmp_path / "bv.safetensors"
    assert convert.main([str(npz), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "big_vision -> vitjax" in printed and "mean (0.5, 0.5, 0.5)" in printed
    assert read_preprocessing(out)["mean"] == [0.5, 0.5, 0.5]
    back = tmp_path / "timm.safetensors"
    assert convert.main([str(out), str(back)]) == 0
    # The timm file keeps the stated normalisation in its header, so it is not "assumed" ImageNet.
    assert load_checkpoint(back, num_heads=4).preprocessing["mean"] == [0.5, 0.5, 0.5]
    assert load_checkpoint(back, num_heads=4).preprocessing["known"] is True
    expected = read_state_dict(FIXTURES / MANIFEST["big_vision_tok_c7_32px"]["timm_state"])
    got = read_state_dict(back)
    assert sorted(got) == sorted(expected)
    assert all(np.array_equal(got[k], v) for k, v in expected.items())
    timm_in = FIXTURES / MANIFEST["deit3_c10_32px"]["checkpoint"]
    assert convert.main([str(timm_in), str(tmp_path / "d3.npz"), "--num-heads", "2"]) == 0
    assert "assumed" in capsys.readouterr().out
    assert read_preprocessing(tmp_path / "d3.npz")["known"] is False
    # A timm file that says nothing is still assumed ImageNet, and a stated one wins over it.
    assert load_checkpoint(timm_in, num_heads=2).preprocessing["known"] is False
    stated = load_checkpoint(back, num_heads=4, preprocessing="imagenet").preprocessing
    assert stated["mean"] == pytest.approx([0.485, 0.456, 0.406]) and stated["known"] is True
    assert convert.main([str(npz), str(tmp_path / "x.safetensors"), "--num-heads", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: big_vision") and "num_heads=4" in err and "\n" not in err


# ------------------------------------------------------------------------------ pipeline


def _tiny_digits():
    spec = importlib.util.spec_from_file_location(
        "test_stages", Path(__file__).parent / "test_stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_digits


def test_pipeline_on_a_register_token_gap_model(tmp_path):
    """pretrain -> score -> criteria -> search -> prune -> export with registers, no class
    token and average pooling: static token pruning, registers kept, weights record the
    normalisation; the class-attention token mode is refused up front."""
    from vitjax.errors import UserError
    from vitjax.interop import load_native
    from vitjax.stages import runner
    from vitjax.workdir import read_json

    config = _tiny_digits()(token_mode="static")
    config.model.update(class_token=False, reg_tokens=2, no_embed_class=True,
                        global_pool="avg", fc_norm=True)
    config.stages = "pretrain,score,criteria,search,prune,export"
    config.criteria.ratios = (0.0, 0.5)
    config.search.update(population=2, iterations=1, restarts=1)
    config.export.formats = "jax"
    runner.run_pipeline(config, tmp_path / "run")
    prune = read_json(tmp_path / "run" / "prune" / "DONE.json")
    assert prune["max_logit_diff_vs_masked"] < 1e-4
    pruned_config, _ = load_native(tmp_path / "run" / "prune" / "pruned.safetensors")
    assert pruned_config.reg_tokens == 2 and not pruned_config.class_token
    assert all(ix[:2] == (0, 1) for ix in pruned_config.layer_token_indices)  # registers kept
    assert read_preprocessing(tmp_path / "run" / "prune" / "pruned.safetensors")["mean"] == [
        0.3, 0.3, 0.3]
    criteria = read_json(tmp_path / "run" / "criteria" / "DONE.json")
    assert "attn-prob" not in {row["criterion"] for row in criteria["rows"]}
    assert read_json(tmp_path / "run" / "export" / "DONE.json")["formats"]["jax"]["ok"]

    config.train.token_mode = "attention"
    with pytest.raises(UserError, match="token_mode=static"):
        runner.run_pipeline(config, tmp_path / "other")


def test_pipeline_checks_the_checkpoint_normalisation(tmp_path):
    """An AugReg .npz expects [-1, 1] inputs; digits are normalised otherwise: a clear error,
    unless the data config matches (then pretraining starts from the checkpoint)."""
    from vitjax.errors import UserError
    from vitjax.stages import runner

    npz = FIXTURES / MANIFEST["augreg_gap_c7_32px"]["checkpoint"]
    config = _tiny_digits()(token_mode="static")
    config.model.update(variant="", embed_dim=24, num_heads=3, mlp_dim=48, depth=2,
                        class_token=False, global_pool="avg")
    config.init.checkpoint = str(npz)
    config.stages = "pretrain"
    with pytest.raises(UserError, match=r"augreg ViT without class token.*mean \(0.5, 0.5, 0.5\)"):
        runner.run_pipeline(config, tmp_path / "a")
    config.data.update(mean=(0.5,) * 3, std=(0.5,) * 3)
    runner.run_pipeline(config, tmp_path / "b")


# ------------------------------------------------------------------------------ live timm


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:
        return False


needs_timm = pytest.mark.skipif(not all(_importable(m) for m in ("torch", "timm")),
                                reason="needs torch and timm")


@needs_timm
@pytest.mark.parametrize("layout,class_token,scanned", [
    ("augreg", True, False), ("augreg", False, False), ("big_vision", True, True),
    ("big_vision", False, False)])
def test_timm_reads_the_same_npz(layout, class_token, scanned, tmp_path):
    """A fresh random .npz (other sizes than the fixtures: head_dim 16, 4 blocks) through
    timm's own `_load_weights` and through vitjax: same logits; then vitjax -> timm state dict
    == what timm's loader made of it."""
    from timm.models.vision_transformer import _load_weights

    tools = _tools()
    sizes = dict(embed_dim=32, depth=4, num_heads=2, mlp_dim=64, patch_size=4, img_size=16)
    state = tools.random_jax_npz(layout, class_token=class_token, num_classes=4, seed=7,
                                 scanned=scanned, **sizes)
    np.savez(tmp_path / "w.npz", **state)
    timm_model = tools.timm_model_for_npz(layout, class_token, 4, **sizes)
    _load_weights(timm_model, str(tmp_path / "w.npz"))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    expected = tools.timm_logits(timm_model, images)
    loaded = load_checkpoint(tmp_path / "w.npz")
    assert loaded.source_format == layout and loaded.config.num_heads == 2
    logits, _ = ViT(loaded.config).apply({"params": loaded.params}, images)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    back = timm_state_dict(loaded.config, loaded.params)
    timm_state = {k: v.numpy() for k, v in timm_model.state_dict().items()}
    assert sorted(back) == sorted(timm_state)
    assert all(np.array_equal(back[k], v) for k, v in timm_state.items())


@needs_timm
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_timm_loads_strictly_into_timm(family, tmp_path):
    """Round trip to timm: every family written by save_timm loads strictly into the timm
    model of that family and gives vitjax's logits."""
    import timm
    import torch

    from vitjax.interop import save_timm

    config = ViTConfig(**BASE, **FAMILIES[family])
    model, params, images = _setup(config)
    path = tmp_path / "m.safetensors"
    save_timm(config, params, path)
    kwargs = dict(embed_dim=32, depth=3, num_heads=4, mlp_ratio=1.5, patch_size=8, img_size=32,
                  num_classes=5, class_token=config.class_token, reg_tokens=config.reg_tokens,
                  no_embed_class=config.no_embed_class, global_pool=config.global_pool,
                  fc_norm=config.fc_norm, init_values=1e-5 if config.layer_scale else None)
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    timm_model.load_state_dict(read_state_dict_torch(path, torch), strict=True)
    expected = _tools().timm_logits(timm_model, np.array(images))
    logits, _ = model.apply({"params": params}, images)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-5)


def read_state_dict_torch(path, torch):
    return {k: torch.from_numpy(np.array(v)) for k, v in read_state_dict(path).items()}
