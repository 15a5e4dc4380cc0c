"""Expected improvement for MAXIMISING the objective (hold-out accuracy).

    EI(x) = (mu - best - xi) * Phi(z) + sigma * phi(z),   z = (mu - best - xi) / sigma

with mu, sigma the GP posterior mean and standard deviation of the latent objective at x, best
the best observed value and xi >= 0 a margin that favours exploration. It is E[max(f(x) - best
- xi, 0)] for f(x) ~ N(mu, sigma^2).

Sign: the paper's Sec. 3.3 prints (A* - mu) Phi((A* - mu)/Sigma) + Sigma phi(...), the
improvement of a MINIMISATION problem; for accuracy, which is maximised, that formula rewards
points predicted to be worse than the best. Here the improvement is mu - best, as in the
authors' released code (`greater_is_better=True`). The paper also writes Sigma where the
standard deviation belongs; sigma is the standard deviation.

`ei_values(gp, u, best, xi)` is a pure jnp function of the query points, so jax.grad gives EI's
gradient through the GP posterior (what SLSQP uses).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from vitjax.search.gp import GaussianProcess, numerics

_INV_SQRT_2PI = 0.3989422804014327


def expected_improvement(mean, std, best, xi=0.0):
    """Closed-form EI of N(mean, std^2) over `best + xi` (elementwise; numpy or jax inputs).
    std must be > 0."""
    improvement = mean - best - xi
    z = improvement / std
    return improvement * ndtr(z) + std * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


def ei_values(gp: GaussianProcess, u, best, xi=0.0):
    """EI at unit-cube points u [m, D] of the GP's objective; best and xi in the objective's
    units. Pure jnp (call within an x64 context; `ei` below does that for you)."""
    mean, var = gp.predict_standardised(u)
    scale = gp.y_scale
    best_std = (best - gp.y_mean) / scale
    return expected_improvement(mean, jnp.sqrt(var), best_std, xi / scale) * scale


@jax.jit
def _ei_jit(gp, u, best, xi):
    return ei_values(gp, u, best, xi)


@numerics
def ei(gp: GaussianProcess, u, best: float, xi: float = 0.0) -> np.ndarray:
    """EI at u [m, D] as a float64 numpy array (units of the objective)."""
    u = jnp.asarray(np.atleast_2d(np.asarray(u, np.float64)))
    return np.asarray(_ei_jit(gp, u, jnp.float64(best), jnp.float64(xi)))
