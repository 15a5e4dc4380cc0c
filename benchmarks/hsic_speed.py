"""HSIC scoring speed: full DeiT-B (12 x 3072 neurons, 12 x 12 heads, 12 x 197 tokens), B=256.

    python benchmarks/hsic_speed.py                       # DeiT-B, B=256
    python benchmarks/hsic_speed.py --batch 64 --layers 2  # quick

Scores random features of the right shapes with `vitjax.scoring.hsic_scores` (the model's
forward pass is not part of the scoring time), one layer at a time like `score_model` does;
the features of one layer are reused for every layer (the timing does not depend on values,
and 12 layers of DeiT-B neuron features would take 7.4 GB). Prints:
  * the scoring time, and the FLOPs of its Gram einsums (2 F B^2 D);
  * the machine's matmul rate, measured on a large jnp.dot (best of runs before and after the
    scoring), and the resulting ratio
    (scoring time / time those FLOPs take at that rate; the goal is <= 1.5);
  * the speed-up over per-feature numpy loops, timed on a subset of features and extrapolated
    to all of them: the literal Eq. (2) (pairwise differences, tr(K C L C) by matmuls) and a
    tuned loop (norm expansion, centred L precomputed, sum(K * Lc)).
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.bench.timing import seconds_of
from vitjax.scoring.scores import ScoreConfig, chunk_size, hsic_flops, hsic_scores, output_weights


def matmul_rate(size: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of one large float32 jnp.dot on the default device (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    dot(a, b).block_until_ready()
    best = seconds_of(lambda: dot(a, b).block_until_ready(), repeats)
    return 2 * size**3 / best


def numpy_literal(features, outputs, sigma=1.0):
    """Eq. (2) as written, one feature at a time."""
    B = outputs.shape[0]
    C = np.eye(B) - np.ones((B, B)) / B
    L = np.exp(-((outputs[:, None] - outputs[None]) ** 2).sum(-1) / 2)
    out = []
    for x in features:
        K = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / (2 * sigma**2))
        out.append(np.trace(K @ C @ L @ C) / (B - 1) ** 2)
    return np.array(out)


def numpy_tuned(features, outputs, sigma=1.0):
    """A per-feature loop with the same algebra as vitjax (norm expansion, Lc once)."""
    B = outputs.shape[0]
    sq = (outputs**2).sum(-1)
    L = np.exp(-(sq[:, None] + sq[None] - 2 * outputs @ outputs.T) / 2)
    Lc = L - L.mean(0) - L.mean(1)[:, None] + L.mean()
    out = []
    for x in features:
        sq = (x**2).sum(-1)
        K = np.exp(-np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0) / (2 * sigma**2))
        out.append((K * Lc).sum() / (B - 1) ** 2)
    return np.array(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--mlp_dim", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--embed_dim", type=int, default=768)
    parser.add_argument("--numpy_subset", type=int, default=8, help="features per numpy timing")
    parser.add_argument("--chunk_mib", type=int, default=256, help="ScoreConfig.chunk_bytes")
    parser.add_argument("--sigma_mode", default=ScoreConfig().sigma_mode,
                        help="multi (default: 5 Gaussian kernels), fixed (the paper), median")
    args = parser.parse_args()

    B, N, d = args.batch, args.tokens, args.embed_dim
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    config = ScoreConfig(sigma_mode=args.sigma_mode, chunk_bytes=args.chunk_mib * 2**20)
    rng = np.random.default_rng(0)
    outputs = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, 1000)) * 3, jnp.float32))
    # GELU-like activations / head outputs / token features of a plausible scale.
    shapes = {  # dimension -> (features per layer, feature dim)
        "neuron": (args.mlp_dim, N),
        "head": (args.heads, N),
        "token": (N, d),
    }
    features = {
        name: jnp.asarray(rng.normal(size=(f, B, D)).astype(np.float32) * 0.3)
        for name, (f, D) in shapes.items()
    }

    rate_before = matmul_rate()
    weights = output_weights(outputs, config)
    for x in features.values():  # compile once per shape
        hsic_scores(x, config=config, weights=weights).block_until_ready()

    def score_all():
        weights = output_weights(outputs, config)
        for _ in range(args.layers):
            for x in features.values():
                result = hsic_scores(x, config=config, weights=weights)
        result.block_until_ready()

    seconds = seconds_of(score_all, repeats=2)
    flops = sum(hsic_flops(args.layers * f, B, D) for f, D in shapes.values())
    # Best of before/after: the machine is shared, so take the rate it can reach.
    rate = max(rate_before, matmul_rate())
    flop_seconds = flops / rate
    print(f"DeiT shapes: L={args.layers}, F={args.mlp_dim}, H={args.heads}, N={N}, d={d}, "
          f"B={B}; sigma_mode={args.sigma_mode}; features per chunk (neuron shape): "
          f"{chunk_size(B, N, config)}")
    print(f"vitjax scoring (no forward pass):   {seconds:8.2f} s")
    print(f"Gram einsum FLOPs:                  {flops / 1e12:8.3f} TFLOP")
    print(f"measured matmul rate (4096^2 dot):  {rate / 1e9:8.1f} GFLOP/s")
    print(f"FLOP time at that rate:             {flop_seconds:8.2f} s")
    print(f"ratio scoring / FLOP time:          {seconds / flop_seconds:8.2f}  (goal <= 1.5)")

    n_sub = args.numpy_subset
    out_np = np.asarray(outputs, np.float64)
    total = {"literal": 0.0, "tuned": 0.0}
    for name, (f, _) in shapes.items():
        sub = np.asarray(features[name][:n_sub], np.float64)
        for label, fn in (("literal", numpy_literal), ("tuned", numpy_tuned)):
            per_feature = seconds_of(lambda fn=fn, sub=sub: fn(sub, out_np)) / len(sub)
            total[label] += per_feature * f * args.layers
    for label, est in total.items():
        print(f"numpy {label:7s} loop (extrapolated from {n_sub} features per shape): "
              f"{est:9.1f} s  -> vitjax speed-up {est / seconds:6.1f}x")


if __name__ == "__main__":
    main()
