"""ViT / DeiT in Flax Linen, with structural masks for heads, FFN neurons and tokens.

`ViT(config).apply({'params': p}, images, masks)` is a pure function. A sub-network of the dense
"supernet" is selected by a `Masks` pytree of fixed shape, so one compiled function serves every
pruning policy; a physically pruned model is the same module built from a `ViTConfig` with
per-layer sizes. The two give the same logits (see tests/test_model.py).

Parameter layout (heads are an explicit axis, so head pruning is a slice):
  patch_embed/kernel [P, P, C, d]  patch_embed/bias [d]
  cls_token [1, 1, d]  dist_token [1, 1, d]  reg_token [1, R, d]
  pos_embed [1, N, d] (or [1, N - prefix tokens, d] with no_embed_class)
  blocks_{l}/norm1, norm2: LayerNorm scale/bias [d]   blocks_{l}/ls1, ls2: LayerScale gamma [d]
  blocks_{l}/attn/qkv/kernel [d, 3, H, dh]  qkv/bias [3, H, dh]
  blocks_{l}/attn/proj/kernel [H, dh, d]    proj/bias [d]
  blocks_{l}/mlp/fc1/kernel [d, F]  fc1/bias [F]  fc2/kernel [F, d]  fc2/bias [d]
  norm (or fc_norm): LayerNorm [d]   head, head_dist: Dense [d, num_classes]
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vitjax.models.config import ViTConfig

Array = jax.Array
_NEG_INF = float("-inf")


@flax.struct.dataclass
class Masks:
    """Which heads, FFN neurons and tokens of the dense model a sub-network keeps.

    head:   [L, H] 1 keeps head h of layer l.
    neuron: [L, F] 1 keeps FFN hidden unit j of layer l.
    token:  [L, N] static token positions kept by the token selection layer of block l; a token
            dropped at layer l stays dropped (the model takes the cumulative product).
    token_keep: [L] int, alternative to `token`: each image keeps, at block l, its `token_keep[l]`
            tokens (class/distillation tokens included) with the largest class-token attention.
    Any field may be None (that dimension is not pruned). Values are traced arrays, so changing a
    policy never recompiles.
    """

    head: Array | None = None
    neuron: Array | None = None
    token: Array | None = None
    token_keep: Array | None = None


def drop_path_residual(x: Array, rate: float, deterministic: bool, module: nn.Module) -> Array:
    """Stochastic depth: drops the whole residual branch per sample."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _select_by_class_attention(
    cls_attn: Array, alive: Array, keep: Array, num_prefix: int
) -> Array:
    """Per-image token selection: keep the `keep` alive tokens with the largest class attention.

    cls_attn: [B, N] class-token attention (mean over kept heads); alive: [B, N] bool.
    Prefix tokens always win, dead tokens always lose; ties go to the lower position, which is
    what the physically pruned model does too.
    """
    score = jnp.where(alive, cls_attn, _NEG_INF)
    score = score.at[:, :num_prefix].set(jnp.inf)
    order = jnp.argsort(-score, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return alive & (rank < keep)


def _flat_init(init, num_in_axes: int):
    """`init` applied to the 2-D (fan-in, fan-out) view of a kernel, like nn.DenseGeneral."""

    def wrapped(rng, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:num_in_axes]), math.prod(shape[num_in_axes:]))
        return jnp.reshape(init(rng, flat, dtype), shape)

    return wrapped


class DenseParams(nn.Module):
    """The kernel [*in_shape, *features] and bias [*features] of a dense layer, not applied.

    Initialised exactly as nn.DenseGeneral / nn.Dense would, so the parameter tree is the usual
    one, while the caller may fold masks and constant scales into the (small) kernel before the
    matmul instead of multiplying the (large) activations.
    """

    in_shape: tuple[int, ...]
    features: tuple[int, ...]
    kernel_init: Any = nn.initializers.xavier_uniform()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self):
        kernel = self.param(
            "kernel", _flat_init(self.kernel_init, len(self.in_shape)),
            (*self.in_shape, *self.features),
        )
        bias = self.param("bias", _flat_init(self.bias_init, 0), self.features)
        return kernel, bias


