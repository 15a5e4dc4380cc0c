"""Attention implementations: the fused path (jax.nn.dot_product_attention) against the explicit
einsum path and numpy, key masks, the class-token row, bfloat16 under jit, remat policies."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY, perturbed  # noqa: I001  (tests/ is on sys.path)

from vitjax.interop import load_timm
from vitjax.models import Masks, ViT, ViTConfig, init_params
from vitjax.models import vit as vit_lib
from vitjax.pruning import Policy, Ranks, policy_masks, ranks_from_scores
from vitjax.pruning.prune import prune_params

FIXTURES = Path(__file__).parent / "fixtures" / "timm"


def _setup(config=TINY, seed=0, batch=3):
    _, params, images = perturbed(config, seed, batch)
    return params, images


def _ranks(config, seed):
    rng = np.random.default_rng(seed)
    return Ranks(
        head=ranks_from_scores(rng.normal(size=(config.depth, config.num_heads))),
        neuron=ranks_from_scores(rng.normal(size=(config.depth, config.mlp_dim))),
        token=ranks_from_scores(rng.normal(size=(config.depth, config.num_tokens))),
    )


def _numpy_attention(q, k, v, alive):
    """softmax(q k^T) v per head in float64; q, k, v [B, N, H, dh], alive [B, N] or None."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    if alive is not None:
        logits = np.where(np.asarray(alive)[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v), probs


def _qkv(seed=0, batch=2, n=9, heads=3, dh=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (batch, n, heads, dh)) for key in keys]


def test_auto_keeps_the_explicit_path_on_cpu_and_bad_choices_are_refused(tiny_vit):
    assert vit_lib.resolve_attention("auto", jnp.float32, 64) == "explicit"
    assert vit_lib.resolve_attention("auto", jnp.bfloat16, 64) == "explicit"
    assert vit_lib.resolve_attention("xla", jnp.float32, 64) == "xla"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        vit_lib.resolve_attention("cudnn", jnp.float32, 64)
    _, params, images = tiny_vit
    with pytest.raises(ValueError, match="attention='flash'"):
        ViT(TINY, attention="flash").apply({"params": params}, images)
    with pytest.raises(ValueError, match="remat_policy='most'"):
        ViT(TINY, remat=True, remat_policy="most").apply({"params": params}, images)


def test_fused_attention_matches_numpy_and_honours_key_masks():
    q, k, v = _qkv()
    alive = np.ones((2, 9), bool)
    alive[0, [3, 7]] = False
    alive[1, 5] = False
    for mask in (None, alive):
        got = vit_lib.fused_attention(q, k, v, None if mask is None else jnp.asarray(mask), "xla")
        want, _ = _numpy_attention(q, k, v, mask)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # A dead key has no influence: garbage in its key and value leaves every output unchanged.
    k_bad = k.at[0, 3].set(1e4).at[1, 5].set(-1e4)
    v_bad = v.at[0, 7].set(1e4)
    base = vit_lib.fused_attention(q, k, v, jnp.asarray(alive), "xla")
    perturbed = vit_lib.fused_attention(q, k_bad, v_bad, jnp.asarray(alive), "xla")
    np.testing.assert_array_equal(base, perturbed)
    # A [1, N] mask (static token positions) broadcasts over the batch.
    shared = vit_lib.fused_attention(q, k, v, jnp.asarray(alive[:1]), "xla")
    want, _ = _numpy_attention(q, k, v, np.broadcast_to(alive[:1], (2, 9)))
    np.testing.assert_allclose(shared, want, atol=1e-5, rtol=1e-5)


def test_class_token_row_is_row_zero_of_the_full_matrix():
    q, k, v = _qkv(seed=1)
    alive = np.ones((2, 9), bool)
    alive[:, [2, 4]] = False
    for mask in (None, alive):
        row = vit_lib.class_attention(q[:, 0], k, None if mask is None else jnp.asarray(mask))
        _, probs = _numpy_attention(q, k, v, mask)
        assert row.shape == (2, 3, 9) and row.dtype == jnp.float32
        np.testing.assert_allclose(row, probs[:, :, 0, :], atol=1e-6)
    dead = vit_lib.class_attention(q[:, 0], k, jnp.asarray(alive))[..., 2]
    assert float(jnp.abs(dead).max()) == 0


