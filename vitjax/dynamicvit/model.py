"""DynamicViT (Rao et al. 2021): a ViT whose learned predictors drop patch tokens per image.

Before block `locations[i]` a small MLP (`Predictor`, the original PredictorLG) scores every
surviving patch token from its own features and a pooled summary of the image; the class (and
distillation) token is always kept.

  train=True   Each stage samples hard keep/drop decisions with the straight-through
               Gumbel-softmax and multiplies them into a running policy [B, N_patches]. No
               token is removed (shapes stay static): the policy masks attention as the
               original `softmax_with_policy` does, so a dropped token stops being a key for
               every other token (it still attends to itself, which keeps its row finite), and
               gradients reach the predictors through the attention weights.
  train=False  Each stage keeps, per image, the k_i = int(N * ratio_i) patch tokens with the
               highest keep probability (`jax.lax.top_k`, static k) and gathers them: a
               rectangular batch that jit and `jax.export` (symbolic batch) handle. Kept tokens
               stay in the order of their scores, as the original's argsort does; attention is
               indifferent to token order.

The parameter tree is exactly the ViT's (vitjax.models.vit) plus `predictor_{i}`, so a dense,
trained or physically pruned ViT drops straight in (`init_from_vit`). Per-layer pruned configs
(`heads_at` / `mlp_dim_at`, zero meaning the sub-block is removed) work, which is what block
pruning followed by DynamicViT needs; static token pruning (`layer_tokens`) does not combine.

Predictor parameters (PyTorch names of the released checkpoints in brackets):
  predictor_{i}/in_norm  LayerNorm [d] (eps 1e-5, torch's default)   [score_predictor.i.in_conv.0]
  predictor_{i}/in_fc    Dense [d, d]                                [in_conv.1]
  predictor_{i}/out_fc1  Dense [d, d // 2]                           [out_conv.0]
  predictor_{i}/out_fc2  Dense [d // 2, d // 4]                      [out_conv.2]
  predictor_{i}/out_fc3  Dense [d // 4, 2] (log-probs: keep, drop)   [out_conv.4]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vitjax.dynamicvit import schedule
from vitjax.models.config import ViTConfig
from vitjax.models.vit import Block, DenseParams, Mlp, PatchEmbed, classify, drop_path_residual
from vitjax.pruning.flops import GIGA, block_macs, stem_and_head_macs

Array = jax.Array
# softmax_with_policy's eps: keeps rows whose keys are all dropped finite, as in the original.
POLICY_EPS = 1e-6
# Floor of the predictor's pooling weight: an image whose tokens were all dropped pools to zero
# instead of the original's 0/0 = NaN (see the Predictor docstring).
_POOL_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class DynamicViTConfig:
    """Where DynamicViT prunes and how many patch tokens each stage keeps."""

    # Blocks before which a predictor runs (the original's `pruning_loc`, 0-based).
    locations: tuple[int, ...] = (3, 6, 9)
    # Cumulative fraction of the patch tokens kept after each stage (`token_ratio`); the
    # default is the released DeiT models' rho = 0.7 (see schedule.keep_ratios).
    ratios: tuple[float, ...] = schedule.keep_ratios("original", 0.7)

    def __post_init__(self):
        # Hashable even when built from lists (JSON, ml_collections).
        object.__setattr__(self, "locations", tuple(int(x) for x in self.locations))
        object.__setattr__(self, "ratios", tuple(float(x) for x in self.ratios))

    @classmethod
    def from_rate(cls, kind: str, rate: float,
                  locations: tuple[int, ...] = (3, 6, 9)) -> DynamicViTConfig:
        """`DynamicViTConfig.from_rate('base', 0.7)`: ratios by schedule.keep_ratios."""
        return cls(locations=tuple(locations),
                   ratios=schedule.keep_ratios(kind, rate, len(locations)))

    @property
    def num_stages(self) -> int:
        return len(self.locations)


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)  # torch.nn.GELU's exact (erf) form


class Predictor(nn.Module):
    """PredictorLG: per-token log-probabilities [..., (keep, drop)] from local + global features.

    LayerNorm -> Dense(d) -> GELU; the first d // 2 channels stay per token ("local"), the rest
    are averaged over the image's alive tokens ("global", weighted by `policy` during training,
    a plain mean over the gathered tokens at inference) and broadcast back; then
    Dense(d/2) GELU Dense(d/4) GELU Dense(2) log_softmax. The pooling weight is floored at
    1e-6: identical whenever a token is alive, and zero instead of NaN for an image whose tokens
    were all dropped (which the original turns into a NaN loss).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array, policy: Array | None = None) -> Array:
        """tokens [B, N, d]; policy [B, N] running keep decisions or None -> [B, N, 2]."""
        d = tokens.shape[-1]
        init = nn.initializers.truncated_normal(0.02)  # the original's trunc_normal_(std=.02)

        def dense(features: int, name: str) -> nn.Dense:
            return nn.Dense(features, dtype=self.dtype, kernel_init=init, name=name)

        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="in_norm")(tokens)
        x = _gelu(dense(d, "in_fc")(x))
        local, pooled = x[..., : d // 2], x[..., d // 2 :]
        if policy is None:
            pooled = pooled.mean(axis=1, keepdims=True)
        else:
            weights = policy[..., None].astype(pooled.dtype)
            total = jnp.maximum(weights.sum(axis=1, keepdims=True), _POOL_FLOOR)
            pooled = (pooled * weights).sum(axis=1, keepdims=True) / total
        x = jnp.concatenate([local, jnp.broadcast_to(pooled, local.shape[:-1] + pooled.shape[-1:])],
                            axis=-1)
        x = _gelu(dense(d // 2, "out_fc1")(x))
        x = _gelu(dense(d // 4, "out_fc2")(x))
        return jax.nn.log_softmax(dense(2, "out_fc3")(x).astype(jnp.float32), axis=-1)


def softmax_with_policy(logits: Array, policy: Array, eps: float = POLICY_EPS) -> Array:
    """The original's masked softmax over keys: logits [B, H, N, N], policy [B, N] in [0, 1].

    exp(logit - rowmax) is multiplied by the key's policy (the diagonal counts as kept, so a
    dropped token still attends to itself), then (w + eps/N) / (sum w + eps). Computed in
    float32; the eps leaves dropped keys a weight of about eps/N / sum w, i.e. ~1e-6.
    """
    n = policy.shape[-1]
    key_policy = policy.astype(jnp.float32)[:, None, None, :]
    eye = jnp.eye(n, dtype=jnp.float32)
    key_policy = key_policy + (1.0 - key_policy) * eye
    logits = logits.astype(jnp.float32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * key_policy
    return (weights + eps / n) / (weights.sum(axis=-1, keepdims=True) + eps)


class PolicyAttention(nn.Module):
    """Multi-head self-attention of vitjax.models.vit.Attention (same parameters, same folding of
    the query scale into the weights) whose softmax is `softmax_with_policy`."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, policy: Array) -> Array:
        d = x.shape[-1]
        heads_shape = (self.num_heads, self.head_dim)
        qkv_kernel, qkv_bias = DenseParams((d,), (3, *heads_shape), name="qkv")()
        proj_kernel, proj_bias = DenseParams(heads_shape, (d,), name="proj")()
        scale = jnp.asarray([self.head_dim**-0.5, 1.0, 1.0], self.dtype)[:, None, None]
        qkv = (jnp.einsum("bnd,dthk->bnthk", x, qkv_kernel.astype(self.dtype) * scale)
               + qkv_bias.astype(self.dtype) * scale)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [B, H, N, dh] each
        probs = softmax_with_policy(jnp.einsum("bhqd,bhkd->bhqk", q, k), policy)
        heads = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
        return (jnp.einsum("bhnk,hkd->bnd", heads, proj_kernel.astype(self.dtype))
                + proj_bias.astype(self.dtype))


class PolicyBlock(nn.Module):
    """vitjax.models.vit.Block (same parameter names) for the training path: attention under a
    token policy, no token selection layer. Zero heads / zero neurons remove the sub-block."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, policy: Array) -> Array:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)

        if self.num_heads:
            out = PolicyAttention(self.num_heads, self.head_dim, self.dtype, name="attn")(
                norm("norm1")(x), policy)
            x = x + drop_path_residual(out, self.drop_path, False, self)
        if self.mlp_dim:
            out, _ = Mlp(self.mlp_dim, self.dtype, name="mlp")(norm("norm2")(x))
            x = x + drop_path_residual(out, self.drop_path, False, self)
        return x


def _hard_gumbel_keep(log_probs: Array, key: Array) -> Array:
    """F.gumbel_softmax(log_probs, hard=True)[..., 0]: 0/1 keep decisions [B, N] whose gradient
    is that of the soft sample (straight-through estimator)."""
    gumbels = jax.random.gumbel(key, log_probs.shape, log_probs.dtype)
    soft = jax.nn.softmax(log_probs + gumbels, axis=-1)[..., 0]
    hard = (jnp.argmax(log_probs + gumbels, axis=-1) == 0).astype(soft.dtype)
    return hard - jax.lax.stop_gradient(soft) + soft


def _check_architecture(config: ViTConfig) -> None:
    standard = (config.class_token and not config.reg_tokens and not config.no_embed_class
                and not config.layer_scale and config.global_pool == "token")
    if not standard:
        raise ValueError(
            f"DynamicViT is built on a DeiT/ViT with a class token; this {config.family} "
            "(registers, LayerScale, average pooling, no_embed_class) is not supported"
        )
    if config.layer_tokens is not None:
        raise ValueError(
            "DynamicViT selects tokens itself; its ViTConfig must not prune tokens statically "
            "(layer_tokens / layer_token_indices); per-layer heads and FFN sizes are fine"
        )


class DynamicViT(nn.Module):
    """ViT/DeiT with DynamicViT token pruning. `__call__(images, train=False) -> (logits, aux)`.

    images: [B, H, W, C] float, normalised. Randomness (train=True): the 'gumbel' rng when given,
    else 'dropout' (which stochastic depth uses too).
    aux (train=True): 'decisions' list (one per stage) of the running policy [B, N_patches]
      (float 0/1 up to one rounding of the straight-through sum, gradients of the soft Gumbel
      sample), 'features' [B, N_patches, d] final patch-token
      features after the last LayerNorm (for token distillation; dropped tokens included),
      'pre_logits' [B, d].
    aux (train=False): 'kept_patches' list of [B, k_i] indices into the patch grid of the
      tokens kept by each stage, in score order; 'features' [B, k_last, d] (those tokens);
      'pre_logits'.
    Distilled configs also return 'logits_cls' / 'logits_dist' (logits are their mean), as
    vitjax's ViT does; num_classes=0 returns the pre-logit features as logits.
    """

    config: ViTConfig
    dyn: DynamicViTConfig = DynamicViTConfig()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    drop_path_rate: float = 0.0  # stochastic depth at the last block (linear from 0)
    # Attention of the inference path (vitjax.models.vit.resolve_attention). The training path
    # keeps its explicit policy softmax: the predictors learn through the full attention
    # weights, which a fused kernel never forms.
    attention: str = "auto"

    @nn.compact
    def __call__(self, images: Array, train: bool = False, masks=None) -> tuple[Array, dict]:
        """masks: accepted (as None) so the shared evaluator and trainer call DynamicViT like a
        ViT; structural masks do not apply (prune heads/FFN physically first)."""
        if masks is not None:
            raise ValueError("DynamicViT takes no structural masks; prune heads and FFN "
                             "neurons physically (vitjax.pruning.prune_params) before DynamicViT")
        cfg, dyn = self.config, self.dyn
        _check_architecture(cfg)
        schedule.validate(dyn.ratios, dyn.locations, cfg)
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_chans):
            raise ValueError(
                f"images have shape {images.shape}; this model expects "
                f"[batch, {cfg.image_size}, {cfg.image_size}, {cfg.in_chans}]"
            )
        d, prefix = cfg.embed_dim, cfg.num_prefix_tokens
        x = PatchEmbed(cfg.patch_size, d, self.dtype, name="patch_embed")(images.astype(self.dtype))
        batch = x.shape[0]
        tok_init = nn.initializers.truncated_normal(0.02)
        prefix_tokens = [self.param("cls_token", tok_init, (1, 1, d))]
        if cfg.distilled:
            prefix_tokens.append(self.param("dist_token", tok_init, (1, 1, d)))
        prefix_tokens = [jnp.broadcast_to(t.astype(self.dtype), (batch, 1, d))
                         for t in prefix_tokens]
        x = jnp.concatenate([*prefix_tokens, x], axis=1)
        x = x + self.param("pos_embed", tok_init, (1, cfg.num_tokens, d)).astype(self.dtype)

        stage_at = {location: stage for stage, location in enumerate(dyn.locations)}
        keep = schedule.keep_counts(dyn.ratios, cfg.num_patches)
        aux: dict[str, Any] = {}
        if train:
            decision = jnp.ones((batch, cfg.num_patches), jnp.float32)
            aux["decisions"] = []
        else:
            patch_index = jnp.broadcast_to(jnp.arange(cfg.num_patches, dtype=jnp.int32),
                                           (batch, cfg.num_patches))
            aux["kept_patches"] = []
        for layer in range(cfg.depth):
            if layer in stage_at:
                stage = stage_at[layer]
                predictor = Predictor(self.dtype, name=f"predictor_{stage}")
                patches = x[:, prefix:]
                if train:
                    log_probs = predictor(patches, decision)
                    rng = "gumbel" if self.has_rng("gumbel") else "dropout"
                    decision = _hard_gumbel_keep(log_probs, self.make_rng(rng)) * decision
                    aux["decisions"].append(decision)
                else:
                    _, order = jax.lax.top_k(predictor(patches)[..., 0], keep[stage])
                    patches = jnp.take_along_axis(patches, order[..., None], axis=1)
                    x = jnp.concatenate([x[:, :prefix], patches], axis=1)
                    patch_index = jnp.take_along_axis(patch_index, order, axis=1)
                    aux["kept_patches"].append(patch_index)
            sizes = dict(num_heads=cfg.heads_at(layer), head_dim=cfg.dim_per_head,
                         mlp_dim=cfg.mlp_dim_at(layer), dtype=self.dtype, name=f"blocks_{layer}")
            if train:
                # As the original, every block of the training path (also those before the
                # first stage, under an all-ones policy) uses the policy softmax.
                policy = jnp.concatenate([jnp.ones((batch, prefix), jnp.float32), decision],
                                         axis=1)
                rate = self.drop_path_rate * layer / max(cfg.depth - 1, 1)
                x = PolicyBlock(drop_path=rate, **sizes)(x, policy)
            else:
                x, _, _ = Block(num_prefix=prefix, attention=self.attention, **sizes)(
                    x, None, {}, False)

        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        aux.update(features=x[:, prefix:], pre_logits=x[:, 0])
        return classify(cfg, x, aux, self.dtype)


def _flat_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape)
            for path, leaf in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def init_from_vit(model: DynamicViT, vit_params: Mapping[str, Any], rng: Array) -> dict:
    """DynamicViT parameters: `vit_params` (of a `ViT(model.config)`, dense or pruned) plus
    freshly initialised predictors. Raises ValueError naming parameters that do not fit."""
    cfg = model.config
    if set(vit_params) == {"params"}:
        vit_params = vit_params["params"]
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.in_chans), jnp.float32)
    expected = jax.eval_shape(lambda r, x: model.init(r, x)["params"], rng, images)
    predictors = {f"predictor_{stage}" for stage in range(model.dyn.num_stages)}
    want = _flat_shapes({k: v for k, v in expected.items() if k not in predictors})
    have = _flat_shapes(vit_params)
    problems = [f"missing {p}" for p in sorted(set(want) - set(have))]
    problems += [f"unexpected {p}" for p in sorted(set(have) - set(want))]
    problems += [f"{p} has shape {have[p]}, expected {want[p]}"
                 for p in sorted(set(want) & set(have)) if have[p] != want[p]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 5 else "")
        raise ValueError(f"the ViT parameters do not fit DynamicViT(config) for the given "
                         f"ViTConfig: {shown}")
    params = dict(vit_params)
    tokens = jnp.zeros((1, cfg.num_patches, cfg.embed_dim), jnp.float32)
    init_predictor = jax.jit(lambda key: Predictor(model.dtype).init(key, tokens)["params"])
    for stage in range(model.dyn.num_stages):
        params[f"predictor_{stage}"] = init_predictor(jax.random.fold_in(rng, stage))
    return params


def predictor_gmacs(config: ViTConfig, dyn: DynamicViTConfig) -> float:
    """GMACs of the predictors at inference: their four Dense layers on the tokens each sees
    (all patches for the first, the previous stage's survivors after). Pooling, LayerNorm and
    the top-k are not counted, as vitjax.pruning.flops leaves out elementwise work."""
    d = config.embed_dim
    per_token = d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2
    counts = schedule.keep_counts(dyn.ratios, config.num_patches)
    tokens_seen = (config.num_patches, *counts[:-1])
    return sum(n * per_token for n in tokens_seen) / GIGA


def dynamicvit_gmacs(config: ViTConfig, dyn: DynamicViTConfig) -> float:
    """GMACs (multiply-accumulates / 1e9, vitjax.pruning.count_flops conventions) of the
    inference model: patch embedding, every block on the tokens it receives, head(s) and
    predictors. Per image; the same for every image, since the keep counts are static."""
    _check_architecture(config)
    schedule.validate(dyn.ratios, dyn.locations, config)
    counts = dict(zip(dyn.locations, schedule.keep_counts(dyn.ratios, config.num_patches),
                      strict=True))
    d, dh = config.embed_dim, config.dim_per_head
    patches, blocks = config.num_patches, 0
    for layer in range(config.depth):
        patches = counts.get(layer, patches)
        tokens = patches + config.num_prefix_tokens
        blocks += sum(block_macs(d, dh, config.heads_at(layer), config.mlp_dim_at(layer),
                                  tokens, tokens))
    stem, head = stem_and_head_macs(config)
    return (stem + blocks + head) / GIGA + predictor_gmacs(config, dyn)
