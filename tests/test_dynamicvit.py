"""DynamicViT: schedules, the model's two paths, its loss, FLOPs, export and the PyTorch original.

Tiny models (32px images, 4px patches = 64 patch tokens, embed 32, depth 4, predictors before
blocks 1, 2, 3). The golden test runs a copy of the original PyTorch inference code
(raoyongming/DynamicViT models/dyvit.py) on random weights and compares logits.
"""

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitjax.dynamicvit import (
    DynamicViT,
    DynamicViTConfig,
    Predictor,
    dynamicvit_gmacs,
    dynamicvit_loss,
    init_from_vit,
    keep_counts,
    keep_ratios,
    predictor_gmacs,
    ratio_loss,
    token_distillation_loss,
    validate,
)
from vitjax.export import export_all
from vitjax.models import ViT, ViTConfig, init_params
from vitjax.pruning import count_flops
from vitjax.pruning.flops import xla_matmul_macs

TINY = ViTConfig(num_classes=10, image_size=32, patch_size=4, embed_dim=32, depth=4,
                 num_heads=2, mlp_dim=64)
# Block pruning first: per-layer heads and FFN sizes, a removed MHSA and a removed FFN.
PRUNED = dataclasses.replace(TINY, layer_heads=(2, 0, 1, 2), layer_mlp_dims=(64, 16, 0, 40))
DISTILLED = dataclasses.replace(TINY, distilled=True)
DYN = DynamicViTConfig(locations=(1, 2, 3), ratios=keep_ratios("original", 0.7))
KEEP = (44, 31, 21)  # int(64 * 0.7), int(64 * 0.49), int(64 * 0.343)


def _images(batch=4):
    shape = (batch, TINY.image_size, TINY.image_size, TINY.in_chans)
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)


@functools.cache
def _vit_params(config):
    return init_params(ViT(config), jax.random.key(0))


@functools.cache
def _vit_and_dynamic(config, dyn=DYN):
    """(ViT params, DynamicViT, its params) with the ViT's weights and fresh predictors; built
    once per test session (the arrays are immutable)."""
    vit_params = _vit_params(config)
    model = DynamicViT(config, dyn)
    return vit_params, model, init_from_vit(model, vit_params, jax.random.key(1))


def _without_predictors(params):
    return {k: v for k, v in params.items() if not k.startswith("predictor_")}


# ---------------------------------------------------------------------------------------------
# Schedules.


def test_keep_ratio_schedules_and_counts():
    assert keep_ratios("original", 0.5) == (0.5, 0.25, 0.125)
    assert keep_ratios("base", 0.7) == pytest.approx((0.7, 0.5, 0.3))
    assert keep_ratios("original", 0.9, num_stages=2) == pytest.approx((0.9, 0.81))
    # int(N * ratio) of the float ratios, exactly as the original (0.7 - 0.4 < 0.3).
    assert keep_counts(keep_ratios("base", 0.7), 196) == (137, 97, 58)
    assert keep_counts(DYN.ratios, TINY.num_patches) == KEEP
    assert DynamicViTConfig.from_rate("base", 0.7, (1, 2, 3)).ratios == keep_ratios("base", 0.7)
    with pytest.raises(ValueError, match="unknown keep-ratio schedule"):
        keep_ratios("cosine", 0.7)


@pytest.mark.parametrize("ratios, locations, message", [
    # The block/token paper's base rate 0.3: the last stage would keep a negative count.
    (keep_ratios("base", 0.3), (1, 2, 3), r"stage 3 \(before block 3\): keep ratio -0\.1 is "
                                          r"not in \(0, 1\] \(it would keep -6 of 64"),
    # ... and 0.4, which kept no token at layer 9 in that paper.
    (keep_ratios("base", 0.4), (1, 2, 3), r"stage 3 .*keep ratio 0 is not in \(0, 1\]"),
    # A tiny rho keeps int(64 * 0.01) = 0 tokens at stage 2.
    (keep_ratios("original", 0.1), (1, 2, 3),
     r"stage 2 \(before block 2\): keep ratio 0\.01 keeps int\(64 x 0\.01\) = 0 of 64 patch "
     r"tokens; .* at least 1/64"),
    ((0.5, 0.7, 0.3), (1, 2, 3), r"stage 2 .*exceeds the previous stage's 0\.5"),
    ((0.7, 0.5), (1, 2, 3), r"2 ratios .* for 3 locations"),
    ((0.7, 0.5, 0.3), (0, 2, 3), r"stage 1: pruning location 0 is outside \[1, 3\]"),
    ((0.7, 0.5, 0.3), (1, 2, 4), r"stage 3: pruning location 4 is outside \[1, 3\]"),
    ((0.7, 0.5, 0.3), (1, 3, 2), r"strictly increasing"),
])
def test_invalid_schedules_are_refused(ratios, locations, message):
    with pytest.raises(ValueError, match=message):
        validate(ratios, locations, TINY)
    model = DynamicViT(TINY, DynamicViTConfig(locations=locations, ratios=ratios))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), _images(1))


