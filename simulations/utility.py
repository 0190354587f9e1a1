"""Utility that can tell levers apart: N federated runs on N held-out folds, with the
baselines on the same folds, mean and sd over runs.

    python -m simulations.utility --config F --runs 5 [--set key=value ...] [--out DIR]
                                  [--no-baselines] [--baselines central,central-dp,local]
                                  [--hours 6,12,24,36,48] [--fold K]
    python -m simulations.utility --rescore DIR [--hours ...]

Run i holds out fold i of ``--folds`` (default 5) stratified folds of every hospital's
stays (``split.folds``/``split.fold``), validates on ``split.val`` of the rest and
trains on the remainder, with fresh DP noise (each hospital seeds its noise from the
operating system). With 5 runs every stay of set A is tested once. Each federated run
is a real ``fedgru simulate`` (its own process, as a user would run it); its model
bundle is then scored here on the fold's test patients *exactly*: a simulation holds
every patient, so the harness can measure what the run's DP-noised report can only
estimate. The report's own (noisy, DP) pooled test metrics are kept beside them.

It reports mean and sd over runs of pooled test AUROC, AUPRC, min(Se,PPV) (PhysioNet 2012's event-1 score, at the
run's own threshold) and Brier; the AUROC pooled over all folds' test patients
(n = 4,000 on set A); per-hospital AUROC; and the same for the baselines on the same
folds: central without DP, central DP at the same epsilon, each hospital alone with DP.
It writes ``utility.json`` and ``utility.md`` into ``--out``. A single run's AUROC on
800 test patients has a standard error of about 0.025: compare levers by these means.

``--fold K`` repeats the training ``--runs`` times on the one held-out fold K instead:
the test patients stay the same, so the sd over runs is the training's own randomness
(the DP noise, the Poisson samples, dropout), what a consortium that trains once cannot
know. Over different folds the sd also holds the test sets' sampling error, about 0.02
for 800 patients even for a model trained without any randomness.

``--hours`` (binary tasks): also the exact AUROC of the risk after each listed hour (what
a bedside monitor would have shown then, from the observations up to that hour).

``--rescore DIR`` trains nothing: it scores again the federated runs an earlier call left
in DIR (every ``fold*`` folder with a ``model.pt``, each with its own ``config.yaml``) and
writes the summary of this version of the harness beside them, for a measurement the
harness learned after those runs were made (the intervals' coverage per hospital, say).
The runs' own readings and intervals are the ones their ``metrics.json`` saved, made by
the code that ran them: only the exact scoring and the summary are this version's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.bundle import Bundle
from common.config import ExperimentConfig, load_config
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.files import write_json
from common.metrics import Metrics, exact_metrics
from common.paths import project_root
from common.training import predict_proba
from server.records import RunMetrics, load_record

BASELINES = ("central", "central-dp", "local")


@dataclass
class FoldResult:
    """One model on one fold: exact metrics of its test patients, and their scores."""

    fold: int
    pooled: Metrics
    hospitals: dict[str, float]  # hospital -> exact AUROC of its own test patients
    seconds: float
    released: Metrics | None = None  # the run's own report (noisy, DP releases); federated runs only
    early: dict[int, float] = field(default_factory=dict)  # hour -> exact AUROC of the risk after that hour
    # The bedside view of the run's own threshold(s), exact on its test patients (federated runs):
    threshold: float | None = None  # the hour-48 decision threshold the run chose
    flagged: dict[int, float] = field(default_factory=dict)  # hour -> share of test stays flagged after that hour
    ever_flagged: float | None = None  # share of test stays flagged at some hour within the window
    interval: list[float] | None = None  # the run's own rough interval of its pooled test AUROC
    covered: bool | None = None  # whether that interval holds the exact AUROC of the same patients
    covered_metrics: dict[str, bool] = field(default_factory=dict)  # each metric with an interval: held the exact value?
    # The same for each hospital's own row of the report: hospital -> metric -> held its own test patients' exact value?
    # A hospital whose row has no interval (too few deaths for its noise) is absent; hospital_rows counts them all.
    covered_hospitals: dict[str, dict[str, bool]] = field(default_factory=dict)
    hospital_rows: int = 0
    y: list[int] = field(default_factory=list, repr=False)
    risk: list[float] = field(default_factory=list, repr=False)
    monitor_sensitivity: float | None = None  # of the monitor's flag at the window's end (latched: ever flagged)
    monitor_specificity: float | None = None
    margin: float | None = None  # the run's monitor margin (log-odds), None: each hour flags alone
    ever_exact_margin: float | None = None  # ever flagged with the margin read without DP noise (Bedside)
    decision_flagged: float | None = None  # share of test stays at or above the threshold at hour 48 (what predict flags)
    # The report's calibration reading over all test patients, [reading, low, high] (observed rate over mean
    # predicted risk, from the DP releases), the exact ratio on the same patients, and whether the interval held it
    calibration_ratio: list[float] | None = None
    calibration_exact: float | None = None
    calibration_covered: bool | None = None

    @property
    def flag_rate_ratio(self) -> float | None:
        """The largest share flagged at any hour from 6 to the end, over the end's share."""
        if not self.flagged:
            return None
        last = self.flagged[max(self.flagged)]
        return max(self.flagged[h] for h in self.flagged if h >= 6) / last if last > 0 else None  # undefined


