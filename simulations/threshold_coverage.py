"""How often the monitor's threshold intervals hold the exact thresholds, on real models.

    python -m simulations.threshold_coverage RUNS_DIR [RUNS_DIR ...] [--draws 6]

``RUNS_DIR`` is a ``simulations.utility`` output folder: every ``fold*/model.pt`` in it is
scored exactly on its own fold's validation stays, per hospital (a simulation holds every
patient; nothing here is a DP release). Each run's final validation releases are then
made again, ``--draws`` times, with fresh noise of the multipliers the run's config
calibrates (``common.evaluation_noise``) and the onset histogram's mechanism its ledger
recorded: each hospital's pooled-validation histogram and hourly histograms, then its
onset histogram over the hour thresholds read from them (as a run sends the ones it
read). They are read as a run reads them (``server.results.Reader``: the threshold's flag
rate, each checkpoint hour's threshold, the margin, the flag levels) with their intervals
(``server.threshold_intervals``), and each interval is checked against the exact value of
the same patients:

- a checkpoint hour's exact threshold: the risk that flags, among the validation stays'
  risks after that hour, the share the run's own threshold flags of their hour-48 risks;
- the exact margin: the excess over the hour thresholds this release read that
  ``monitor_rate`` of the validation stays reach at some hour (what the margin's interval
  is about: the onset histogram counts over the thresholds the run read);
- a flag level's (an hour's threshold moved up by the margin) exact value: the exact
  hour thresholds moved up by the exact margin over them, at each checkpoint hour and, under
  a clinical level, the last hour.

Printed: each reading's bias and sd against the exact value, and how many intervals held
it (the report's THRESHOLD_INTERVAL_COVERAGE comes from here); and the error of the share
each hour aims at (the share the run's threshold flags of the hour-48 risks, read from the
pooled validation release, less its exact value), which has no interval of its own. Fresh
noise on the exact counts is, in distribution, what the run's hospitals added.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.messages import Item, Mechanism, Split
from common.metrics import ScoreGrid, ScoreSummary, logit, pooled


@dataclass
class ValidationScores:
    """One run's exact validation logits, per hospital: after each checkpoint hour, at the
    window's end (with the outcomes) and the onset score over the run's hour thresholds."""

    name: str
    cfg: object
    every: list[np.ndarray]  # per hospital: (stays, hours of the window): the onset scores are made over each draw's
    hourly: list[np.ndarray]  # per hospital: (stays, checkpoint hours)
    end: list[np.ndarray]  # per hospital: each stay's logit at the window's end
    y: list[np.ndarray]
    noise: dict  # (split, final, item) -> multiplier (common.evaluation_noise)
    onset_laplace: bool


@dataclass
class Held:
    """Each quantity's readings' errors against the exact values, and its intervals' hits."""

    errors: dict[str, list[float]] = field(default_factory=dict)
    held: dict[str, list[bool]] = field(default_factory=dict)
    widths: dict[str, list[float]] = field(default_factory=dict)

    def add(self, what: str, read: float, interval: list[float] | None, exact: float) -> None:
        """One release's reading; a reading without an interval counts as one that missed
        (the report would print it bare)."""
        self.errors.setdefault(what, []).append(read - exact)
        self.held.setdefault(what, []).append(interval is not None and interval[0] <= exact <= interval[1])
        if interval is not None:
            self.widths.setdefault(what, []).append(interval[1] - interval[0])


def validation_scores(run_dir: Path) -> ValidationScores | None:
    """A run's exact validation scores, from its bundle and its fold's stays; None for a
    run without hour thresholds."""
    from common.bundle import Bundle
    from common.data.dataset import load_dataset
    from common.data.partition import make_partition
    from common.evaluation_noise import calibrated_evaluation_noise
    from common.training import hourly_logits_at
    from simulations.bedside_study import onset_entry

    bundle = Bundle(run_dir / "model.pt")
    cfg, model = bundle.config, bundle.model.eval()
    if not bundle.info.get("hour_thresholds") or not cfg.checkpoint_hours:
        return None
    if bundle.info.get("calibration"):  # its hour thresholds were moved by the recalibration: not read here
        print(f"{run_dir}: recalibrated (evaluation.calibrate), left out", file=sys.stderr)
        return None
    ds = load_dataset(cfg)
    hospitals = make_partition(ds, cfg)
    steps = list(range(1, ds.X.shape[1] + 1))
    every = [hourly_logits_at(model, ds.X[h.val], ds.S[h.val], steps) for h in hospitals]
    at = [h - 1 for h in cfg.checkpoint_hours]
    delta = next(iter(json.loads((run_dir / "privacy.json").read_text())["hospitals"].values()))["delta"]
    entry = onset_entry(run_dir)
    return ValidationScores(
        name=f"{run_dir.parent.name}/{run_dir.name}", cfg=cfg, every=every, hourly=[e[:, at] for e in every],
        end=[e[:, -1] for e in every], y=[ds.y[h.val] for h in hospitals],
        noise=calibrated_evaluation_noise(cfg.to_json(), float(delta)),
        onset_laplace=bool(entry and entry.mechanism == Mechanism.LAPLACE))


