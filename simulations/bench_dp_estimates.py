"""How far the metrics read from DP score histograms are from the exact ones, per estimator.

    python -m simulations.bench_dp_estimates [--repeats 300] [--seed 1] [--bins 20,10]
        [--shapes normal,skew,narrow] [--release test|val-final|val-round] [--no-threshold]
    python -m simulations.bench_dp_estimates --runs RUN_DIR [RUN_DIR ...] [--repeats N] [--bins 20,10]

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
``skewnormal`` (the default), a skew-normal fitted per class (Azzalini 1985;
common.estimates); ``binormal``, a normal fitted per class; ``binormal-bins``, the
normal's fit but AUROC and AUPRC read from its counts in the bins, not on its finer
grid. ``exact-binned`` reads the same histograms without noise (what binning alone
costs); ``skewnormal-exact`` and ``binormal-exact`` fit them (what each fit's shape alone
costs).

``--runs DIR ...``: the same on finished runs' models (say, the fold folders of
``simulations.utility``), each scored exactly on its own test patients, which stay
the same while every repeat draws fresh noise of the run's own test release.

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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.config import ExperimentConfig, load_config
from common.estimates import for_metrics
from common.messages import Item, Split
from common.metrics import ScoreGrid, ScoreSummary, choose_threshold, exact_metrics, pooled
from simulations.estimator_study import AUROC_READINGS, read_release

SIZES = (115, 175, 296, 214)
PREVALENCES = (0.14, 0.05, 0.19, 0.145)
# (name, which histograms, estimator, AUROC/AUPRC on the fit's fine grid): what each variant reads
VARIANTS = (("binned", "noisy", "binned", False), ("skewnormal", "noisy", "skewnormal", True),
            ("binormal", "noisy", "binormal", True), ("binormal-bins", "noisy", "binormal", False),
            ("exact-binned", "exact", "binned", False), ("skewnormal-exact", "exact", "skewnormal", True),
            ("skewnormal-free-exact", "exact", "skewnormal", "free"), ("skewnormal-tied-exact", "exact", "skewnormal", "tied"),
            ("binormal-exact", "exact", "binormal", True))
# fine: True reads the fitted fine grid as a run does, told the release's noise (the skew-normal's AUROC from
# the tied pair where the noise is large for the deaths, common.estimates.reads_tied, else the free fits'),
# "free" the fine grid of the free fits alone, "tied" the tied pair's AUROC whatever the noise, False the
# fitted counts in the bins
THRESHOLD_ESTIMATORS = ("binned", "skewnormal", "binormal")  # the threshold study's, besides the best threshold
SHIFT = 1.09  # deaths' logits are this much higher: AUROC about 0.78 for normal scores
NARROW = 0.3  # "narrow": the normal scores squeezed to this sd (a model whose risks are not calibrated)


# --release: which of a run's releases (its noise in the default config) and the split's size
RELEASES = {"test": ((Split.TEST, True), 1.0), "val-final": ((Split.VAL, True), 0.5),
            "val-round": ((Split.VAL, False), 0.5)}


def release_noise(bins: int, release: str = "test") -> float:
    """The noise multiplier of a hospital's histogram release in the default config at ``bins``
    (the test release; the final model's validation; a validation during the run)."""
    from client.evaluation import evaluation_noise

    cfg = load_config(None, [f"evaluation.score_bins={bins}", f"evaluation.subgroup_bins={min(5, bins)}"])
    split, final = RELEASES[release][0]
    return evaluation_noise(cfg.to_json(), 1e-5)[(split, final, Item.HISTOGRAM)]


def hospital(rng: np.random.Generator, n: int, prevalence: float, shape: str) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < prevalence).astype(np.int64)
    z = (rng.gamma(2.0, size=n) - 2.0) / np.sqrt(2.0) if shape == "skew" else rng.normal(size=n)
    scale = NARROW if shape == "narrow" else 1.0
    risk = 1 / (1 + np.exp(-(-2.3 + scale * (z + SHIFT * y))))
    return y, np.stack([1 - risk, risk], axis=1)


Parts = list[tuple[np.ndarray, np.ndarray]]  # per hospital: labels and class probabilities


def errors_of(draw: Callable[[], Parts], sigma: float, grid: ScoreGrid, repeats: int, rng: np.random.Generator
              ) -> dict[str, dict[str, np.ndarray]]:
    """Errors per variant and metric over ``repeats`` releases of the hospitals' histograms of
    ``draw()``'s predictions, each with noise ``sigma`` per cell."""
    errors: dict[str, dict[str, list[float]]] = {
        v[0]: {"AUROC": [], "AUPRC": [], "Brier": [], "hospital AUROC": []} for v in VARIANTS
    }
    for _ in range(repeats):
        parts = draw()
        exact = [ScoreSummary.from_predictions(y, p, grid) for y, p in parts]
        noisy = [s.noised(sigma, rng) for s in exact]
        truth = exact_metrics(np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]))
        truth_h = [exact_metrics(y, p).auroc for y, p in parts]
        for name, which, estimator, fine in VARIANTS:
            released = noisy if which == "noisy" else exact

            def read(summary: ScoreSummary, noise_sd: float) -> ScoreSummary:
                # (exact ones too: what the fit alone costs; their noise is none)
                read = read_release(summary, estimator, noise_sd, fine if fine in AUROC_READINGS else "rule")
                return read if fine else replace(read, fine=None)

            sds = [sigma * s.sensitivity if which == "noisy" else 0.0 for s in released]  # each cell's, as noised()
            m = read(pooled(released), float(np.sqrt(np.sum(np.square(sds))))).metrics()
            errors[name]["AUROC"].append(m.auroc - truth.auroc)
            errors[name]["AUPRC"].append(m.auprc - truth.auprc)
            errors[name]["Brier"].append(m.brier - truth.brier)
            for summary, t, sd in zip(released, truth_h, sds):
                errors[name]["hospital AUROC"].append(read(summary, sd).metrics().auroc - t)
    return {k: {m: np.asarray(v) for m, v in d.items()} for k, d in errors.items()}