def _exact(cfg: ExperimentConfig, model, threshold: float) -> tuple[Metrics, dict[str, Metrics], np.ndarray, np.ndarray]:
    """Exact metrics of the test patients, pooled and per hospital, with their labels and scores."""
    ds = load_dataset(cfg)
    hospitals = make_partition(ds, cfg)
    ys, ps, per = [], [], {}
    for h in hospitals:
        p = predict_proba(model(h.name), ds.X[h.test], ds.S[h.test])
        per[h.name] = exact_metrics(ds.y[h.test], p, threshold)
        ys.append(ds.y[h.test])
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    return exact_metrics(y, p, threshold), per, y, p


def _held(intervals: dict[str, list[float]], exact: Metrics) -> dict[str, bool]:
    """Metric -> whether its interval holds the exact value (a rounding's slack)."""
    return {m: bool(lo - 1e-9 <= getattr(exact, m) <= hi + 1e-9) for m, (lo, hi) in intervals.items()}


def _early(cfg: ExperimentConfig, model, hours: list[int]) -> dict[int, float]:
    """Exact test AUROC of the risk after each of ``hours`` (pooled over hospitals)."""
    import torch

    if not hours:
        return {}
    ds = load_dataset(cfg)
    ys, logits = [], []
    for h in make_partition(ds, cfg):
        m = model(h.name).eval()
        with torch.no_grad():
            x = torch.as_tensor(ds.X[h.test], dtype=torch.float32)
            s = torch.as_tensor(ds.S[h.test], dtype=torch.float32)
            logits.append(m.hourly_logits(x, s)[..., 0].numpy())
        ys.append(ds.y[h.test])
    y, z = np.concatenate(ys), np.concatenate(logits)
    risk = 1 / (1 + np.exp(-z))
    return {hour: float(exact_metrics(y, np.stack([1 - risk[:, hour - 1], risk[:, hour - 1]], axis=1)).auroc)
            for hour in hours if hour <= z.shape[1]}


@dataclass
class Bedside:
    """What the run's monitor shows on its test stays, exactly."""

    flagged: dict[int, float]  # hour -> share of the test stays flagged after that hour
    ever: float  # share flagged at some hour of the window
    sensitivity: float  # of the flag at the window's end
    specificity: float
    # the same monitor with its margin read exactly from the run's validation stays (no DP noise on the
    # onset histogram; a simulation holds them): the share of test stays it flags at some hour. None without a margin.
    ever_exact_margin: float | None


