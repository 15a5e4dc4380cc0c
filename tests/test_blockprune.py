"""Block movement pruning: straight-through masks, the movement signal through vit.py's masks,
the regulariser and the top-k schedule, FLOPs-budgeted thresholds, masked == pruned logits."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitjax.blockprune import (
    MovementConfig,
    init_scores,
    keep_fraction,
    learned_scores,
    movement_frozen,
    movement_init_fn,
    movement_loss,
    movement_masks,
    policy_from_keep_counts,
    prune_movement,
    threshold_to_budget,
)
from vitjax.models import ViT, ViTConfig
from vitjax.pruning import KeepCounts, count_flops, masks_from_ranks

TINY = ViTConfig(
    num_classes=5, image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_dim=64
)
L = TINY.depth


@functools.cache
def _params(seed=0):
    """Dense parameters, drawn on the host (a jitted init costs seconds of compilation): normal
    weights and biases (non-zero, so a wrong slice or a lost bias shows up), LayerNorm scales
    around 1."""
    shapes = jax.eval_shape(
        lambda key: ViT(TINY).init(key, jnp.zeros((1, 16, 16, 3)))["params"], jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        center = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(center + 0.1 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _images(seed=2, batch=8):
    return jax.random.normal(jax.random.key(seed), (batch, 16, 16, 3))


def _random_scores(blocks, seed):
    rng = np.random.default_rng(seed)
    return {"head": rng.normal(size=(L, TINY.num_heads)).astype(np.float32),
            "neuron": rng.normal(size=(L, blocks)).astype(np.float32)}


def _batch(images, logits):
    """Soft targets from a teacher's logits: the student is pulled toward the teacher."""
    target = jax.nn.softmax(logits)
    return {"image": images, "target": target, "label": jnp.argmax(target, axis=-1)}


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    (dict(neuron_block=0), "neuron_block"), (dict(mode="hard"), "mode"),
    (dict(threshold=1.0), "threshold"), (dict(final_keep=0.0), "final_keep"),
    (dict(total_steps=10, warmup_steps=6, cooldown_steps=4), "total_steps"),
    (dict(reg_weight=-1.0), "reg_weight"), (dict(score_lr_scale=0.0), "score_lr_scale"),
])
def test_invalid_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        MovementConfig(**fields)


def test_neuron_block_must_divide_the_mlp_width():
    with pytest.raises(ValueError, match="does not divide the MLP width 64"):
        init_scores(TINY, MovementConfig(neuron_block=5))
    with pytest.raises(ValueError, match="already pruned"):
        init_scores(dataclasses.replace(TINY, layer_heads=(1, 2)), MovementConfig())


def test_score_shapes_and_the_trainable_tree():
    mcfg = MovementConfig(neuron_block=4, init_score=0.7, score_lr_scale=10.0)
    scores = init_scores(TINY, mcfg)
    assert scores["head"].shape == (L, 4) and scores["neuron"].shape == (L, 16)
    assert scores["head"].dtype == jnp.float32 and float(scores["neuron"][1, 5]) == np.float32(0.7)
    shapes = jax.eval_shape(movement_init_fn(None, TINY, mcfg), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, shapes["vit"]) == jax.tree.map(
        lambda a: a.shape, _params())
    params = _params()
    tree = movement_init_fn(params, TINY, mcfg)(None)
    assert tree["vit"] is params
    # Stored divided by score_lr_scale; learned_scores gives the scores back.
    np.testing.assert_allclose(tree["scores"]["neuron"], 0.07, rtol=1e-6)
    np.testing.assert_allclose(learned_scores(tree, mcfg)["head"], 0.7, rtol=1e-6)