# Why the layers below fold constants and masks into their kernels: XLA:CPU (YNNPACK fusions)
# pulls elementwise producers of a matmul operand into the matmul and then materialises every
# scalar constant they use as a full activation-sized buffer (a [B, N, 4d] buffer of 0.5 for
# GELU, a [B, H, N, dh] one for the query scale). Scaling the weights instead costs a
# weight-sized multiply. Masks are 0/1, so masking a weight row is exactly masking the input.


# Attention implementations (`ViT.attention`, `config.model.attention`).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "explicit")
# Checkpointing policies of `ViT(remat=True)` (`config.model.remat_policy`): 'full' recomputes
# every activation of a block in the backward pass; 'dots' keeps the outputs of the matmuls
# against weights (qkv, proj, fc1, fc2: no batch dimensions in the dot) and recomputes only the
# cheap elementwise work and the attention matmuls, whose [B, H, N, N] results are the large part.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def _cudnn_available() -> bool:
    """Whether the default backend is CUDA (cuDNN ships with jax's CUDA plugin)."""
    if jax.default_backend() != "gpu":
        return False
    try:
        from jax.extend import backend as backend_lib

        return "cuda" in str(backend_lib.get_backend().platform_version).lower()
    except (ImportError, AttributeError):  # another jax layout: fall back to the device name
        return "nvidia" in jax.devices()[0].device_kind.lower()


