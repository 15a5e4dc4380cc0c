"""`config.search`: the block the pipeline's search stage reads.

    config.search = default_search_config()
    config.search.space.token = 'tied'       # or --config.search.space.token=tied

`SearchSettings.from_config(config.search)` and `SearchSpace.from_config(config.search.space,
depth)` turn it into the library's objects; `objective` and `loss_weight` are for the stage.
"""

from __future__ import annotations

import ml_collections


def default_search_config() -> ml_collections.ConfigDict:
    """The paper's search (Sec. 4: population 100, 100 iterations); every key documented."""
    c = ml_collections.ConfigDict()
    c.method = "gp"  # 'gp' (GP + EI, see optimizer) | 'authors' (released code) | 'random'
    c.population = 100  # m: initial policies from U_T, evaluated before the first GP fit
    c.iterations = 100  # T_gp: search iterations after the initial population
    c.q = 1  # policies proposed per iteration; >1 evaluates a batch in parallel
    c.batch_strategy = "kriging_believer"  # q > 1: 'kriging_believer' | 'constant_liar'
    # Stop after this many iterations without a better policy; None: run all iterations.
    c.patience = ml_collections.config_dict.placeholder(int)
    c.xi = 0.0  # EI margin, in the objective's units (e.g. 0.001 = 0.1% accuracy)
    c.kernel = "matern52"  # GP kernel: 'matern52' | 'rbf' (both ARD)
    c.lengthscale_prior = "dim_scaled"  # MAP with dimension-scaled priors; None: plain ML
    c.restarts = 3  # hyper-parameter starts of the first fit (and every restart_every)
    c.restart_every = 10  # other iterations warm-start from the previous fit only
    c.refit_every = 1  # re-fit hyper-parameters every k iterations (else only condition)
    # How a proposal maximises EI: 'slsqp' (problem (4): SLSQP from the best of `candidates`
    # U_T draws), 'candidates' (the EI argmax over `screen` U_T draws within `screen_band`
    # below the target: the authors' screening with this GP) or 'auto' ('candidates' while the
    # GP holds fewer than `slsqp_from` points, then 'slsqp'; measured in BUILD_NOTES, issue 23).
    c.optimizer = "auto"
    c.slsqp_from = 50
    c.screen = 4096
    c.screen_band = 0.02  # None: the band `tol` below
    c.starts = 5  # SLSQP starts per proposed policy (the best candidates by EI)
    c.candidates = 512  # random feasible candidates scored by EI to pick the starts
    c.maxiter = 100  # SLSQP iterations per start
    c.trust_region = True  # each SLSQP run stays in a TuRBO-style box around its start
    c.initial_length = 1.0  # its first side, in widths of the box U_T samples from
    c.success_tolerance = 2  # improving iterations in a row that double the region
    c.failure_tolerance = 5  # failing iterations in a row that halve it
    # Sample and search policies with GMACs in [T(1 - tol), T]; None: only <= T (paper).
    c.tol = 0.05
    # 'sampled': propose policies only inside the box U_T draws the initial population from
    # (at the search's target), or the box the supernet's training policies were drawn from
    # (U_T at config.train's target) where that is larger: the GP interpolates instead of
    # extrapolating to the cube's faces. 'trained': only inside the trained box (sub-networks
    # outside it were never trained; below the trained target a thin corner). 'cube': the
    # whole space, the paper's literal problem (4) (exactly it with trust_region=False).
    c.region = "sampled"
    # With region 'sampled' or 'trained': proposals (not the initial population) may keep this
    # many heads / neurons / patches per layer fewer than the trained box allows.
    c.region_margin = 0
    c.seed = 0  # every random choice of the search derives from (seed, iteration)
    # FLOPs budget T in GMACs; None: config.target_flops_fraction x the dense model's GMACs.
    c.target_gmacs = ml_collections.config_dict.placeholder(float)
    # What the search maximises on the hold-out split: 'accuracy' | 'accuracy_minus_loss'
    # (accuracy - loss_weight * cross-entropy, which breaks ties between equal accuracies).
    c.objective = "accuracy"
    c.loss_weight = 0.01
    c.authors_candidates = 100  # 'authors': candidates per iteration = this x population
    c.authors_tol = 0.02  # 'authors': candidates within this fraction below T
    # Which ratios are searched: 'layer' (one per layer) | 'tied' (one for all) | a fixed
    # float. preset='authors_code' is the released code's 12 + 12 + 1 space (tokens pruned
    # after blocks 3, 6, 9, ratios <= 0.5); token_layers restricts token pruning to layers.
    c.space = ml_collections.ConfigDict(dict(
        preset="paper", neuron="layer", head="layer", token="layer", max_ratio=0.9,
        min_ratio=0.0))
    c.space.token_layers = ml_collections.config_dict.placeholder(tuple)
    return c