# -- straight-through masks and the schedule -----------------------------------------------------


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_masks_are_exactly_binary_forward_and_identity_backward(mode):
    mcfg = MovementConfig(mode=mode, neuron_block=4, threshold=0.5, final_keep=0.4,
                          total_steps=10)
    scores = jax.tree.map(jnp.asarray, _random_scores(16, seed=3))
    masks_fn = jax.jit(movement_masks, static_argnums=1)
    masks = masks_fn(scores, mcfg, 5)
    assert masks.head.shape == (L, 4) and masks.neuron.shape == (L, 64)
    for mask in (masks.head, masks.neuron):
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0.0, 1.0}
    # A block's mask is repeated over its neurons.
    blocks = np.asarray(masks.neuron).reshape(L, 16, 4)
    assert (blocks == blocks[..., :1]).all()
    if mode == "soft":
        np.testing.assert_array_equal(masks.head, np.asarray(scores["head"]) > 0.0)
    # Straight-through: d(sum(mask * c))/d(score) = c, summed over a block's neurons, for pruned
    # blocks as much as for kept ones.
    c_head = jax.random.normal(jax.random.key(4), (L, 4))
    c_neuron = jax.random.normal(jax.random.key(5), (L, 64))
    grads = jax.jit(jax.grad(lambda s: (movement_masks(s, mcfg, 5).head * c_head).sum()
                             + (movement_masks(s, mcfg, 5).neuron * c_neuron).sum()))(scores)
    np.testing.assert_allclose(grads["head"], c_head, rtol=1e-6)
    np.testing.assert_allclose(grads["neuron"], c_neuron.reshape(L, 16, 4).sum(-1), rtol=1e-5)


def test_topk_follows_the_cubic_schedule():
    mcfg = MovementConfig(mode="topk", final_keep=0.3, warmup_steps=10, total_steps=60,
                          cooldown_steps=10, neuron_block=2)
    fractions = np.asarray([keep_fraction(mcfg, s) for s in range(0, 61)])
    np.testing.assert_allclose(fractions[:11], 1.0)
    np.testing.assert_allclose(fractions[50:], 0.3, rtol=1e-6)
    np.testing.assert_allclose(fractions[30], 0.3 + 0.7 * 0.5**3, rtol=1e-6)
    assert (np.diff(fractions) <= 0).all()
    scores = _random_scores(32, seed=6)
    for step, fraction in ((0, 1.0), (30, float(fractions[30])), (55, 0.3)):
        masks = movement_masks(scores, mcfg, step)
        for name, mask, size in (("head", masks.head, 4), ("neuron", masks.neuron[:, ::2], 32)):
            kept = math.ceil(round(fraction * size, 6))
            np.testing.assert_array_equal(np.asarray(mask).sum(-1), kept)
            # ... and those are the blocks of highest score in each layer.
            top = np.argsort(-scores[name], axis=-1)[:, :kept]
            assert all(np.asarray(mask)[layer, top[layer]].all() for layer in range(L))
    with pytest.raises(ValueError, match="needs the training step"):
        movement_masks(scores, mcfg)
    loss_fn = jax.jit(movement_loss(ViT(TINY), mcfg))
    batch = _batch(_images(), jnp.zeros((8, 5)))
    tree = movement_init_fn(_params(), TINY, mcfg)(None)
    with pytest.raises(ValueError, match="movement_frozen"):
        loss_fn(tree, None, batch, None, jax.random.key(0))
    _, metrics = loss_fn(tree, movement_frozen(55), batch, None, jax.random.key(0))
    assert float(metrics["keep_fraction"]) == pytest.approx(0.3)
    assert float(metrics["kept_heads"]) == pytest.approx(2 / 4)  # ceil(0.3 * 4) per layer


# -- the movement signal -----------------------------------------------------------------------


