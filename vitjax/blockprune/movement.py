"""Block movement pruning of attention heads and FFN neurons (Sanh et al. 2020, Lagunas et al.
2021), on the masks of `vitjax.models.vit`.

Every head and every block of `neuron_block` FFN neurons gets a learned score S. The forward pass
uses a 0/1 mask M = binarize(S); the backward pass treats the binarizer as the identity
(straight-through, the `TopKBinarizer` / `ThresholdBinarizer` of movement pruning), so
dL/dS = dL/dM.

The movement signal falls out of where vit.py applies the masks. It folds the head mask into the
rows of the output projection, proj'[h] = M_h proj[h], and the neuron mask into the rows of fc2,
fc2'[j] = 1/2 M_j fc2[j] (the 1/2 belongs to GELU). With W' the masked (effective) weight,

    dL/dM_h = sum_{k,e} proj[h,k,e] * dL/dproj'[h,k,e],
    dL/dM_j = 1/2 sum_e fc2[j,e] * dL/dfc2'[j,e]  (= sum_e fc2[j,e] * dL/dfc2[j,e] while kept),

which is Sanh et al.'s dL/dS = sum over the block of W * dL/dW' (a neuron block sums its
neurons, through `jnp.repeat`). Gradient descent on S therefore adds -(W * dL/dW') to the
score: a block whose outgoing weights move away from zero gains score, one whose weights move
toward zero loses it; a pruned block (M = 0) keeps receiving the signal, so it can come back.
For a kept head this is also Michel et al.'s first-order head importance. tests/test_blockprune
checks the identity against jax.grad of the ViT parameters. Unlike Lagunas et al., who score
32x32 blocks of every matrix (qkv and fc1 included) and see heads vanish as a consequence, the
signal here comes from each head's / neuron's outgoing weights only, because that is the
structure the masks (and `vitjax.pruning.prune`) remove.

Two modes (`MovementConfig.mode`):
  'soft': keep a block while sigmoid(S) > threshold, plus Sanh et al.'s L1 regulariser
      reg_weight * mean sigmoid(S); the sparsity is whatever the regulariser buys.
  'topk': keep the top ceil(p * n) blocks of each layer (heads and neuron blocks separately, as
      the TopKBinarizer works per weight matrix), with p following the cubic schedule from 1 to
      `final_keep` (Zhu & Gupta; Sanh et al.'s `schedule_threshold`).

The training loss is a `vitjax.training.losses.LossFn` over params {'vit', 'scores'}; 'topk' needs
the step number, which `LossFn` does not receive: it reads it from the state's `frozen` tree
(`movement_frozen(step)`, refreshed by the caller's loop before each step).

After training, `threshold_to_budget` turns scores into a FLOPs budget with one global threshold
and `prune_movement` slices the model through `vitjax.pruning.prune.prune_params`, the same path
the HSIC method's pruned models take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.models.config import ViTConfig
from vitjax.models.vit import Masks, ViT
from vitjax.pruning.flops import count_flops
from vitjax.pruning.masks import Ranks, ranks_from_scores
from vitjax.pruning.policy import KeepCounts, Policy
from vitjax.pruning.prune import prune_params
from vitjax.pruning.sampling import check_reachable

if TYPE_CHECKING:
    # Only the type: importing vitjax.training loads the trainer and TensorFlow (via clu).
    from vitjax.training.losses import LossFn

Scores = dict[str, jax.Array]  # {'head': [L, H], 'neuron': [L, F / neuron_block]}

MODES = ("soft", "topk")
# Key of the schedule step in the state's `frozen` tree ('topk' mode).
STEP_KEY = "movement_step"
# A float32 product p * n that should be the integer k can come out a few ulp above k; this
# relative slack keeps ceil() from turning it into k + 1 (n is far below 1e6).
_CEIL_SLACK = 1e-6


@dataclasses.dataclass(frozen=True)
class MovementConfig:
    """Static settings of block movement pruning (hashable: closures over it jit once)."""

    mode: str = "soft"  # 'soft' (sigmoid threshold + L1) or 'topk' (cubic keep schedule)
    neuron_block: int = 1  # FFN neurons per scored block; must divide the MLP width
    init_score: float = 0.0  # every score's initial value (Sanh et al.: constant 0)
    # soft: a block is kept while sigmoid(score) > threshold (Sanh et al.'s tau, in (0, 1)).
    threshold: float = 0.1
    # soft: lambda of the L1 penalty lambda * mean(sigmoid(scores)); 'topk' has no regulariser
    # (its sparsity is set by the schedule, as in Sanh et al.'s hard movement pruning).
    reg_weight: float = 1.0
    final_keep: float = 0.5  # topk: fraction of each layer's heads / neuron blocks kept at the end
    warmup_steps: int = 0  # topk: steps that keep everything before the cubic decay starts
    total_steps: int = 1  # topk: length of the run the schedule is laid out on
    cooldown_steps: int = 0  # topk: last steps that train at `final_keep`
    # The scores' step size relative to the ViT's under one Adam(W) optimizer: the trainable
    # tree holds scores / score_lr_scale, and Adam's step is invariant to the gradient's scale,
    # so each score moves score_lr_scale times as far as with scale 1. Sanh et al. train scores
    # at 1e-2 and weights at ~3e-5 (a ratio of a few hundred) with two parameter groups; the
    # Trainer has one optimizer, hence this reparametrisation.
    score_lr_scale: float = 1.0

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"invalid MovementConfig: {msg}")

        if self.mode not in MODES:
            fail(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.neuron_block, int | np.integer) and self.neuron_block >= 1):
            fail(f"neuron_block must be a positive integer, got {self.neuron_block!r}")
        if not 0.0 < self.threshold < 1.0:
            fail(f"threshold is compared with sigmoid(score); it must lie in (0, 1), "
                 f"got {self.threshold}")
        if not (np.isfinite(self.reg_weight) and self.reg_weight >= 0.0):
            fail(f"reg_weight must be finite and >= 0, got {self.reg_weight}")
        if not 0.0 < self.final_keep <= 1.0:
            fail(f"final_keep must lie in (0, 1], got {self.final_keep}")
        if min(self.warmup_steps, self.cooldown_steps) < 0:
            fail("warmup_steps and cooldown_steps must be >= 0")
        if self.total_steps <= self.warmup_steps + self.cooldown_steps:
            fail(f"total_steps={self.total_steps} must exceed warmup_steps + cooldown_steps = "
                 f"{self.warmup_steps + self.cooldown_steps} (the cubic decay needs >= 1 step)")
        if not (np.isfinite(self.score_lr_scale) and self.score_lr_scale > 0.0):
            fail(f"score_lr_scale must be finite and > 0, got {self.score_lr_scale}")


def num_neuron_blocks(vit_config: ViTConfig, mcfg: MovementConfig) -> int:
    """F / neuron_block, refusing block sizes that do not divide the MLP width F."""
    if vit_config.is_pruned:
        raise ValueError("movement pruning scores a dense model; this config is already pruned")
    if vit_config.mlp_dim % mcfg.neuron_block:
        raise ValueError(
            f"neuron_block={mcfg.neuron_block} does not divide the MLP width "
            f"{vit_config.mlp_dim}; choose a divisor of it (1 scores single neurons)"
        )
    return vit_config.mlp_dim // mcfg.neuron_block


def init_scores(vit_config: ViTConfig, mcfg: MovementConfig) -> Scores:
    """Constant initial scores: {'head': [L, H], 'neuron': [L, F / neuron_block]} float32."""
    blocks = num_neuron_blocks(vit_config, mcfg)
    depth = vit_config.depth
    return {
        "head": jnp.full((depth, vit_config.num_heads), mcfg.init_score, jnp.float32),
        "neuron": jnp.full((depth, blocks), mcfg.init_score, jnp.float32),
    }


def keep_fraction(mcfg: MovementConfig, step) -> jax.Array:
    """The 'topk' schedule: 1 up to `warmup_steps`, then final + (1 - final) * (1 - t)^3 with t
    going linearly from 0 to 1 until `total_steps - cooldown_steps`, then `final_keep`.
    Traceable in `step`."""
    span = mcfg.total_steps - mcfg.warmup_steps - mcfg.cooldown_steps
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - mcfg.warmup_steps) / span, 0.0, 1.0)
    return mcfg.final_keep + (1.0 - mcfg.final_keep) * (1.0 - progress) ** 3


@jax.custom_jvp
def straight_through(scores: jax.Array, hard: jax.Array) -> jax.Array:
    """Returns `hard` (a 0/1 mask computed from `scores`) exactly; derivatives pass to `scores`
    unchanged. A custom rule rather than `scores + stop_gradient(hard - scores)`, whose forward
    value is not exactly 0/1 in floating point."""
    del scores
    return hard


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, hard = primals
    scores_dot, _ = tangents
    return hard, scores_dot


def _check_scores(scores: Mapping[str, Any]) -> None:
    if not isinstance(scores, Mapping) or set(scores) != {"head", "neuron"}:
        raise ValueError("scores must be a dict with exactly the keys 'head' [L, H] and "
                         "'neuron' [L, F / neuron_block]")
    shapes = {k: np.shape(v) for k, v in scores.items()}
    if any(len(s) != 2 for s in shapes.values()) or shapes["head"][0] != shapes["neuron"][0]:
        raise ValueError(f"scores must be [L, H] and [L, blocks] for the same L, got {shapes}")


def _hard_masks(scores: Scores, mcfg: MovementConfig, step) -> dict[str, jax.Array]:
    """0/1 float masks per scored block (no gradient path)."""
    if mcfg.mode == "soft":
        return {k: (jax.nn.sigmoid(s) > mcfg.threshold).astype(jnp.float32)
                for k, s in scores.items()}
    if step is None:
        raise ValueError("mode='topk' needs the training step for its keep schedule")
    fraction = keep_fraction(mcfg, step)
    out = {}
    for name, s in scores.items():
        size = s.shape[-1]
        count = jnp.ceil(fraction * size * (1.0 - _CEIL_SLACK))
        out[name] = (ranks_from_scores(s) < count).astype(jnp.float32)
    return out


def movement_masks(scores: Scores, mcfg: MovementConfig, step=None) -> Masks:
    """`Masks(head [L, H], neuron [L, F])` from the scores: exactly 0/1 forward, straight-through
    backward (see the module docstring for the gradient the scores receive). A neuron block's
    mask is repeated over its `neuron_block` neurons. `step` (traceable) drives the 'topk'
    schedule; 'soft' ignores it."""
    _check_scores(scores)
    scores = {k: jnp.asarray(v, jnp.float32) for k, v in scores.items()}
    hard = _hard_masks(scores, mcfg, step)
    head = straight_through(scores["head"], hard["head"])
    blocks = straight_through(scores["neuron"], hard["neuron"])
    neuron = jnp.repeat(blocks, mcfg.neuron_block, axis=-1,
                        total_repeat_length=blocks.shape[-1] * mcfg.neuron_block)
    return Masks(head=head, neuron=neuron)


def l1_regularizer(scores: Scores) -> jax.Array:
    """Sanh et al.'s L1 penalty: mean sigmoid(score), per type, averaged over the two types (their
    code averages the per-matrix means over the matrices)."""
    return (jax.nn.sigmoid(scores["head"]).mean() + jax.nn.sigmoid(scores["neuron"]).mean()) / 2


def learned_scores(params: Mapping[str, Any], mcfg: MovementConfig) -> Scores:
    """The scores of a trainable {'vit', 'scores'} tree (undoing `score_lr_scale`)."""
    return {k: jnp.asarray(v, jnp.float32) * mcfg.score_lr_scale
            for k, v in params["scores"].items()}


def movement_frozen(step) -> dict[str, jax.Array]:
    """The `frozen` tree carrying the schedule step to the 'topk' loss: pass
    `Trainer(..., frozen=movement_frozen(0))` and, before each step,
    `state = state.replace(frozen=movement_frozen(step))`."""
    return {STEP_KEY: jnp.asarray(step, jnp.float32)}


def movement_init_fn(vit_params, vit_config: ViTConfig,
                     mcfg: MovementConfig) -> Callable[[jax.Array], dict]:
    """`init_fn(key) -> {'vit', 'scores'}` for `Trainer(init_fn=...)`.

    vit_params: the (pretrained) dense parameters to prune, or None to initialise the ViT from
    `key`. With pretrained parameters, also pass `init_fn(key)` as the trainer's `init_params`:
    the jitted initialisation would otherwise embed the whole tree as constants.
    """
    initial = jax.tree.map(lambda s: s / mcfg.score_lr_scale, init_scores(vit_config, mcfg))

    def init_fn(key: jax.Array) -> dict:
        if vit_params is None:
            images = jnp.zeros((1, vit_config.image_size, vit_config.image_size,
                                vit_config.in_chans), jnp.float32)
            vit = ViT(vit_config).init({"params": key}, images)["params"]
        else:
            vit = vit_params
        return {"vit": vit, "scores": dict(initial)}

    return init_fn


def _schedule_step(frozen) -> jax.Array:
    if not isinstance(frozen, Mapping) or STEP_KEY not in frozen:
        raise ValueError(
            f"mode='topk' reads the schedule step from frozen[{STEP_KEY!r}], and the state's "
            "frozen tree has none: build the Trainer with frozen=movement_frozen(0) and set "
            "state = state.replace(frozen=movement_frozen(step)) before each step (the loss "
            "interface passes no step, and train() keeps `frozen` fixed)"
        )
    return frozen[STEP_KEY]


def movement_loss(model: ViT, mcfg: MovementConfig) -> LossFn:
    """Cross-entropy of `model` on batch['target'] (soft targets, `vitjax.training.losses`)
    under the learned masks, plus reg_weight * `l1_regularizer` in 'soft' mode.

    params: {'vit': ViT parameters, 'scores': see `movement_init_fn`}. frozen: None ('soft') or
    `movement_frozen(step)` ('topk'). The masks argument must be None: the masks are learned
    here, so train with `train.sample_policies=False`. Metrics: accuracy, kept_heads and
    kept_neurons (fractions kept in the forward pass), regularizer ('soft') or keep_fraction
    ('topk').
    """

    from vitjax.training.losses import accuracy, cross_entropy

    def loss_fn(params, frozen, batch, masks, rng):
        if masks is not None:
            raise ValueError(
                "movement pruning learns its own masks, but the trainer passed sampled policy "
                "masks: set train.sample_policies=False"
            )
        step = _schedule_step(frozen) if mcfg.mode == "topk" else None
        scores = learned_scores(params, mcfg)
        learned = movement_masks(scores, mcfg, step)
        logits, _ = model.apply({"params": params["vit"]}, batch["image"], masks=learned,
                                train=True, rngs={"dropout": rng})
        loss = cross_entropy(logits, batch["target"])
        metrics = {
            "accuracy": accuracy(logits, batch["label"]),
            "kept_heads": learned.head.mean(),
            "kept_neurons": learned.neuron.mean(),
        }
        if mcfg.mode == "soft":
            regularizer = l1_regularizer(scores)
            loss = loss + mcfg.reg_weight * regularizer
            metrics["regularizer"] = regularizer
        else:
            metrics["keep_fraction"] = keep_fraction(mcfg, step)
        return loss, metrics

    return loss_fn


# -- from scores to a FLOPs budget and a physically pruned model -------------------------------


def _token_counts(vit_config: ViTConfig, token_keep: Sequence[int] | None) -> np.ndarray:
    """Tokens (prefix included) after each block's token selection, validated."""
    depth, total = vit_config.depth, vit_config.num_tokens
    if token_keep is None:
        return np.full((depth,), total, np.int32)
    tokens = np.asarray(token_keep)
    if tokens.shape != (depth,) or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_keep must be {depth} integers (one per layer), got {token_keep}")
    previous = total
    for layer, count in enumerate(tokens):
        if not vit_config.num_prefix_tokens < count <= previous:
            raise ValueError(
                f"token_keep[{layer}]={count} must lie in "
                f"({vit_config.num_prefix_tokens}, {previous}]: tokens only ever drop, and a "
                "policy keeps at least one patch"
            )
        previous = count
    return tokens.astype(np.int32)