def released(run: ValidationScores, rng: np.random.Generator) -> dict:
    """Each hospital's final validation releases (pooled-validation histogram, hourly
    histograms) with fresh noise, as server.validation.Evaluations."""
    from server.validation import Evaluations

    ev = run.cfg.evaluation
    grid = ScoreGrid(*ev.logit_range, ev.score_bins)
    val_sigma = run.noise.get((Split.VAL, True, Item.HISTOGRAM), 0.0)
    hourly_sigma = run.noise.get((Split.VAL, True, Item.HOURLY_HISTOGRAMS), 0.0)
    hours = len(run.cfg.checkpoint_hours)
    out = {}
    for k, (hourly, end, y) in enumerate(zip(run.hourly, run.end, run.y)):
        p = 1 / (1 + np.exp(-end))
        summary = ScoreSummary.from_predictions(y, np.stack([1 - p, p], axis=1), grid).noised(val_sigma, rng)
        counts = np.stack([np.bincount(grid.index(hourly[:, j]), minlength=grid.bins) for j in range(hours)]).astype(float)
        out[f"h{k}"] = Evaluations(
            summaries={Split.VAL: summary}, histogram_noise={Split.VAL: val_sigma},
            hourly=counts + rng.normal(0.0, hourly_sigma * math.sqrt(hours), counts.shape),
            noise={Item.HOURLY_HISTOGRAMS: hourly_sigma})
    return out


def with_onset(run: ValidationScores, evaluations: dict, hours: list[float], rng: np.random.Generator) -> dict:
    """The same releases with each hospital's onset histogram, fresh noise on its validation
    stays' highest excess over ``hours`` (the thresholds this draw read, as a run sends
    the ones it read), by the mechanism the run's ledger recorded."""
    from common import laplace
    from common.onset import onset_scores

    ev = run.cfg.evaluation
    grid = ScoreGrid(*ev.logit_range, ev.score_bins)
    sigma = run.noise.get((Split.VAL, True, Item.ONSET_HISTOGRAM), 0.0)
    out = {}
    for (name, e), every in zip(evaluations.items(), run.every):
        counts = np.bincount(grid.index(onset_scores(every, np.asarray(hours))), minlength=grid.bins).astype(float)
        noise = (laplace.sample(sigma, counts.shape, rng) if run.onset_laplace else rng.normal(0.0, sigma, counts.shape))
        out[name] = replace(e, onset=counts + noise, onset_n=len(every),
                            onset_mechanism=Mechanism.LAPLACE if run.onset_laplace else Mechanism.GAUSSIAN,
                            noise={**e.noise, Item.ONSET_HISTOGRAM: sigma})
    return out


def exact_margin(run: ValidationScores, hours: list[float]) -> float:
    """The margin these validation stays' exact highest excesses over ``hours`` give."""
    from common.onset import onset_scores

    onset = np.concatenate([onset_scores(every, np.asarray(hours)) for every in run.every])
    return float(np.quantile(onset, 1 - run.cfg.evaluation.monitor_rate))