def test_score_gradient_is_the_movement_of_the_masked_weights():
    """dL/dS = sum over the block of W * dL/dW', W' = mask * W the weights vit.py multiplies the
    mask into; for a kept block dL/dW' is the gradient of the parameter itself."""
    mcfg = MovementConfig(neuron_block=2, reg_weight=0.0, init_score=4.0)
    params = _params()
    batch = _batch(_images(), 3 * jax.random.normal(jax.random.key(7), (8, 5)))
    loss_fn = movement_loss(ViT(TINY), mcfg)
    grad_fn = jax.jit(jax.grad(lambda t: loss_fn(t, None, batch, None, jax.random.key(0))[0]))
    tree = movement_init_fn(params, TINY, mcfg)(None)
    # Prune head 1 and neuron block 3 (neurons 6, 7) of layer 0: their signal must still come.
    pruned = dict(tree, scores={"head": tree["scores"]["head"].at[0, 1].set(-4.0),
                                "neuron": tree["scores"]["neuron"].at[0, 3].set(-4.0)})
    grads = grad_fn(pruned)

    def movement(vit_params, vit_grads, layer):
        block, d_block = vit_params[f"blocks_{layer}"], vit_grads[f"blocks_{layer}"]
        head = (block["attn"]["proj"]["kernel"] * d_block["attn"]["proj"]["kernel"]).sum((1, 2))
        neuron = (block["mlp"]["fc2"]["kernel"] * d_block["mlp"]["fc2"]["kernel"]).sum(1)
        return head, neuron.reshape(-1, 2).sum(1)

    for layer in range(L):
        head, neuron = movement(params, grads["vit"], layer)
        kept_head, kept_neuron = np.ones(4, bool), np.ones(32, bool)
        if layer == 0:
            kept_head[1] = kept_neuron[3] = False
        np.testing.assert_allclose(grads["scores"]["head"][layer][kept_head], head[kept_head],
                                   rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(grads["scores"]["neuron"][layer][kept_neuron],
                                   neuron[kept_neuron], rtol=1e-4, atol=1e-7)
    # A pruned block's weights get no gradient ...
    assert float(np.abs(grads["vit"]["blocks_0"]["mlp"]["fc2"]["kernel"][6:8]).max()) == 0.0
    # ... its score gets sum W * dL/dW', dL/dW' read off the same model with everything kept and
    # the pruned rows zeroed in the weights instead (the same function: W' is identical).
    zeroed = jax.tree.map(lambda a: a, params)
    block0 = zeroed["blocks_0"]
    block0["attn"]["proj"]["kernel"] = block0["attn"]["proj"]["kernel"].at[1].set(0.0)
    block0["mlp"]["fc2"]["kernel"] = block0["mlp"]["fc2"]["kernel"].at[6:8].set(0.0)
    d_effective = grad_fn(dict(tree, vit=zeroed))["vit"]
    head, neuron = movement(params, d_effective, 0)
    np.testing.assert_allclose(grads["scores"]["head"][0, 1], head[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads["scores"]["neuron"][0, 3], neuron[3], rtol=1e-4, atol=1e-7)
    assert abs(float(neuron[3])) > 1e-6


def _scaled(params, layer, head=None, head_scale=1.0, neuron=None, neuron_scale=1.0):
    """params with one head's output projection and/or one neuron's fc2 row scaled."""
    params = jax.tree.map(lambda a: a, params)
    block = params[f"blocks_{layer}"]
    if head is not None:
        kernel = block["attn"]["proj"]["kernel"]
        block["attn"]["proj"]["kernel"] = kernel.at[head].multiply(head_scale)
    if neuron is not None:
        kernel = block["mlp"]["fc2"]["kernel"]
        block["mlp"]["fc2"]["kernel"] = kernel.at[neuron].multiply(neuron_scale)
    return params


def test_scores_follow_weights_moving_away_from_or_toward_zero():
    """A teacher that equals the student except for one block scaled by 2 (its weights should
    grow) or by 0 (they should shrink). Training weights and scores together with SGD (the
    setting of Sanh et al.'s analysis: S = -lr * sum_t W_t * dL/dW'_t), the block's score
    gradient is negative, resp. positive, at every step, so its score rises, resp. falls."""
    mcfg = MovementConfig(reg_weight=0.0, init_score=3.0)
    model = ViT(TINY)
    params, images = _params(), _images()
    loss_fn = movement_loss(model, mcfg)
    tree = movement_init_fn(params, TINY, mcfg)(None)
    tx = optax.sgd(0.03)

    @jax.jit
    def train(teacher):
        """Per-step score gradients and losses of 10 steps toward `teacher`, and the scores'
        total change."""
        batch = _batch(images, model.apply({"params": teacher}, images)[0])

        def step(state, _):
            tree, opt_state = state
            loss, grads = jax.value_and_grad(
                lambda t: loss_fn(t, None, batch, None, jax.random.key(0))[0])(tree)
            updates, opt_state = tx.update(grads, opt_state, tree)
            return (optax.apply_updates(tree, updates), opt_state), (grads["scores"], loss)

        (trained, _), (grads, losses) = jax.lax.scan(step, (tree, tx.init(tree)), None,
                                                     length=10)
        moved = jax.tree.map(lambda a, b: a - b, trained["scores"], tree["scores"])
        return grads, losses, moved

    layer, head, neuron = L - 1, 1, 10
    for scale, sign in ((2.0, 1.0), (0.0, -1.0)):  # sign of the score's change
        for kind, index, teacher in (
                ("head", head, _scaled(params, layer, head=head, head_scale=scale)),
                ("neuron", neuron, _scaled(params, layer, neuron=neuron, neuron_scale=scale))):
            grads, losses, moved = train(teacher)
            assert losses[-1] < losses[0]
            np.testing.assert_array_equal(np.sign(grads[kind][:, layer, index]), -sign)
            assert np.sign(float(moved[kind][layer, index])) == sign


def test_the_regulariser_lowers_the_kept_fraction():
    model, params, images = ViT(TINY), _params(), _images()
    batch = _batch(images, 3 * jax.random.normal(jax.random.key(15), (8, 5)))
    mcfg = MovementConfig(reg_weight=1.0, threshold=0.5, init_score=0.5)
    loss_fn = movement_loss(model, mcfg)
    tree = movement_init_fn(params, TINY, mcfg)(None)
    tx = optax.adam(0.05)

    @jax.jit
    def run(reg_weight):
        """20 Adam steps on cross-entropy + reg_weight * regulariser (one compilation for both
        weights: the loss carries the regulariser at weight 1, the difference is added here)."""

        def objective(t):
            loss, metrics = loss_fn(t, None, batch, None, jax.random.key(0))
            return loss + (reg_weight - 1.0) * metrics["regularizer"], metrics

        def step(state, _):
            tree, opt_state = state
            grads, metrics = jax.grad(objective, has_aux=True)(tree)
            updates, opt_state = tx.update(grads, opt_state, tree)
            return (optax.apply_updates(tree, updates), opt_state), metrics

        return jax.lax.scan(step, (tree, tx.init(tree)), None, length=20)[1]

    with_reg, without = run(10.0), run(0.0)
    for metrics in (with_reg, without):
        assert float(metrics["kept_heads"][0]) == 1.0 and float(metrics["kept_neurons"][0]) == 1.0
    assert (np.diff(np.asarray(with_reg["regularizer"])) < 0).all()
    kept = lambda m: float(m["kept_heads"][-1] + m["kept_neurons"][-1]) / 2  # noqa: E731
    assert kept(with_reg) < 0.5 and kept(with_reg) < kept(without)


# -- FLOPs budget and physical pruning ---------------------------------------------------------


def _reference_counts(scores, target, block_size, token_keep=None):
    """Independent reference: walk the blocks in descending score with per-layer configs."""
    heads, blocks = scores["head"], scores["neuron"]
    entries = sorted(
        [(-heads[layer, h], 0, layer, h) for layer in range(L) for h in range(4)]
        + [(-blocks[layer, b], 1, layer, b) for layer in range(L)
           for b in range(blocks.shape[1])])
    kept_heads, kept_neurons = [0] * L, [0] * L
    tokens = tuple(token_keep) if token_keep is not None else None

    def gmacs(h, n):
        config = dataclasses.replace(TINY, layer_heads=tuple(h), layer_mlp_dims=tuple(n),
                                     layer_tokens=tokens)
        return count_flops(config).total

    for _, kind, layer, _ in entries:
        h, n = list(kept_heads), list(kept_neurons)
        if kind == 0:
            h[layer] += 1
        else:
            n[layer] += block_size
        if gmacs(h, n) > target:
            return kept_heads, kept_neurons, gmacs(h, n)
        kept_heads, kept_neurons = h, n
    return kept_heads, kept_neurons, None


@pytest.mark.parametrize("block_size,token_keep", [(1, None), (4, (15, 11))])
def test_threshold_to_budget_meets_the_budget_and_is_maximal(block_size, token_keep):
    scores = _random_scores(64 // block_size, seed=8)
    everything, _ = threshold_to_budget(TINY, scores, 1e9, token_keep)
    np.testing.assert_array_equal(everything.head, 4)
    np.testing.assert_array_equal(everything.neuron, 64)
    keep_none = KeepCounts(neuron=np.zeros(L, np.int32), head=np.zeros(L, np.int32),
                           token=np.asarray(token_keep or (17,) * L, np.int32))
    floor = count_flops(TINY, policy_from_keep_counts(TINY, keep_none)).total
    dense = count_flops(TINY, policy_from_keep_counts(
        TINY, keep_none.replace(head=np.full(L, 4), neuron=np.full(L, 64)))).total
    for fraction in (0.0, 0.13, 0.5, 0.77):
        target = floor + fraction * (dense - floor)
        keep, ranks = threshold_to_budget(TINY, scores, target, token_keep)
        got = count_flops(TINY, policy_from_keep_counts(TINY, keep)).total
        heads, neurons, next_gmacs = _reference_counts(scores, target, block_size, token_keep)
        assert got <= target
        assert next_gmacs is not None and next_gmacs > target  # the next block breaks it
        np.testing.assert_array_equal(keep.head, heads)
        np.testing.assert_array_equal(keep.neuron, neurons)
        assert keep.neuron.tolist() == [n - n % block_size for n in keep.neuron.tolist()]
        # Neuron ranks keep whole blocks: the kept neurons of a layer are whole top blocks.
        masks = np.asarray(ranks.neuron) < keep.neuron[:, None]
        assert (masks.reshape(L, -1, block_size) == masks.reshape(L, -1, block_size)[..., :1]
                ).all()
    with pytest.raises(ValueError, match="below the smallest model"):
        threshold_to_budget(TINY, scores, floor * 0.99, token_keep)
    with pytest.raises(ValueError, match="token_keep"):
        threshold_to_budget(TINY, scores, dense, (15, 16))


def test_keep_counts_round_trip_through_policy():
    config = ViTConfig(num_classes=3, image_size=28, patch_size=4, embed_dim=36, depth=4,
                       num_heads=6, mlp_dim=37, distilled=True)
    rng = np.random.default_rng(9)
    for _ in range(200):
        tokens = np.sort(rng.integers(1, config.num_patches + 1, 4))[::-1] + 2
        keep = KeepCounts(neuron=rng.integers(0, 38, 4).astype(np.int32),
                          head=rng.integers(0, 7, 4).astype(np.int32),
                          token=tokens.astype(np.int32))
        got = policy_from_keep_counts(config, keep).keep_counts(config)
        for name in ("neuron", "head", "token"):
            np.testing.assert_array_equal(getattr(got, name), getattr(keep, name))
    for count in range(38):  # every neuron count, at the edges of float rounding
        keep = KeepCounts(neuron=np.full(4, count), head=np.full(4, 6), token=np.full(4, 51))
        got = policy_from_keep_counts(config, keep).keep_counts(config)
        assert got.neuron.tolist() == [count] * 4


@pytest.mark.parametrize("token_keep", [None, (14, 9)])
def test_masked_model_equals_the_physically_pruned_model(token_keep):
    scores = _random_scores(16, seed=10)
    params, images = _params(), _images(seed=12)
    keep_none = KeepCounts(neuron=np.zeros(L, np.int32), head=np.zeros(L, np.int32),
                           token=np.asarray(token_keep or (17,) * L, np.int32))
    floor = count_flops(TINY, policy_from_keep_counts(TINY, keep_none)).total
    target = floor + 0.45 * (count_flops(TINY).total - floor)
    keep, ranks = threshold_to_budget(TINY, scores, target, token_keep)
    masked, _ = jax.jit(ViT(TINY).apply)({"params": params}, images,
                                         masks_from_ranks(TINY, ranks, keep, "attention"))
    pruned_config, pruned_params = prune_movement(TINY, params, scores, target, token_keep)
    pruned, _ = jax.jit(ViT(pruned_config).apply)({"params": pruned_params}, images)
    np.testing.assert_allclose(masked, pruned, atol=1e-5, rtol=1e-5)
    assert count_flops(pruned_config).total <= target
    assert pruned_config.layer_heads == tuple(keep.head.tolist())
    assert pruned_config.num_params() == sum(x.size for x in jax.tree.leaves(pruned_params))


def test_at_the_soft_masks_flops_the_budget_reproduces_the_soft_masks():
    mcfg = MovementConfig(neuron_block=4, threshold=0.5)
    scores = _random_scores(16, seed=13)
    masks = movement_masks(scores, mcfg)
    keep = KeepCounts(neuron=np.asarray(masks.neuron.sum(-1), np.int32),
                      head=np.asarray(masks.head.sum(-1), np.int32),
                      token=np.full(L, 17, np.int32))
    target = count_flops(TINY, policy_from_keep_counts(TINY, keep)).total
    got_keep, ranks = threshold_to_budget(TINY, scores, target)
    again = masks_from_ranks(TINY, ranks, got_keep, "attention")
    np.testing.assert_array_equal(again.head, masks.head)
    np.testing.assert_array_equal(again.neuron, masks.neuron)


# -- the trainer ----------------------------------------------------------------------------------


def test_the_trainer_runs_topk_movement_pruning_with_the_step_in_frozen():
    from vitjax.parallel import local_to_global, make_mesh
    from vitjax.training import default_train_config
    from vitjax.training.train import Trainer

    train_cfg = default_train_config()
    train_cfg.update(steps=4, warmup_steps=1, lr=1e-2, sample_policies=False, drop_path=0.0)
    mesh = make_mesh({"data": 2})
    rng = np.random.default_rng(14)
    images = local_to_global(rng.normal(size=(8, 16, 16, 3)).astype(np.float32), mesh, 8)
    labels = local_to_global(rng.integers(0, 5, 8).astype(np.int32), mesh, 8)
    mcfg = MovementConfig(mode="topk", neuron_block=8, final_keep=0.5, total_steps=3)
    model = ViT(TINY)
    trainer = Trainer(model, train_cfg, mesh, loss_fn=movement_loss(model, mcfg),
                      init_fn=movement_init_fn(None, TINY, mcfg), frozen=movement_frozen(0))
    state = trainer.create_state(seed=0)
    start = jax.device_get(state.params["scores"])
    for step in range(3):
        state = state.replace(frozen=movement_frozen(step))
        state, metrics = trainer.train_step(state, images, labels, None)
        assert np.isfinite(float(metrics["loss"]))
        assert float(metrics["keep_fraction"]) == pytest.approx(0.5 + 0.5 * (1 - step / 3) ** 3)
    assert float(metrics["kept_heads"]) == pytest.approx(3 / 4)  # ceil(0.52 * 4) of 4
    moved = jax.device_get(state.params["scores"])
    assert np.abs(moved["neuron"] - start["neuron"]).max() > 0
    assert trainer.train_step._cache_size() == 1  # the step is data, not a recompilation