def test_static_token_pruning_does_not_combine():
    static = dataclasses.replace(TINY, layer_tokens=(65, 40, 30, 20))
    with pytest.raises(ValueError, match="must not prune tokens statically"):
        dynamicvit_gmacs(static, DYN)


# ---------------------------------------------------------------------------------------------
# Parameters and the inference path.


def test_predictor_shapes_and_policy_pooling():
    tokens = jax.random.normal(jax.random.key(0), (3, 64, 32))
    predictor = Predictor()
    params = predictor.init(jax.random.key(1), tokens)
    assert jax.tree.map(jnp.shape, params["params"]) == {
        "in_norm": {"scale": (32,), "bias": (32,)}, "in_fc": {"kernel": (32, 32), "bias": (32,)},
        "out_fc1": {"kernel": (32, 16), "bias": (16,)},
        "out_fc2": {"kernel": (16, 8), "bias": (8,)}, "out_fc3": {"kernel": (8, 2), "bias": (2,)}}
    log_probs = predictor.apply(params, tokens)
    assert log_probs.shape == (3, 64, 2)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-6)
    # With a policy, dropped tokens leave the kept tokens' scores untouched (global pooling is
    # over the kept tokens only), and an all-ones policy is the plain mean.
    policy = (jax.random.uniform(jax.random.key(2), (3, 64)) < 0.5).astype(jnp.float32)
    changed = jnp.where(policy[..., None] > 0, tokens, 100.0 * tokens)
    kept = policy > 0
    np.testing.assert_allclose(predictor.apply(params, tokens, policy)[kept],
                               predictor.apply(params, changed, policy)[kept], atol=1e-6)
    np.testing.assert_allclose(predictor.apply(params, tokens, jnp.ones((3, 64))), log_probs,
                               atol=1e-6)
    # An image whose tokens were all dropped gets finite scores (the original divides 0 by 0).
    assert np.all(np.isfinite(predictor.apply(params, tokens, jnp.zeros((3, 64)))))


@pytest.mark.parametrize("config", [TINY, PRUNED, DISTILLED], ids=["dense", "pruned", "dist"])
def test_parameter_tree_is_the_vits_plus_predictors(config):
    vit_params, model, params = _vit_and_dynamic(config)
    fresh = jax.eval_shape(model.init, jax.random.key(0), _images(1))["params"]
    assert set(fresh) - set(vit_params) == {"predictor_0", "predictor_1", "predictor_2"}
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    assert shapes(_without_predictors(fresh)) == shapes(vit_params)
    assert shapes(params) == shapes(fresh)
    wrong = _vit_params(TINY if config != TINY else PRUNED)
    with pytest.raises(ValueError, match="do not fit DynamicViT"):
        init_from_vit(model, wrong, jax.random.key(0))


@pytest.mark.parametrize("config", [TINY, PRUNED, DISTILLED], ids=["dense", "pruned", "dist"])
def test_keeping_every_token_is_the_vit(config):
    """Ratios 1.0: the inference path only permutes tokens, so it computes the ViT."""
    vit_params, model, params = _vit_and_dynamic(
        config, DynamicViTConfig(locations=(1, 2, 3), ratios=(1.0, 1.0, 1.0)))
    images = _images()
    expected, _ = ViT(config).apply({"params": vit_params}, images)
    logits, aux = model.apply({"params": params}, images)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
    assert [k.shape for k in aux["kept_patches"]] == [(4, 64)] * 3