@pytest.mark.parametrize("distilled", [False, True])
def test_fused_model_equals_explicit_model_in_float32(distilled):
    config = ViTConfig(**{**TINY.to_dict(), "distilled": distilled})
    params, images = _setup(config, seed=3)
    ranks = _ranks(config, seed=4)
    policy = Policy(neuron=(0.5, 0.0, 0.8), head=(0.25, 0.5, 0.0), token=(0.3, 0.0, 0.5))
    cases = {
        "dense": None,
        "static": policy_masks(config, policy, ranks, "static"),
        "attention": policy_masks(config, policy, ranks, "attention"),
    }
    for name, masks in cases.items():
        explicit, aux_e = ViT(config, attention="explicit").apply({"params": params}, images, masks)
        fused, aux_f = ViT(config, attention="xla").apply({"params": params}, images, masks)
        np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5, err_msg=name)
        for block_e, block_f in zip(aux_e["blocks"], aux_f["blocks"], strict=True):
            np.testing.assert_allclose(block_f["cls_attn"], block_e["cls_attn"], atol=1e-6)
            np.testing.assert_allclose(block_f["attn_heads"], block_e["attn_heads"], atol=1e-5)
            if "alive" in block_e:  # per-image token selection picks exactly the same tokens
                np.testing.assert_array_equal(block_f["alive"], block_e["alive"])


@pytest.mark.parametrize("token_mode", ["static", "attention"])
def test_fused_masked_supernet_equals_fused_pruned_model(token_mode):
    params, images = _setup(seed=5)
    ranks = _ranks(TINY, seed=6)
    policy = Policy(neuron=(0.5, 1.0, 0.2), head=(0.25, 0.0, 0.5), token=(0.4, 0.2, 0.5))
    masks = policy_masks(TINY, policy, ranks, token_mode)
    masked, _ = ViT(TINY, attention="xla").apply({"params": params}, images, masks)
    pruned_config, pruned_params = prune_params(TINY, params, policy, ranks, token_mode)
    pruned, _ = ViT(pruned_config, attention="xla").apply({"params": pruned_params}, images)
    np.testing.assert_allclose(masked, pruned, atol=1e-5, rtol=1e-5)


