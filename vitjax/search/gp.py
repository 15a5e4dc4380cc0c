"""Gaussian process regression in JAX: ARD Matérn-5/2 or RBF kernel plus noise, hyper-parameters
by maximising the log marginal likelihood (optionally with a lengthscale prior), Cholesky
posterior.

    gp = fit_gp(u, values, kernel='matern52', restarts=3, rng=np.random.default_rng(0))
    mean, var = gp.predict(u_query)          # latent f, in the units of `values`
    gp2 = gp.condition(u_new, fake_values)   # same hyper-parameters, more data (batch BO)

Inputs are points of the unit cube (`SearchSpace` maps policies there). Outputs are standardised
(zero mean, unit standard deviation) before fitting, as scikit-learn's `normalize_y=True`; the
prior mean is therefore the mean of the observations. Hyper-parameters: log lengthscales (one
per input dimension), log amplitude (the signal's standard deviation, kernel variance amp^2) and
log noise (a noise variance, WhiteKernel's `noise_level`), all in standardised units.

Precision: everything here runs in float64 inside a local `jax.enable_x64(True)` context
(thread local, restored on exit; never set globally; see `numerics`). Kernel matrices of 200
nearly noise-free points in the unit cube are too ill-conditioned for a float32 Cholesky, and
SLSQP's line search needs EI values that are smooth to more than 7 digits. A jitter of 1e-10
(scikit-learn's default `alpha`) is added to the diagonal on top of the fitted noise.

Shapes are padded to multiples of 32 data points (padding rows are identity rows of the kernel
matrix with zero targets, which leaves every result exact) so one compilation serves a search
whose data grows by one point per iteration.

Why not tinygp: see NOTES_FOR_LEAD.md (it adds equinox/jaxtyping for ~100 lines we need).
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

KERNELS = ("matern52", "rbf")
JITTER = 1e-10
PAD_MULTIPLE = 32
# Bounds of the hyper-parameters in standardised units on the unit cube.
LOG_LENGTHSCALE_BOUNDS = (math.log(1e-2), math.log(1e3))
LOG_AMPLITUDE_BOUNDS = (math.log(1e-2), math.log(1e2))
LOG_NOISE_BOUNDS = (math.log(1e-6), math.log(1.0))
PRIORS = (None, "dim_scaled")


@functools.lru_cache(maxsize=1)
def _blas_controller():
    import threadpoolctl  # a dependency of scikit-learn

    return threadpoolctl.ThreadpoolController()


def numerics(fn):
    """Runs `fn` with 64-bit JAX types and single-threaded BLAS, both only while it runs.

    Single-threaded BLAS: scipy's SLSQP and L-BFGS-B work on 36x36 matrices, where OpenBLAS's
    thread pool only adds synchronisation (measured: twice the CPU time of a 12-iteration
    search on a 2-core machine, and a different floating-point path from run to run)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True), _blas_controller().limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


@flax.struct.dataclass
class GPParams:
    log_lengthscale: jax.Array  # [D]
    log_amplitude: jax.Array  # log signal standard deviation
    log_noise: jax.Array  # log noise variance

    def to_vector(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.log_lengthscale, np.float64).ravel(),
                               [float(self.log_amplitude), float(self.log_noise)]])

    @classmethod
    def from_vector(cls, theta) -> GPParams:
        theta = jnp.asarray(theta)
        return cls(theta[:-2], theta[-2], theta[-1])

    def to_dict(self) -> dict:
        """JSON-able; Python floats round-trip exactly, so a resumed search warm-starts from
        bit-identical hyper-parameters."""
        return {"log_lengthscale": [float(v) for v in np.asarray(self.log_lengthscale)],
                "log_amplitude": float(self.log_amplitude), "log_noise": float(self.log_noise)}

    @classmethod
    def from_dict(cls, data: dict) -> GPParams:
        return cls(np.asarray(data["log_lengthscale"], np.float64),
                   np.float64(data["log_amplitude"]), np.float64(data["log_noise"]))


