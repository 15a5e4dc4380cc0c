"""How well does each surrogate rank policies it has not seen, from n evaluated ones? (issue 23)

An offline check beside `benchmarks/search_digits.py`: it takes the distinct policies that the
benchmark's `random` searches evaluated at one budget (U_T draws with their hold-out values,
read from OUT/<budget>_*_random.jsonl), and for `--trials` random splits fits each surrogate on
n of them and predicts 600 others. Prints per n the mean Spearman correlation between the
predictions and the observed values, and the regret (pp) of the policy the surrogate's mean
ranks first among the 600. First it prints how linear the objective is over those policies
(5-fold cross-validated R^2 of a linear fit in the ratios, on the values above 0.9).

Needs `i23_surrogate_variants.patch` applied (`fit_gp(..., ard=)`, which the main code does
not have):

    git apply benchmarks/experiments/i23_surrogate_variants.patch
    python benchmarks/experiments/surrogate_ranking.py /work/runs/i23b/search_benchmark 0.6
    git apply -R benchmarks/experiments/i23_surrogate_variants.patch
"""

import argparse
import glob
import json
import os
import warnings

import numpy as np
import scipy.stats
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Matern
from sklearn.linear_model import LinearRegression, RidgeCV
from sklearn.model_selection import cross_val_score

from vitjax.search.gp import fit_gp


def load(out: str, budget: str) -> tuple[np.ndarray, np.ndarray]:
    u, values, seen = [], [], set()
    for path in sorted(glob.glob(os.path.join(out, f"{budget}_*_s*_random.jsonl"))):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if "value" in record and "u" in record:
                    key = tuple(np.round(record["u"], 6))
                    if key not in seen:
                        seen.add(key)
                        u.append(record["u"])
                        values.append(record["value"])
    return np.array(u), np.array(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the benchmark's output folder (search_benchmark)")
    parser.add_argument("budget", help="e.g. 0.6")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--sizes", default="12,24")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    x, y = load(args.out, args.budget)
    if len(y) < 700:
        raise SystemExit(f"only {len(y)} distinct random-search policies at {args.budget}; "
                         "run more random searches with benchmarks/search_digits.py")
    span = x.max(0) - x.min(0)
    span[span == 0] = 1.0

    def ours(ard, scale=1.0):
        def predict(xt, yt, xq):
            gp = fit_gp(xt, yt, input_span=span * scale, ard=ard, restarts=3,
                        rng=np.random.default_rng(1))
            return gp.predict(xq)[0]
        return predict

    def authors(xt, yt, xq):  # the released code's model (vitjax.search.baselines)
        model = GaussianProcessRegressor(Matern(), alpha=1e-5, n_restarts_optimizer=3,
                                         normalize_y=False, random_state=0)
        return model.fit(xt, yt).predict(xq)

    def ridge(xt, yt, xq):
        return RidgeCV(alphas=np.logspace(-4, 2, 20)).fit(xt, yt).predict(xq)

    methods = {"ard (default)": ours(True), "iso": ours(False), "authors": authors,
               "ridge": ridge}
    for scale in (3, 10, 30):
        methods[f"ard_x{scale}"] = ours(True, scale)
        methods[f"iso_x{scale}"] = ours(False, scale)
    kept = y > 0.9
    r2 = cross_val_score(LinearRegression(), x[kept], y[kept], cv=5, scoring="r2").mean()
    print(f"{len(y)} distinct policies at {args.budget}; linear fit R^2 {r2:.2f} (5-fold, "
          f"{int(kept.sum())} values > 0.9); {args.trials} splits per size")
    rng = np.random.default_rng(0)
    for n in (int(v) for v in args.sizes.split(",")):
        rho = {k: [] for k in methods}
        regret = {k: [] for k in methods}
        for _ in range(args.trials):
            order = rng.permutation(len(y))
            train, test = order[:n], order[n:n + 600]
            for name, predict in methods.items():
                p = predict(x[train], y[train], x[test])
                rho[name].append(scipy.stats.spearmanr(p, y[test])[0])
                regret[name].append(y[test].max() - y[test][np.argmax(p)])
        print(f"n = {n}: " + "; ".join(
            f"{k} {np.nanmean(rho[k]):.3f} / {100 * np.mean(regret[k]):.2f} pp"
            for k in methods), flush=True)


if __name__ == "__main__":
    main()
