"""The search loop of Alg. 1 lines 7-11: m policies from U_T, then T_gp iterations of
fit GP -> propose q policies -> evaluate them -> add them, with early stopping.

    result = run_search(objective, model_config, target_gmacs, log_path=workdir / 'search.jsonl',
                        settings=SearchSettings.from_config(config.search),
                        space=SearchSpace.from_config(config.search.space, model_config.depth),
                        is_writer=jax.process_index() == 0)
    result.best_policy, result.best_value, result.best_gmacs, result.history

`objective(policies: list[Policy]) -> list[float]`, higher is better (hold-out accuracy). It
is called with the q proposals of one iteration at a time (and the initial population in
chunks of q), so an implementation can evaluate them in parallel.

Resumption and determinism: every proposal and every evaluation is appended to the JSONL log
(`vitjax.search.log`) and flushed before the next evaluation starts. All randomness comes from
generators seeded with (seed, iteration, purpose), and a proposal depends only on the records
before it (the GP warm-starts from the hyper-parameters logged with the previous proposal). So
a killed search, run again with the same log, replays the logged iterations without
evaluating or refitting anything, and continues exactly as the uninterrupted search would have.
Multi-host: each host runs the same loop on the same log; only `is_writer` writes. Hosts
compute identical proposals; `sync` (e.g. a broadcast from process 0) makes sure of it where
hosts might differ in floating point.

`settings.method`: 'gp' (this package: GP + EI, maximised over screened U_T draws while the
GP holds fewer than `acquisition.slsqp_from` points, by SQP after), 'authors' (the released
code: EI argmax over random candidates) or 'random' (the best of random U_T policies, paper
Table 5); all share the initial population, the log format and the evaluation budget.

`settings.region`: 'sampled' (default) proposes only inside the box U_T draws the initial
population from at the search's target, widened to the box the supernet's training policies
were drawn from (`sampled_region`): a GP fitted on a dozen points extrapolates beyond its data
(on digits it predicted 1.01 for a policy on the cube's face that scored 0.98) and a
sub-network outside the trained box was never trained (on a from-scratch digits supernet a
GP proposal keeping 1 head of 4 scored 2.8%). 'trained' samples and proposes only inside the
trained box (`trained_region`; below the trained target that box is a thin corner).
'cube' searches the whole space (the paper's literal problem (4)).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from vitjax.errors import UserError
from vitjax.models.config import ViTConfig
from vitjax.pruning.policy import Policy
from vitjax.search import baselines
from vitjax.search.gp import KERNELS, PRIORS, GPParams, fit_gp, make_gp
from vitjax.search.log import FORMAT_VERSION, SearchLog
from vitjax.search.optimize import (
    AcquisitionSettings,
    Problem,
    propose,
    trust_region_length,
)
from vitjax.search.space import SearchSpace

METHODS = ("gp", "authors", "random")
REGIONS = ("trained", "sampled", "cube")
_LOGGER = logging.getLogger("vitjax.search")

_STAGE_KEYS = ("space", "objective", "loss_weight", "target_gmacs", "baselines")
# Generator streams: rng([seed, iteration, stream]).
_INITIAL, _FIT, _ACQUIRE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How to search; `from_config(config.search)` reads the pipeline's block."""

    method: str = "gp"  # 'gp' | 'authors' | 'random'
    population: int = 100  # m: initial policies from U_T (paper: 100)
    iterations: int = 100  # T_gp (paper: 100)
    q: int = 1  # policies proposed (and evaluated in parallel) per iteration
    patience: int | None = None  # stop after this many iterations without improvement
    seed: int = 0
    tol: float | None = None  # sample and search GMACs in [T(1 - tol), T]; None: <= T
    kernel: str = "matern52"  # 'matern52' | 'rbf'
    restarts: int = 3  # hyper-parameter starts of the first fit (and every restart_every)
    restart_every: int = 10  # later fits warm-start from the previous one, with restarts
    refit_every: int = 1  # re-estimate hyper-parameters every k iterations (else condition)
    lengthscale_prior: str | None = "dim_scaled"  # None: plain maximum likelihood
    acquisition: AcquisitionSettings = AcquisitionSettings()
    authors_candidates: int = 100  # 'authors': candidates per iteration = this x population
    authors_tol: float = 0.02  # 'authors': candidates within this fraction below T
    # Where policies are sampled and proposed: 'sampled' (inside the box U_T draws the initial
    # population from at the search's target, at least the trained box, see `sampled_region`),
    # 'trained' (inside the box U_T drew the supernet's training policies from, see
    # `trained_region`) or 'cube' (the whole space: the paper's literal problem (4); with
    # acquisition.trust_region=False exactly it).
    region: str = "sampled"
    # With region='trained' or 'sampled': each layer may keep this many heads / neurons /
    # patches fewer than the trained box allows (`trained_region`'s margin).
    region_margin: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"search method {self.method!r} is unknown; use one of "
                            f"{list(METHODS)}")
        if self.region not in REGIONS:
            raise UserError(f"search region {self.region!r} is unknown; use one of "
                            f"{list(REGIONS)}")
        if self.kernel not in KERNELS:
            raise UserError(f"search kernel {self.kernel!r} is unknown; use one of "
                            f"{list(KERNELS)}")
        if self.lengthscale_prior not in PRIORS:
            raise UserError(f"lengthscale prior {self.lengthscale_prior!r} is unknown; use "
                            f"one of {list(PRIORS)}")
        for name in ("population", "q", "restarts", "restart_every", "refit_every",
                     "authors_candidates"):
            if getattr(self, name) < 1:
                raise UserError(f"search {name} must be >= 1, got {getattr(self, name)}")
        if self.region_margin < 0:
            raise UserError(f"search region_margin must be >= 0, got {self.region_margin}")
        if self.iterations < 0 or (self.patience is not None and self.patience < 1):
            raise UserError("search iterations must be >= 0 and patience >= 1 (or None)")
        if self.population < 2 and self.method != "random":
            raise UserError("a GP needs an initial population of at least 2 policies")
        if not 0.0 < self.authors_tol < 1.0:
            raise UserError(f"authors_tol must lie in (0, 1), got {self.authors_tol}")

    @classmethod
    def from_config(cls, block) -> SearchSettings:
        """From `config.search` (see `vitjax.search.config.default_search_config`); the keys
        the stage reads itself (space, objective, loss_weight, target_gmacs, baselines) are
        skipped."""
        data = dict(block.to_dict() if hasattr(block, "to_dict") else block)
        for key in _STAGE_KEYS:
            data.pop(key, None)
        acquisition_fields = {f.name for f in dataclasses.fields(AcquisitionSettings)}
        acquisition = {k: data.pop(k) for k in list(data) if k in acquisition_fields}
        acquisition.update(data.pop("acquisition", None) or {})
        fields = {f.name for f in dataclasses.fields(cls)} - {"acquisition"}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise UserError(f"config.search has unknown keys {unknown}")
        return cls(acquisition=AcquisitionSettings(**acquisition), **data)

    @property
    def capacity(self) -> int:
        """Most points a GP of this search will hold (fantasies included)."""
        return self.population + self.iterations * self.q + self.q


