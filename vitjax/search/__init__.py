"""Policy search (paper Sec. 3.3, Alg. 1 lines 7-11): a Gaussian process over pruning policies,
expected improvement maximised by SQP under the FLOPs budget, with the random-search and
authors'-code baselines.

    from vitjax.search import SearchSettings, SearchSpace, run_search
    result = run_search(objective, model_config, target_gmacs, log_path='search.jsonl',
                        settings=SearchSettings(population=100, iterations=100),
                        space=SearchSpace.paper(model_config.depth))

Modules: `space` (which ratios are searched, unit cube <-> Policy, U_T sampling, rounding),
`gp` (the GP), `acquisition` (EI), `optimize` (SLSQP, rounding and repair, batches, trust
region), `loop` (`run_search`, `trained_region`), `baselines`, `log` (the JSONL log), `config`
(`default_search_config`), `synthetic` (a test objective with a known optimum).
"""

from vitjax.search.acquisition import ei, ei_values, expected_improvement
from vitjax.search.baselines import authors_expected_improvement, propose_authors, propose_random
from vitjax.search.config import default_search_config
from vitjax.search.gp import GaussianProcess, GPParams, fit_gp, make_gp
from vitjax.search.log import SearchLog, read_log
from vitjax.search.loop import (
    Evaluation,
    SearchResult,
    SearchSettings,
    run_search,
    sampled_region,
    trained_region,
)
from vitjax.search.optimize import (
    AcquisitionSettings,
    Problem,
    Proposal,
    Region,
    maximize_ei,
    propose,
    repair,
    round_and_repair,
    trust_region_length,
)
from vitjax.search.space import SearchSpace
from vitjax.search.synthetic import SyntheticObjective

__all__ = [
    "ei", "ei_values", "expected_improvement", "authors_expected_improvement",
    "propose_authors", "propose_random", "default_search_config", "GaussianProcess",
    "GPParams", "fit_gp", "make_gp", "SearchLog", "read_log", "Evaluation", "SearchResult",
    "SearchSettings", "run_search", "trained_region", "sampled_region", "AcquisitionSettings",
    "Problem", "Proposal", "Region",
    "maximize_ei", "propose", "repair", "round_and_repair", "trust_region_length",
    "SearchSpace", "SyntheticObjective",
]