def test_inference_keeps_the_scheduled_number_of_tokens_per_image():
    _, model, params = _vit_and_dynamic(PRUNED)
    logits, aux = jax.jit(model.apply)({"params": params}, _images())
    assert logits.shape == (4, 10)
    kept = [np.asarray(k) for k in aux["kept_patches"]]
    assert [k.shape for k in kept] == [(4, n) for n in KEEP]
    assert aux["features"].shape == (4, KEEP[-1], 32)
    for image in range(4):
        stages = [set(k[image].tolist()) for k in kept]
        assert [len(s) for s in stages] == list(KEEP)  # distinct patches
        assert stages[2] <= stages[1] <= stages[0]  # a dropped token never comes back
    # Different images keep different tokens: the selection is per image.
    assert len({tuple(sorted(k.tolist())) for k in kept[-1]}) > 1


# ---------------------------------------------------------------------------------------------
# The training path.


def _gathered_reference(config, vit_params, images, decisions, locations):
    """Logits and class-token features of the plain ViT that physically drops, per image, the
    tokens the decisions drop: at the token selection layer of the block before each location
    (its FFN acts per token, so the survivors' values are those DynamicViT's block sees)."""
    prefix = config.num_prefix_tokens
    logits, pre_logits = [], []
    for image in range(images.shape[0]):
        alive = list(range(config.num_tokens))  # original positions of the current sequence
        indices = []
        for layer in range(config.depth):
            if layer + 1 in locations:
                keep = np.asarray(decisions[locations.index(layer + 1)][image]) > 0.5
                survivors = [t for t in alive if t < prefix or keep[t - prefix]]
                indices.append(tuple(alive.index(t) for t in survivors))
                alive = survivors
            else:
                indices.append(tuple(range(len(alive))))
        physical = dataclasses.replace(config, layer_token_indices=tuple(indices))
        out, aux = ViT(physical).apply({"params": vit_params}, images[image:image + 1])
        logits.append(out[0])
        pre_logits.append(aux["pre_logits"][0])
    return np.stack(logits), np.stack(pre_logits)


@pytest.mark.parametrize("config", [TINY, PRUNED], ids=["dense", "pruned"])
def test_training_policy_masks_dropped_tokens_exactly(config):
    vit_params, model, params = _vit_and_dynamic(config)
    images = _images(2)
    logits, aux = model.apply({"params": params}, images, train=True,
                              rngs={"gumbel": jax.random.key(3)})
    decisions = [np.asarray(d) for d in aux["decisions"]]
    kept = [d.sum(axis=1) for d in decisions]
    assert all(np.all((k > 0) & (k < 64)) for k in kept)  # every stage drops and keeps tokens
    assert all(np.all(later <= earlier) for earlier, later in zip(decisions, decisions[1:],
                                                                  strict=False))
    assert np.all((np.abs(decisions[-1]) < 1e-6) | (np.abs(decisions[-1] - 1) < 1e-6))
    expected_logits, expected_cls = _gathered_reference(config, vit_params, images, decisions,
                                                        DYN.locations)
    # Equal up to the original's eps in softmax_with_policy (dropped keys weigh ~1e-6 / N).
    np.testing.assert_allclose(aux["pre_logits"], expected_cls, atol=2e-5)
    np.testing.assert_allclose(logits, expected_logits, atol=2e-5)


def test_ratio_loss_is_zero_at_the_target_and_quadratic_off_it():
    half = jnp.asarray(np.tile([1.0, 0.0], (3, 32)))  # each of 3 images keeps 32 of 64
    quarter = half * jnp.asarray(np.tile([1.0, 1.0, 0.0, 0.0], (3, 16)))
    assert float(ratio_loss([half, quarter], (0.5, 0.25))) == 0.0
    assert float(ratio_loss([half, quarter], (0.7, 0.25))) == pytest.approx(0.2**2 / 2)


def test_token_distillation_is_the_mse_over_kept_tokens():
    rng = np.random.default_rng(0)
    student, teacher = rng.standard_normal((2, 3, 5, 4))
    policy = rng.random((3, 5)) > 0.5
    expected = ((student - teacher)[policy] ** 2).mean()
    assert float(token_distillation_loss(student, teacher, policy.astype(np.float32))) == (
        pytest.approx(expected, rel=1e-6))
    assert float(token_distillation_loss(student, teacher, np.zeros((3, 5)))) == 0.0


