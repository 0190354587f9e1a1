"""What the bedside flags of a set of runs could reach, and where their spread comes from.

    python -m simulations.bedside_study RUNS_DIR [--draws 100] [--levels 0.15,0.17,0.19] [--split val]

``RUNS_DIR`` is a ``simulations.utility`` output folder: every ``fold*/model.pt`` in it
is scored exactly (a simulation holds every patient; nothing here is a DP release) on its
own fold's validation stays (per hospital) and test stays, with the bundle's own hour
thresholds. Three tables, each a question the README's "Flags at the bedside" answers:

1. **An oracle.** Flag exactly the top ``r`` of each run's own test stays (no real run
   can): at which ``r`` does every run keep sensitivity >= 0.55 and specificity >= 0.7
   (issue 22's per-run targets)? For the hour-48 risk and for the monitor's score (a
   stay's highest excess over the hour thresholds, ``common.onset``). A rate outside
   every run's band cannot meet them whatever the rule.
2. **Clinical levels.** The hour-48 decision at fixed risks, applied to the same models:
   the share of test stays flagged (mean, sd, range, and the sd within one fold, where
   only the training's randomness differs), and the least sensitivity and specificity.
   ``--split val`` reads each run's validation stays instead: the split a default level
   may be chosen on, leaving the test stays to judge it.
3. **The monitor's margin, redrawn.** For each run, ``--draws`` fresh draws of the onset
   histogram's noise as its ledger recorded it (discrete Laplace or Gaussian, its sd;
   per-hospital DP), read by several rules; the sd of the monitor's share over runs and draws, and how often a
   draw's sensitivity or specificity misses. The first row (no noise) is the spread the
   models themselves leave. Two rows spend the final validation release's whole budget:
   on the run's reading, and on one Gaussian count put at the exact margin (a benchmark
   no reading of a Gaussian histogram of that budget reached). The last row is an
   accounting fedgru does not use: the onset histogram as a pure-DP Laplace release at its
   share of the validation epsilon, the shares composed in epsilon (fedgru composes its
   Laplace release in RDP with the Gaussian ones). Secure aggregation's runs get the
   no-noise rows only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from common.metrics import ScoreGrid, ScoreSummary, logit, threshold_for_rate

MIN_SENSITIVITY, MIN_SPECIFICITY = 0.55, 0.7  # issue 22's per-run targets
RATES = np.round(np.arange(0.15, 0.46, 0.01), 2)


@dataclass
class RunScores:
    """One run's exact scores (log-odds) and what it read from its DP releases."""

    name: str
    val_onset: list[np.ndarray]  # per hospital: each validation stay's highest excess over the hour thresholds
    test_onset: np.ndarray  # the same for the test stays
    test_end: np.ndarray  # each test stay's logit at the window's end (what predict flags)
    y: np.ndarray  # test outcomes
    threshold: float  # the run's hour-48 decision threshold (a risk)
    onset_noise: float  # the onset histogram's noise sd per hospital (sensitivity 1), as its ledger entry records it
    monitor_rate: float
    grid: ScoreGrid  # the onset histogram's bins, as the run released it
    estimator: str = "binormal"  # how the run read its DP releases (evaluation.estimator)
    val_end: np.ndarray | None = None  # each validation stay's logit at the window's end
    y_val: np.ndarray | None = None  # validation outcomes
    # the noise multiplier per hospital of one count (sensitivity 1) given the final validation release's
    # whole budget (its histogram's, the hourly histograms' and the onset histogram's rho together)
    one_count_noise: float = 0.0
    per_hospital: bool = True  # each hospital's own noise (not secure aggregation's summed Skellam shares)
    onset_laplace: bool = False  # the onset histogram's noise was discrete Laplace (common.laplace), not Gaussian
    # the onset histogram's share of the validation epsilon, spent as pure epsilon-DP (a Laplace histogram composed
    # in epsilon, not in RDP as fedgru does: what a change of accounting could give)
    laplace_epsilon: float = 0.0

    def end_scores(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(logit at the window's end, outcome) of the ``split`` ("test" or "val") stays."""
        if split == "test":
            return self.test_end, self.y
        if self.val_end is None or self.y_val is None:
            raise ValueError(f"{self.name}: no validation scores were loaded")
        return self.val_end, self.y_val


def flags_at(score: np.ndarray, y: np.ndarray, cut: float) -> tuple[float, float, float]:
    """(share flagged, sensitivity, specificity) of flagging ``score >= cut``."""
    flag = score >= cut
    return float(flag.mean()), float(flag[y == 1].mean()), float(1 - flag[y == 0].mean())


def feasible_rates(score: np.ndarray, y: np.ndarray, rates: np.ndarray = RATES) -> np.ndarray:
    """The rates ``r`` at which flagging the top ``r`` of these stays keeps sensitivity
    and specificity at or above the targets."""
    keep = []
    for r in rates:
        _, sens, spec = flags_at(score, y, float(np.quantile(score, 1 - r)))
        keep.append(sens >= MIN_SENSITIVITY and spec >= MIN_SPECIFICITY)
    return rates[np.asarray(keep, dtype=bool)]


def oracle(runs: list[RunScores], which: str) -> tuple[list[tuple[float, float] | None], list[float]]:
    """Each run's band of feasible rates (None: no rate works) and the rates feasible in every run."""
    bands, common = [], set(RATES.tolist())
    for run in runs:
        found = feasible_rates(run.test_end if which == "end" else run.test_onset, run.y)
        bands.append((float(found.min()), float(found.max())) if len(found) else None)
        common &= set(found.tolist())
    return bands, sorted(common)


def at_level(runs: list[RunScores], level: float, split: str = "test") -> dict[str, float]:
    """The hour-48 decision at a fixed risk on each run's test stays (``split="val"``: its
    validation stays)."""
    cut = float(logit(level))
    scored = [r.end_scores(split) for r in runs]
    rows = np.array([flags_at(score, y, cut) for score, y in scored])
    folds: dict[str, list[float]] = {}
    for run, share in zip(runs, rows[:, 0]):
        folds.setdefault(run.name.split("-")[0], []).append(float(share))
    within = [np.var(v, ddof=1) for v in folds.values() if len(v) > 1]
    return {"share": float(rows[:, 0].mean()), "sd": float(rows[:, 0].std(ddof=1)) if len(rows) > 1 else math.nan,
            "low": float(rows[:, 0].min()), "high": float(rows[:, 0].max()),
            "within_fold_sd": float(math.sqrt(np.mean(within))) if within else math.nan,
            "least_sensitivity": float(rows[:, 1].min()), "least_specificity": float(rows[:, 2].min())}


Reading = Callable[[np.ndarray, int, ScoreGrid, float], float | None]  # (pooled noisy histogram, n, grid, rate) -> margin


def fitted(hist: np.ndarray, n: int, grid: ScoreGrid, rate: float, estimator: str = "binormal") -> float | None:
    """The run's own reading: the ``estimator``'s fit of the pooled histogram
    (server.results.Reader.onset_margin)."""
    from common.estimates import binormal_counts

    chosen = threshold_for_rate(binormal_counts(ScoreSummary(hist[None, None, :], None, n, grid), estimator), rate)
    return None if chosen is None else math.log(chosen) - math.log1p(-chosen)


def binned(hist: np.ndarray, n: int, grid: ScoreGrid, rate: float) -> float | None:
    """The counts clipped at zero, interpolated within the bin the target falls in."""
    chosen = threshold_for_rate(ScoreSummary(np.maximum(hist, 0)[None, None, :], None, n, grid), rate)
    return None if chosen is None else math.log(chosen) - math.log1p(-chosen)


def redrawn_margins(run: RunScores, grid: ScoreGrid | None, read: Reading, draws: int, rng: np.random.Generator,
                    noise_sd: float | None = None, laplace_epsilon: float | None = None) -> list[float | None]:
    """``draws`` margins read from fresh noise on the run's exact per-hospital onset
    histograms (``grid`` None: the run's own bins): the run's own noise (its mechanism and
    sd), or Gaussian noise of ``noise_sd``, or with ``laplace_epsilon`` each hospital's pure
    epsilon-DP Laplace histogram (a stay is in one bin: L1 sensitivity 1 under adding or
    removing a stay, so scale 1/epsilon per bin; Dwork & Roth 2014, 3.3)."""
    from common import laplace

    grid = grid or run.grid
    hists = [np.bincount(grid.index(v), minlength=grid.bins).astype(np.float64) for v in run.val_onset]
    n = sum(len(v) for v in run.val_onset)

    def noise() -> np.ndarray:
        if laplace_epsilon is not None:
            return rng.laplace(0.0, 1.0 / laplace_epsilon, grid.bins)
        if noise_sd is None and run.onset_laplace:
            return laplace.sample(run.onset_noise, (grid.bins,), rng)
        return rng.normal(0.0, run.onset_noise if noise_sd is None else noise_sd, grid.bins)

    return [read(sum(h + noise() for h in hists), n, grid, run.monitor_rate) for _ in range(draws)]


def one_count_margins(run: RunScores, draws: int, rng: np.random.Generator) -> list[float | None]:
    """A benchmark for Gaussian releases of this budget: the margin set by one noisy
    count, the number of validation stays at or above it, at the margin where the exact
    count is ``monitor_rate`` of them, with the final validation release's whole budget
    spent on that count (``one_count_noise``, each hospital's noise summed). A real rule
    cannot know where to put it and must read more than one count from the same budget.
    It is not a bound over every mechanism: a pure-DP Laplace count, or a rule that
    trades bias for spread (a fixed margin reads no release), can spread less."""
    pooled = np.concatenate(run.val_onset)
    sd = run.one_count_noise * math.sqrt(len(run.val_onset))
    rates = np.clip(run.monitor_rate + rng.normal(0.0, sd, draws) / len(pooled), 1e-6, 1 - 1e-6)
    return [float(np.quantile(pooled, 1 - rate)) for rate in rates]


def monitor_spread(runs: list[RunScores], margins: list[list[float | None]]) -> dict[str, float]:
    """The monitor's flag share (a stay flagged once its onset score reaches the margin)
    over runs x draws, and how often a draw misses the per-run targets."""
    rows = np.array([flags_at(r.test_onset, r.y, m if m is not None else -math.inf) for r, ms in zip(runs, margins)
                     for m in ms])
    return {"share": float(rows[:, 0].mean()), "sd": float(rows[:, 0].std()),
            "sensitivity_misses": float((rows[:, 1] < MIN_SENSITIVITY).mean()),
            "specificity_misses": float((rows[:, 2] < MIN_SPECIFICITY).mean()), "over_045": float((rows[:, 0] > 0.45).mean())}


def onset_entry(run_dir: Path):
    """The ledger entry of a run's onset histogram (its mechanism and noise sd), from the
    first hospital's ledger in its privacy.json; None where none was made."""
    from common.ledger import Ledger
    from common.messages import Item, Split

    hospitals = json.loads((run_dir / "privacy.json").read_text())["hospitals"].values()
    for hospital in hospitals:
        if hospital.get("ledger"):
            ledger = Ledger.from_plain(hospital["ledger"], source=str(run_dir / "privacy.json"))
            entries = [e for e in ledger.noisy(Split.VAL) if e.item == Item.ONSET_HISTOGRAM]
            return entries[-1] if entries else None
    return None


def run_scores(run_dir: Path) -> RunScores | None:
    """A run's exact scores, from its bundle and its fold's stays; None for a run
    without a monitor margin."""
    from client.noise import calibrated_evaluation_noise
    from common.bundle import Bundle, hour_thresholds, onset_margin
    from common.data.dataset import load_dataset
    from common.data.partition import make_partition
    from common.messages import Item, Mechanism, Split
    from common.onset import onset_scores
    from common.training import hourly_logits_at

    bundle = Bundle(run_dir / "model.pt")
    cfg, model = bundle.config, bundle.model.eval()
    ds = load_dataset(cfg)
    hospitals = make_partition(ds, cfg)
    hours = list(range(1, ds.X.shape[1] + 1))
    thresholds = np.asarray(hour_thresholds(bundle.info, len(hours)))
    test = np.concatenate([h.test for h in hospitals])
    test_logits = hourly_logits_at(model, ds.X[test], ds.S[test], hours)
    val = np.concatenate([h.val for h in hospitals])
    # the hospitals' delta, as their ledgers recorded it (the run's privacy.json)
    delta = next(iter(json.loads((run_dir / "privacy.json").read_text())["hospitals"].values()))["delta"]
    onset = onset_entry(run_dir)
    # the one-count benchmark is of Gaussian releases: the final validation release's Gaussian calibration
    gaussian = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, onset_noise="gaussian"))
    noise = calibrated_evaluation_noise(gaussian.to_json(), float(delta))
    final_val = [sigma for (split, final, _), sigma in noise.items() if split == Split.VAL and final and sigma > 0]
    return RunScores(
        name=run_dir.name,
        val_onset=[onset_scores(hourly_logits_at(model, ds.X[h.val], ds.S[h.val], hours), thresholds) for h in hospitals],
        test_onset=onset_scores(test_logits, thresholds), test_end=test_logits[:, -1], y=ds.y[test],
        threshold=float(bundle.info.get("threshold", 0.5)),
        onset_noise=onset.noise_multiplier if onset else float(noise.get((Split.VAL, True, Item.ONSET_HISTOGRAM), 0.0)),
        onset_laplace=bool(onset and onset.mechanism == Mechanism.LAPLACE),
        monitor_rate=float(bundle.info.get("monitor_rate") or cfg.evaluation.monitor_rate),
        grid=ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins),
        estimator=cfg.evaluation.estimator,
        val_end=hourly_logits_at(model, ds.X[val], ds.S[val], [hours[-1]])[:, -1], y_val=ds.y[val],
        one_count_noise=1 / math.sqrt(sum(sigma ** -2 for sigma in final_val)) if final_val else 0.0,
        per_hospital=cfg.privacy.aggregation == "per_hospital",
        laplace_epsilon=cfg.evaluation.onset_share * cfg.evaluation.val_epsilon
        * (cfg.evaluation.final_share if cfg.validation_rounds() else 1.0),
    ) if onset_margin(bundle.info) is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bedside_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="a simulations.utility output folder (fold*/model.pt)")
    parser.add_argument("--draws", type=int, default=100, help="fresh noise draws of each run's onset histogram")
    parser.add_argument("--levels", default="0.15,0.17,0.19", help="comma-separated risks for the hour-48 decision")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the stays table 2 scores the levels on: test (judge a level), val (choose one)")
    args = parser.parse_args(argv)
    dirs = sorted(p for p in args.runs_dir.glob("fold*") if (p / "model.pt").is_file())
    runs = [r for r in (run_scores(d) for d in dirs) if r is not None]
    if not runs:
        parser.error(f"{args.runs_dir}: no fold*/model.pt with a monitor margin (a binary task's utility run)")
    print(f"{len(runs)} runs of {args.runs_dir}\n")
    print("1. An oracle: flag exactly the top r of each run's own test stays; the rates at which every run keeps "
          f"sensitivity >= {MIN_SENSITIVITY} and specificity >= {MIN_SPECIFICITY}:\n")
    for which, label in (("end", "the hour-48 risk"), ("onset", "the monitor's score")):
        bands, common = oracle(runs, which)
        narrowest = [b for b in bands if b is not None]
        print(f"- {label}: in every run {common[0]:.2f}-{common[-1]:.2f}" if common else f"- {label}: no rate in every run",
              f"(runs with no rate: {bands.count(None)}; each run's band starts {min(b[0] for b in narrowest):.2f}-"
              f"{max(b[0] for b in narrowest):.2f} and ends {min(b[1] for b in narrowest):.2f}-"
              f"{max(b[1] for b in narrowest):.2f})" if narrowest else "")
    stays = "test" if args.split == "test" else "validation"
    print(f"\n2. The hour-48 decision at fixed risks (and each run's own threshold), on each run's {stays} stays:\n")
    print("| threshold | share flagged | sd | range | sd within a fold | least sensitivity | least specificity |")
    print("|---|---|---|---|---|---|---|")
    scored = [r.end_scores(args.split) for r in runs]
    own = np.array([flags_at(score, y, float(logit(r.threshold))) for r, (score, y) in zip(runs, scored)])
    print(f"| each run's own | {own[:, 0].mean():.3f} | {own[:, 0].std(ddof=1):.3f} | {own[:, 0].min():.2f}-"
          f"{own[:, 0].max():.2f} | | {own[:, 1].min():.3f} | {own[:, 2].min():.3f} |")
    for level in (float(v) for v in args.levels.split(",") if v.strip()):
        s = at_level(runs, level, args.split)
        print(f"| {level:g} | {s['share']:.3f} | {s['sd']:.3f} | {s['low']:.2f}-{s['high']:.2f} | "
              f"{s['within_fold_sd']:.3f} | {s['least_sensitivity']:.3f} | {s['least_specificity']:.3f} |")
    print(f"\n3. The monitor's margin, {args.draws} fresh draws of each run's onset histogram noise:\n")
    print("| reading | share flagged | sd (runs x draws) | draws with sensitivity < 0.55 | specificity < 0.7 | share > 0.45 |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(7)
    exact = [[float(np.quantile(np.concatenate(r.val_onset), 1 - r.monitor_rate))] for r in runs]
    fixed = float(np.median([m[0] for m in exact]))
    rows: list[tuple[str, list[list[float | None]]]] = [
        ("no noise (the validation stays' exact quantile)", exact),
        (f"a fixed margin, no release ({fixed:.2f}, the median of the exact ones)", [[fixed] for _ in runs])]
    own = partial(fitted, estimator=runs[0].estimator)  # one utility folder: one config
    per_hospital = all(r.per_hospital for r in runs)  # the redrawn noise is each hospital's own
    if not per_hospital:
        print("(secure aggregation: the rows below that redraw noise assume each hospital's own Gaussian noise, so "
              "they are left out)\n")
    else:
        for label, grid, read in ((f"the run's: a {runs[0].estimator} fit on the run's bins", None, own),
                                  (f"a {runs[0].estimator} fit, 5 bins over [-2, 3]", ScoreGrid(-2, 3, 5), own),
                                  ("3 bins over [-1, 2], read binned", ScoreGrid(-1, 2, 3), binned)):
            rows.append((label, [redrawn_margins(r, grid, read, args.draws, rng) for r in runs]))
    if per_hospital and all(r.one_count_noise > 0 for r in runs):
        # the same reading with the final validation release's whole budget on the onset histogram
        rows.append(("the run's, with the final validation release's whole budget",
                     [redrawn_margins(r, None, own, args.draws, rng, r.one_count_noise) for r in runs]))
        rows.append(("a benchmark: one Gaussian count at the exact margin, the whole budget",
                     [one_count_margins(r, args.draws, rng) for r in runs]))
    if per_hospital and all(r.laplace_epsilon > 0 for r in runs):
        rows.append((f"not fedgru's accounting: a pure-DP Laplace histogram at the onset's share of the validation "
                     f"epsilon ({runs[0].laplace_epsilon:g}, composed in epsilon), the run's reading",
                     [redrawn_margins(r, None, own, args.draws, rng, laplace_epsilon=r.laplace_epsilon) for r in runs]))
    for label, margins in rows:
        s = monitor_spread(runs, margins)
        print(f"| {label} | {s['share']:.3f} | {s['sd']:.3f} | {s['sensitivity_misses']:.2f} | "
              f"{s['specificity_misses']:.2f} | {s['over_045']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
