"""The two baselines of the search, proposing through the same loop, log and budget as the GP
search (`run_search(..., method='random' | 'authors')`).

random   The best of random policies from U_T (the paper's Table 5 "random search"): every
         iteration draws q more policies from the same constrained uniform distribution as
         the initial population.
authors  The authors' released code (`expected_improvement.py`, `bayesian_optimisation`):
         scikit-learn's GaussianProcessRegressor with its default `Matern()` kernel (nu=1.5,
         one isotropic lengthscale starting at 1, no amplitude, zero prior mean),
         alpha=1e-5, n_restarts_optimizer=10, normalize_y=False, fitted on the ratios; each
         iteration screens 100 x population random policies whose FLOPs lie within 2% of the
         target and evaluates the one with the largest EI (no SQP).
         Deviations: candidates must be <= T (the code accepts up to 2% above T); the code's
         `ei[sigma == 0.0] == 0.0` is a no-op, here EI is 0 where sigma is 0; with q > 1 the
         q candidates with the largest EI are taken (the code has q = 1).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import norm

from vitjax.search.gp import numerics
from vitjax.search.optimize import Problem


def propose_random(problem: Problem, rng: np.random.Generator, q: int) -> np.ndarray:
    """q draws from U_T (in the space, within the band)."""
    return problem.sample(rng, q)


def authors_expected_improvement(mean, std, best) -> np.ndarray:
    """The released code's EI with greater_is_better=True (improvement mu - best, xi = 0)."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (mean - best) / std
        value = (mean - best) * norm.cdf(z) + std * norm.pdf(z)
    return np.where(std > 0, value, 0.0)


@numerics  # single-threaded BLAS for the small matrices, as for the GP search
def propose_authors(
    problem: Problem,
    u: np.ndarray,
    values: np.ndarray,
    rng: np.random.Generator,
    *,
    q: int,
    candidates: int,
    tol: float = 0.02,
) -> tuple[np.ndarray, dict]:
    """The authors' EI argmax over `candidates` random policies within `tol` below T."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import Matern

    lower, upper = problem.space.lower_upper()

    def ratios(points):  # the code fits on the ratios themselves, not on the unit cube
        return lower + np.asarray(points) * (upper - lower)

    model = GaussianProcessRegressor(
        kernel=Matern(), alpha=1e-5, n_restarts_optimizer=10, normalize_y=False,
        random_state=int(rng.integers(2**31 - 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(ratios(u), values)
    screen = Problem(problem.config, problem.space, problem.target_gmacs, tol=tol)
    pool = screen.sample(rng, candidates)
    mean, std = model.predict(ratios(pool), return_std=True)
    ei = authors_expected_improvement(mean, std, float(np.max(values)))
    top = np.argsort(-ei, kind="stable")[:q]
    return pool[top], {"ei": [float(v) for v in ei[top]], "gp": None,
                       "authors_kernel": str(model.kernel_)}