@dataclasses.dataclass(frozen=True)
class Evaluation:
    index: int  # position in the history
    iteration: int  # 0: initial population
    slot: int  # position within the iteration's proposals
    policy: Policy
    u: np.ndarray  # the point in the space's unit cube
    value: float
    gmacs: float

    def to_dict(self) -> dict:
        return {"index": self.index, "iteration": self.iteration, "slot": self.slot,
                "policy": self.policy.to_dict(), "value": self.value, "gmacs": self.gmacs}


@dataclasses.dataclass(frozen=True)
class SearchResult:
    method: str
    target_gmacs: float
    best: Evaluation
    history: tuple[Evaluation, ...]
    iterations: int  # search iterations completed (initial population not counted)
    stopped_early: bool
    initial_spread: tuple[float, float, float]  # min, median, max of the initial values
    overhead_seconds: float  # time in this process spent on anything but the objective
    objective_seconds: float  # time in this process spent inside the objective

    @property
    def best_policy(self) -> Policy:
        return self.best.policy

    @property
    def best_value(self) -> float:
        return self.best.value

    @property
    def best_gmacs(self) -> float:
        return self.best.gmacs

    def to_dict(self) -> dict:
        """A JSON-able summary (the history itself is in the log)."""
        return {"method": self.method, "target_gmacs": self.target_gmacs,
                "best": self.best.to_dict(), "evaluations": len(self.history),
                "iterations": self.iterations, "stopped_early": self.stopped_early,
                "initial_spread": list(self.initial_spread),
                "overhead_seconds": self.overhead_seconds,
                "objective_seconds": self.objective_seconds}


