"""Closed-form GMACs: published numbers, XLA's own count of the compiled model, relaxation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models import ViT, ViTConfig, init_params
from vitjax.pruning import Policy, count_flops, count_flops_batch, relaxed_gmacs
from vitjax.pruning.flops import xla_matmul_macs


@pytest.mark.parametrize("variant, published", [("Ti/16", 1.3), ("S/16", 4.6), ("B/16", 17.6)])
def test_published_deit_gmacs(variant, published):
    flops = count_flops(ViTConfig.from_variant(variant))
    assert round(flops.total, 1) == published


def test_paper_table_breakdown_for_deit_s_and_b():
    s = count_flops(ViTConfig.from_variant("S/16"))
    assert (round(s.attention, 2), round(s.mhsa_projections, 2), round(s.ffn, 2)) == (
        0.36, 1.39, 2.79)
    b = count_flops(ViTConfig.from_variant("B/16"))
    assert (round(b.attention, 2), round(b.mhsa_projections, 2), round(b.ffn, 2)) == (
        0.72, 5.58, 11.15)
    assert round(b.blocks, 1) == 17.4  # the paper's "17.5G" total leaves out stem and head


def _xla_macs(config):
    model = ViT(config)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, 3), jnp.float32)
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(params,
                                                                             images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return xla_matmul_macs(compiled.as_text()) / 2, cost["flops"] / 2 / 2


BASE = ViTConfig(num_classes=10, image_size=32, patch_size=4, embed_dim=96, depth=3,
                 num_heads=4, mlp_dim=384)


@pytest.mark.parametrize(
    "config",
    [
        BASE,
        ViTConfig(**{**BASE.to_dict(), "distilled": True, "num_classes": 5}),
        # Physically smaller: per-layer heads, FFN sizes and token counts (top-k by attention).
        ViTConfig(**{**BASE.to_dict(), "layer_heads": (4, 1, 3), "layer_mlp_dims": (384, 50, 7),
                     "layer_tokens": (65, 30, 11)}),
        ViTConfig(**{**BASE.to_dict(), "layer_heads": (0, 2, 4), "layer_mlp_dims": (0, 50, 384),
                     "layer_token_indices": (tuple(range(0, 65, 2)), (0, 3, 5, 7), (0, 1))}),
    ],
)
def test_closed_form_matches_xla_cost_analysis(config):
    ours = count_flops(config).total * 1e9  # per image
    matmul_macs, all_flops_as_macs = _xla_macs(config)
    # Every matrix product XLA runs, counted from the optimised HLO, equals the closed form.
    assert matmul_macs == pytest.approx(ours, rel=1e-9)
    # XLA's total also counts elementwise work (LayerNorm, GELU, softmax, adds): a little more.
    assert ours <= all_flops_as_macs <= 1.25 * ours


def test_policy_flops_equal_the_pruned_architecture_and_batch_form():
    config = ViTConfig.from_variant("S/16")
    policy = Policy.from_vector(np.random.default_rng(0).uniform(0, 0.6, 36))
    direct = count_flops(config, policy).total
    assert direct == pytest.approx(count_flops(policy.pruned_config(config)).total)
    assert direct == pytest.approx(count_flops_batch(config, policy.to_vector()[None])[0])
    assert direct < count_flops(config).total


def test_relaxation_is_differentiable_and_exact_on_integral_counts():
    config = ViTConfig.from_variant("S/16")
    # Ratios whose kept counts are integers: no rounding, relaxation == exact count.
    policy = Policy.uniform(12, neuron=0.5, head=0.5, token=0.0)
    assert float(relaxed_gmacs(config, policy.to_vector())) == pytest.approx(
        count_flops(config, policy).total, rel=1e-6)
    grad = jax.grad(lambda v: relaxed_gmacs(config, v))(jnp.asarray(policy.to_vector()))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) <= 0)
    # Token pruning early saves more than late.
    assert grad[24] < grad[35]