def policy_from_keep_counts(vit_config: ViTConfig, keep: KeepCounts) -> Policy:
    """The Policy whose `keep_counts(vit_config)` are exactly `keep` (the inverse of
    Policy.keep_counts): ratio 1 - k / size, token ratios relative to the patches that survived
    the previous layer."""
    _token_counts(vit_config, keep.token)
    patches = vit_config.num_patches
    token_ratios = []
    for count in np.asarray(keep.token):
        kept = int(count) - vit_config.num_prefix_tokens
        token_ratios.append(1.0 - kept / patches)
        patches = kept
    policy = Policy(
        neuron=tuple(1.0 - int(k) / vit_config.mlp_dim for k in np.asarray(keep.neuron)),
        head=tuple(1.0 - int(k) / vit_config.num_heads for k in np.asarray(keep.head)),
        token=tuple(token_ratios),
    )
    got = policy.keep_counts(vit_config)
    for name in ("neuron", "head", "token"):
        if not np.array_equal(getattr(got, name), np.asarray(getattr(keep, name))):
            raise ValueError(
                f"keep counts {name}={np.asarray(getattr(keep, name)).tolist()} are not "
                f"reachable by a Policy (it gives {getattr(got, name).tolist()})"
            )
    return policy


def threshold_to_budget(
    vit_config: ViTConfig, scores: Scores, target_gmacs: float,
    token_keep: Sequence[int] | None = None,
) -> tuple[KeepCounts, Ranks]:
    """The most heads and neuron blocks, by one global score threshold, whose pruned model costs
    at most `target_gmacs` (`count_flops` GMACs).

    Heads and neuron blocks of all layers are compared by their raw scores, i.e. one threshold
    over everything, as soft movement pruning's single tau: training moved both kinds of score
    against the same loss, the same regulariser and the same threshold, so the raw scores are
    the common scale, and at the GMACs of the trained 'soft' masks this returns exactly those
    masks. The threshold is lowered block by block (descending score; ties go to heads before
    neuron blocks, then to the lower layer and index) and stops before the first block that
    would exceed the budget, so adding the next block in that order always breaks it. (A greedy
    by score per MAC would trade expensive heads for cheap neurons; scores from 'topk' training
    are only calibrated within a layer and type, so prefer 'soft' scores here.)

    scores: {'head' [L, H], 'neuron' [L, F / b]} (`learned_scores`); b is inferred from the
    shapes and a neuron block is kept whole. token_keep: tokens (prefix included) after each
    layer's token selection, counted in the FLOPs and returned in KeepCounts.token (None: no
    token pruning). Returns (KeepCounts, Ranks): ranks from the scores, neuron blocks expanded
    to their neurons, for `masks_from_ranks(..., token_mode='attention')` and `prune_params`.
    """
    _check_scores(scores)
    if vit_config.is_pruned:
        raise ValueError("threshold_to_budget needs the dense config the scores belong to")
    head_scores = np.asarray(scores["head"], np.float32)
    block_scores = np.asarray(scores["neuron"], np.float32)
    depth, heads = vit_config.depth, vit_config.num_heads
    blocks = block_scores.shape[1]
    if head_scores.shape != (depth, heads) or block_scores.shape[0] != depth or (
            vit_config.mlp_dim % blocks):
        raise ValueError(
            f"scores of shapes {head_scores.shape}, {block_scores.shape} do not fit the model "
            f"(depth {depth}, {heads} heads, MLP width {vit_config.mlp_dim})"
        )
    if not (np.isfinite(head_scores).all() and np.isfinite(block_scores).all()):
        raise ValueError("scores contain NaN or infinite values")
    block_size = vit_config.mlp_dim // blocks
    tokens = _token_counts(vit_config, token_keep)

    flat = np.concatenate([head_scores.ravel(), block_scores.ravel()])
    order = np.argsort(-flat, kind="stable")
    is_head = order < depth * heads
    layer = np.where(is_head, order // heads, (order - depth * heads) // blocks)

    def keep_first(count: int) -> KeepCounts:
        head = np.bincount(layer[:count][is_head[:count]], minlength=depth)
        neuron = np.bincount(layer[:count][~is_head[:count]], minlength=depth) * block_size
        return KeepCounts(neuron=neuron.astype(np.int32), head=head.astype(np.int32),
                          token=tokens)

    def gmacs(count: int) -> float:
        policy = policy_from_keep_counts(vit_config, keep_first(count))
        return count_flops(vit_config, policy).total

    check_reachable(target_gmacs, gmacs(0),
                    detail=" with every head and neuron removed: patch embedding, classifier"
                    + (" and the given token counts" if token_keep is not None else ""),
                    fix="raise the target")
    # Every block costs MACs, so the cost grows strictly along the order: binary search for the
    # longest prefix within budget.
    low, high = 0, len(order)
    while low < high:
        middle = (low + high + 1) // 2
        if gmacs(middle) <= target_gmacs:
            low = middle
        else:
            high = middle - 1
    ranks = Ranks(
        head=ranks_from_scores(head_scores),
        neuron=ranks_from_scores(np.repeat(block_scores, block_size, axis=-1)),
    )
    return keep_first(low), ranks


def prune_movement(
    vit_config: ViTConfig, vit_params, scores: Scores, target_gmacs: float,
    token_keep: Sequence[int] | None = None,
) -> tuple[ViTConfig, dict]:
    """(pruned_config, pruned_params): the model `threshold_to_budget` selects, sliced by
    `vitjax.pruning.prune.prune_params` (token_mode 'attention': with `token_keep` each image
    keeps its tokens of largest class attention). Its logits equal those of the dense model under
    `masks_from_ranks(vit_config, ranks, keep, 'attention')`."""
    keep, ranks = threshold_to_budget(vit_config, scores, target_gmacs, token_keep)
    policy = policy_from_keep_counts(vit_config, keep)
    return prune_params(vit_config, vit_params, policy, ranks, token_mode="attention")