def resolve_attention(implementation: str, dtype: Any, head_dim: int) -> str:
    """The attention implementation `implementation` stands for on the default backend.

    'explicit': the einsum attention below, tuned for XLA:CPU; it materialises [B, H, N, N].
    'xla': `jax.nn.dot_product_attention(implementation='xla')`.
    'cudnn': the same with cuDNN's fused (flash) attention: NVIDIA GPUs, bfloat16 / float16
        compute, head size a multiple of 8 up to 128.
    'auto': 'explicit' on CPU (fastest there, see BUILD_NOTES), 'cudnn' on NVIDIA GPUs where its
        conditions hold, 'xla' otherwise (TPU, float32 on GPU).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: choose one of "
                         f"{list(ATTENTION_IMPLEMENTATIONS)}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if implementation == "cudnn" and not half:
        raise ValueError(f"attention='cudnn' needs bfloat16 or float16 compute, the model "
                         f"computes in {jnp.dtype(dtype).name}; use attention='auto' or 'xla' "
                         "(or config.model.dtype='bfloat16')")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "cpu":
        return "explicit"
    if half and head_dim % 8 == 0 and head_dim <= 128 and _cudnn_available():
        return "cudnn"
    return "xla"


def class_attention(q_cls: Array, k: Array, alive: Array | None) -> Array:
    """The class token's attention probabilities [B, H, N] (float32) alone: its query
    q_cls [B, H, dh] (already scaled) against the keys k [B, N, H, dh], dead keys excluded.
    What token selection and the criteria read, at 1/N of the cost of the full matrix."""
    logits = jnp.einsum("bhd,bnhd->bhn", q_cls, k, preferred_element_type=jnp.float32)
    if alive is not None:
        logits = jnp.where(alive[:, None, :], logits, _NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def fused_attention(q: Array, k: Array, v: Array, alive: Array | None,
                    implementation: str) -> Array:
    """softmax(q k^T) v per head through `jax.nn.dot_product_attention`; q, k, v [B, N, H, dh]
    with the query already scaled; alive [B or 1, N]: keys that take part (None: all)."""
    if alive is None:
        return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
    batch, n = q.shape[0], q.shape[1]
    alive = jnp.broadcast_to(alive, (batch, n))
    if implementation != "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=alive[:, None, None, :], scale=1.0,
                                            implementation=implementation)
    # cuDNN takes a mask as a bias of shape [B, 1, T, S], and in training only with an even
    # sequence length: pad one dead key/query (197 tokens -> 198) and drop its row after.
    pad = n % 2
    if pad:
        q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
        alive = jnp.pad(alive, ((0, 0), (0, pad)))
    mask = jnp.broadcast_to(alive[:, None, None, :], (batch, 1, n + pad, n + pad))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")
    return out[:, :n]


class Attention(nn.Module):
    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    implementation: str = "auto"  # see resolve_attention

    @nn.compact
    def __call__(self, x, head_mask=None, alive=None):
        """-> (output [B, N, d], per-head outputs [B, N, H, dh], class attention [B, H, N])."""
        d = x.shape[-1]
        heads_shape = (self.num_heads, self.head_dim)
        qkv_kernel, qkv_bias = DenseParams((d,), (3, *heads_shape), name="qkv")()
        proj_kernel, proj_bias = DenseParams(heads_shape, (d,), name="proj")()
        # 1/sqrt(dh) folded into the query weights (exact for powers of two, e.g. dh = 64).
        scale = jnp.asarray([self.head_dim**-0.5, 1.0, 1.0], self.dtype)[:, None, None]
        qkv_kernel = qkv_kernel.astype(self.dtype) * scale
        qkv_bias = qkv_bias.astype(self.dtype) * scale
        qkv = jnp.einsum("bnd,dthk->bnthk", x, qkv_kernel) + qkv_bias
        implementation = resolve_attention(self.implementation, self.dtype, self.head_dim)
        if implementation == "explicit":
            # Heads-leading [3, B, H, N, dh]: both attention matmuls are then plain batched
            # matmuls over (B, H). With [B, N, H, dh] operands XLA:CPU picks transposed operand
            # layouts for the dots, which ran about 2x slower than this one explicit transpose.
            q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
            logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
            if alive is not None:
                # Dropped tokens are no longer keys/values for anybody.
                logits = jnp.where(alive[:, None, None, :], logits, _NEG_INF)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            heads = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v)
            heads = jnp.transpose(heads, (0, 2, 1, 3))  # [B, N, H, dh], the layout aux promises
            cls_attn = probs[:, :, 0, :]
        else:
            # The fused kernel never forms the probabilities; the class token's row, which
            # token selection and the criteria need, is computed on its own (and is dead code,
            # removed by XLA, where nobody reads it).
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, dh]
            heads = fused_attention(q, k, v, alive, implementation)
            cls_attn = class_attention(q[:, 0], k, alive)
        proj_kernel = proj_kernel.astype(self.dtype)
        proj_bias = proj_bias.astype(self.dtype)
        if head_mask is not None:
            head_mask = head_mask.astype(self.dtype)
            proj_kernel = proj_kernel * head_mask[:, None, None]
            # With every head dropped the sub-block is removed: no projection bias either.
            proj_bias = proj_bias * jnp.any(head_mask > 0).astype(self.dtype)
        out = jnp.einsum("bnhk,hkd->bnd", heads, proj_kernel) + proj_bias
        return out, heads, cls_attn


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, neuron_mask=None):
        d = x.shape[-1]
        bias_init = nn.initializers.normal(1e-6)
        fc1_kernel, fc1_bias = DenseParams((d,), (self.hidden_dim,), bias_init=bias_init,
                                           name="fc1")()
        fc2_kernel, fc2_bias = DenseParams((self.hidden_dim,), (d,), bias_init=bias_init,
                                           name="fc2")()
        pre = x @ fc1_kernel.astype(self.dtype) + fc1_bias.astype(self.dtype)
        # Exact (erf) GELU, as timm/DeiT: gelu(u) = 0.5 * u * (1 + erf(u / sqrt 2)). The 0.5
        # goes into fc2's weights (a power of two: exact). lax.erf is about 2x cheaper on CPU
        # than the erfc form of jax.nn.gelu and agrees with it to ~1 ulp (1e-6 at |u| ~ 10).
        half_gelu = pre * (1.0 + jax.lax.erf(pre * math.sqrt(0.5)))
        fc2_kernel = fc2_kernel.astype(self.dtype) * 0.5
        fc2_bias = fc2_bias.astype(self.dtype)
        if neuron_mask is not None:
            neuron_mask = neuron_mask.astype(self.dtype)
            fc2_kernel = fc2_kernel * neuron_mask[:, None]
            # With every neuron dropped the sub-block is removed: no fc2 bias either.
            fc2_bias = fc2_bias * jnp.any(neuron_mask > 0).astype(self.dtype)
        out = half_gelu @ fc2_kernel + fc2_bias
        return out, 0.5 * half_gelu  # hidden: GELU output, before neuron masking


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT / DeiT-III, timm's `ls1.gamma`)."""

    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block with a token selection layer between MHSA and FFN."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    drop_path: float = 0.0
    num_prefix: int = 1
    attention: str = "auto"  # attention implementation, see resolve_attention
    dtype: Any = jnp.float32
    layer_scale: bool = False  # ls1 / ls2 gammas on the two residual branches

    @nn.compact
    def __call__(self, x, alive, masks, train: bool = False, keep_indices=None, keep_count=None):
        """x: [B, N, d]; alive: [B, N] bool or None (None: every token is alive).

        masks: dict with optional 'head' [H], 'neuron' [F], 'token' [N] (static), 'token_keep'
        (scalar). keep_indices / keep_count: physical token selection of a pruned model.
        """
        ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)  # noqa: E731
        aux = {}
        head_mask = masks.get("head")
        if self.num_heads:
            attn_out, heads, cls_attn = Attention(
                self.num_heads, self.head_dim, self.dtype, self.attention, name="attn"
            )(ln("norm1")(x), head_mask, alive)
            if self.layer_scale:
                attn_out = LayerScale(name="ls1")(attn_out)
            x = x + drop_path_residual(attn_out, self.drop_path, not train, self)
            aux.update(attn_heads=heads, cls_attn=cls_attn)
            if head_mask is None:
                cls_attn_mean = cls_attn.mean(axis=1)
            else:
                weights = head_mask.astype(jnp.float32)
                cls_attn_mean = jnp.einsum("bhn,h->bn", cls_attn, weights) / jnp.maximum(
                    weights.sum(), 1.0
                )
        else:
            cls_attn_mean = jnp.zeros(x.shape[:2], jnp.float32)
        aux["tokens"] = x

        # Token selection layer (no parameters).
        if masks.get("token") is not None:
            alive = masks["token"][None, :] > 0 if alive is None else alive & (masks["token"] > 0)
        elif masks.get("token_keep") is not None:
            alive = jnp.ones(x.shape[:2], bool) if alive is None else alive
            alive = _select_by_class_attention(
                cls_attn_mean, alive, masks["token_keep"], self.num_prefix
            )
        elif keep_indices is not None:
            x = x[:, jnp.asarray(keep_indices)]
        elif keep_count is not None and keep_count < x.shape[1]:
            score = cls_attn_mean.at[:, : self.num_prefix].set(jnp.inf)
            order = jnp.argsort(-score, axis=-1, stable=True)[:, :keep_count]
            x = jnp.take_along_axis(x, jnp.sort(order, axis=-1)[..., None], axis=1)
        if alive is not None:
            aux["alive"] = jnp.broadcast_to(alive, x.shape[:2])

        neuron_mask = masks.get("neuron")
        if self.mlp_dim:
            mlp_out, hidden = Mlp(self.mlp_dim, self.dtype, name="mlp")(
                ln("norm2")(x), neuron_mask
            )
            if self.layer_scale:
                mlp_out = LayerScale(name="ls2")(mlp_out)
            x = x + drop_path_residual(mlp_out, self.drop_path, not train, self)
            aux["ffn_hidden"] = hidden
        return x, alive, aux