def _bedside(cfg: ExperimentConfig, bundle: Bundle) -> Bedside:
    """The share of the test stays the monitor shows flagged after each hour (the bundle's
    levels: each hour's threshold, moved up by the run's margin with the flag staying on
    when the run read one: common.bundle.monitor_levels), and what a monitor would have
    alarmed on, exactly; and where the margin's DP noise goes, the same with the margin
    read without noise from the validation stays."""
    from common.bundle import hour_thresholds, monitor_levels, onset_margin
    from common.onset import monitor_flags, onset_scores, raising_levels
    from common.training import hourly_logits_at

    ds = load_dataset(cfg)
    model = bundle.model.eval()

    def hourly(split: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.concatenate([getattr(h, split) for h in make_partition(ds, cfg)])
        return hourly_logits_at(model, ds.X[idx], ds.S[idx], list(range(1, ds.X.shape[1] + 1))), ds.y[idx]

    logits, y = hourly("test")
    risk = 1 / (1 + np.exp(-logits))
    thresholds = hour_thresholds(bundle.info, risk.shape[1])
    flags = monitor_flags(risk, *monitor_levels(bundle.info, thresholds))
    end = flags[:, -1]
    exact = None
    if onset_margin(bundle.info) is not None and cfg.monitors_onset:
        val_scores = onset_scores(hourly("val")[0], thresholds)
        margin = float(np.quantile(val_scores, 1 - cfg.evaluation.monitor_rate))
        exact = float(monitor_flags(risk, raising_levels(thresholds, margin), True)[:, -1].mean())
    return Bedside({hour: float(flags[:, hour - 1].mean()) for hour in range(1, risk.shape[1] + 1)},
                   float(flags.any(axis=1).mean()), float(end[y == 1].mean()), float(1 - end[y == 0].mean()), exact)


def federated_fold(config: Path | None, overrides: list[str], folds: int, fold: int, out: Path,
                   hours: list[int] = (), tag: str = "") -> FoldResult:
    run_dir = out / f"fold{fold}{tag}"
    args = [sys.executable, "-m", "fedgru.cli", "simulate", "--out", str(run_dir)]
    if config is not None:
        args += ["--config", str(config)]
    sets = overrides + [f"split.folds={folds}", f"split.fold={fold}"]
    args += [a for item in sets for a in ("--set", item)]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=project_root(), capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"fold {fold}: fedgru simulate failed:\n{proc.stderr[-3000:]}")
    return score_run(run_dir, load_config(config, sets), fold, time.perf_counter() - t0, hours)


def score_run(run_dir: Path, cfg: ExperimentConfig, fold: int, seconds: float, hours: list[int] = ()) -> FoldResult:
    """A finished federated run's bundle, scored exactly on its fold's test patients, beside
    what its own report read from the DP releases (and whether each interval held)."""
    bundle = Bundle(run_dir / "model.pt")
    threshold = float(bundle.info.get("threshold", 0.5))
    pooled, per, y, p = _exact(cfg, lambda _name: bundle.model, threshold)
    released = load_record(run_dir / "metrics.json", RunMetrics)
    test = released.test if released else None
    bed = _bedside(cfg, bundle) if p.shape[1] == 2 else Bedside({}, None, None, None, None)
    interval = test.auroc_interval if test else None
    intervals = (getattr(test, "intervals", None) or {}) if test else {}
    return FoldResult(fold, pooled, {name: m.auroc for name, m in per.items()}, round(seconds, 1),
                      test.pooled if test else None,
                      _early(cfg, lambda _name: bundle.model, list(hours)), threshold, bed.flagged, bed.ever, interval,
                      None if interval is None else bool(interval[0] <= pooled.auroc <= interval[1]),
                      _held(intervals.get("pooled", {}), pooled),
                      {name: _held(intervals[name], per[name]) for name in per if intervals.get(name)}, len(per),
                      y.tolist(), p[:, 1].tolist() if p.shape[1] == 2 else [], bed.sensitivity, bed.specificity,
                      bundle.info.get("onset_margin"), bed.ever_exact_margin,
                      float((p[:, 1] >= threshold).mean()) if p.shape[1] == 2 else None,
                      *_calibration(test, y, p))


def _calibration(test, y: np.ndarray, p: np.ndarray) -> tuple[list[float] | None, float | None, bool | None]:
    """The run's calibration reading with its interval, the exact ratio (observed rate of the
    positive class over the mean predicted risk of the same patients) and whether it held."""
    ratio = getattr(test, "calibration_ratio", None) if test else None
    if p.shape[1] != 2 or not len(y):
        return ratio, None, None
    exact = float(np.mean(y == 1) / max(float(p[:, 1].mean()), 1e-12))
    return ratio, exact, None if ratio is None else bool(ratio[1] - 1e-9 <= exact <= ratio[2] + 1e-9)


