"""How well each estimator reads a run's test metrics from its DP release, on real models.

    python -m simulations.estimator_study RUNS_DIR [RUNS_DIR ...] [--draws 10] [--intervals 2]
                                          [--estimators skewnormal,binormal]
                                          [--noise-scale 1] [--auroc-reading rule|tied|free]

``RUNS_DIR`` is a ``simulations.utility`` output folder: every ``fold*/model.pt`` in it
is scored exactly on its own fold's test stays (a simulation holds every patient; nothing
here is a DP release). Each run's pooled test histogram is then released again, ``--draws``
times, with fresh Gaussian noise of the sd the run's own release carried (per-hospital DP:
each of its K hospitals' test multiplier, so sqrt(K) of one; secure aggregation: the sum
of K Skellam shares, each with the variance its hospital calibrates,
``client.secure_evaluation.secure_evaluation_variances``), and read by each estimator
(``common.estimates``) at the run's own threshold. Printed per metric: the readings'
bias, sd and root mean square error against the exact value of the same patients at the
same bin edge, and for the first ``--intervals`` draws of each run how often the interval
(``metric_intervals``, the report's nominal level) held that exact value. Then each
estimator's reliability diagram (``common.reliability.reliability``, as the report draws
it) against the exact tenths of the same patients, and how often each point's band held
its exact tenth.

``--noise-scale`` releases with that many times the run's noise (a larger federation, a
larger test epsilon; 0: exact counts), and ``--auroc-reading`` forces the skew-normal's
AUROC from the tied pair or the free fits, to see what ``common.estimates.reads_tied``
chooses between.

Fresh noise on the exact counts is, in distribution, what the run's hospitals added, so
20 runs x 10 draws measure an estimator's error with less chance than 20 runs' single
releases; what it does not vary is the models. Why it exists: the normal fit read
specificity about 0.04 high in every mode (README "What a run reports about itself").
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.estimates import ESTIMATORS, for_metrics
from common.intervals import INTERVAL_LEVEL, INTERVAL_METRICS, metric_intervals, reliability_bands
from common.metrics import ScoreGrid, ScoreSummary, exact_metrics


@dataclass
class HeldOutScores:
    """One run's exact hour-48 test logits and outcomes, its threshold's bin edge and the
    sd of the noise its pooled test release carried on each cell."""

    name: str
    logits: np.ndarray
    y: np.ndarray
    grid: ScoreGrid
    edge: int
    noise_sd: float
    # for simulations.subgroup_study: the run's config, its test stays' descriptors (raw, as
    # evaluation.subgroups groups them) and the sd of its pooled subgroup release's noise per cell
    cfg: object = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    subgroup_noise_sd: float = math.nan
    threshold: float = math.nan  # the run's decision threshold (a risk)


@dataclass
class Errors:
    """An estimator's readings against the exact values, and its intervals' hits."""

    errors: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in INTERVAL_METRICS})
    held: dict[str, list[bool]] = field(default_factory=lambda: {m: [] for m in INTERVAL_METRICS})
    # the reliability diagram (common.reliability.reliability, as the report draws it: made non-decreasing)
    # against the exact tenths of the same patients: each release's observed rates read, and the exact ones;
    # and the same without the PAV step
    curves: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    raw_curves: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # per tenth, whether the point's band (metric_intervals with_reliability) held the exact tenth's rate
    bands_held: dict[int, list[bool]] = field(default_factory=dict)

    def bands_row(self) -> str:
        """How often each reliability point's band held its exact tenth, and in all."""
        if not self.bands_held:
            return "no band drawn"
        held = [h for k in sorted(self.bands_held) for h in self.bands_held[k]]
        return (f"{sum(held)} of {len(held)} ({np.mean(held):.0%}); by tenth "
                + " ".join(f"{sum(self.bands_held[k])}/{len(self.bands_held[k])}" for k in sorted(self.bands_held)))

    def reliability_row(self, raw: bool = False) -> str:
        """Mean absolute error of each tenth's observed rate; the lowest tenth read against
        exact (and the share read 0.1 or more too high); each curve's largest error."""
        curves = self.raw_curves if raw else self.curves
        if not curves:
            return "no curve with ten points"
        read, exact = np.array([c[0] for c in curves]), np.array([c[1] for c in curves])
        error = np.abs(read - exact)
        largest = error.max(axis=1)
        return (f"{len(read)} curves; mean error per tenth {' '.join(f'{e:.3f}' for e in error.mean(axis=0))} "
                f"(all {error.mean():.3f}); lowest tenth read {read[:, 0].mean():.3f} against {exact[:, 0].mean():.3f} "
                f"exact, 0.1 or more too high in {np.mean(read[:, 0] > exact[:, 0] + 0.1):.0%}; a curve's largest "
                f"error {largest.mean():.3f} (90th centile {np.quantile(largest, 0.9):.3f}, most {largest.max():.3f})")

    def row(self, metric: str) -> tuple[float, float, float, int, int]:
        """(bias, sd, rmse, intervals that held, intervals)"""
        e = np.array([v for v in self.errors[metric] if math.isfinite(v)])
        if not len(e):
            return math.nan, math.nan, math.nan, 0, 0
        h = self.held[metric]
        return float(e.mean()), float(e.std()), float(math.sqrt((e ** 2).mean())), int(sum(h)), len(h)


