"""A synthetic stand-in for hold-out accuracy with a known optimum, for tests and benchmarks.

    objective = SyntheticObjective(ViTConfig.from_variant('S/16'), seed=0)
    values = objective(policies)                       # the `run_search` objective interface
    best_value, best_policy = objective.optimum(space, target_gmacs)

value(policy) = base - sum_i w_i * r_i^2 over the 3L EFFECTIVE ratios of the pruned model
(r = 1 - kept / size, with the keep counts the policy really produces, tokens relative to the
patches entering the layer), so like real accuracy it depends only on the pruned model and is
piecewise constant in the ratios. Every term falls with pruning, so under a FLOPs budget the
optimum lies on the budget boundary; the weights differ by dimension and layer (log-uniform
over ~1.5 decades, drawn from `seed`), so the optimum prunes some coordinates much more than
others: random policies are far from it, which is what separates the search methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from vitjax.models.config import ViTConfig
from vitjax.pruning.flops import count_flops_batch, relaxed_gmacs
from vitjax.pruning.policy import Policy
from vitjax.search.space import SearchSpace


class SyntheticObjective:
    """Higher is better, like accuracy; values are about 0.5-0.8 near realistic budgets."""

    def __init__(self, config: ViTConfig, seed: int = 0, base: float = 0.8):
        rng = np.random.default_rng([seed, 7919])
        L = config.depth
        # Tokens matter most in early layers, heads and neurons everywhere, with noise.
        dimension = np.repeat([0.03, 0.05, 0.12], L)
        early = np.concatenate([np.ones(2 * L), np.linspace(2.0, 0.3, L)])
        self.weights = dimension * early * np.exp(rng.uniform(-1.7, 1.7, 3 * L))
        self.config = config
        self.base = base
        self.calls = 0  # policies evaluated so far (tests count re-evaluations with it)

    def effective_ratios(self, policy: Policy) -> np.ndarray:
        keep = policy.keep_counts(self.config)
        c = self.config
        patches_in = np.concatenate([[c.num_patches], keep.token[:-1] - c.num_prefix_tokens])
        patches_out = keep.token - c.num_prefix_tokens
        return np.concatenate([1.0 - keep.neuron / c.mlp_dim, 1.0 - keep.head / c.num_heads,
                               1.0 - patches_out / patches_in])

    def value(self, policy: Policy) -> float:
        r = self.effective_ratios(policy)
        return float(self.base - np.dot(self.weights, r * r))

    def __call__(self, policies: list[Policy]) -> list[float]:
        self.calls += len(policies)
        return [self.value(p) for p in policies]

    def optimum(self, space: SearchSpace, target_gmacs: float, starts: int = 8):
        """(value, policy) of the continuous relaxation's optimum in `space`: an upper bound on
        what any search can reach (its rounded policy is reported for reference)."""
        config, weights = self.config, jnp.asarray(self.weights)
        with jax.enable_x64(True):
            def loss(u):
                r = space.to_ratios(u, xp=jnp)
                return jnp.dot(weights, r * r)

            def slack(u):
                return 1.0 - relaxed_gmacs(config, space.to_ratios(u, xp=jnp)) / target_gmacs

            loss_grad = jax.jit(jax.value_and_grad(loss))
            slack_fn, slack_grad = jax.jit(slack), jax.jit(jax.grad(slack))
            rng = np.random.default_rng(0)
            best = None
            for _ in range(starts):
                result = scipy.optimize.minimize(
                    lambda u: tuple(np.asarray(v, np.float64) for v in loss_grad(u)),
                    rng.uniform(0.0, 1.0, space.dim), jac=True, method="SLSQP",
                    bounds=[(0.0, 1.0)] * space.dim,
                    constraints=[{"type": "ineq", "fun": lambda u: float(slack_fn(u)),
                                  "jac": lambda u: np.asarray(slack_grad(u))}],
                    options={"maxiter": 500, "ftol": 1e-12})
                feasible = float(slack_fn(result.x)) >= -1e-8
                if feasible and (best is None or result.fun < best.fun):
                    best = result
        ratios = space.to_ratios(np.clip(best.x, 0.0, 1.0))
        return self.base - float(best.fun), Policy.from_vector(ratios)

    def gmacs(self, policy: Policy) -> float:
        return float(count_flops_batch(self.config, policy.to_vector()[None])[0])