def iteration_rng(seed: int, iteration: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, iteration, stream])


def _header(settings: SearchSettings, problem: Problem) -> dict:
    header = {"type": "header", "version": FORMAT_VERSION, "method": settings.method,
              "seed": settings.seed, "population": settings.population, "q": settings.q,
              "tol": settings.tol, "target_gmacs": float(problem.target_gmacs),
              "space": problem.space.to_dict(), "model": problem.config.to_dict()}
    if problem.upper is not None:  # logs of whole-cube searches keep their old header
        header["region"] = list(problem.upper)
        if problem.sample_upper != problem.upper:
            header["sample_region"] = list(problem.sample_upper)
    header["settings"] = _proposal_settings(settings)
    return header


def _proposal_settings(settings: SearchSettings) -> dict:
    """The settings that decide the method's proposals, beyond those the header names on its
    own: a resumed log continues the same search only if they match. `iterations` and
    `patience` may change (a finished search can be extended); random search has none."""
    data = dataclasses.asdict(settings)
    authors = {k: data.pop(k) for k in ("authors_candidates", "authors_tol")}
    for key in ("method", "population", "q", "seed", "tol", "iterations", "patience"):
        data.pop(key)
    return {"gp": data, "authors": authors, "random": {}}[settings.method]


def _setting_differences(logged: dict, expected: dict) -> list[str]:
    """'settings.acquisition.xi (logged 0.0, now 0.001)' for each setting recorded in both
    with another value; a setting the log does not record (older code) is not compared."""
    from flax import traverse_util

    logged = traverse_util.flatten_dict(logged, sep=".")
    return [f"settings.{key} (logged {logged[key]!r}, now {value!r})"
            for key, value in traverse_util.flatten_dict(expected, sep=".").items()
            if key in logged and logged[key] != value]


def trained_region(config: ViTConfig, space: SearchSpace, trained_gmacs: float | None,
                   margin: int = 0) -> tuple[float, ...] | None:
    """The box of the space's unit cube that the supernet's training policies came from:
    U_T at `trained_gmacs` draws every ratio uniformly below one bound per dimension
    (`vitjax.pruning.calibrated_space`; 0.9 without a target), so a sub-network outside it
    keeps fewer heads, neurons or tokens in some layer than any policy it was trained with
    (on digits at 60% FLOPs: 3 of 4 heads at least) and its accuracy there says little.
    `margin`: each layer may keep this many units (heads, neurons, patches) fewer than the
    smallest count the box allows (the bound rises by margin / the dense count).
    None: the box covers the whole space (nothing to restrict)."""
    from vitjax.pruning.flops import count_flops
    from vitjax.pruning.sampling import SamplingSpace, calibrated_space

    trained = SamplingSpace()
    if trained_gmacs is not None and trained_gmacs < count_flops(config).total:
        trained = calibrated_space(config, float(trained_gmacs))
    bound = np.array([trained.neuron, trained.head, trained.token])
    if margin:
        sizes = np.array([config.mlp_dim, config.num_heads, config.num_patches], np.float64)
        fewest = np.ceil(np.round((1.0 - bound) * sizes, 9))
        bound = 1.0 - np.maximum(fewest - margin, 0.0) / sizes
    lower, upper = space.lower_upper()
    ratio_bound = bound[space.coordinate_dimensions]
    units = np.clip((ratio_bound - lower) / (upper - lower), 0.0, 1.0)
    return None if np.all(units >= 1.0) else tuple(float(v) for v in units)