def exact_summary(run: HeldOutScores) -> tuple[ScoreSummary, object]:
    """The run's exact pooled histogram and its exact metrics at the threshold's edge."""
    risk = 1 / (1 + np.exp(-run.logits))
    probs = np.stack([1 - risk, risk], axis=1)
    return (ScoreSummary.from_predictions(run.y, probs, run.grid),
            exact_metrics(run.y, probs, run.grid.edge_risk(run.edge)))


AUROC_READINGS = ("rule", "tied", "free")  # as a run reads it (common.estimates.reads_tied), or forced


def read_release(noisy: ScoreSummary, estimator: str, noise_sd: float, auroc_reading: str = "rule") -> ScoreSummary:
    """``noisy`` read as a run reads it, told its noise; ``auroc_reading`` tied or free:
    the skew-normal's AUROC from the tied pair, or from the free fits, whatever the noise."""
    read = for_metrics(noisy, estimator, True, None if auroc_reading == "tied" else noise_sd)
    if auroc_reading == "free" and read.fine is not None:
        read = replace(read, fine=replace(read.fine, ranking_auroc=None))
    return read


def study(runs: list[HeldOutScores], estimators: list[str], draws: int, intervals: int, seed: int = 0,
          interval_draws: int = 200, noise_scale: float = 1.0, auroc_reading: str = "rule") -> dict[str, Errors]:
    """Each estimator's errors over ``runs`` x ``draws`` fresh releases (intervals on the
    first ``intervals`` of each run's), with ``noise_scale`` times each run's noise."""
    from common.reliability import exact_reliability, non_decreasing, reliability

    rng = np.random.default_rng(seed)
    out = {e: Errors() for e in estimators}
    for index, run in enumerate(runs):
        summary, exact = exact_summary(run)
        tenths = np.array([p.observed for p in exact_reliability(run.y == 1, 1 / (1 + np.exp(-run.logits)))])
        noise_sd = run.noise_sd * noise_scale
        for k in range(draws):
            noisy = ScoreSummary(summary.histogram + rng.normal(0.0, noise_sd, summary.histogram.shape), None,
                                 summary.n, run.grid)
            for e in estimators:
                counts = read_release(noisy, e, noise_sd, auroc_reading)
                points = reliability(counts, monotone=False)
                if len(points) == len(tenths):
                    out[e].raw_curves.append((np.array([p.observed for p in points]), tenths))
                    out[e].curves.append((np.array([p.observed for p in non_decreasing(points)]), tenths))
                read = counts.metrics(run.edge)
                for m in INTERVAL_METRICS:
                    out[e].errors[m].append(getattr(read, m) - getattr(exact, m))
                if k < intervals:
                    found = metric_intervals(noisy, noise_sd, run.edge, INTERVAL_LEVEL, interval_draws,
                                             np.random.default_rng([seed, index, k]), e, with_reliability=True) or {}
                    banded = reliability_bands(non_decreasing(points), found)  # takes the bands out of found
                    if len(banded) == len(tenths):
                        for t, (point, truth) in enumerate(zip(banded, tenths)):
                            if point.low is not None:
                                out[e].bands_held.setdefault(t, []).append(
                                    bool(point.low - 1e-9 <= truth <= point.high + 1e-9))
                    for m, (low, high) in found.items():
                        out[e].held[m].append(bool(low - 1e-9 <= getattr(exact, m) <= high + 1e-9))
    return out


