"""ViT/DeiT model: masks, exactness of masked vs physically pruned models, compilation count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY, perturbed  # noqa: I001  (tests/ is on sys.path)

from vitjax.models import Masks, ViT, ViTConfig
from vitjax.pruning import Policy, Ranks, masks_from_ranks, policy_masks, ranks_from_scores
from vitjax.pruning.prune import prune_params

_setup = perturbed  # (ViT, params with non-trivial biases and head, images)


def _random_ranks(config, seed):
    rng = np.random.default_rng(seed)
    L = config.depth
    return Ranks(
        head=ranks_from_scores(rng.normal(size=(L, config.num_heads))),
        neuron=ranks_from_scores(rng.normal(size=(L, config.mlp_dim))),
        token=ranks_from_scores(rng.normal(size=(L, config.num_tokens))),
    )


@pytest.mark.parametrize("distilled", [False, True])
def test_all_ones_masks_give_the_dense_model_exactly(distilled):
    config = ViTConfig(**{**TINY.to_dict(), "distilled": distilled})
    model, params, images = _setup(config)
    dense, _ = model.apply({"params": params}, images)
    L, N = config.depth, config.num_tokens
    ones = Masks(
        head=jnp.ones((L, config.num_heads)), neuron=jnp.ones((L, config.mlp_dim)),
        token=jnp.ones((L, N)),
    )
    masked, _ = model.apply({"params": params}, images, ones)
    np.testing.assert_array_equal(dense, masked)
    keep_all = Masks(head=ones.head, neuron=ones.neuron, token_keep=jnp.full((L,), N))
    masked, _ = model.apply({"params": params}, images, keep_all)
    np.testing.assert_array_equal(dense, masked)
    assert dense.shape == (3, 7)


@pytest.mark.parametrize("token_mode", ["static", "attention"])
@pytest.mark.parametrize("distilled", [False, True])
def test_masked_supernet_equals_physically_pruned_model(token_mode, distilled):
    config = ViTConfig(**{**TINY.to_dict(), "distilled": distilled})
    model, params, images = _setup(config, seed=3)
    ranks = _random_ranks(config, seed=4)
    policy = Policy(neuron=(0.5, 0.0, 0.8), head=(0.25, 0.5, 0.0), token=(0.3, 0.0, 0.5))
    masks = policy_masks(config, policy, ranks, token_mode)
    masked, _ = model.apply({"params": params}, images, masks)
    pruned_config, pruned_params = prune_params(config, params, policy, ranks, token_mode)
    pruned, aux = ViT(pruned_config).apply({"params": pruned_params}, images)
    np.testing.assert_allclose(masked, pruned, atol=1e-5, rtol=1e-5)
    # The pruned model really is smaller: fewer tokens reach the last FFN.
    assert aux["blocks"][-1]["ffn_hidden"].shape[1] == policy.keep_counts(config).token[-1]
    assert pruned_config.num_params() == sum(x.size for x in jax.tree.leaves(pruned_params))


def test_removing_every_head_or_neuron_removes_the_sub_block():
    model, params, images = _setup(seed=5)
    ranks = _random_ranks(TINY, seed=6)
    policy = Policy(neuron=(0.0, 1.0, 0.0), head=(1.0, 0.0, 0.0), token=(0.0, 0.0, 0.0))
    masked, _ = model.apply({"params": params}, images, policy_masks(TINY, policy, ranks))
    pruned_config, pruned_params = prune_params(TINY, params, policy, ranks)
    assert "attn" not in pruned_params["blocks_0"] and "mlp" not in pruned_params["blocks_1"]
    pruned, _ = ViT(pruned_config).apply({"params": pruned_params}, images)
    np.testing.assert_allclose(masked, pruned, atol=1e-5, rtol=1e-5)


def test_dropped_token_has_no_influence_downstream():
    """Garbage written into a token after it was dropped must not move the logits."""
    import flax.linen as nn

    model, params, images = _setup(seed=7)
    L, N = TINY.depth, TINY.num_tokens
    token = np.ones((L, N), np.float32)
    token[1:, 5] = 0  # token 5 dropped by block 1's token selection layer
    token[2:, 9] = 0
    masks = Masks(token=jnp.asarray(token))
    base, aux = model.apply({"params": params}, images, masks)
    assert not bool(aux["blocks"][2]["alive"][:, 5].any())

    def garbage_into_block_2(next_fun, args, kwargs, context):
        if context.module.name == "blocks_2" and context.method_name == "__call__":
            x, *rest = args
            args = (x.at[:, 5].set(1e3), *rest)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(garbage_into_block_2):
        perturbed, _ = model.apply({"params": params}, images, masks)
    np.testing.assert_array_equal(base, perturbed)
    masks_live = Masks(token=jnp.ones((L, N)))
    with nn.intercept_methods(garbage_into_block_2):
        live, _ = model.apply({"params": params}, images, masks_live)
    assert not np.allclose(live, model.apply({"params": params}, images, masks_live)[0])


def test_one_compilation_serves_every_policy():
    model, params, images = _setup(seed=8)
    ranks = _random_ranks(TINY, seed=9)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, images, keep):
        return model.apply({"params": params}, images, masks_from_ranks(TINY, ranks, keep))[0]

    rng = np.random.default_rng(0)
    outputs = []
    for _ in range(4):
        policy = Policy.from_vector(rng.uniform(0, 0.7, 3 * TINY.depth))
        outputs.append(forward(params, images, policy.keep_counts(TINY)))
    assert not np.allclose(outputs[0], outputs[1])


def test_drop_path_and_compute_dtype(tiny_vit):
    config = TINY
    model = ViT(config, drop_path_rate=0.5)
    _, params, images = tiny_vit
    eval_a, _ = model.apply({"params": params}, images)
    eval_b, _ = model.apply({"params": params}, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train, _ = model.apply(
        {"params": params}, images, train=True, rngs={"dropout": jax.random.key(0)}
    )
    assert not np.allclose(train, eval_a)
    bf16, _ = ViT(config, dtype=jnp.bfloat16).apply({"params": params}, images)
    assert bf16.dtype == jnp.float32
    # bfloat16 rounds to ~3 significant digits: ~1% of the logits' scale here, not more.
    scale = float(np.abs(eval_a).max())
    assert scale > 0.3
    np.testing.assert_allclose(bf16, eval_a, rtol=0, atol=0.04 * scale)


def test_headless_model_returns_features_and_bad_input_is_refused():
    config = ViTConfig(**{**TINY.to_dict(), "num_classes": 0})
    model, params, images = _setup(config)
    features, aux = model.apply({"params": params}, images)
    assert features.shape == (3, config.embed_dim)
    assert "head" not in params
    with pytest.raises(ValueError, match="expects"):
        model.apply({"params": params}, images[:, :16])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)


def test_aux_exposes_what_scoring_needs(tiny_vit):
    model, params, images = tiny_vit
    _, aux = model.apply({"params": params}, images)
    block = aux["blocks"][0]
    N, H, dh = TINY.num_tokens, TINY.num_heads, TINY.dim_per_head
    assert block["attn_heads"].shape == (3, N, H, dh)
    assert block["cls_attn"].shape == (3, H, N)
    np.testing.assert_allclose(block["cls_attn"].sum(-1), 1.0, rtol=1e-5)
    assert block["tokens"].shape == (3, N, TINY.embed_dim)
    assert block["ffn_hidden"].shape == (3, N, TINY.mlp_dim)


def test_remat_gives_the_same_gradients():
    model, params, images = _setup(seed=11)
    remat_model = ViT(TINY, drop_path_rate=0.2, remat=True)
    model = ViT(TINY, drop_path_rate=0.2)

    def grads(m):
        def loss(p):
            logits, _ = m.apply({"params": p}, images, train=True,
                                rngs={"dropout": jax.random.key(1)})
            return (logits**2).mean()
        return jax.grad(loss)(params)

    pairs = zip(jax.tree.leaves(grads(model)), jax.tree.leaves(grads(remat_model)), strict=True)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_headless_distilled_model_averages_both_prefix_tokens():
    config = ViTConfig(**{**TINY.to_dict(), "num_classes": 0, "distilled": True})
    model, params, images = _setup(config)
    # timm's VisionTransformerDistilled with num_classes=0 returns the mean of the normalised
    # class and distillation tokens, not the class token alone (aux['pre_logits']).
    features, aux = model.apply({"params": params}, images)
    assert features.shape == (3, config.embed_dim)
    assert not np.allclose(features, aux["pre_logits"], atol=1e-3)