def kernel_matrix(kind: str, x1, x2, log_lengthscale, log_amplitude):
    """k(x1, x2) [n1, n2] of the ARD kernel `kind` (scikit-learn's Matern(nu=2.5) or RBF times
    ConstantKernel(amp^2))."""
    scaled1 = x1 / jnp.exp(log_lengthscale)
    scaled2 = x2 / jnp.exp(log_lengthscale)
    # |a|^2 + |b|^2 - 2ab: matrix products instead of an [n1, n2, D] difference tensor (5x
    # faster with its gradient on CPU); the cancellation error (~1e-16 |a|^2) is clamped at 0.
    r2 = (jnp.sum(scaled1 * scaled1, axis=-1)[:, None] + jnp.sum(scaled2 * scaled2, axis=-1)[None]
          - 2.0 * scaled1 @ scaled2.T)
    r2 = jnp.maximum(r2, 0.0)
    variance = jnp.exp(2.0 * log_amplitude)
    if kind == "rbf":
        return variance * jnp.exp(-0.5 * r2)
    if kind == "matern52":
        # sqrt has an infinite derivative at 0, the kernel does not: keep gradients finite
        # where a query coincides with a data point.
        positive = r2 > 1e-30
        r = jnp.where(positive, jnp.sqrt(5.0 * jnp.where(positive, r2, 1.0)), 0.0)
        return variance * (1.0 + r + r * r / 3.0) * jnp.exp(-r)
    raise ValueError(f"unknown kernel {kind!r}; use one of {KERNELS}")


def _check_kernel(kind: str) -> str:
    if kind not in KERNELS:
        from vitjax.errors import UserError

        raise UserError(f"GP kernel {kind!r} is unknown; use one of {list(KERNELS)}")
    return kind