def test_loss_trains_the_predictors_in_the_trainers_step():
    from vitjax.training.steps import StepConfig, TrainState, train_step

    _, model, params = _vit_and_dynamic(PRUNED)
    teacher = ViT(TINY)
    loss_fn = dynamicvit_loss(model, teacher)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(3e-3),
                              rng=jax.random.key_data(jax.random.key(0)),
                              frozen=init_params(teacher, jax.random.key(7)))
    step = jax.jit(functools.partial(train_step, config=StepConfig(model=model, num_classes=10),
                                     loss_fn=loss_fn))
    images, labels = _images(8), jnp.arange(8) % 10
    losses = []
    for _ in range(8):
        state, metrics = step(state, images, labels, None)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # Adam moves every parameter whose gradient is not zero: the predictors learn.
    for stage in range(3):
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                             state.params[f"predictor_{stage}"], params[f"predictor_{stage}"])
        assert all(jax.tree.leaves(moved)), stage
    assert set(metrics) >= {"accuracy", "cls_loss", "ratio_loss", "distill", "token_distill",
                            "keep_fraction_0", "keep_fraction_1", "keep_fraction_2"}
    assert 0.0 < float(metrics["keep_fraction_2"]) <= float(metrics["keep_fraction_0"]) < 1.0
    with pytest.raises(ValueError, match="no structural masks"):
        loss_fn(params, state.frozen, {"image": images}, object(), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# FLOPs and export.


@pytest.mark.parametrize("config", [TINY, PRUNED, DISTILLED], ids=["dense", "pruned", "dist"])
def test_gmacs_without_pruning_and_predictors_are_the_vits(config):
    keep_all = DynamicViTConfig(locations=(1, 2, 3), ratios=(1.0, 1.0, 1.0))
    assert dynamicvit_gmacs(config, keep_all) - predictor_gmacs(config, keep_all) == (
        pytest.approx(count_flops(config).total, rel=1e-12))
    assert dynamicvit_gmacs(config, DYN) < count_flops(config).total


@pytest.mark.parametrize("rate, published", [(0.7, 11.5), (0.6, 9.9), (0.5, 8.6), (0.4, 7.4)])
def test_gmacs_of_the_block_token_papers_dynamicvit_b(rate, published):
    """Table 1 of the block/token pruning paper (DyViT-Sub, DeiT-B at 224px, fvcore with the
    predictors): its numbers are those of the original's rho^k schedule."""
    dyn = DynamicViTConfig.from_rate("original", rate)
    assert round(dynamicvit_gmacs(ViTConfig.from_variant("B/16"), dyn), 1) == published


@pytest.mark.parametrize("config", [TINY, PRUNED], ids=["dense", "pruned"])
def test_gmacs_match_xla_matmuls_of_the_compiled_inference(config):
    model = DynamicViT(config, DYN)
    params = jax.eval_shape(model.init, jax.random.key(0), _images(1))["params"]
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(params,
                                                                             images).compile()
    assert xla_matmul_macs(compiled.as_text()) / 2 == pytest.approx(
        dynamicvit_gmacs(config, DYN) * 1e9, rel=1e-9)


def test_export_jax_matches_the_model(tmp_path):
    _, model, params = _vit_and_dynamic(PRUNED)
    summary = export_all(model, params, tmp_path, formats=("jax",), batches=(3,))
    assert summary["formats"]["jax"]["ok"], summary


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime")),
                    reason="the 'export' extra is not installed")
def test_export_onnx_matches_the_model(tmp_path):
    _, model, params = _vit_and_dynamic(TINY)
    summary = export_all(model, params, tmp_path, formats=("onnx",), batches=(3,))
    assert summary["formats"]["onnx"]["ok"], summary


# ---------------------------------------------------------------------------------------------
# The original PyTorch implementation.


