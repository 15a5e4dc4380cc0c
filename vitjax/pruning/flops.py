"""Closed-form multiply-accumulate counts of a (pruned) ViT.

Convention: one multiply-accumulate = one "FLOP", as in the DeiT paper, fvcore and the
compression paper's tables (DeiT-S 4.6G, DeiT-B 17.6G). Counted: patch embedding, qkv,
attention scores (QK^T), attention-weighted values (AV), output projection, FFN fc1/fc2 and the
classifier head(s). Not counted: LayerNorm, GELU, softmax, biases and residual adds (a few per
mille). The paper's Sec. 1 table ("Total 17.5G" for DeiT-B) also leaves out the patch embedding
and the head; `Flops.blocks` is that number.

Per block l with n_in tokens entering, n_out tokens leaving the token selection layer (which sits
between MHSA and FFN), h kept heads of size dh and f kept neurons:
  qkv n_in*d*3*h*dh, scores h*n_in^2*dh, AV h*n_in^2*dh, proj n_in*h*dh*d, FFN 2*n_out*d*f.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from vitjax.models.config import ViTConfig

GIGA = 1e9


@dataclasses.dataclass(frozen=True)
class Flops:
    """GMACs of a model, by part."""

    patch_embed: float
    qkv: float
    attention: float  # QK^T and AV ("softmax-attention" in the paper's table)
    proj: float
    ffn: float
    head: float
    per_layer: tuple[float, ...]  # GMACs of each block

    @property
    def mhsa_projections(self) -> float:
        return self.qkv + self.proj

    @property
    def blocks(self) -> float:
        """What the paper's Sec. 1 table totals: the transformer blocks only."""
        return self.qkv + self.attention + self.proj + self.ffn

    @property
    def total(self) -> float:
        return self.patch_embed + self.blocks + self.head

    def __str__(self) -> str:
        return (
            f"{self.total:.3f} GMACs (blocks {self.blocks:.3f}: qkv {self.qkv:.3f}, attention "
            f"{self.attention:.3f}, proj {self.proj:.3f}, ffn {self.ffn:.3f}; patch embed "
            f"{self.patch_embed:.3f}; head {self.head:.4f})"
        )


def block_macs(d, dh, heads, neurons, n_in, n_out):
    """MACs of one block's parts; works on Python numbers, numpy and jax arrays alike."""
    qkv = n_in * d * 3 * heads * dh
    attention = 2 * heads * n_in * n_in * dh
    proj = n_in * heads * dh * d
    ffn = 2 * n_out * d * neurons
    return qkv, attention, proj, ffn


def stem_and_head_macs(config: ViTConfig) -> tuple[float, float]:
    patch = config.num_patches * config.patch_size**2 * config.in_chans * config.embed_dim
    head = config.embed_dim * config.num_classes * (2 if config.distilled else 1)
    return patch, head


def count_flops(config: ViTConfig, policy=None) -> Flops:
    """GMACs of `config` (dense, or pruned by its per-layer sizes), or of `policy` applied to
    the dense `config`."""
    if policy is not None:
        config = policy.pruned_config(config)
    d, dh = config.embed_dim, config.dim_per_head
    parts = np.zeros(4)
    per_layer = []
    for layer in range(config.depth):
        macs = block_macs(
            d, dh, config.heads_at(layer), config.mlp_dim_at(layer),
            config.tokens_in(layer), config.tokens_out(layer),
        )
        parts += np.asarray(macs, np.float64)
        per_layer.append(sum(macs) / GIGA)
    patch, head = stem_and_head_macs(config)
    qkv, attention, proj, ffn = (parts / GIGA).tolist()
    return Flops(patch / GIGA, qkv, attention, proj, ffn, head / GIGA, tuple(per_layer))


def _gmacs_from_ratios(config: ViTConfig, ratios, xp, ceil):
    """GMACs for ratios [..., 3L] = [neuron_1..L, head_1..L, token_1..L] (vectorised)."""
    L = config.depth
    neuron_r, head_r = ratios[..., :L], ratios[..., L : 2 * L]
    token_r = ratios[..., 2 * L :]
    round_up = (lambda x: xp.ceil(xp.round(x, 9))) if ceil else (lambda x: x)
    neurons = round_up((1.0 - neuron_r) * config.mlp_dim)
    heads = round_up((1.0 - head_r) * config.num_heads)
    prefix = config.num_prefix_tokens
    d, dh = config.embed_dim, config.dim_per_head
    patches = config.num_patches * xp.ones_like(token_r[..., 0])
    total = 0.0
    for layer in range(L):
        n_in = patches + prefix
        patches = round_up((1.0 - token_r[..., layer]) * patches)
        macs = block_macs(d, dh, heads[..., layer], neurons[..., layer], n_in, patches + prefix)
        total = total + sum(macs)
    patch, head = stem_and_head_macs(config)
    return (total + patch + head) / GIGA


def count_flops_batch(config: ViTConfig, ratio_vectors: np.ndarray) -> np.ndarray:
    """Exact GMACs (with ceil) of many policies at once; ratio_vectors is [P, 3L]."""
    return _gmacs_from_ratios(config, np.asarray(ratio_vectors, np.float64), np, ceil=True)


def relaxed_gmacs(config: ViTConfig, ratio_vector):
    """Continuous relaxation (no ceil) of the GMACs, differentiable with jax for the search's
    constraint; `ratio_vector` is the policy's 3L-vector (see `Policy.to_vector`)."""
    import jax.numpy as jnp

    return _gmacs_from_ratios(config, jnp.asarray(ratio_vector), jnp, ceil=False)


_HLO_DEF = re.compile(r"%?([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w[\w\-]*)\(([^)]*)\)(.*)")


def xla_matmul_macs(compiled_hlo_text: str) -> float:
    """MACs of every dot in an optimised XLA HLO module (from `jit(f).lower(..).compile()
    .as_text()`): output elements times contracted size. An independent check of `count_flops`
    that sees exactly the matrix products XLA will run, and nothing elementwise."""
    shapes: dict[str, list[int]] = {}
    dots = []
    for line in compiled_hlo_text.splitlines():
        match = _HLO_DEF.search(line)
        if not match:
            continue
        name, dims, opcode, operands, attrs = match.groups()
        shapes[name] = [int(x) for x in dims.split(",") if x]
        if opcode == "dot":
            dots.append((name, operands, attrs))
    total = 0
    for name, operands, attrs in dots:
        lhs = operands.split(",")[0].strip().lstrip("%")
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        dims = [int(x) for x in contracting.group(1).split(",") if x] if contracting else []
        contracted = int(np.prod([shapes[lhs][i] for i in dims])) if dims else 1
        total += int(np.prod(shapes[name])) * contracted
    return float(total)