def _padded_size(n: int, capacity: int = 0) -> int:
    return max(PAD_MULTIPLE, -(-max(n, capacity) // PAD_MULTIPLE) * PAD_MULTIPLE)


def _pad(x: np.ndarray, y: np.ndarray, capacity: int = 0):
    n, dim = x.shape
    size = _padded_size(n, capacity)
    x_pad = np.zeros((size, dim))
    x_pad[:n] = x
    y_pad = np.zeros(size)
    y_pad[:n] = y
    mask = np.zeros(size, bool)
    mask[:n] = True
    return jnp.asarray(x_pad), jnp.asarray(y_pad), jnp.asarray(mask)


def _masked_gram(kind, x, mask, params: GPParams):
    gram = kernel_matrix(kind, x, x, params.log_lengthscale, params.log_amplitude)
    both = mask[:, None] & mask[None, :]
    diagonal = jnp.where(mask, jnp.exp(params.log_noise) + JITTER, 1.0)
    return jnp.where(both, gram, 0.0) + jnp.diag(diagonal)


def _log_marginal_likelihood(kind, params: GPParams, x, y, mask):
    """log p(y | x, params) of standardised y; padding contributes exactly 0."""
    chol = jnp.linalg.cholesky(_masked_gram(kind, x, mask, params))
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    n = jnp.sum(mask)
    return (-0.5 * jnp.dot(y, alpha) - jnp.sum(jnp.log(jnp.diag(chol)))
            - 0.5 * n * jnp.log(2.0 * jnp.pi))


def lengthscale_prior_moments(dim: int) -> tuple[float, float]:
    """Log-normal lengthscale prior scaled with the dimension (Hvarfner, Hellsten & Nardi,
    "Vanilla Bayesian optimization performs great in high dimensions", ICML 2024):
    log ell ~ N(sqrt(2) + log(D)/2, sqrt(3)). Without it a 36-d ARD fit on 100 points
    collapses onto tiny lengthscales (measured: predictions uncorrelated with the truth)."""
    return math.sqrt(2.0) + 0.5 * math.log(dim), math.sqrt(3.0)


# With the lengthscale prior, the noise variance gets BoTorch's default log-normal prior
# N(-4, 1) on its log: without it fits on few points in many dimensions often explain
# everything as noise (amplitude at its lower bound, EI zero everywhere).
NOISE_PRIOR_MOMENTS = (-4.0, 1.0)


@functools.partial(jax.jit, static_argnames=("kind", "use_prior"))
def _neg_log_posterior_and_grad(theta, x, y, mask, prior_mean, prior_std, kind, use_prior):
    def objective(theta):
        params = GPParams.from_vector(theta)
        value = _log_marginal_likelihood(kind, params, x, y, mask)
        if use_prior:
            z = (params.log_lengthscale - prior_mean) / prior_std
            z_noise = (params.log_noise - NOISE_PRIOR_MOMENTS[0]) / NOISE_PRIOR_MOMENTS[1]
            value = value - 0.5 * jnp.sum(z * z) - 0.5 * z_noise * z_noise
        return -value

    return jax.value_and_grad(objective)(theta)


@functools.partial(jax.jit, static_argnames=("kind",))
def _factorise(kind, params: GPParams, x, y, mask):
    chol = jnp.linalg.cholesky(_masked_gram(kind, x, mask, params))
    return chol, jax.scipy.linalg.cho_solve((chol, True), y)


@flax.struct.dataclass
class GaussianProcess:
    """A GP posterior: padded data, hyper-parameters and the Cholesky factor of K + noise.

    A pytree, so `predict` can be jitted and differentiated with respect to the query point
    (EI's gradient for SLSQP) with the GP passed as data rather than baked into the program.
    """

    x: jax.Array  # [N, D] unit-cube inputs, padded
    y: jax.Array  # [N] standardised targets, padded with 0
    mask: jax.Array  # [N] which rows are data
    params: GPParams
    chol: jax.Array  # [N, N] lower Cholesky factor of the masked K + noise
    alpha: jax.Array  # [N] (K + noise)^-1 y
    y_mean: jax.Array  # the standardisation: raw = y * y_scale + y_mean
    y_scale: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="matern52")

    @property
    def num_data(self) -> int:
        return int(np.sum(np.asarray(self.mask)))

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """The (unpadded) inputs and raw targets."""
        mask = np.asarray(self.mask)
        x = np.asarray(self.x)[mask]
        y = np.asarray(self.y)[mask] * float(self.y_scale) + float(self.y_mean)
        return x, y

    def predict_standardised(self, xq):
        """Latent mean and variance at xq [m, D] in standardised units; pure jnp, differentiable
        in xq. Call inside an x64 context (as `predict` and `optimize` do)."""
        cross = kernel_matrix(self.kind, xq, self.x, self.params.log_lengthscale,
                              self.params.log_amplitude)
        cross = jnp.where(self.mask[None, :], cross, 0.0)
        mean = cross @ self.alpha
        v = jax.scipy.linalg.solve_triangular(self.chol, cross.T, lower=True)
        prior_var = jnp.exp(2.0 * self.params.log_amplitude)
        var = jnp.maximum(prior_var - jnp.sum(v * v, axis=0), 1e-18)
        return mean, var

    @numerics
    def predict(self, xq, observation_noise: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of the latent function (plus the noise variance with
        `observation_noise`) at xq [m, D], in the units of the observations."""
        mean, var = _predict_jit(self, jnp.asarray(np.atleast_2d(xq), jnp.float64))
        if observation_noise:
            var = var + jnp.exp(self.params.log_noise)
        scale = float(self.y_scale)
        return (np.asarray(mean) * scale + float(self.y_mean),
                np.asarray(var) * scale * scale)

    @numerics
    def condition(self, x_new, y_new) -> GaussianProcess:
        """The posterior after also observing (x_new, y_new) (raw units), with the same
        hyper-parameters and standardisation: kriging believer / constant liar fantasies."""
        x, y = self.data()
        x = np.concatenate([x, np.atleast_2d(np.asarray(x_new, np.float64))])
        y = np.concatenate([y, np.atleast_1d(np.asarray(y_new, np.float64))])
        return _build(self.kind, self.params, x, y, float(self.y_mean), float(self.y_scale),
                      capacity=int(self.x.shape[0]))

    @numerics
    def log_marginal_likelihood(self) -> float:
        """log p(y | x, params) of the standardised targets (scikit-learn's value with
        normalize_y=True)."""
        return float(_log_marginal_likelihood(self.kind, self.params, self.x, self.y, self.mask))


@jax.jit
def _predict_jit(gp: GaussianProcess, xq):
    return gp.predict_standardised(xq)


def standardisation(y: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation, 1 where the values are all equal."""
    mean = float(np.mean(y))
    scale = float(np.std(y))
    return mean, scale if scale > 1e-12 else 1.0


def _build(kind, params: GPParams, x, y, y_mean, y_scale, capacity=0) -> GaussianProcess:
    x_pad, y_pad, mask = _pad(x, (y - y_mean) / y_scale, capacity)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    chol, alpha = _factorise(kind, params, x_pad, y_pad, mask)
    return GaussianProcess(x_pad, y_pad, mask, params, chol, alpha, jnp.float64(y_mean),
                           jnp.float64(y_scale), kind)


def _validate_data(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"GP data needs x [n, D] and y [n] with n >= 1; got {x.shape}, "
                         f"{y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("GP data contains NaN or infinite values")
    return x, y


@numerics
def make_gp(x, y, params: GPParams, kernel: str = "matern52", capacity: int = 0
            ) -> GaussianProcess:
    """The posterior for fixed hyper-parameters (no fitting)."""
    x, y = _validate_data(x, y)
    mean, scale = standardisation(y)
    return _build(_check_kernel(kernel), params, x, y, mean, scale, capacity)


def default_params(dim: int, log_span=0.0) -> GPParams:
    """Where the first fit starts: the prior's median lengthscale, unit amplitude, noise 1e-2."""
    mean, _ = lengthscale_prior_moments(dim)
    return GPParams(np.full(dim, mean) + log_span, np.float64(0.0), np.float64(math.log(1e-2)))


def _bounds(dim: int, log_span) -> list[tuple[float, float]]:
    shift = np.broadcast_to(log_span, (dim,))
    return [(LOG_LENGTHSCALE_BOUNDS[0] + s, LOG_LENGTHSCALE_BOUNDS[1] + s) for s in shift] + [
        LOG_AMPLITUDE_BOUNDS, LOG_NOISE_BOUNDS]


def _ladder_start(dim: int, step: int, log_span) -> np.ndarray:
    """Deterministic starts: the prior's median lengthscale divided by 4**step. The median
    (~25 spans for D=36) is long against the spread of U_T draws, where L-BFGS-B often slides
    into the "all noise" optimum; shorter starts reach the data-explaining one."""
    theta = default_params(dim, log_span).to_vector()
    theta[:dim] -= step * math.log(4.0)
    return theta


def _random_start(dim: int, rng: np.random.Generator, log_span) -> np.ndarray:
    mean, _ = lengthscale_prior_moments(dim)
    return np.concatenate([
        rng.uniform(mean - 3.0, mean, dim) + log_span,
        [rng.uniform(math.log(0.5), math.log(2.0)), rng.uniform(math.log(1e-4), math.log(1e-1))],
    ])


def _degenerate(theta: np.ndarray) -> bool:
    """Explains the data as noise: amplitude at its floor or noise at half the variance."""
    return theta[-2] <= LOG_AMPLITUDE_BOUNDS[0] + 1e-3 or theta[-1] >= math.log(0.5)


@numerics
def fit_gp(
    x,
    y,
    *,
    kernel: str = "matern52",
    restarts: int = 3,
    rng: np.random.Generator | None = None,
    init: GPParams | None = None,
    lengthscale_prior: str | None = "dim_scaled",
    maxiter: int = 200,
    capacity: int = 0,
    input_span=1.0,
) -> GaussianProcess:
    """Fits the hyper-parameters by L-BFGS-B on the (jitted, JAX-differentiated) negative log
    marginal likelihood (plus the priors, a MAP estimate, unless `lengthscale_prior=None`)
    from `restarts` starts: `init` (a warm start, e.g. the previous iteration's fit) if given,
    then a ladder of shorter and shorter lengthscales, then random starts from `rng`; keeps
    the best. If the best explains everything as noise, the ladder is tried as well.
    Deterministic given its arguments.

    `capacity`: pad to at least this many points, e.g. the search's whole evaluation budget,
    so that every fit and posterior of a search shares one compilation.

    `input_span` (a number or one per dimension): the width of the region the data is drawn
    from. The lengthscale prior, bounds and starts are stated in units of it, as if the inputs
    were rescaled to fill the unit cube, which is what the dimension-scaled prior assumes.
    U_T's draws fill only [0, s]^D of the search space's cube (s ~ 0.17 for DeiT-S at 60%
    FLOPs); measured on the 36-d synthetic problem with span 1, the MAP fit is nearly linear
    and extrapolates with confidence (predicted 0.81 +- 0.003 where the truth was 0.71)."""
    x, y = _validate_data(x, y)
    _check_kernel(kernel)
    if lengthscale_prior not in PRIORS:
        from vitjax.errors import UserError

        raise UserError(f"lengthscale prior {lengthscale_prior!r} is unknown; use one of "
                        f"{list(PRIORS)}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    dim = x.shape[1]
    y_mean, y_scale = standardisation(y)
    x_pad, y_pad, mask = _pad(x, (y - y_mean) / y_scale, capacity)
    log_span = np.log(np.broadcast_to(np.asarray(input_span, np.float64), (dim,)))
    if not np.all(np.isfinite(log_span)):
        raise ValueError(f"input_span must be positive, got {input_span}")
    prior_mean, prior_std = lengthscale_prior_moments(dim)
    prior_mean = prior_mean + log_span
    bounds = _bounds(dim, log_span)
    lower, upper = np.array(bounds).T

    def objective(theta):
        value, grad = _neg_log_posterior_and_grad(
            np.asarray(theta, np.float64), x_pad, y_pad, mask, prior_mean, prior_std, kernel,
            lengthscale_prior is not None)
        value, grad = float(value), np.asarray(grad, np.float64)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            return 1e25, np.zeros_like(theta)  # a failed Cholesky: steer L-BFGS-B away
        return value, grad

    rng = rng if rng is not None else np.random.default_rng(0)
    ladder = [_ladder_start(dim, step, log_span) for step in range(3)]
    cold = ladder[:restarts] + [_random_start(dim, rng, log_span)
                                for _ in range(restarts - min(restarts, 3))]
    # Warm: the given start plus restarts - 1 cold ones; cold: the ladder, then random.
    starts = [init.to_vector()] + cold[: restarts - 1] if init is not None else cold
    best_theta, best_value = None, np.inf

    def run(theta0):
        nonlocal best_theta, best_value
        result = scipy.optimize.minimize(objective, np.clip(theta0, lower, upper), jac=True,
                                         method="L-BFGS-B", bounds=bounds,
                                         options={"maxiter": maxiter, "ftol": 1e-6})
        if best_theta is None or result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)

    for theta0 in starts:
        run(theta0)
    if _degenerate(best_theta):
        # A warm start can stay stuck in the all-noise optimum: retry from the whole ladder.
        for theta0 in ladder:
            if not any(np.array_equal(theta0, start) for start in starts):
                run(theta0)
    params = GPParams(np.asarray(best_theta[:dim]), np.float64(best_theta[dim]),
                      np.float64(best_theta[dim + 1]))
    return _build(kernel, params, x, y, y_mean, y_scale, capacity)