def rescore(folder: Path, hours: list[int] = ()) -> list[FoldResult]:
    """Every federated run an earlier call of this harness left in ``folder``, scored again."""
    runs = sorted(d for d in folder.glob("fold*") if (d / "model.pt").is_file() and (d / "config.yaml").is_file())
    if not runs:
        raise SystemExit(f"{folder}: no run folders (fold*/ with model.pt and config.yaml) to score again")
    results = []
    for run_dir in runs:
        cfg = load_config(run_dir / "config.yaml")
        released = load_record(run_dir / "metrics.json", RunMetrics)
        results.append(score_run(run_dir, cfg, cfg.split.fold, released.wall_seconds if released else float("nan"), hours))
        print(f"{run_dir.name}: federated AUROC {results[-1].pooled.auroc:.3f}", flush=True)
    return results


def baseline_fold(config: Path | None, overrides: list[str], folds: int, fold: int, kind: str,
                  hours: list[int] = ()) -> FoldResult:
    from simulations.baselines import train_baseline_models

    cfg = load_config(config, overrides + [f"split.folds={folds}", f"split.fold={fold}"])
    t0 = time.perf_counter()
    models = train_baseline_models(cfg, kind)
    pooled, per, y, p = _exact(cfg, lambda name: models[name], 0.5)
    return FoldResult(fold, pooled, per, round(time.perf_counter() - t0, 1), None,
                      early=_early(cfg, lambda name: models[name], list(hours)), y=y.tolist(),
                      risk=p[:, 1].tolist() if p.shape[1] == 2 else [])


def summarize(results: list[FoldResult]) -> dict:
    def stats(values: list[float]) -> dict:
        values = [v for v in values if v is not None and math.isfinite(v)]  # NaN, inf (nothing flagged at the end)
        return {"mean": statistics.fmean(values) if values else float("nan"),
                "sd": statistics.stdev(values) if len(values) > 1 else float("nan")}

    out = {key: stats([getattr(r.pooled, key) for r in results]) for key in ("auroc", "auprc", "event1_score", "brier")}
    if results and results[0].y and results[0].risk:
        y = np.concatenate([r.y for r in results])
        risk = np.asarray(np.concatenate([r.risk for r in results]))
        out["auroc_all_folds"] = exact_metrics(y, np.stack([1 - risk, risk], axis=1)).auroc
        out["patients_all_folds"] = int(len(y))
    names = sorted({n for r in results for n in r.hospitals})
    out["hospitals"] = {n: stats([r.hospitals[n] for r in results if n in r.hospitals]) for n in names}
    released = [r.released for r in results if r.released is not None]
    if released:
        out["released"] = {key: stats([getattr(m, key) for m in released]) for key in ("auroc", "event1_score", "brier")}
    out["seconds"] = stats([r.seconds for r in results])
    hours = sorted({h for r in results for h in r.early})
    if hours:
        out["early"] = {h: stats([r.early[h] for r in results if h in r.early]) for h in hours}
    bedside = [r for r in results if r.flagged]
    if bedside:
        last = max(bedside[0].flagged)
        out["bedside"] = {
            "threshold": stats([r.threshold for r in bedside]),
            "flagged_by_hour": {h: stats([r.flagged[h] for r in bedside]) for h in (1, 6, 12, 24, 36, last)},
            "flagged_end": stats([r.flagged[last] for r in bedside]),
            "ever_flagged": stats([r.ever_flagged for r in bedside]),
            "largest_ratio_to_end_from_hour_6": stats([r.flag_rate_ratio for r in bedside]),
            "sensitivity": stats([r.pooled.sensitivity for r in bedside]),
            "specificity": stats([r.pooled.specificity for r in bedside]),
            "min_sensitivity": min(r.pooled.sensitivity for r in bedside),
            "min_specificity": min(r.pooled.specificity for r in bedside),
        }
        decided = [r.decision_flagged for r in bedside if r.decision_flagged is not None and math.isfinite(r.decision_flagged)]
        if decided:
            out["bedside"]["decision_flagged"] = {**stats(decided), "min": min(decided), "max": max(decided)}
        monitored = [r for r in bedside if r.monitor_sensitivity is not None]
        if monitored:
            out["bedside"].update({
                "monitor_sensitivity": stats([r.monitor_sensitivity for r in monitored]),
                "monitor_specificity": stats([r.monitor_specificity for r in monitored]),
                "min_monitor_sensitivity": min(r.monitor_sensitivity for r in monitored),
                "min_monitor_specificity": min(r.monitor_specificity for r in monitored),
                "runs_with_margin": sum(r.margin is not None for r in monitored),
                "margin": stats([r.margin for r in monitored if r.margin is not None]),
                "ever_flagged_exact_margin": stats([r.ever_exact_margin for r in monitored]),
            })
    intervals = [r for r in results if r.covered is not None]
    if intervals:
        out["interval_coverage"] = {"runs": len(intervals), "covered": sum(r.covered for r in intervals),
                                    "share": sum(r.covered for r in intervals) / len(intervals),
                                    "runs_without_interval": len(results) - len(intervals)}
    calibrated = [r for r in results if r.calibration_covered is not None]
    if calibrated:
        errors = [r.calibration_ratio[0] - r.calibration_exact for r in calibrated]
        exact = [r.calibration_exact for r in calibrated]
        out["calibration_coverage"] = {
            "runs": len(calibrated), "covered": sum(r.calibration_covered for r in calibrated),
            "error_mean": float(np.mean(errors)), "error_sd": float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0,
            "exact_mean": float(np.mean(exact)), "exact_sd": float(np.std(exact, ddof=1)) if len(exact) > 1 else 0.0}
    metrics = sorted({m for r in results for m in r.covered_metrics})
    if metrics:
        out["metric_coverage"] = {m: {"runs": sum(m in r.covered_metrics for r in results),
                                      "covered": sum(r.covered_metrics.get(m, False) for r in results)} for m in metrics}
    rows = [held for r in results for held in r.covered_hospitals.values()]
    if rows:
        out["hospital_metric_coverage"] = {
            "rows": sum(r.hospital_rows for r in results), "rows_with_interval": len(rows),
            "with_interval_by_hospital": {n: sum(n in r.covered_hospitals for r in results)
                                          for n in sorted({n for r in results for n in r.covered_hospitals})},
            "metrics": {m: {"rows": sum(m in held for held in rows), "covered": sum(held.get(m, False) for held in rows)}
                        for m in sorted({m for held in rows for m in held})}}
    return out