def test_fused_training_gradients_equal_explicit_ones():
    params, images = _setup(seed=7)
    masks = policy_masks(TINY, Policy(neuron=(0.3,) * 3, head=(0.25,) * 3, token=(0.3,) * 3),
                         _ranks(TINY, seed=8), "attention")

    def grads(attention):
        model = ViT(TINY, attention=attention)

        def loss(p):
            logits, _ = model.apply({"params": p}, images, masks, train=True)
            return (logits**2).mean()

        return jax.grad(loss)(params)

    for a, b in zip(jax.tree.leaves(grads("explicit")), jax.tree.leaves(grads("xla")), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_dropped_token_has_no_influence_on_the_fused_path():
    import flax.linen as nn

    params, images = _setup(seed=9)
    token = np.ones((TINY.depth, TINY.num_tokens), np.float32)
    token[1:, 5] = 0
    masks = Masks(token=jnp.asarray(token))
    model = ViT(TINY, attention="xla")
    base, _ = model.apply({"params": params}, images, masks)

    def garbage_into_block_2(next_fun, args, kwargs, context):
        if context.module.name == "blocks_2" and context.method_name == "__call__":
            x, *rest = args
            args = (x.at[:, 5].set(1e3), *rest)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(garbage_into_block_2):
        perturbed, _ = model.apply({"params": params}, images, masks)
    np.testing.assert_array_equal(base, perturbed)


def test_bfloat16_under_jit_on_the_fused_path():
    params, images = _setup(seed=10)
    reference, _ = ViT(TINY, attention="explicit").apply({"params": params}, images)
    masks = policy_masks(TINY, Policy(neuron=(0.2,) * 3, head=(0.25,) * 3, token=(0.3,) * 3),
                         _ranks(TINY, seed=11), "attention")
    for attention in ("xla", "explicit"):
        model = ViT(TINY, dtype=jnp.bfloat16, attention=attention)

        @jax.jit
        def forward(p, x, m, model=model):
            logits, aux = model.apply({"params": p}, x, m)
            return logits, aux["blocks"][0]["attn_heads"], aux["blocks"][0]["cls_attn"]

        logits, heads, cls_attn = forward(params, images, None)
        assert logits.dtype == jnp.float32 and heads.dtype == jnp.bfloat16
        assert cls_attn.dtype == jnp.float32  # softmax in float32 whatever the compute dtype
        # bfloat16 rounds to ~3 significant digits: ~1% of the logits' scale, not more.
        scale = float(np.abs(reference).max())
        assert scale > 0.3
        np.testing.assert_allclose(logits, reference, rtol=0, atol=0.04 * scale)
        masked, _, _ = forward(params, images, masks)
        assert np.isfinite(np.asarray(masked)).all()

        def loss(p, model=model):
            return (model.apply({"params": p}, images, masks, train=True)[0] ** 2).mean()

        grads = jax.jit(jax.grad(loss))(params)
        # Parameters stay float32, and so do their gradients.
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_cudnn_wrapper_pads_to_even_length_and_passes_a_full_bias_shaped_mask(monkeypatch):
    """cuDNN cannot run here; what vitjax hands it can be checked: the conditions cuDNN sets
    for a masked call (a [B, 1, T, S] mask, even T and S) hold, and after padding and slicing
    the result equals the reference."""
    original = jax.nn.dot_product_attention
    calls = []

    def fake_cudnn(q, k, v, bias=None, mask=None, *, scale=None, implementation=None):
        assert implementation == "cudnn"
        b, t = q.shape[:2]
        if mask is not None:
            assert mask.shape == (b, 1, t, k.shape[1]) and t % 2 == 0
        calls.append(q.shape)
        return original(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    q, k, v = _qkv(seed=2)  # 9 tokens: odd
    alive = np.ones((2, 9), bool)
    alive[1, [1, 6]] = False
    got = vit_lib.fused_attention(q, k, v, jnp.asarray(alive), "cudnn")
    want, _ = _numpy_attention(q, k, v, alive)
    assert got.shape == q.shape and calls == [(2, 10, 3, 8)]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    unmasked = vit_lib.fused_attention(q, k, v, None, "cudnn")
    np.testing.assert_allclose(unmasked, _numpy_attention(q, k, v, None)[0], atol=1e-5)


def test_fused_path_reproduces_timm_golden_logits():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["cases"]
    for case in ("deit_c1000_64px", "deit_distilled_c10_32px"):
        entry = manifest[case]
        golden = np.load(FIXTURES / entry["io"])
        model, params = load_timm(FIXTURES / entry["checkpoint"], **entry["load"])
        with jax.default_matmul_precision("highest"):
            logits, _ = jax.jit(model.clone(attention="xla").apply)({"params": params},
                                                                   golden["images"])
        np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=1e-5, err_msg=case)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(policy):
    params, images = _setup(seed=12)

    def grads(model):
        def loss(p):
            logits, _ = model.apply({"params": p}, images, train=True,
                                    rngs={"dropout": jax.random.key(1)})
            return (logits**2).mean()

        return jax.jit(jax.grad(loss))(params)

    plain = grads(ViT(TINY, drop_path_rate=0.2, attention="xla"))
    remat = grads(ViT(TINY, drop_path_rate=0.2, attention="xla", remat=True, remat_policy=policy))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_dynamicvit_inference_path_takes_the_attention_option():
    from vitjax.dynamicvit import DynamicViT, DynamicViTConfig, init_from_vit

    config = ViTConfig(num_classes=5, image_size=32, patch_size=8, embed_dim=32, depth=3,
                       num_heads=4, mlp_dim=48)
    dyn = DynamicViTConfig(locations=(1, 2), ratios=(0.75, 0.5))
    params = init_from_vit(DynamicViT(config, dyn), init_params(ViT(config), jax.random.key(0)),
                           jax.random.key(1))
    images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    explicit, aux_e = DynamicViT(config, dyn, attention="explicit").apply({"params": params},
                                                                          images)
    fused, aux_f = DynamicViT(config, dyn, attention="xla").apply({"params": params}, images)
    np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
    for a, b in zip(aux_e["kept_patches"], aux_f["kept_patches"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_path_on_register_token_gap_models():
    """DeiT-III / register-token families (no class token, LayerScale, average pooling): the
    fused path equals the explicit one, dense and with static token masks."""
    config = ViTConfig(num_classes=5, image_size=32, patch_size=8, embed_dim=32, depth=3,
                       num_heads=4, mlp_dim=48, class_token=False, reg_tokens=2,
                       no_embed_class=True, layer_scale=True, global_pool="avg", fc_norm=True)
    params, images = _setup(config, seed=13)
    token = np.ones((config.depth, config.num_tokens), np.float32)
    token[1:, [4, 9]] = 0
    for masks in (None, Masks(token=jnp.asarray(token))):
        explicit, _ = ViT(config, attention="explicit").apply({"params": params}, images, masks)
        fused, _ = ViT(config, attention="xla").apply({"params": params}, images, masks)
        np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