def sampled_region(config: ViTConfig, space: SearchSpace, target_gmacs: float,
                   trained_gmacs: float | None, margin: int = 0) -> tuple[float, ...] | None:
    """The box U_T draws the initial population from at `target_gmacs` (every method's
    first policies), widened to the trained box (`trained_region`, with `margin`) where that
    is larger: proposals stay where the GP has data (it interpolates instead of
    extrapolating to the cube's faces) and where the supernet was trained. At the trained
    target the two boxes agree; below it U_T's box is the wider one. None: the whole cube."""
    scale = space.calibrated_scale(config, target_gmacs)
    trained = trained_region(config, space, trained_gmacs, margin=margin)
    if trained is None or scale >= 1.0:
        return None
    return tuple(float(v) for v in np.maximum(np.asarray(trained), scale))


def _with_model_defaults(model: dict | None) -> dict | None:
    """A logged model with the ViTConfig fields added since it was written, at their defaults
    (the same architecture), so a search resumes across such an upgrade."""
    if not isinstance(model, dict):
        return model
    filled = dict(model)
    for field in dataclasses.fields(ViTConfig):
        if field.name not in filled and field.default is not dataclasses.MISSING:
            filled[field.name] = field.default
    return filled


def _check_header(logged: dict, expected: dict, path) -> None:
    if logged.get("type") != "header":
        raise UserError(f"search log {path} does not start with a header; delete it")
    logged = {**logged, "model": _with_model_defaults(logged.get("model"))}
    # Settings: compared one by one, and only where the log records them (older logs do not).
    settings = expected.get("settings", {})
    expected = {k: v for k, v in expected.items() if k != "settings"}
    differ = sorted(k for k in expected if logged.get(k) != expected[k])
    differ += _setting_differences(logged.get("settings") or {}, settings)
    if "provenance" in differ:  # name what the logged values measured: supernet, objective
        logged_inputs = logged.get("provenance") or {}
        differ.remove("provenance")
        differ += [f"{k} (logged {logged_inputs.get(k, '<unset>')!r}, now {v!r})"
                   for k, v in sorted(expected["provenance"].items())
                   if logged_inputs.get(k) != v]
    if differ:
        raise UserError(
            f"search log {path} belongs to a different search ({', '.join(differ)} differ); "
            "delete it, use another log path, or restore those settings (the pipeline: "
            "--config.overwrite=True starts the stage over)"
        )


@dataclasses.dataclass
class _History:
    """What the proposers see: the points and values so far."""

    u: list[np.ndarray] = dataclasses.field(default_factory=list)
    values: list[float] = dataclasses.field(default_factory=list)
    improved: list[bool] = dataclasses.field(default_factory=list)  # per search iteration

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.u, np.float64).reshape(-1, dim), np.asarray(self.values)