def study(runs: list[ValidationScores], draws: int, seed: int = 0) -> Held:
    """``draws`` fresh releases of each run, read with their intervals, against the exact values."""
    from server.results import Reader, every_hour, flag_level_intervals, pooled_noise, risk_interval

    rng = np.random.default_rng(seed)
    held = Held()
    for run in runs:
        ev = run.cfg.evaluation
        grid = ScoreGrid(*ev.logit_range, ev.score_bins)
        end, hourly = np.concatenate(run.end), np.concatenate(run.hourly)
        steps = run.every[0].shape[1]
        for _ in range(draws):
            # each release's bootstrap draws its own, as each run's does
            reader = Reader(replace(run.cfg, run=replace(run.cfg.run, seed=int(rng.integers(2**31)))))
            evaluations = released(run, rng)
            parts = {n: e.summaries[Split.VAL] for n, e in evaluations.items()}
            raw = pooled(list(parts.values()))
            sd = pooled_noise(parts, {n: e.histogram_noise[Split.VAL] for n, e in evaluations.items()})
            val = reader.read(raw, noise_sd=sd)
            threshold, source = reader.threshold_and_source(val, grid, None)
            rate = reader.flag_rate(val, threshold)
            exact_rate = float((end >= float(logit(threshold))).mean())
            if rate is not None:  # the share every hour aims at: read from the validation release under a level
                held.errors.setdefault("share", []).append(rate - exact_rate)
            checkpoints = reader.hour_thresholds(evaluations, rate, grid, None)
            readings = reader.hour_threshold_intervals(evaluations, checkpoints, rate, raw, sd, threshold, grid)
            exact = {}
            for j, hour in enumerate(run.cfg.checkpoint_hours):
                if hour in checkpoints:
                    exact[hour] = float(np.quantile(hourly[:, j], 1 - exact_rate))
                    found = readings.get(hour)
                    held.add(f"hour {hour}", float(logit(checkpoints[hour])),
                             [float(logit(t)) for t in risk_interval(found, None)] if found else None, exact[hour])
            if not checkpoints:
                continue
            hours = every_hour(checkpoints, threshold, steps)
            evaluations = with_onset(run, evaluations, hours, rng)
            margin = reader.onset_margin(evaluations, grid)
            if margin is None:
                continue
            margin_reading = reader.margin_interval(evaluations, grid, margin)
            # the margin's truth: over the thresholds this draw read, as the onset histogram counted
            held.add("margin", margin, [margin_reading.low, margin_reading.high] if margin_reading else None,
                     exact_margin(run, hours))
            # a flag level's: the exact thresholds, and the exact margin over them
            exact_hours = every_hour({h: float(1 / (1 + np.exp(-z))) for h, z in exact.items()}, threshold, steps)
            exact_level = exact_margin(run, exact_hours)
            levels = flag_level_intervals(hours, sorted(checkpoints), readings, margin_reading, source != "read", None)
            for hour in [*sorted(exact), steps]:
                if hour == steps and source == "read":
                    continue
                found = levels.get(str(hour))
                held.add(f"flag {hour}", float(logit(hours[hour - 1])) + margin,
                         [float(logit(t)) for t in found] if found else None,
                         float(logit(exact_hours[hour - 1])) + exact_level)
        print(f"{run.name}: done", file=sys.stderr, flush=True)
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.threshold_coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dirs", type=Path, nargs="+", help="simulations.utility output folders (fold*/model.pt)")
    parser.add_argument("--draws", type=int, default=6, help="fresh releases of each run's validation stays")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = [r for d in args.runs_dirs for p in sorted(d.glob("fold*/model.pt")) if (r := validation_scores(p.parent))]
    if not runs:
        print("no run with hour thresholds under " + ", ".join(map(str, args.runs_dirs)), file=sys.stderr)
        return 1
    held = study(runs, args.draws, args.seed)
    print(f"{len(runs)} runs x {args.draws} fresh releases; errors in log-odds (reading - exact); intervals nominal 99% "
          "(a reading without one counts as a miss)")
    print(f"{'':10} {'bias':>7} {'sd':>6} {'held':>10} {'share':>6} {'width':>6}")
    for what, errors in held.errors.items():
        hits = held.held.get(what, [])
        if what == "share":  # no interval of its own: its error is drawn into each hour's
            print(f"{'aimed share':10} {np.mean(errors):+7.3f} {np.std(errors):6.3f}   (the share the level flags at hour 48, "
                  "read from the validation release, less the exact share; not log-odds)")
            continue
        width = float(np.mean(held.widths[what])) if held.widths.get(what) else math.nan
        print(f"{what:10} {np.mean(errors):+7.3f} {np.std(errors):6.3f} {sum(hits):>4} of {len(hits):<3} "
              f"{(sum(hits) / len(hits) if hits else math.nan):6.3f} {width:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