def markdown(summary: dict[str, dict], runs: int, fold: int | None = None) -> str:
    f = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    pooled_column = fold is None and any("auroc_all_folds" in s for s in summary.values())
    design = ("one held-out fold each; 'all folds': AUROC of every fold's test patients together" if pooled_column else
              "one held-out fold each, each fold in several runs (no AUROC of all folds together: it would count "
              "their patients more than once)" if fold is None else
              f"all on held-out fold {fold} (the sd is the federated training's own; the baselines are seeded, "
              "so they were trained once)")
    lines = [
        f"Mean ± sd over {runs} run(s), {design}; exact metrics of each run's test patients "
        "(min(Se,PPV) at the run's own threshold, 0.5 for baselines).",
        "",
        "| model | AUROC | AUPRC | min(Se,PPV) | Brier |" + (" AUROC all folds |" if pooled_column else "") + " seconds |",
        "|---|---|---|---|---|" + ("---|" if pooled_column else "") + "---|",
    ]
    for name, s in summary.items():
        all_folds = f" {s.get('auroc_all_folds', float('nan')):.3f} |" if pooled_column else ""
        lines.append(f"| {name} | {f(s['auroc'])} | {f(s['auprc'])} | {f(s['event1_score'])} | {f(s['brier'])} |"
                     f"{all_folds} {s['seconds']['mean']:.0f} |")
    hospitals = sorted({h for s in summary.values() for h in s["hospitals"]})
    lines += ["", "Per-hospital test AUROC (mean ± sd over runs):", "",
              "| model | " + " | ".join(hospitals) + " |", "|---|" + "---|" * len(hospitals)]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(f(s["hospitals"][h]) if h in s["hospitals"] else "" for h in hospitals) + " |")
    early = sorted({h for s in summary.values() for h in s.get("early", {})})
    if early:
        lines += ["", "Test AUROC of the risk after each hour (mean ± sd over runs; exact):", "",
                  "| model | " + " | ".join(f"hour {h}" for h in early) + " |", "|---|" + "---|" * len(early)]
        for name, s in summary.items():
            lines.append(f"| {name} | " + " | ".join(f(s["early"][h]) if h in s.get("early", {}) else "" for h in early)
                         + " |")
    fed = summary.get("federated", {})
    bed = fed.get("bedside")
    if bed:
        hours_shown = sorted(bed["flagged_by_hour"], key=int)
        lines += ["", "At the bedside, each run's own threshold(s) on its test patients (exact; mean ± sd over runs):", "",
                  "| threshold (hour 48) | " + " | ".join(f"flagged at hour {h}" for h in hours_shown)
                  + " | ever flagged | largest hour-6+ share / end share | sensitivity | specificity |",
                  "|---|" + "---|" * (len(hours_shown) + 4),
                  f"| {f(bed['threshold'])} | " + " | ".join(f(bed["flagged_by_hour"][h]) for h in hours_shown)
                  + f" | {f(bed['ever_flagged'])} | {f(bed['largest_ratio_to_end_from_hour_6'])} | "
                  f"{f(bed['sensitivity'])} (least {bed['min_sensitivity']:.3f}) | "
                  f"{f(bed['specificity'])} (least {bed['min_specificity']:.3f}) |"]
        if "decision_flagged" in bed:
            d = bed["decision_flagged"]
            lines += ["", f"The hour-48 decision (`predict`, the sensitivity and specificity above) flags {f(d)} of the "
                          f"test stays (from {d['min']:.3f} to {d['max']:.3f})."]
        if "monitor_sensitivity" in bed:
            lines += ["", f"The monitor's flag at the window's end (a flag stays on once raised in the "
                          f"{bed['runs_with_margin']} run(s) that read a margin): sensitivity "
                          f"{f(bed['monitor_sensitivity'])} (least {bed['min_monitor_sensitivity']:.3f}), specificity "
                          f"{f(bed['monitor_specificity'])} (least {bed['min_monitor_specificity']:.3f})"
                          + (f"; margin {f(bed['margin'])} in log-odds. With the margin read without noise from "
                             f"each run's validation stays, the share flagged at some hour would be "
                             f"{f(bed['ever_flagged_exact_margin'])}: the rest of the spread is the onset histogram's "
                             "DP noise." if bed["runs_with_margin"] else ".")]
    cov = fed.get("interval_coverage")
    if cov:
        lines += ["", f"The runs' own AUROC intervals held the exact AUROC of their test patients in {cov['covered']} of "
                      f"{cov['runs']} runs ({cov['share']:.0%})"
                  + (f"; {cov['runs_without_interval']} run(s) gave no interval" if cov["runs_without_interval"] else "")
                  + "."]
    cal = fed.get("calibration_coverage")
    if cal:
        lines += ["", f"The calibration reading's interval (observed rate over mean predicted risk, all test patients) "
                      f"held the exact ratio in {cal['covered']} of {cal['runs']} runs; reading minus exact "
                      f"{cal['error_mean']:+.3f} (sd {cal['error_sd']:.3f}), exact ratio {cal['exact_mean']:.2f} "
                      f"(sd {cal['exact_sd']:.2f})."]
    mc = fed.get("metric_coverage")
    if mc:
        lines += ["", "Each metric's interval held the exact value of the run's test patients in: "
                  + ", ".join(f"{m} {c['covered']}/{c['runs']}" for m, c in mc.items()) + " runs."]
    hc = fed.get("hospital_metric_coverage")
    if hc:
        by = ", ".join(f"{n} {k}" for n, k in hc["with_interval_by_hospital"].items())
        lines += ["", f"Each hospital's own row ({hc['rows_with_interval']} of {hc['rows']} rows had intervals: {by}; "
                      "the others' noise drowned a class): its interval held the exact value of that hospital's test "
                      "patients in: " + ", ".join(f"{m} {c['covered']}/{c['rows']}" for m, c in hc["metrics"].items())
                  + " rows."]
    if "released" in fed:
        r = fed["released"]
        lines += ["", f"The runs' own reports (from DP score histograms): AUROC {f(r['auroc'])}, "
                      f"min(Se,PPV) {f(r['event1_score'])}, Brier {f(r['brier'])}."]
    return "\n".join(lines) + "\n"