class PatchEmbed(nn.Module):
    """Non-overlapping patches times one matrix: a conv with stride = kernel, without the conv."""

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        p = self.patch_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (p, p, c, self.embed_dim)
        ).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.embed_dim,)).astype(self.dtype)
        patches = x.reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel) + bias
        return x.reshape(b, (h // p) * (w // p), self.embed_dim)


class ViT(nn.Module):
    """ViT/DeiT classifier. `__call__(images, masks=None, train=False) -> (logits, aux)`.

    images: [B, H, W, C] float, already normalised.
    aux: {'pre_logits': [B, d], 'blocks': [per-block dict]} with, per block,
      attn_heads [B, N, H, dh] per-head attention outputs (before the output projection),
      cls_attn [B, H, N] attention probabilities of the class token,
      tokens [B, N, d] token features after attention (input of the token selection layer),
      ffn_hidden [B, N', F] FFN activations after GELU, before neuron masking,
      alive [B, N] tokens alive after the token selection layer (masked runs only).
    Under jit, parts of aux the caller does not use cost nothing.
    """

    config: ViTConfig
    drop_path_rate: float = 0.0  # stochastic depth at the last block (linear from 0)
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    # Recompute each block's activations in the backward pass instead of storing them: less
    # memory for large batches (DeiT-B at 128 images per device), ~30% more compute.
    remat: bool = False
    remat_policy: str = "full"  # what remat keeps: a key of REMAT_POLICIES
    attention: str = "auto"  # attention implementation: a value of ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, images, masks: Masks | None = None, train: bool = False):
        cfg = self.config
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_chans):
            raise ValueError(
                f"images have shape {images.shape}; this model expects "
                f"[batch, {cfg.image_size}, {cfg.image_size}, {cfg.in_chans}]"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}: choose one of "
                             f"{sorted(REMAT_POLICIES)}")
        resolve_attention(self.attention, self.dtype, cfg.dim_per_head)  # a clear error early
        if masks is not None and cfg.is_pruned:
            raise ValueError("masks select sub-networks of a dense model; this model is pruned")
        per_image = cfg.layer_tokens is not None and cfg.layer_token_indices is None
        if not cfg.class_token and (per_image or (masks is not None
                                                  and masks.token_keep is not None)):
            raise ValueError(f"token_keep / layer_tokens without layer_token_indices select "
                             f"tokens by class attention; this {cfg.family} has no class token: "
                             "use static token masks (Masks.token, layer_token_indices)")
        d = cfg.embed_dim
        x = images.astype(self.dtype)

        x = PatchEmbed(cfg.patch_size, d, self.dtype, name="patch_embed")(x)

        tok_init = nn.initializers.truncated_normal(0.02)
        prefix = []
        if cfg.class_token:
            prefix.append(self.param("cls_token", tok_init, (1, 1, d)))
        if cfg.distilled:
            prefix.append(self.param("dist_token", tok_init, (1, 1, d)))
        if cfg.reg_tokens:
            prefix.append(self.param("reg_token", tok_init, (1, cfg.reg_tokens, d)))
        prefix = [jnp.broadcast_to(t.astype(self.dtype), (x.shape[0], *t.shape[1:]))
                  for t in prefix]
        pos_embed = self.param("pos_embed", tok_init, (1, cfg.num_pos_embed, d))
        pos_embed = pos_embed.astype(self.dtype)
        if cfg.no_embed_class:  # timm's order: positions on the patches, then the prefix
            x = jnp.concatenate([*prefix, x + pos_embed], axis=1)
        else:
            x = jnp.concatenate([*prefix, x], axis=1) + pos_embed

        alive = None
        blocks_aux = []
        for layer in range(cfg.depth):
            layer_masks = {}
            if masks is not None:
                for name in ("head", "neuron", "token", "token_keep"):
                    value = getattr(masks, name)
                    if value is not None:
                        layer_masks[name] = value[layer]
            keep_indices = keep_count = None
            if cfg.layer_token_indices is not None:
                keep_indices = cfg.layer_token_indices[layer]
            elif cfg.layer_tokens is not None:
                keep_count = cfg.layer_tokens[layer]
            rate = self.drop_path_rate * layer / max(cfg.depth - 1, 1)
            block = Block
            if self.remat:
                block = nn.remat(Block, static_argnums=(4, 5, 6),
                                 policy=REMAT_POLICIES[self.remat_policy])
            x, alive, block_aux = block(
                num_heads=cfg.heads_at(layer),
                head_dim=cfg.dim_per_head,
                mlp_dim=cfg.mlp_dim_at(layer),
                drop_path=rate,
                num_prefix=cfg.num_prefix_tokens,
                attention=self.attention,
                dtype=self.dtype,
                layer_scale=cfg.layer_scale,
                name=f"blocks_{layer}",
            )(x, alive, layer_masks, train, keep_indices, keep_count)
            blocks_aux.append(block_aux)

        if not cfg.fc_norm:
            x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        aux = {"blocks": blocks_aux}
        return classify(cfg, x, aux, self.dtype, alive)


