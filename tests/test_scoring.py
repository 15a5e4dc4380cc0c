"""HSIC scores against plain numpy, their statistical sanity, chunking, sharding, criteria."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.config import ViTConfig
from vitjax.models.vit import ViT, init_params
from vitjax.pruning.masks import masks_from_ranks
from vitjax.pruning.policy import Policy
from vitjax.scoring import criteria
from vitjax.scoring import hsic as hsic_lib
from vitjax.scoring.scores import (
    ScoreConfig,
    Scores,
    hsic_scores,
    load_ranks,
    load_scores,
    save_scores,
    score_model,
)
from vitjax.scoring.sweep import run_criteria_sweep

TINY = ViTConfig(num_classes=5, image_size=16, patch_size=4, embed_dim=32, depth=2,
                 num_heads=4, mlp_dim=48)


# ---------------------------------------------------------------- numpy reference, Eq. (2)
def np_gaussian(x, sigma):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2)), d2


def np_feature_gram(x, config):
    if config.standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    K, d2 = np_gaussian(x, 1.0)
    if config.sigma_mode == "fixed":
        return np_gaussian(x, config.sigma)[0]
    if config.sigma_mode == "median":
        sigma = np.sqrt(np.median(d2[np.triu_indices(len(x), 1)])) * config.sigma
        return np_gaussian(x, sigma)[0]
    return np.mean([np_gaussian(x, s)[0] for s in config.sigmas], axis=0)


def np_hsic_biased(K, L):
    B = len(K)
    C = np.eye(B) - np.ones((B, B)) / B
    return np.trace(K @ C @ L @ C) / (B - 1) ** 2


def np_hsic_unbiased(K, L):
    B = len(K)
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(B)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((B - 1) * (B - 2))
            - 2 / (B - 2) * one @ Kt @ Lt @ one) / (B * (B - 3))


def np_scores(features, outputs, config):
    features, outputs = np.float64(features), np.float64(outputs)
    if config.output_kernel == "gaussian":
        L = np_gaussian(outputs, config.output_sigma)[0]
    else:
        L = outputs @ outputs.T
    est = np_hsic_biased if config.estimator == "biased" else np_hsic_unbiased
    return np.array([est(np_feature_gram(f, config), L) for f in features])


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("config", [
    ScoreConfig(),
    ScoreConfig.paper(),
    ScoreConfig(estimator="unbiased"),
    ScoreConfig(sigma_mode="median", output_kernel="linear"),
    ScoreConfig(sigma_mode="median", standardize=True, output_kernel="gaussian"),
    ScoreConfig(sigma_mode="multi", estimator="unbiased", output_sigma=0.5),
    ScoreConfig(sigma_mode="fixed", sigma=3.0, output_kernel="linear", estimator="unbiased"),
])
def test_matches_numpy_eq2(config):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, 24, 5)).astype(np.float32) * 0.7
    outputs = softmax(rng.normal(size=(24, 6)) * 2).astype(np.float32)
    got = hsic_scores(jnp.asarray(features), jnp.asarray(outputs), config)
    np.testing.assert_allclose(got, np_scores(features, outputs, config), rtol=2e-4, atol=2e-7)


def test_hsic_of_gram_matrices_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    K, L = np_gaussian(x, 1.0)[0], np_gaussian(y, 1.0)[0]
    Kj = hsic_lib.gaussian_gram(jnp.asarray(x, jnp.float32), 1.0)
    Lj = hsic_lib.gaussian_gram(jnp.asarray(y, jnp.float32), 1.0)
    np.testing.assert_allclose(hsic_lib.hsic(Kj, Lj), np_hsic_biased(K, L), rtol=1e-4)
    np.testing.assert_allclose(hsic_lib.hsic(Kj, Lj, "unbiased"), np_hsic_unbiased(K, L),
                               rtol=1e-3, atol=1e-7)
    C = np.asarray(hsic_lib.centering_matrix(16))
    np.testing.assert_allclose(hsic_lib.center(Lj), C @ np.asarray(Lj) @ C, atol=1e-6)


# ------------------------------------------------------ independence vs dependence, shapes
@pytest.mark.parametrize("shape_name,dim", [("neuron/head [B, N]", 17), ("token [B, d]", 32)])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_independent_near_zero_dependent_large(shape_name, dim, estimator):
    rng = np.random.default_rng(2)
    B = 128
    latent = rng.normal(size=(B, 3))
    outputs = softmax(latent @ rng.normal(size=(3, 10)) * 2)
    dependent = latent @ rng.normal(size=(3, dim)) / np.sqrt(3) + 0.1 * rng.normal(size=(B, dim))
    independent = rng.normal(size=(B, dim))
    features = jnp.asarray(np.stack([dependent, independent]), jnp.float32)
    config = ScoreConfig(sigma_mode="median", estimator=estimator)
    dep, ind = np.asarray(hsic_scores(features, jnp.asarray(outputs, jnp.float32), config))
    # The biased estimator carries an O(1/B) positive offset; the unbiased one is ~0.
    assert dep > (10 if estimator == "biased" else 20) * abs(ind), (shape_name, dep, ind)
    if estimator == "unbiased":
        assert abs(ind) < 3e-4


def test_permutation_of_samples_leaves_scores_unchanged():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(9, 32, 6)).astype(np.float32)
    outputs = softmax(rng.normal(size=(32, 4))).astype(np.float32)
    perm = rng.permutation(32)
    for config in (ScoreConfig(sigma_mode="median"), ScoreConfig(estimator="unbiased")):
        a = hsic_scores(jnp.asarray(features), jnp.asarray(outputs), config)
        b = hsic_scores(jnp.asarray(features[:, perm]), jnp.asarray(outputs[perm]), config)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------ chunking and sharding
def test_chunked_equals_unchunked():
    rng = np.random.default_rng(4)
    features = jnp.asarray(rng.normal(size=(23, 16, 5)), jnp.float32)
    outputs = jnp.asarray(softmax(rng.normal(size=(16, 3))), jnp.float32)
    for mode in ("fixed", "median", "multi"):
        whole = hsic_scores(features, outputs, ScoreConfig(sigma_mode=mode))
        # 1 byte: one feature per step; 5000 bytes: uneven chunks with a remainder.
        for chunk_bytes in (1, 5000):
            cfg = ScoreConfig(sigma_mode=mode, chunk_bytes=chunk_bytes)
            np.testing.assert_allclose(hsic_scores(features, outputs, cfg), whole, rtol=1e-6)


@pytest.mark.parametrize("mesh_shape,axes", [((8,), ("data",)), ((4, 2), ("data", "model"))])
def test_sharded_equals_single_device(mesh_shape, axes):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: run through tests/conftest.py")
    mesh = jax.make_mesh(mesh_shape, axes)
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(29, 16, 5)), jnp.float32)  # 29: padded to 32
    outputs = jnp.asarray(softmax(rng.normal(size=(16, 3))), jnp.float32)
    single = hsic_scores(features, outputs, ScoreConfig(estimator="unbiased"))
    sharded = hsic_scores(features, outputs,
                          ScoreConfig(estimator="unbiased", mesh=mesh, chunk_bytes=3000))
    assert sharded.shape == (29,)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-8)


# -------------------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def tiny_model():
    model = ViT(TINY)
    params = init_params(model, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (12, 16, 16, 3))
    return model, params, images


def test_score_model_shapes_features_and_sharding(tiny_model):
    model, params, images = tiny_model
    config = ScoreConfig(sigma_mode="median")
    scores = score_model(model, params, images, config=config)
    L, N = TINY.depth, TINY.num_tokens
    assert scores.head.shape == (L, 4) and scores.neuron.shape == (L, 48)
    assert scores.token.shape == (L, N)
    assert all(np.isfinite(np.asarray(s)).all() for s in (scores.head, scores.neuron,
                                                           scores.token))
    # The scores are those of the paper's features: neuron j of layer 1 -> [B, N].
    logits, aux = model.apply({"params": params}, images)
    probs = np.asarray(jax.nn.softmax(logits))
    neuron = np.moveaxis(np.asarray(aux["blocks"][1]["ffn_hidden"]), -1, 0)
    head = np.moveaxis(np.asarray(aux["blocks"][0]["attn_heads"]).mean(-1), -1, 0)
    token = np.moveaxis(np.asarray(aux["blocks"][1]["tokens"]), 1, 0)
    np.testing.assert_allclose(scores.neuron[1], np_scores(neuron, probs, config), rtol=2e-3,
                               atol=1e-7)
    np.testing.assert_allclose(scores.head[0], np_scores(head, probs, config), rtol=2e-3,
                               atol=1e-7)
    np.testing.assert_allclose(scores.token[1], np_scores(token, probs, config), rtol=2e-3,
                               atol=1e-7)

    mesh = jax.make_mesh((8,), ("data",))
    sharded = score_model(model, params, images,
                          config=dataclasses.replace(config, mesh=mesh, chunk_bytes=1))
    for a, b in zip(jax.tree.leaves(scores), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)

    # Both token selection modes come out of the scores.
    keep = Policy.uniform(L, neuron=0.5, head=0.25, token=0.5).keep_counts(TINY)
    static = masks_from_ranks(TINY, scores.ranks(), keep, "static")
    assert static.token.shape == (L, N) and static.token[:, 0].all()
    assert int(static.token[-1].sum()) == keep.token[-1]
    assert int(static.neuron[0].sum()) == 24 and int(static.head[0].sum()) == 3
    # the kept neurons are the top scored ones
    top = np.argsort(-np.asarray(scores.neuron[0]))[:24]
    assert set(np.flatnonzero(np.asarray(static.neuron[0]))) == set(top)
    dynamic = masks_from_ranks(TINY, Scores(scores.head, scores.neuron).ranks(), keep,
                               "attention")
    assert dynamic.token_keep.shape == (L,)


def test_scores_round_trip(tmp_path):
    scores = Scores(jnp.arange(8.0).reshape(2, 4), jnp.ones((2, 6)), None)
    save_scores(str(tmp_path / "scores.npz"), scores)
    loaded = load_scores(str(tmp_path / "scores.npz"))
    np.testing.assert_array_equal(loaded.head, scores.head)
    assert loaded.token is None
    ranks = load_ranks(str(tmp_path / "scores.npz"))
    np.testing.assert_array_equal(ranks.head, [[3, 2, 1, 0], [3, 2, 1, 0]])
    # Ranks alone (what the supernet stores) in the same format, read by the same reader.
    save_scores(str(tmp_path / "ranks.npz"), ranks=ranks)
    np.testing.assert_array_equal(load_ranks(str(tmp_path / "ranks.npz")).neuron, ranks.neuron)
    with pytest.raises(ValueError, match="no scores"):
        load_scores(str(tmp_path / "ranks.npz"))


def test_criteria(tiny_model):
    model, params, images = tiny_model
    mag = criteria.magnitude_neuron_scores(params, TINY)
    fc1 = np.asarray(params["blocks_1"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_allclose(mag[1], np.linalg.norm(fc1, axis=0), rtol=1e-6)
    both = criteria.magnitude_neuron_scores(params, TINY, which="both", ord=1)
    assert both.shape == (2, 48)
    _, aux = model.apply({"params": params}, images)
    heads = np.asarray(aux["blocks"][0]["attn_heads"])
    np.testing.assert_allclose(criteria.spatten_head_scores(aux)[0],
                               np.abs(heads).sum(-1).mean((0, 1)), rtol=1e-5)
    assert criteria.class_attention_scores(aux).shape == (2, TINY.num_tokens)
    rand = criteria.random_scores(TINY, jax.random.key(0))
    assert rand.neuron.shape == (2, 48) and rand.token.shape == (2, TINY.num_tokens)


def test_sweep_writes_table_and_plot(tiny_model, tmp_path):
    model, params, images = tiny_model
    labels = jnp.arange(12) % 5
    from vitjax.evaluate import array_batches
    from vitjax.parallel import make_mesh

    rows = run_criteria_sweep(model, params, images, lambda: array_batches(images, labels, 8),
                              make_mesh({"data": 2}), str(tmp_path), ratios=(0.0, 0.5))
    assert len(rows) == 3 * 3 * 2
    dense = {r["accuracy"] for r in rows if r["ratio"] == 0.0}
    assert len(dense) == 1  # ratio 0 is the dense model whatever the criterion
    for name in ("fig1.md", "fig1.csv", "fig1.json", "fig1.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="sigma_mode"):
        ScoreConfig(sigma_mode="silverman")
    with pytest.raises(ValueError, match="estimator"):
        ScoreConfig(estimator="debiased")
    with pytest.raises(ValueError, match="batch"):
        hsic_scores(jnp.zeros((2, 3, 4)), jnp.zeros((3, 2)), ScoreConfig(estimator="unbiased"))
    with pytest.raises(ValueError, match="num_features, batch, dim"):
        hsic_scores(jnp.zeros((3, 4)), jnp.zeros((3, 2)))