def _torch_reference(torch, config, dyn):
    """The inference path of the original VisionTransformerDiffPruning (models/dyvit.py),
    copied down to what a DeiT needs; `init_n` is the model's patch count instead of the
    original's hard-coded 14 * 14."""
    nn = torch.nn

    def batch_index_select(x, idx):  # utils.batch_index_select
        if len(x.size()) == 3:
            B, N, C = x.size()
            N_new = idx.size(1)
            offset = torch.arange(B, dtype=torch.long, device=x.device).view(B, 1) * N
            idx = idx + offset
            return x.reshape(B * N, C)[idx.reshape(-1)].reshape(B, N_new, C)
        raise NotImplementedError

    class Mlp(nn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Attention(nn.Module):
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads = num_heads
            self.scale = (dim // num_heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3, bias=True)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

    class Block(nn.Module):
        def __init__(self, dim, num_heads, hidden):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, num_heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, hidden)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self, patch, in_chans, dim):
            super().__init__()
            self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class PredictorLG(nn.Module):
        def __init__(self, embed_dim=384):
            super().__init__()
            self.in_conv = nn.Sequential(
                nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
            self.out_conv = nn.Sequential(
                nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
                nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
                nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

        def forward(self, x, policy):
            x = self.in_conv(x)
            B, N, C = x.size()
            local_x = x[:, :, :C // 2]
            global_x = (x[:, :, C // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(
                policy, dim=1, keepdim=True)
            x = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
            return self.out_conv(x)

    class VisionTransformerDiffPruning(nn.Module):
        def __init__(self):
            super().__init__()
            d = config.embed_dim
            self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, d))
            self.blocks = nn.ModuleList(
                [Block(d, config.num_heads, config.mlp_dim) for _ in range(config.depth)])
            self.norm = nn.LayerNorm(d, eps=1e-6)
            self.head = nn.Linear(d, config.num_classes)
            self.score_predictor = nn.ModuleList([PredictorLG(d) for _ in dyn.locations])
            self.pruning_loc, self.token_ratio = dyn.locations, dyn.ratios

        def forward(self, x):  # the `not self.training` branch of the original
            B = x.shape[0]
            x = self.patch_embed(x)
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1) + self.pos_embed
            p_count = 0
            init_n = config.num_patches
            prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype, device=x.device)
            for i, blk in enumerate(self.blocks):
                if i in self.pruning_loc:
                    spatial_x = x[:, 1:]
                    pred_score = self.score_predictor[p_count](spatial_x, prev_decision).reshape(
                        B, -1, 2)
                    score = pred_score[:, :, 0]
                    num_keep_node = int(init_n * self.token_ratio[p_count])
                    keep_policy = torch.argsort(score, dim=1, descending=True)[:, :num_keep_node]
                    cls_policy = torch.zeros(B, 1, dtype=keep_policy.dtype, device=x.device)
                    now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
                    x = batch_index_select(x, now_policy)
                    prev_decision = batch_index_select(prev_decision, keep_policy)
                    p_count += 1
                x = blk(x)
            x = self.norm(x)
            return self.head(x[:, 0])

    return VisionTransformerDiffPruning()


def test_released_checkpoint_layout_matches_the_original_pytorch_model():
    torch = pytest.importorskip("torch")
    from vitjax.interop.dynamicvit import load_dynamicvit_torch

    torch.manual_seed(0)
    reference = _torch_reference(torch, TINY, DYN).eval()
    with torch.no_grad():
        # Random weights of a useful scale (predictor scores far apart, so the top-k is not
        # decided by float noise); LayerNorm scales around 1.
        for tensor in reference.parameters():
            tensor.copy_(0.2 * torch.randn_like(tensor))
        for module in reference.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(1.0)
    images = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()

    # The released files wrap the state dict: {'model': ...}.
    params = load_dynamicvit_torch({"model": reference.state_dict()}, TINY, DYN)
    logits, _ = DynamicViT(TINY, DYN).apply({"params": params}, images.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)

    state = dict(reference.state_dict())
    del state["score_predictor.2.out_conv.4.bias"]
    with pytest.raises(ValueError, match="score_predictor.2.out_conv.4.bias"):
        load_dynamicvit_torch(state, TINY, DYN)
    with pytest.raises(ValueError, match="has score predictors \\[0, 1, 2\\]"):
        load_dynamicvit_torch(reference.state_dict(), TINY,
                              DynamicViTConfig(locations=(1, 2), ratios=(0.7, 0.5)))