def test_scores(run_dir: Path) -> HeldOutScores:
    """A run's exact hour-48 test logits, from its bundle and its fold's stays."""
    import json

    from client.noise import calibrated_evaluation_noise
    from common.bundle import Bundle
    from common.data.dataset import load_dataset
    from common.data.partition import make_partition
    from common.messages import Item, Split
    from common.training import hourly_logits_at

    bundle = Bundle(run_dir / "model.pt")
    cfg, model = bundle.config, bundle.model.eval()
    ds = load_dataset(cfg)
    hospitals = make_partition(ds, cfg)
    test = np.concatenate([h.test for h in hospitals])
    logits = hourly_logits_at(model, ds.X[test], ds.S[test], [ds.X.shape[1]])[:, 0]
    # each hospital calibrates its own noise to its own delta (delta: auto depends on its stays)
    deltas = [float(h["delta"]) for h in json.loads((run_dir / "privacy.json").read_text())["hospitals"].values()]
    key = (Split.TEST, True, Item.HISTOGRAM)
    group_key = (Split.TEST, True, Item.SUBGROUP_HISTOGRAMS)
    # a patient is in one group of each grouping: the subgroup release's sensitivity is sqrt(groupings)
    group_sensitivity = math.sqrt(max(len(cfg.evaluation.subgroups), 1))
    if cfg.privacy.aggregation == "secure":  # K Skellam shares, each as its hospital calibrated it
        from client.secure_evaluation import secure_evaluation_variances

        # calibrated once per distinct delta: each calibration runs the accountant (seconds)
        by_delta = {d: secure_evaluation_variances(cfg.to_json(), d, cfg.privacy.min_honest,
                                                   cfg.privacy.max_epsilon_alone) for d in set(deltas)}
        variances = [by_delta[d] for d in deltas]
        sd = math.sqrt(sum(v[key] for v in variances))
        group_sd = math.sqrt(sum(v[group_key] for v in variances)) if group_key in variances[0] else math.nan
    else:  # K Gaussian releases, the histogram's sensitivity 1
        by_delta = {d: calibrated_evaluation_noise(cfg.to_json(), d) for d in set(deltas)}  # once per distinct delta
        multipliers = [by_delta[d] for d in deltas]
        sd = math.sqrt(sum(m[key] ** 2 for m in multipliers))
        group_sd = (group_sensitivity * math.sqrt(sum(m[group_key] ** 2 for m in multipliers))
                    if group_key in multipliers[0] else math.nan)
    grid = ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins)
    threshold = float(bundle.info.get("threshold", 0.5))
    return HeldOutScores(run_dir.name, logits, ds.y[test], grid, grid.edge_for_risk(threshold), sd, cfg,
                         {name: values[test] for name, values in ds.groups.items()}, group_sd, threshold)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.estimator_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dirs", type=Path, nargs="+", help="simulations.utility output folders (fold*/model.pt)")
    parser.add_argument("--draws", type=int, default=10, help="fresh noise draws of each run's test release")
    parser.add_argument("--intervals", type=int, default=2, help="of those, how many also get intervals (slow)")
    parser.add_argument("--estimators", default="skewnormal,binormal",
                        help=f"comma-separated, of {', '.join(e for e in ESTIMATORS if e != 'binned')}")
    parser.add_argument("--noise-scale", type=float, default=1.0,
                        help="each release's noise, times the run's own (0: exact counts; the reading is told the same)")
    parser.add_argument("--auroc-reading", choices=AUROC_READINGS, default="rule",
                        help="the skew-normal's AUROC as a run reads it (rule), or always from the tied pair or the "
                             "free fits (common.estimates.reads_tied)")
    args = parser.parse_args(argv)
    if not args.noise_scale >= 0:
        parser.error("--noise-scale must be 0 or more")
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown:
        parser.error(f"--estimators: unknown {', '.join(unknown)} (one of {', '.join(ESTIMATORS)})")
    dirs = []
    for runs_dir in args.runs_dirs:
        found_here = sorted(p for p in runs_dir.glob("fold*") if (p / "model.pt").is_file())
        if not found_here:
            parser.error(f"{runs_dir}: no fold*/model.pt (a simulations.utility output folder)")
        dirs += found_here
    runs = [test_scores(d) for d in dirs]
    print(f"{len(runs)} runs of {', '.join(map(str, args.runs_dirs))}, {args.draws} fresh releases each (noise sd per cell "
          f"{min(r.noise_sd for r in runs):.2f}-{max(r.noise_sd for r in runs):.2f}, times {args.noise_scale}), "
          f"intervals on {args.intervals}, the AUROC read: {args.auroc_reading}\n",
          file=sys.stderr)
    draws = args.draws if args.noise_scale > 0 else 1  # exact counts: one reading each
    found = study(runs, estimators, draws, args.intervals, noise_scale=args.noise_scale,
                  auroc_reading=args.auroc_reading)
    print("| metric | " + " | ".join(f"{e}: bias | sd | rmse | intervals held" for e in estimators) + " |")
    print("|---|" + "---|---|---|---|" * len(estimators))
    for m in INTERVAL_METRICS:
        cells = []
        for e in estimators:
            bias, sd, rmse, held, total = found[e].row(m)
            cells.append(f"{bias:+.3f} | {sd:.3f} | {rmse:.3f} | " + (f"{held}/{total}" if total else "not run"))
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("\nThe reliability diagram (observed rate in tenths of the patients by risk, as the report draws it) "
          "against the exact tenths:")
    for e in estimators:
        print(f"- {e}: {found[e].reliability_row()}")
        print(f"- {e}, without making the curve non-decreasing (PAV): {found[e].reliability_row(raw=True)}")
        print(f"- {e}: each point's band (the report's nominal level) held the exact tenth's rate in "
              f"{found[e].bands_row()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
