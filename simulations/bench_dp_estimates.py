"""How far the metrics read from DP score histograms are from the exact ones, per estimator.

    python -m simulations.bench_dp_estimates [--repeats 300] [--seed 1] [--bins 20,10]

A synthetic study at the default's size: 4 hospitals with 115/175/296/214 test patients
and death rates .14/.05/.19/.145 (about 110 deaths in 800), logits of survivors
-2.3 + Z and of deaths 1.09 higher (Z standard normal, or a skewed gamma(2) standardised:
a score distribution the binormal model does not assume; or "narrow": normal, all
logits scaled by 0.3 about -2.3, as from a DP model whose output scale learnt little),
so an AUROC near 0.78. Each
hospital releases its test score histogram with the noise fedgru calibrates for the
default config's test release (``evaluation.test_epsilon``, the histogram's share); the
server pools them and reads metrics with each estimator (``evaluation.estimator``):
``binned``, the counts clipped at zero; ``binormal``, a normal fitted per class
(common.estimates); ``binormal-bins``, the same fit but AUROC and AUPRC read from its
counts in the bins, not on its finer grid. ``exact-binned`` reads the same histograms without noise (what
binning alone costs). Prints, per score distribution, bin count and estimator, the
error (estimate minus the exact metric of the same predictions) of the pooled AUROC,
AUPRC and Brier score and of the hospitals' own AUROCs: bias, sd and rmse over repeats.
Numbers only, no pass or fail.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from common.config import load_config
from common.estimates import for_metrics
from common.messages import Item, Split
from common.metrics import ScoreGrid, ScoreSummary, exact_metrics, pooled

SIZES = (115, 175, 296, 214)
PREVALENCES = (0.14, 0.05, 0.19, 0.145)
# (name, released, estimator, dp): the summary each estimator reads
VARIANTS = (("binned", "noisy", "binned", True), ("binormal", "noisy", "binormal", True),
            ("binormal-bins", "noisy", "binormal", True), ("exact-binned", "exact", "binned", False))
SHIFT = 1.09  # deaths' logits are this much higher: AUROC about 0.78 for normal scores
NARROW = 0.3  # "narrow": the normal scores squeezed to this sd (a model whose risks are not calibrated)


def test_noise(bins: int) -> float:
    """The noise multiplier of the pooled test histogram in the default config at ``bins``."""
    from client.app import _evaluation_noise

    cfg = load_config(None, [f"evaluation.score_bins={bins}", f"evaluation.subgroup_bins={min(5, bins)}"])
    return _evaluation_noise(cfg.to_json(), 1e-5)[(Split.TEST, True, Item.HISTOGRAM)]


def hospital(rng: np.random.Generator, n: int, prevalence: float, shape: str) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < prevalence).astype(np.int64)
    z = (rng.gamma(2.0, size=n) - 2.0) / np.sqrt(2.0) if shape == "skew" else rng.normal(size=n)
    scale = NARROW if shape == "narrow" else 1.0
    risk = 1 / (1 + np.exp(-(-2.3 + scale * (z + SHIFT * y))))
    return y, np.stack([1 - risk, risk], axis=1)


def study(shape: str, bins: int, repeats: int, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Errors per estimator and metric over ``repeats`` synthetic releases."""
    sigma = test_noise(bins)
    cfg = load_config(None, [f"evaluation.score_bins={bins}"])
    grid = ScoreGrid(*cfg.evaluation.logit_range, bins)
    errors: dict[str, dict[str, list[float]]] = {
        v[0]: {"AUROC": [], "AUPRC": [], "Brier": [], "hospital AUROC": []} for v in VARIANTS
    }
    for _ in range(repeats):
        parts = [hospital(rng, n, p, shape) for n, p in zip(SIZES, PREVALENCES)]
        exact = [ScoreSummary.from_predictions(y, p, grid) for y, p in parts]
        noisy = [s.noised(sigma, rng) for s in exact]
        truth = exact_metrics(np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]))
        truth_h = [exact_metrics(y, p).auroc for y, p in parts]
        for name, released, estimator, dp in VARIANTS:
            released = noisy if dp else exact
            read = (lambda s: replace(for_metrics(s, estimator, dp), fine=None)) if name == "binormal-bins" else (
                lambda s: for_metrics(s, estimator, dp))
            m = read(pooled(released)).metrics()
            errors[name]["AUROC"].append(m.auroc - truth.auroc)
            errors[name]["AUPRC"].append(m.auprc - truth.auprc)
            errors[name]["Brier"].append(m.brier - truth.brier)
            for s, t in zip(released, truth_h):
                errors[name]["hospital AUROC"].append(read(s).metrics().auroc - t)
    return {k: {m: np.asarray(v) for m, v in d.items()} for k, d in errors.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bins", default="20,10", help="comma-separated bin counts")
    parser.add_argument("--shapes", default="normal,skew,narrow", help="score distributions: normal, skew, narrow")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"{args.repeats} synthetic releases each; test noise multiplier {test_noise(10):.3f} "
          f"(per-cell std per hospital); error = estimate - exact")
    print(f"{'scores':7s} {'bins':>4s} {'estimator':13s} {'metric':15s} {'bias':>7s} {'sd':>6s} {'rmse':>6s}")
    for shape in args.shapes.split(","):
        for bins in (int(b) for b in args.bins.split(",")):
            t0 = time.perf_counter()
            errors = study(shape, bins, args.repeats, rng)
            for name, per in errors.items():
                for metric, e in per.items():
                    e = e[np.isfinite(e)]
                    print(f"{shape:7s} {bins:4d} {name:13s} {metric:15s} {e.mean():+7.3f} {e.std():6.3f} "
                          f"{np.sqrt(np.mean(e**2)):6.3f}")
            print(f"  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