def study(shape: str, bins: int, repeats: int, rng: np.random.Generator, release: str = "test"
          ) -> dict[str, dict[str, np.ndarray]]:
    """Errors per variant and metric over ``repeats`` synthetic releases."""
    sizes = [round(n * RELEASES[release][1]) for n in SIZES]
    grid = ScoreGrid(*load_config(None, []).evaluation.logit_range, bins)
    return errors_of(lambda: [hospital(rng, n, p, shape) for n, p in zip(sizes, PREVALENCES)],
                     release_noise(bins, release), grid, repeats, rng)


def run_scores(run_dir: Path) -> tuple[ExperimentConfig, Parts]:
    """A finished run's model scored exactly on each hospital's test patients (a simulation
    holds them all), with the run's own config."""
    from common.bundle import Bundle
    from common.data.dataset import load_dataset
    from common.data.partition import make_partition
    from common.training import predict_proba

    cfg = load_config(run_dir / "config.yaml")
    model = Bundle(run_dir / "model.pt").model.eval()
    ds = load_dataset(cfg)
    return cfg, [(ds.y[h.test], predict_proba(model, ds.X[h.test], ds.S[h.test])) for h in make_partition(ds, cfg)]


def threshold_study(shape: str, bins: int, repeats: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The exact event-1 score, min(Se, +P), on fresh test patients at the threshold each
    estimator picks (``choose_threshold``, a bin edge) from a noisy validation release
    half the test's size; "best": the best threshold for those test patients, any risk."""
    sigma = release_noise(bins, "val-final")
    grid = ScoreGrid(*load_config(None, []).evaluation.logit_range, bins)
    out: dict[str, list[float]] = {**{e: [] for e in THRESHOLD_ESTIMATORS}, "best": []}
    for _ in range(repeats):
        val = pooled([ScoreSummary.from_predictions(*hospital(rng, n // 2, p, shape), grid).noised(sigma, rng)
                      for n, p in zip(SIZES, PREVALENCES)])
        test = [hospital(rng, n, p, shape) for n, p in zip(SIZES, PREVALENCES)]
        y, probs = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
        for estimator in THRESHOLD_ESTIMATORS:
            edge = choose_threshold(for_metrics(val, estimator, True))
            out[estimator].append(exact_metrics(y, probs, grid.edge_risk(edge) if edge else 0.5).event1_score)
        out["best"].append(max(exact_metrics(y, probs, t).event1_score for t in np.quantile(probs[:, 1], np.linspace(0.5, 0.99, 50))))
    return {k: np.asarray(v) for k, v in out.items()}


def print_errors(label: str, bins: int, errors: dict[str, dict[str, np.ndarray]]) -> None:
    for name, per in errors.items():
        for metric, e in per.items():
            e = e[np.isfinite(e)]
            print(f"{label:7s} {bins:4d} {name:16s} {metric:15s} {e.mean():+7.3f} {e.std():6.3f} {np.sqrt(np.mean(e**2)):6.3f}")


def real_runs(runs: list[Path], bins: list[int], repeats: int, rng: np.random.Generator) -> int:
    """The study on real models' scores: the same patients in every repeat, fresh noise."""
    from client.evaluation import evaluation_noise

    print(f"{repeats} noisy test releases of each run's exact scores; error = estimate - exact")
    print(f"{'run':7s} {'bins':>4s} {'estimator':16s} {'metric':15s} {'bias':>7s} {'sd':>6s} {'rmse':>6s}")
    for run in runs:
        cfg, parts = run_scores(run)
        sigma = evaluation_noise(cfg.to_json(), 1e-5)[(Split.TEST, True, Item.HISTOGRAM)]
        truth = exact_metrics(np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]))
        print(f"{run}: {sum(len(y) for y, _ in parts)} test patients, exact AUROC {truth.auroc:.3f}, "
              f"Brier {truth.brier:.3f}; noise {sigma:.3f} per cell and hospital")
        for b in bins:
            print_errors(run.name[-7:], b, errors_of(lambda: parts, sigma, ScoreGrid(*cfg.evaluation.logit_range, b),
                                                    repeats, rng))
    return 0


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
    parser.add_argument("--runs", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="instead of synthetic scores: finished runs' models, scored exactly on their own test "
                             "patients, with fresh noise (their config's test release) in every repeat")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.runs:
        return real_runs(args.runs, [int(b) for b in args.bins.split(",")], args.repeats, rng)
    print(f"{args.repeats} synthetic {args.release} releases each; noise multiplier "
          f"{release_noise(10, args.release):.3f} (per-cell std per hospital); error = estimate - exact")
    print(f"{'scores':7s} {'bins':>4s} {'estimator':16s} {'metric':15s} {'bias':>7s} {'sd':>6s} {'rmse':>6s}")
    for shape in args.shapes.split(","):
        for bins in (int(b) for b in args.bins.split(",")):
            t0 = time.perf_counter()
            print_errors(shape, bins, study(shape, bins, args.repeats, rng, args.release))
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
