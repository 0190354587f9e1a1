"""How far the metrics read from DP score histograms are from the exact ones, per estimator.

    python -m simulations.bench_dp_estimates [--repeats 300] [--seed 1] [--bins 20,10]
        [--shapes normal,skew,narrow] [--release test|val-final|val-round] [--no-threshold]

A synthetic study at the default's size: 4 hospitals with 115/175/296/214 test patients
and death rates .14/.05/.19/.145 (about 110 deaths in 800), logits of survivors
-2.3 + Z and of deaths 1.09 higher (Z standard normal; "skew": a gamma(2) standardised,
a score distribution the binormal model does not assume; "narrow": normal, all logits
scaled by 0.3 about -2.3, as from a DP model whose output scale learnt little), so an
AUROC near 0.78. Each hospital releases its test score histogram with the noise fedgru
calibrates for the default config's test release (``evaluation.test_epsilon``, the
histogram's share; ``--release``: the final model's validation release, or one during
the run, each of half the test's size); the server pools them and reads metrics with
each estimator (``evaluation.estimator``): ``binned``, the counts clipped at zero;
``binormal``, a normal fitted per class (common.estimates); ``binormal-bins``, the same
fit but AUROC and AUPRC read from its counts in the bins, not on its finer grid.
``exact-binned`` reads the same histograms without noise (what binning alone costs).

Prints, per score distribution, bin count and estimator, the error (estimate minus the
exact metric of the same predictions) of the pooled AUROC, AUPRC and Brier score and of
the hospitals' own AUROCs: bias, sd and rmse over repeats. Then the exact event-1 score
of fresh test patients at the threshold each estimator picks on a noisy pooled
validation release (the final model's noise, half the test's size), beside the best
threshold's. Numbers only, no pass or fail.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from common.config import load_config
from common.estimates import for_metrics
from common.messages import Item, Split
from common.metrics import ScoreGrid, ScoreSummary, choose_threshold, exact_metrics, pooled

SIZES = (115, 175, 296, 214)
PREVALENCES = (0.14, 0.05, 0.19, 0.145)
# (name, released, estimator, dp): the summary each estimator reads
VARIANTS = (("binned", "noisy", "binned", True), ("binormal", "noisy", "binormal", True),
            ("binormal-bins", "noisy", "binormal", True), ("exact-binned", "exact", "binned", False))
SHIFT = 1.09  # deaths' logits are this much higher: AUROC about 0.78 for normal scores
NARROW = 0.3  # "narrow": the normal scores squeezed to this sd (a model whose risks are not calibrated)


# --release: which of a run's releases (its noise in the default config) and the split's size
RELEASES = {"test": ((Split.TEST, True), 1.0), "val-final": ((Split.VAL, True), 0.5),
            "val-round": ((Split.VAL, False), 0.5)}


def release_noise(bins: int, release: str = "test") -> float:
    """The noise multiplier of a hospital's histogram release in the default config at ``bins``
    (the test release; the final model's validation; a validation during the run)."""
    from client.app import _evaluation_noise

    cfg = load_config(None, [f"evaluation.score_bins={bins}", f"evaluation.subgroup_bins={min(5, bins)}"])
    split, final = RELEASES[release][0]
    return _evaluation_noise(cfg.to_json(), 1e-5)[(split, final, Item.HISTOGRAM)]


def hospital(rng: np.random.Generator, n: int, prevalence: float, shape: str) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < prevalence).astype(np.int64)
    z = (rng.gamma(2.0, size=n) - 2.0) / np.sqrt(2.0) if shape == "skew" else rng.normal(size=n)
    scale = NARROW if shape == "narrow" else 1.0
    risk = 1 / (1 + np.exp(-(-2.3 + scale * (z + SHIFT * y))))
    return y, np.stack([1 - risk, risk], axis=1)


def study(shape: str, bins: int, repeats: int, rng: np.random.Generator, release: str = "test"
          ) -> dict[str, dict[str, np.ndarray]]:
    """Errors per estimator and metric over ``repeats`` synthetic releases."""
    sigma = release_noise(bins, release)
    sizes = [round(n * RELEASES[release][1]) for n in SIZES]
    cfg = load_config(None, [f"evaluation.score_bins={bins}"])
    grid = ScoreGrid(*cfg.evaluation.logit_range, bins)
    errors: dict[str, dict[str, list[float]]] = {
        v[0]: {"AUROC": [], "AUPRC": [], "Brier": [], "hospital AUROC": []} for v in VARIANTS
    }
    for _ in range(repeats):
        parts = [hospital(rng, n, p, shape) for n, p in zip(sizes, PREVALENCES)]
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


def threshold_study(shape: str, bins: int, repeats: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The exact event-1 score, min(Se, +P), on fresh test patients at the threshold each
    estimator picks (``choose_threshold``, a bin edge) from a noisy validation release
    half the test's size; "best": the best threshold for those test patients, any risk."""
    sigma = release_noise(bins, "val-final")
    grid = ScoreGrid(*load_config(None, []).evaluation.logit_range, bins)
    out: dict[str, list[float]] = {"binned": [], "binormal": [], "best": []}
    for _ in range(repeats):
        val = pooled([ScoreSummary.from_predictions(*hospital(rng, n // 2, p, shape), grid).noised(sigma, rng)
                      for n, p in zip(SIZES, PREVALENCES)])
        test = [hospital(rng, n, p, shape) for n, p in zip(SIZES, PREVALENCES)]
        y, probs = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
        for estimator in ("binned", "binormal"):
            edge = choose_threshold(for_metrics(val, estimator, True))
            out[estimator].append(exact_metrics(y, probs, grid.edge_risk(edge) if edge else 0.5).event1_score)
        out["best"].append(max(exact_metrics(y, probs, t).event1_score for t in np.quantile(probs[:, 1], np.linspace(0.5, 0.99, 50))))
    return {k: np.asarray(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bins", default="20,10", help="comma-separated bin counts")
    parser.add_argument("--shapes", default="normal,skew,narrow", help="score distributions: normal, skew, narrow")
    parser.add_argument("--release", default="test", choices=sorted(RELEASES),
                        help="whose noise and size: the test release, the final model's validation (half the "
                             "test's size), a validation during the run")
    parser.add_argument("--no-threshold", action="store_true", help="skip the threshold study")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"{args.repeats} synthetic {args.release} releases each; noise multiplier "
          f"{release_noise(10, args.release):.3f} (per-cell std per hospital); error = estimate - exact")
    print(f"{'scores':7s} {'bins':>4s} {'estimator':13s} {'metric':15s} {'bias':>7s} {'sd':>6s} {'rmse':>6s}")
    for shape in args.shapes.split(","):
        for bins in (int(b) for b in args.bins.split(",")):
            t0 = time.perf_counter()
            errors = study(shape, bins, args.repeats, rng, args.release)
            for name, per in errors.items():
                for metric, e in per.items():
                    e = e[np.isfinite(e)]
                    print(f"{shape:7s} {bins:4d} {name:13s} {metric:15s} {e.mean():+7.3f} {e.std():6.3f} "
                          f"{np.sqrt(np.mean(e**2)):6.3f}")
            print(f"  ({time.perf_counter() - t0:.0f} s)")
    if args.no_threshold:
        return 0
    print("\nExact test event-1 at the threshold chosen on a noisy pooled validation release (mean, sd)")
    for shape in args.shapes.split(","):
        for bins in (int(b) for b in args.bins.split(",")):
            found = threshold_study(shape, bins, args.repeats, rng)
            print(f"{shape:7s} {bins:4d} " + "  ".join(f"{k} {v.mean():.3f} ({v.std():.3f})" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