def pool(cfg: ViTConfig, x: Array, alive: Array | None = None) -> Array:
    """[B, d] features of the final tokens x [B, N, d]: the class token, or (global_pool 'avg')
    the mean of the patch tokens that are still alive (timm leaves prefix tokens out)."""
    if cfg.global_pool == "token":
        return x[:, 0]
    # Summed in float32: a bfloat16 sum over 196 tokens would lose the mean's low bits.
    patches = x[:, cfg.num_prefix_tokens:].astype(jnp.float32)
    if alive is None:
        return patches.mean(axis=1).astype(x.dtype)
    weights = jnp.broadcast_to(alive, x.shape[:2])[:, cfg.num_prefix_tokens:]
    weights = weights.astype(jnp.float32)[..., None]
    mean = (patches * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
    return mean.astype(x.dtype)


def classify(
    cfg: ViTConfig, x: Array, aux: dict, dtype: Any, alive: Array | None = None
) -> tuple[Array, dict]:
    """(logits, aux) from the final tokens x [B, N, d] (normalised, unless fc_norm): pooling
    (`pool`), fc_norm, then the class head (and the distillation head, averaged, for distilled
    DeiT). Call it inside a compact `__call__`: the layers become the caller's submodules
    'fc_norm' / 'head' / 'head_dist'. Sets aux['pre_logits']. Without classes (a feature
    extractor) the pooled features, or the mean of both prefix tokens' as timm's distilled DeiT
    without heads. alive [B, N]: tokens a masked run has not dropped (average pooling)."""
    features = pool(cfg, x, alive)
    if cfg.fc_norm:
        features = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name="fc_norm")(features)
    aux["pre_logits"] = features
    if not cfg.num_classes:
        features = (x[:, 0] + x[:, 1]) / 2 if cfg.distilled else features
        return features.astype(jnp.float32), aux

    def head(name: str) -> nn.Dense:
        return nn.Dense(cfg.num_classes, dtype=dtype,
                        kernel_init=nn.initializers.truncated_normal(0.02), name=name)

    logits = head("head")(features).astype(jnp.float32)
    if cfg.distilled:
        # DeiT distilled: without a teacher both heads are trained alike; average them.
        logits_dist = head("head_dist")(x[:, 1]).astype(jnp.float32)
        aux.update(logits_cls=logits, logits_dist=logits_dist)
        logits = (logits + logits_dist) / 2
    return logits, aux


def init_params(model: ViT, rng: Array, batch_size: int = 1):
    """Initialises parameters without running the forward pass (shape inference only)."""
    cfg = model.config
    images = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, cfg.in_chans), jnp.float32)
    return jax.jit(lambda r: model.init(r, images)["params"])(rng)
