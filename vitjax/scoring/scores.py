"""HSIC dependency scores of every FFN neuron, attention head and token position (Sec. 3.2).

Feature shapes follow the paper: neuron j of layer l -> its activations over all tokens [B, N];
head h -> its attention output averaged over the head dimension [B, N]; token position n -> its
features [B, d] (input of the token selection layer). Each is scored against the softmax outputs.

Scoring is one jitted function per feature shape: the feature axis is split over the devices of
a Mesh (shard_map, no communication but the final gather), and each device walks its features
in chunks (lax.map with batch_size) so that the B x B intermediates of one chunk stay below
`ScoreConfig.chunk_bytes`. The input features themselves are not counted: they are what the
forward pass produced.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vitjax.models.vit import Masks, ViT
from vitjax.scoring import hsic as hsic_lib

Array = jax.Array

# float32 B x B arrays alive per feature inside one chunk: inner products, distances, kernel.
_GRAMS_PER_FEATURE = 3


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """How dependency scores are computed.

    Defaults follow the authors' released code (Gaussian feature kernel averaged over bandwidths
    1..16, linear kernel over softmax outputs): the paper's printed sigma = 1 (`paper()`) makes
    the Gram matrix of high-dimensional features nearly the identity (on digits, token features
    have median pairwise squared distance ~50, so off-diagonal K ~ e^-25) and ranks worse than
    random in the Fig. 1 sweep; see vitjax/scoring/sweep.py.
    """

    sigma_mode: str = "multi"  # 'fixed' | 'median' | 'multi' (mean over `sigmas`)
    sigma: float = 1.0  # bandwidth ('fixed'), or multiplier of the median distance ('median')
    sigmas: tuple[float, ...] = hsic_lib.AUTHORS_SIGMAS  # 'multi' bandwidths (authors' code)
    standardize: bool = False  # z-score each feature coordinate over the batch first
    output_kernel: str = "linear"  # 'gaussian' | 'linear' over softmax probabilities
    output_sigma: float = 1.0  # bandwidth of the Gaussian output kernel
    estimator: str = "biased"  # 'biased' (Eq. 2) | 'unbiased' (Song et al. 2012)
    chunk_bytes: int = 256 * 2**20  # bound on one device's B x B intermediates
    # On CPU, chunks that stay in cache run ~3x faster than large batched matmuls (XLA:CPU),
    # measured with benchmarks/hsic_speed.py; accelerators use chunk_bytes alone.
    cpu_chunk_bytes: int = 8 * 2**20
    mesh: Mesh | None = None  # features are split over all devices of this mesh
    score_tokens: bool = True  # False: skip token scores (token_mode='attention' needs none)

    def __post_init__(self):
        checks = (
            ("sigma_mode", hsic_lib.SIGMA_MODES),
            ("output_kernel", hsic_lib.OUTPUT_KERNELS),
            ("estimator", hsic_lib.ESTIMATORS),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"ScoreConfig.{name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")
        if self.sigma <= 0 or self.output_sigma <= 0 or any(s <= 0 for s in self.sigmas):
            raise ValueError("ScoreConfig bandwidths (sigma, output_sigma, sigmas) must be > 0")
        if self.chunk_bytes <= 0 or self.cpu_chunk_bytes <= 0:
            raise ValueError("ScoreConfig.chunk_bytes and cpu_chunk_bytes must be > 0, got "
                             f"{self.chunk_bytes}, {self.cpu_chunk_bytes}")
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))

    @classmethod
    def paper(cls, **overrides) -> ScoreConfig:
        """Sec. 4.1 as printed: Gaussian kernels with sigma = 1 on features and softmax
        outputs, biased estimator of Eq. (2)."""
        settings = dict(sigma_mode="fixed", sigma=1.0, output_kernel="gaussian",
                        output_sigma=1.0, estimator="biased")
        return cls(**{**settings, **overrides})

    @classmethod
    def authors_code(cls, **overrides) -> ScoreConfig:
        """The authors' released code: feature kernel averaged over sigma in {1, 2, 4, 8, 16},
        linear kernel over the softmax outputs. (Its `mean_sub` computes x - mean/std, a
        translation, which a Gaussian kernel ignores; centring y does not change C L C.)"""
        settings = dict(sigma_mode="multi", sigmas=hsic_lib.AUTHORS_SIGMAS,
                        output_kernel="linear", estimator="biased")
        return cls(**{**settings, **overrides})


@flax.struct.dataclass
class Scores:
    """Dependency scores, higher = more important. head [L, H], neuron [L, F], token [L, N]
    (None when not scored). Token scores rank static positions (token_mode='static'); prefix
    tokens are scored too but masks always keep them."""

    head: Array
    neuron: Array
    token: Array | None = None

    def ranks(self):
        """`vitjax.pruning.masks.Ranks` (rank 0 = highest score) for masks_from_ranks."""
        from vitjax.pruning.masks import Ranks, ranks_from_scores

        token = None if self.token is None else ranks_from_scores(self.token)
        return Ranks(ranks_from_scores(self.head), ranks_from_scores(self.neuron), token)


def chunk_size(batch: int, dim: int, config: ScoreConfig, platform: str | None = None) -> int:
    """Features scored at once on one device so their intermediates fit in chunk_bytes
    (and, on CPU, in cpu_chunk_bytes)."""
    per_feature = 4 * (batch * dim + _GRAMS_PER_FEATURE * batch * batch)
    if config.sigma_mode == "median":
        per_feature += 4 * 2 * batch * (batch - 1) // 2  # gathered distances + sort buffer
    budget = config.chunk_bytes
    if (platform or _platform(config)) == "cpu":
        budget = min(budget, config.cpu_chunk_bytes)
    return max(1, budget // per_feature)


def _platform(config: ScoreConfig) -> str:
    if config.mesh is not None:
        return config.mesh.devices.flat[0].platform
    return jax.default_backend()


def hsic_flops(num_features: int, batch: int, dim: int) -> int:
    """FLOPs of the Gram einsums (2 F B^2 D), the part that dominates scoring."""
    return 2 * num_features * batch * batch * dim


def _feature_score(x: Array, weights: Array, config: ScoreConfig) -> Array:
    """HSIC of one feature x [B, D] against the outputs, given W from `hsic_weights`."""
    x = x.astype(jnp.float32)
    if config.standardize:
        x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    d2 = hsic_lib.squared_distances(x)
    K = hsic_lib.gaussian_from_distances(d2, config.sigma_mode, config.sigma, config.sigmas)
    return jnp.sum(K * weights)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _scores_jit(features: Array, weights: Array, *, config: ScoreConfig, chunk: int) -> Array:
    def local(x, w):
        # lax.map over features, `chunk` of them vmapped per step: bounded intermediates.
        return jax.lax.map(lambda f: _feature_score(f, w, config), x, batch_size=chunk)

    if config.mesh is None or config.mesh.size == 1:
        return local(features, weights)
    axes = tuple(config.mesh.axis_names)
    return jax.shard_map(
        local,
        mesh=config.mesh,
        in_specs=(PartitionSpec(axes), PartitionSpec()),
        out_specs=PartitionSpec(axes),
    )(features, weights)


def output_weights(outputs: Array, config: ScoreConfig) -> Array:
    """W with HSIC(K_feature, L_outputs) = sum(K * W); compute once, reuse for every feature."""
    L = hsic_lib.output_gram(jnp.asarray(outputs, jnp.float32), config.output_kernel,
                             config.output_sigma)
    return hsic_lib.hsic_weights(L, config.estimator)


def hsic_scores(
    features: Array, outputs: Array | None = None, config: ScoreConfig = ScoreConfig(), *,
    weights: Array | None = None,
) -> Array:
    """HSIC score of each feature: features [F, B, D], outputs [B, C] (or precomputed
    `weights` [B, B] from `output_weights`) -> [F] float32."""
    if features.ndim != 3:
        raise ValueError(f"features must be [num_features, batch, dim], got {features.shape}")
    num_features, batch, dim = features.shape
    if weights is None:
        if outputs is None or outputs.shape[0] != batch:
            raise ValueError(f"outputs must be [batch={batch}, classes], got "
                             f"{None if outputs is None else outputs.shape}")
        weights = output_weights(outputs, config)
    devices = 1 if config.mesh is None else config.mesh.size
    per_device = math.ceil(num_features / devices)
    chunk = min(per_device, chunk_size(batch, dim, config))
    padded = per_device * devices
    if padded != num_features:
        # A constant (zero) feature is independent of anything; its score is dropped anyway.
        features = jnp.pad(features, ((0, padded - num_features), (0, 0), (0, 0)))
    if devices > 1:
        axes = tuple(config.mesh.axis_names)
        features = jax.device_put(features, NamedSharding(config.mesh, PartitionSpec(axes)))
        weights = jax.device_put(weights, NamedSharding(config.mesh, PartitionSpec()))
    scores = _scores_jit(features, weights, config=config, chunk=chunk)
    if devices > 1:
        # F scores are tiny: gather them so callers can slice and stack freely.
        scores = jax.device_put(scores, NamedSharding(config.mesh, PartitionSpec()))
    return scores[:num_features]


def model_features(aux: dict) -> dict[str, list[Array]]:
    """Per-layer features in the paper's shapes from the model's aux outputs:
    'neuron' [F, B, N], 'head' [H, B, N] (mean over head dim), 'token' [N, B, d]."""
    blocks = aux["blocks"]
    return {
        "neuron": [jnp.moveaxis(b["ffn_hidden"], -1, 0) for b in blocks],
        "head": [jnp.moveaxis(b["attn_heads"].mean(axis=-1), -1, 0) for b in blocks],
        "token": [jnp.moveaxis(b["tokens"], 1, 0) for b in blocks],
    }


@functools.partial(jax.jit, static_argnames="model")
def _forward(model: ViT, params, images: Array, masks: Masks | None):
    # Module-level jit keyed on the (hashable) model: periodic re-scoring during training
    # compiles the forward pass once.
    logits, aux = model.apply({"params": params}, images, masks=masks, train=False)
    return jax.nn.softmax(logits, axis=-1), model_features(aux)


def score_model(
    model: ViT, params, images: Array, *, masks: Masks | None = None,
    config: ScoreConfig = ScoreConfig(),
) -> Scores:
    """HSIC scores of every head, neuron (and token position) of `model` on one batch.

    images [B, H, W, C] (the paper: 256 training images). The forward pass runs once; each
    layer's features are then scored in bounded-memory chunks over the devices of config.mesh.
    """
    if images.shape[0] < (4 if config.estimator == "unbiased" else 2):
        raise ValueError(f"scoring needs a batch of several images, got {images.shape[0]}")

    probabilities, features = _forward(model, params, images, masks)
    weights = output_weights(probabilities, config)
    dims = ("head", "neuron") + (("token",) if config.score_tokens else ())
    result = {
        dim: jnp.stack([hsic_scores(f, config=config, weights=weights) for f in features[dim]])
        for dim in dims
    }
    return Scores(head=result["head"], neuron=result["neuron"], token=result.get("token"))


def save_scores(path, scores: Scores | None = None, ranks=None) -> None:
    """Scores and/or ranks to one .npz file (local or gs://): arrays 'head', 'neuron', 'token'
    (scores, when given) and 'rank_head', 'rank_neuron', 'rank_token' (the given ranks, else
    the scores' ranks). The score stage and the supernet's stored ranks both use this format;
    `load_scores` and `load_ranks` read it."""
    from vitjax.workdir import write_npz

    if scores is None and ranks is None:
        raise ValueError("save_scores needs scores, ranks or both")
    arrays = {}
    if scores is not None:
        arrays.update({k: v for k, v in (("head", scores.head), ("neuron", scores.neuron),
                                         ("token", scores.token)) if v is not None})
        ranks = ranks if ranks is not None else scores.ranks()
    arrays.update({f"rank_{k}": v for k, v in (("head", ranks.head), ("neuron", ranks.neuron),
                                                ("token", ranks.token)) if v is not None})
    write_npz(path, arrays)


def load_scores(path) -> Scores:
    """The scores of a file written by `save_scores` (an error if it holds ranks only)."""
    from vitjax.workdir import read_npz

    data = read_npz(path)
    if "head" not in data:
        raise ValueError(f"{path} holds ranks but no scores")
    token = jnp.asarray(data["token"]) if "token" in data else None
    return Scores(jnp.asarray(data["head"]), jnp.asarray(data["neuron"]), token)


def load_ranks(path):
    """The ranks (`vitjax.pruning.Ranks`) of a file written by `save_scores`."""
    from vitjax.pruning.masks import Ranks
    from vitjax.workdir import read_npz

    data = read_npz(path)
    token = jnp.asarray(data["rank_token"]) if "rank_token" in data else None
    return Ranks(jnp.asarray(data["rank_head"]), jnp.asarray(data["rank_neuron"]), token)