def _propose_gp(problem: Problem, settings: SearchSettings, history: _History,
                iteration: int, warm: GPParams | None):
    """(u [q, D], extra fields of the propose record: the GP's hyper-parameters, EI, ...)."""
    u, values = history.arrays(problem.space.dim)
    refit = warm is None or (iteration - 1) % settings.refit_every == 0
    restarts = settings.restarts if warm is None or iteration % settings.restart_every == 0 \
        else 1
    # The GP's priors are relative to the box U_T draws from (see fit_gp's input_span).
    span = problem.span()
    fit_kwargs = dict(kernel=settings.kernel, rng=iteration_rng(settings.seed, iteration, _FIT),
                      lengthscale_prior=settings.lengthscale_prior, capacity=settings.capacity,
                      input_span=span)
    if refit:
        gp = fit_gp(u, values, restarts=restarts, init=warm, **fit_kwargs)
    else:  # keep the hyper-parameters, condition on the new data
        gp = make_gp(u, values, warm, settings.kernel, capacity=settings.capacity)
    length = None
    if settings.acquisition.trust_region:
        initial = min(1.0, settings.acquisition.initial_length * float(np.max(span)))
        length = trust_region_length(history.improved, initial, settings.acquisition)
    proposal = propose(gp, problem, best=float(np.max(values)), q=settings.q,
                       rng=iteration_rng(settings.seed, iteration, _ACQUIRE),
                       settings=settings.acquisition, observed=u, observed_values=values,
                       step=length)
    # The GP's prediction at each proposal, to compare with what the evaluation then gives.
    mean, var = gp.predict(proposal.u)
    extra = {"gp": gp.params.to_dict(), "ei": [float(v) for v in proposal.ei],
             "predicted": [float(v) for v in mean],
             "predicted_std": [float(v) for v in np.sqrt(var)],
             "slsqp_success": list(proposal.slsqp_success), "trust_region": length,
             "optimizer": proposal.optimizer, "band": proposal.band}
    return proposal.u, extra


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_search(
    objective: Callable[[list[Policy]], Sequence[float]],
    config: ViTConfig,
    target_gmacs: float,
    *,
    space: SearchSpace | None = None,
    settings: SearchSettings | None = None,
    log_path: str | os.PathLike | None = None,
    is_writer: bool = True,
    sync: Callable[[np.ndarray], np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
    provenance: dict | None = None,
    trained_gmacs: float | None = None,
    **overrides,
) -> SearchResult:
    """Searches the policy that maximises `objective` under `target_gmacs` (see the module
    docstring). `overrides` replace fields of `settings`, e.g. `run_search(f, cfg, 2.7,
    method='random', iterations=10)`. `log_path=None` keeps the log in memory (no resume).
    `provenance` (JSON) says what the objective measures (which supernet, which objective); it
    goes into the log's header, and a log with another one is never resumed.
    `trained_gmacs`: the FLOPs target the supernet's training policies were drawn for (None:
    `target_gmacs`, the paper's setting); with `settings.region='trained'` every policy stays
    in the box U_T drew them from (`trained_region`), with 'sampled' in that box or U_T's box
    at `target_gmacs`, whichever is larger per coordinate (`sampled_region`)."""
    settings = dataclasses.replace(settings or SearchSettings(), **overrides)
    space = space or SearchSpace.paper(config.depth)
    progress = progress or _LOGGER.info
    upper = sample_upper = None
    if settings.region == "sampled":
        trained = target_gmacs if trained_gmacs is None else trained_gmacs
        upper = sampled_region(config, space, float(target_gmacs), trained,
                               margin=settings.region_margin)
    elif settings.region == "trained":
        trained = target_gmacs if trained_gmacs is None else trained_gmacs
        sample_upper = trained_region(config, space, trained)
        if sample_upper is not None and space.gmacs(config, np.asarray(sample_upper)) \
                > target_gmacs:
            progress(f"search[{settings.method}]: {float(target_gmacs):.4g} GMACs cannot be "
                     "reached inside the region the supernet was trained on; searching the "
                     "whole space (region 'cube')")
            sample_upper = None
        elif settings.region_margin:
            upper = trained_region(config, space, trained, margin=settings.region_margin)
        else:
            upper = sample_upper
    problem = Problem(config, space, float(target_gmacs), tol=settings.tol, upper=upper,
                      sample_upper=sample_upper)
    log = SearchLog(log_path, is_writer=is_writer)
    records = log.read()
    header = _header(settings, problem)
    if provenance is not None:
        header["provenance"] = json.loads(json.dumps(provenance, sort_keys=True))
    if records:
        _check_header(records[0], header, log_path)
    else:
        log.append(header)
    proposals = {r["iteration"]: r for r in records if r.get("type") == "propose"}
    evaluations = {(r["iteration"], r["slot"]): r for r in records if r.get("type") == "eval"}

    history, evaluated = _History(), []
    warm: GPParams | None = None
    best_value, best_iteration, since_improvement = -math.inf, 0, 0
    overhead = objective_time = 0.0
    started, fresh_iterations, stopped_early = time.monotonic(), 0, False
    initial_spread = (math.nan,) * 3
    last_iteration = 0
    for iteration in range(settings.iterations + 1):
        if iteration and settings.patience is not None and since_improvement >= settings.patience:
            stopped_early = True
            break
        tick = time.monotonic()
        record = proposals.get(iteration)
        replayed = record is not None
        if record is None:
            u, extra = _make_proposal(problem, settings, history, iteration, warm)
            if sync is not None:
                u = np.asarray(sync(u), np.float64)
            record = {"type": "propose", "iteration": iteration, "u": u.tolist(),
                      "policies": [space.to_policy(p).to_dict() for p in u],
                      "gmacs": problem.gmacs(u).tolist(), **extra}
            log.append(record)
        u = np.asarray(record["u"], np.float64).reshape(-1, space.dim)
        if record.get("gp") is not None:
            warm = GPParams.from_dict(record["gp"])
        gmacs = problem.gmacs(u)
        policies = [space.to_policy(p) for p in u]
        pending = [slot for slot in range(len(u)) if (iteration, slot) not in evaluations]
        overhead += time.monotonic() - tick
        for start in range(0, len(pending), settings.q):
            chunk = pending[start:start + settings.q]
            tick = time.monotonic()
            values = objective([policies[slot] for slot in chunk])
            elapsed = time.monotonic() - tick
            objective_time += elapsed
            values = _check_values(values, len(chunk))
            for slot, value in zip(chunk, values, strict=True):
                evaluation = {"type": "eval", "iteration": iteration, "slot": slot,
                              "index": len(evaluated) + slot, "u": u[slot].tolist(),
                              "policy": policies[slot].to_dict(), "gmacs": float(gmacs[slot]),
                              "value": value, "seconds": elapsed / len(chunk)}
                log.append(evaluation)
                evaluations[(iteration, slot)] = evaluation
        new_values = [float(evaluations[(iteration, slot)]["value"]) for slot in range(len(u))]
        for slot, value in enumerate(new_values):
            evaluated.append(Evaluation(len(evaluated), iteration, slot, policies[slot],
                                        u[slot].copy(), value, float(gmacs[slot])))
        if iteration:
            better = max(new_values) > best_value
            history.improved.append(better)
            since_improvement = 0 if better else since_improvement + 1
        if max(new_values) > best_value:
            best_value, best_iteration = max(new_values), iteration
        history.u.extend(u)
        history.values.extend(new_values)
        last_iteration = iteration
        if not replayed:
            fresh_iterations += 1
        if iteration == 0:
            values0 = np.asarray(new_values)
            initial_spread = (float(values0.min()), float(np.median(values0)),
                              float(values0.max()))
            progress(f"search[{settings.method}] initial population of {len(values0)}: "
                     f"objective min {initial_spread[0]:.4f} median {initial_spread[1]:.4f} "
                     f"max {initial_spread[2]:.4f}")
        else:
            spent = time.monotonic() - started
            remaining = settings.iterations - iteration
            eta = spent / fresh_iterations * remaining if fresh_iterations else math.nan
            shown = ", ".join(f"{v:.4f}" for v in new_values)
            progress(f"search[{settings.method}] iteration {iteration}/{settings.iterations}: "
                     f"best {best_value:.4f} (iteration {best_iteration}), new [{shown}] at "
                     f"{', '.join(f'{g:.3f}' for g in gmacs)} GMACs, elapsed "
                     f"{_format_seconds(spent)}, eta {_format_seconds(eta)}"
                     + (" (replayed from the log)" if replayed else ""))

    best = max(evaluated, key=lambda e: (e.value, -e.index))
    return SearchResult(settings.method, float(target_gmacs), best, tuple(evaluated),
                        last_iteration, stopped_early, initial_spread, overhead, objective_time)


def _make_proposal(problem, settings, history, iteration, warm):
    """The policies of `iteration` as unit-cube points, and extra fields for the log."""
    if iteration == 0:  # Alg. 1 line 7: m policies from U_T, shared by every method
        u = problem.sample(iteration_rng(settings.seed, 0, _INITIAL), settings.population)
        return u, {}
    if settings.method == "gp":
        return _propose_gp(problem, settings, history, iteration, warm)
    rng = iteration_rng(settings.seed, iteration, _ACQUIRE)
    if settings.method == "random":
        return baselines.propose_random(problem, rng, settings.q), {}
    u, values = history.arrays(problem.space.dim)
    return baselines.propose_authors(
        problem, u, values, rng, q=settings.q,
        candidates=settings.authors_candidates * settings.population, tol=settings.authors_tol)


def _check_values(values, count: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != count:
        raise ValueError(f"the objective returned {len(values)} values for {count} policies")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"the objective returned a non-finite value: {values}")
    return values