def _rescore_main(folder: Path, hours: list[int]) -> int:
    results = rescore(folder, hours)
    summary = {"federated": summarize(results)}
    folds = [r.fold for r in results]
    if len(set(folds)) < len(folds):  # the same patients in several runs: pooling would count them twice
        summary["federated"].pop("auroc_all_folds", None)
        summary["federated"].pop("patients_all_folds", None)
    write_json(folder / "rescored.json", {
        "rescored": str(folder), "runs": len(results), "summary": summary,
        "folds_detail": {"federated": [{k: v for k, v in asdict(r).items() if k not in ("y", "risk")} for r in results]}})
    text = markdown(summary, len(results), None)
    (folder / "rescored.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML experiment config (default: configs/default.yaml)")
    parser.add_argument("--runs", type=int, default=5, help="runs, one held-out fold each (at most --folds)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs and utility.json / utility.md")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated, or '' for none")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--hours", default="", help="comma-separated hours: also the AUROC of the risk after each")
    parser.add_argument("--fold", type=int, default=None,
                        help="repeat every run on this one held-out fold (the sd is then the training's own)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every fold this many times (fresh DP noise each): --runs 5 --repeats 2 is 10 runs")
    parser.add_argument("--rescore", type=Path, default=None, metavar="DIR",
                        help="train nothing: score again the federated runs an earlier call left in DIR")
    args = parser.parse_args(argv)
    if args.rescore is not None:
        return _rescore_main(args.rescore.resolve(), [int(h) for h in args.hours.split(",") if h.strip()])
    if args.fold is None and not 1 <= args.runs <= args.folds:
        parser.error("--runs must be between 1 and --folds (or give --fold to repeat runs on one fold)")
    if args.fold is not None and not (0 <= args.fold < args.folds and args.runs >= 1):
        parser.error(f"--fold must be between 0 and {args.folds - 1}, with --runs at least 1")
    out = (args.out or project_root() / "runs" / f"utility-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    kinds = [] if args.no_baselines else [k for k in args.baselines.split(",") if k]
    hours = [int(h) for h in args.hours.split(",") if h.strip()]
    results: dict[str, list[FoldResult]] = {"federated": [], **{k: [] for k in kinds}}
    plan = [(run + repeat * args.runs, run if args.fold is None else args.fold, repeat)
            for repeat in range(args.repeats) for run in range(args.runs)]
    for run, fold, repeat in plan:
        tag = "" if args.fold is None and repeat == 0 else f"-run{run}"
        results["federated"].append(federated_fold(args.config, args.overrides, args.folds, fold, out, hours, tag))
        r = results["federated"][-1]
        print(f"fold {fold}{tag}: federated AUROC {r.pooled.auroc:.3f} (report: "
              f"{r.released.auroc if r.released else float('nan'):.3f}), {r.seconds:.0f} s", flush=True)
        for kind in kinds if (args.fold is None and repeat == 0) or run == 0 else []:  # seeded: a repeat repeats them
            results[kind].append(baseline_fold(args.config, args.overrides, args.folds, fold, kind, hours))
            print(f"fold {fold}: {kind} AUROC {results[kind][-1].pooled.auroc:.3f}", flush=True)
    summary = {name: summarize(rs) for name, rs in results.items()}
    if args.fold is not None or args.repeats > 1:  # the same patients in several runs: pooling would count them twice
        for s in summary.values():
            s.pop("auroc_all_folds", None)
            s.pop("patients_all_folds", None)
    write_json(out / "utility.json", {
        "runs": args.runs, "repeats": args.repeats, "folds": args.folds, "fold": args.fold, "config": str(args.config or "configs/default.yaml"),
        "overrides": args.overrides, "summary": summary,
        "folds_detail": {name: [{k: v for k, v in asdict(r).items() if k not in ("y", "risk")} for r in rs]
                         for name, rs in results.items()},
    })
    text = markdown(summary, args.runs * args.repeats, args.fold)
    (out / "utility.md").write_text(text)
    print(text)
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
