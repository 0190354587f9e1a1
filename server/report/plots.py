"""The report's plots: validation AUROC and epsilon per round, the reliability diagram."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.reliability import CalibrationPoint  # noqa: E402

from ..records import RunMetrics, RunPrivacy  # noqa: E402

MAX_LISTED = 12  # more hospitals than this: summaries instead of one line (or plot line) each


def _finish(fig, ax, path: Path, ylabel: str, title: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def plot_auroc(metrics: RunMetrics, path: Path) -> bool:
    """The validation AUROC of each validated round's model, pooled with its rough
    interval and per hospital; False (no plot) when fewer than two rounds were validated
    (one point on an axis of its own is no curve: the default validates the final model only)."""
    validated = [r for r in metrics.rounds if r.pooled_val is not None]
    if len(validated) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.round for r in validated]
    # under DP a reading without its interval could not be estimated: no point for it (exact runs have none at all)
    dp = any(r.pooled_val_interval for r in validated)
    ys = [r.pooled_val.auroc if r.pooled_val_interval or not dp else math.nan for r in validated]
    ax.plot(xs, ys, "k-o", lw=2, label="pooled (bars: rough interval)")
    # A bar from the interval's ends, not an error bar around the point: the interval
    # corrects the reading's bias, so it need not hold the point read.
    bars = [(r.round, *r.pooled_val_interval) for r in validated if r.pooled_val_interval]
    if bars:
        ax.vlines([b[0] for b in bars], [b[1] for b in bars], [b[2] for b in bars], color="k", lw=1)
    names = sorted({n for r in validated for n in r.hospitals if r.hospitals[n].val is not None})
    for i, name in enumerate(names):
        points = [(r.round, r.hospitals[name].val.auroc) for r in validated
                  if name in r.hospitals and r.hospitals[name].val is not None]
        px, py = [p[0] for p in points], [p[1] for p in points]
        if len(names) > MAX_LISTED:  # too many to tell apart: one grey line each, one legend entry
            ax.plot(px, py, "-", color="grey", lw=0.6, alpha=0.3, label="each hospital" if i == 0 else None)
        else:
            ax.plot(px, py, "--o", ms=3, alpha=0.7, label=name)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    _finish(fig, ax, path, "validation AUROC", "Validation AUROC of the model after each validated round")
    return True


def plot_epsilon(metrics: RunMetrics, privacy: RunPrivacy, path: Path) -> bool:
    if not metrics.rounds or not privacy.dp_enabled:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.round for r in metrics.rounds]
    many = len(privacy.hospitals) > MAX_LISTED
    for i, (name, h) in enumerate(sorted(privacy.hospitals.items())):
        ys = [_nan(r.hospitals[name].epsilon) if name in r.hospitals else math.nan for r in metrics.rounds]
        if many:  # too many to tell apart: one grey line each, budgets once
            ax.plot(xs, ys, "-", color="grey", lw=0.6, alpha=0.3, label="each hospital" if i == 0 else None)
            continue
        line = ax.plot(xs, ys, "-o", ms=3, label=name)[0]
        if h.budget:
            ax.axhline(h.budget, color=line.get_color(), ls=":", lw=1)
    if many:
        for budget in sorted({h.budget for h in privacy.hospitals.values() if h.budget}):
            ax.axhline(budget, color="k", ls=":", lw=1)
    _finish(fig, ax, path, "cumulative epsilon (dotted: budget)",
            "Training patients' epsilon per hospital, by round")
    return True


def plot_reliability(curves: dict[str, list[CalibrationPoint]], path: Path,
                     exact: list[CalibrationPoint] | None = None) -> bool:
    """Observed against predicted risk in groups of about a tenth of the patients each
    (a reliability diagram); ``exact``: a simulation's exact points of all its test
    patients, drawn apart (dashed, black) so that the DP reading is seen against them. A
    point with a band (a DP reading's, ``CalibrationPoint.low``/``high``) gets it as an
    error bar."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves and not exact:
        return False
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    top = bar_top = 0.05
    for name, points in curves.items():
        xs, ys = [p.predicted for p in points], [p.observed for p in points]
        top = max(top, *xs, *ys)
        (line,) = ax.plot(xs, ys, "-o", ms=4, label=name)
        banded = [p for p in points if p.low is not None and p.high is not None]
        if banded:
            bar_top = max(bar_top, *(p.high for p in banded))
            ax.errorbar([p.predicted for p in banded], [p.observed for p in banded],
                        yerr=[[max(0.0, p.observed - p.low) for p in banded],
                              [max(0.0, p.high - p.observed) for p in banded]],
                        fmt="none", ecolor=line.get_color(), elinewidth=1, capsize=2.5, alpha=0.7)
    if exact:
        xs, ys = [p.predicted for p in exact], [p.observed for p in exact]
        top = max(top, *xs, *ys)
        ax.plot(xs, ys, "--s", ms=3.5, color="black", lw=1.2, label="all test patients, exact (simulation only)")
    ax.set_xlim(0, min(1, top * 1.1))
    ax.set_ylim(0, min(1, max(top, bar_top) * 1.05 if bar_top > top else top * 1.1))  # a bar is not cut off
    ax.set_xlabel("predicted risk (mean of each tenth of the patients)")
    ax.set_ylabel("observed rate of the outcome")
    ax.set_title("Calibration of the final model (test patients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
