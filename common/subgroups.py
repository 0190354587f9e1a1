"""Whom the model fails: score histograms per group of patients (by sex, age band, ICU
type, ... as ``evaluation.subgroups`` says), metrics per group, and calibration by risk
decile (``common.reliability``).

A hospital releases, for its test patients, one binary-task score histogram per group of
each grouping, with Gaussian noise: each patient is in exactly one group of each grouping
(an "unknown" group holds those whose descriptor is missing), so one patient changes
one count per grouping and the release's L2 sensitivity is sqrt(groupings). Summed over
hospitals, each group's histogram gives its AUROC, its sensitivity at the run's threshold
(a bin edge) and its calibration. A group whose noisy counts are too small for the noise
is marked so instead of given numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import ExperimentConfig, StaticSpec, SubgroupSpec
from .estimates import fine_grid, for_metrics, observed_over_predicted
from .gaussian_noise import gaussian_release
from .intervals import OBSERVED_OVER_PREDICTED
from .metrics import Metrics, ScoreGrid, ScoreSummary, logit, noisy_total
from .reliability import CalibrationPoint, exact_reliability, reliability

UNKNOWN = "unknown"


def group_names(spec: SubgroupSpec, static: StaticSpec) -> list[str]:
    """The groups of one grouping, "unknown" last."""
    if static.kind == "categorical":
        names = [static.labels.get(f"{c:g}", f"{static.name} {c:g}") for c in static.categories]
    else:
        b = spec.bands
        integral = all(float(x).is_integer() for x in b)
        names = [f"<{b[0]:g}"]
        for lo, hi in zip(b, b[1:]):
            names.append(f"{lo:g}-{hi - 1:g}" if integral else f"{lo:g} to <{hi:g}")
        names.append(f"{b[-1]:g}+")
    return names + [UNKNOWN]


def assign(spec: SubgroupSpec, static: StaticSpec, raw: np.ndarray) -> np.ndarray:
    """Each patient's group index (the last index: unknown)."""
    raw = np.asarray(raw, dtype=np.float64)
    unknown = ~np.isfinite(raw) | np.isin(raw, static.missing)
    if static.kind == "categorical":
        index = np.full(len(raw), len(static.categories), dtype=np.int64)
        for k, c in enumerate(static.categories):
            index[(raw == c) & ~unknown] = k
        return index
    index = np.searchsorted(np.asarray(spec.bands, dtype=np.float64), raw, side="right").astype(np.int64)
    index[unknown] = len(spec.bands) + 1
    return index


@dataclass
class Grouping:
    name: str
    groups: list[str]


def groupings(cfg: ExperimentConfig) -> list[Grouping]:
    statics = {s.name: s for s in cfg.features.static}
    return [Grouping(g.name, group_names(g, statics[g.column])) for g in cfg.evaluation.subgroups]


@dataclass
class SubgroupSummary:
    """Score histograms per group: (groups over all groupings, classes, 1, bins)."""

    histogram: np.ndarray
    grid: ScoreGrid
    n_groupings: int

    @classmethod
    def from_predictions(cls, cfg: ExperimentConfig, y: np.ndarray, probs: np.ndarray,
                         raw: dict[str, np.ndarray], grid: ScoreGrid) -> SubgroupSummary:
        statics = {s.name: s for s in cfg.features.static}
        y = np.asarray(y, dtype=np.int64)
        bins = grid.index(logit(probs[:, 1]))
        blocks = []
        for spec in cfg.evaluation.subgroups:
            static = statics[spec.column]
            index = assign(spec, static, raw[spec.column])
            block = np.zeros((len(group_names(spec, static)), 2, 1, grid.bins))
            np.add.at(block, (index, y, 0, bins), 1.0)
            blocks.append(block)
        return cls(np.concatenate(blocks) if blocks else np.zeros((0, 2, 1, grid.bins)), grid, len(blocks))

    @property
    def sensitivity(self) -> float:
        return math.sqrt(max(self.n_groupings, 1))

    def noised(self, noise_multiplier: float, rng: np.random.Generator) -> SubgroupSummary:
        """The Gaussian mechanism on every count, snapped (common.gaussian_noise)."""
        std = noise_multiplier * self.sensitivity
        return SubgroupSummary(gaussian_release(self.histogram, std, rng), self.grid, self.n_groupings)

    def __add__(self, other: SubgroupSummary) -> SubgroupSummary:
        if self.histogram.shape != other.histogram.shape or self.grid != other.grid:
            raise ValueError("subgroup summaries of different shapes do not add up")
        return SubgroupSummary(self.histogram + other.histogram, self.grid, self.n_groupings)

    def group(self, row: int) -> ScoreSummary:
        """One group's row, its patients counted by its noisy total: zero-mean noise leaves
        the sum unbiased, where the sum of its counts clipped at zero adds the noise's
        positive half of every empty bin (its fit then spreads patients who are not there)."""
        counts = self.histogram[row]
        return ScoreSummary(counts, None, noisy_total(counts), self.grid)


@dataclass
class GroupResult:
    grouping: str
    group: str
    patients: float  # a noisy count under DP; on exact stays a whole number (evaluate --json: 1751, not 1751.0)
    deaths: float
    metrics: Metrics | None  # None: too few patients for a DP estimate
    calibration: list[CalibrationPoint]
    note: str = ""
    # each metric's interval: on a hospital's own exact stays its sampling interval (common.metrics.sampling_intervals);
    # for a DP row the reading's (common.intervals.metric_intervals, of the reading printed: read_group)
    intervals: dict[str, list[float]] | None = None
    # binary: [observed rate over mean predicted risk, its interval]: on a hospital's own exact stays the sampling
    # interval; for a read DP row the reading's (common.intervals.metric_intervals with_calibration)
    observed_over_predicted: list[float] | None = None


def decision_edge(summary: ScoreSummary, reading: str, threshold: float) -> tuple[int, ScoreGrid]:
    """Where a group row's decisions are read, and on which grid: the edge nearest
    ``threshold`` of the row's own coarse bins (``binned``), or of a fit's finer grid
    (``common.estimates.fine_grid``). The hospitals bin their test release on a grid
    anchored at the threshold (``ScoreGrid.anchored``), so both hold it as an edge."""
    if reading == "binned":
        return summary.grid.edge_for_risk(threshold), summary.grid
    fine, _ = fine_grid(summary.grid)
    return fine.edge_for_risk(threshold), fine


@dataclass(frozen=True)
class GroupReading:
    """A group row as read (:func:`read_group`): the counts its numbers come from (a fit's,
    with its finer grid; or the row's own clipped bins), the edge its decisions are read at
    (on that finer grid for a fit), and its metrics there. Its metrics, its calibration and
    its intervals all read these counts: the row's reading is not fitted again (the
    intervals still fit each class alone, unconstrained, to draw from)."""

    counts: ScoreSummary
    edge: int
    metrics: Metrics


def read_group(summary: ScoreSummary, reading: str, noise_sd: float, threshold: float) -> GroupReading:
    """A group row read: its counts in the bins (``binned``), or a fit of
    ``common.estimates`` (``binormal``, ``skewnormal``) read on its finer grid, deciding at
    :func:`decision_edge`."""
    edge, _ = decision_edge(summary, reading, threshold)
    if reading == "binned":
        return GroupReading(summary, edge, summary.metrics(edge))
    # a fit always gives its finer grid; a class it could not fit is its clipped counts spread over the sub-bins
    counts = for_metrics(summary, reading, True, noise_sd)
    return GroupReading(counts, edge, counts.fine.metrics(edge))


# A row's intervals, given the row as released and as read (server.results.Reader: the
# bootstrap of common.intervals.metric_intervals, with OBSERVED_OVER_PREDICTED's); None:
# the run draws none (exact releases); {}: none could be drawn, and the report says so.
IntervalsOf = Callable[[ScoreSummary, GroupReading], "dict[str, list[float]] | None"]


def results(cfg: ExperimentConfig, total: SubgroupSummary, threshold: float, estimator: str, noise_sd: float,
            min_count: float, intervals_of: IntervalsOf | None = None) -> list[GroupResult]:
    """Metrics per group, read by the run's ``estimator`` as the pooled row is
    (:func:`read_group`): read in its 5 coarse bins, a group's AUROC ties the patients of
    a bin. On 41 default models' test groups, at a tenth of the default's noise (their
    counts against the noise as in a federation of about 40,000 stays), the bins read it
    0.098 low (rmse 0.113) and the skew-normal fit 0.008 low (rmse 0.062;
    ``simulations.subgroup_study``, README). A group with fewer than ``min_count`` noisy
    deaths or survivors is reported as too small instead. ``intervals_of``: each read
    row's intervals, and its calibration in the large's, of the same reading."""
    out, row = [], 0
    for grouping in groupings(cfg):
        for name in grouping.groups:
            summary = total.group(row)
            row += 1
            # Unclipped sums: the noise is zero-mean, so these estimate the counts without bias.
            deaths, survivors = float(summary.histogram[1].sum()), float(summary.histogram[0].sum())
            if min(deaths, survivors) < min_count:
                out.append(GroupResult(grouping.name, name, deaths + survivors, deaths, None, [],
                                       "too few patients for a DP estimate"))
                continue
            read = read_group(summary, estimator, noise_sd, threshold)
            group = GroupResult(grouping.name, name, deaths + survivors, deaths, read.metrics,
                                reliability(read.counts, monotone=noise_sd > 0))
            if intervals_of is not None:
                found = intervals_of(summary, read)
                ratio = (found or {}).pop(OBSERVED_OVER_PREDICTED, None)
                if ratio is not None:  # the group's calibration in the large, with its interval from the same draws
                    group.observed_over_predicted = [observed_over_predicted(read.counts), *ratio]
                group.intervals = found
            out.append(group)
    return out


def exact_results(cfg: ExperimentConfig, y: np.ndarray, probs: np.ndarray, raw: dict[str, np.ndarray],
                  threshold: float, min_events: int = 0, draws: int = 0) -> list[GroupResult]:
    """The same per-group results from exact scores (a baseline, or a hospital's own data).
    A group with fewer than ``min_events`` stays with the event, or without it, gets no
    metrics and a note instead (below about 10, its AUROC is mostly chance). ``draws`` > 0:
    each group's metrics also get their sampling intervals from that many resamples."""
    from .metrics import calibration_in_the_large, exact_metrics, sampling_intervals

    statics = {s.name: s for s in cfg.features.static}
    y = np.asarray(y, dtype=np.int64)
    out = []
    for spec in cfg.evaluation.subgroups:
        static = statics[spec.column]
        index = assign(spec, static, raw[spec.column])
        for k, name in enumerate(group_names(spec, static)):
            member = index == k
            yk, pk = y[member], probs[member]
            events = int((yk == probs.shape[1] - 1).sum())  # stays of the last class ("died"); not a sum of labels
            too_few = min(events, len(yk) - events) < min_events
            metrics = exact_metrics(yk, pk, threshold) if member.any() and not too_few else None
            negative, positive = cfg.task.classes[0], cfg.task.classes[-1]
            note = (f"too few for stable metrics (fewer than {min_events} stays labelled {positive} or "
                    f"{min_events} labelled {negative})" if too_few else "")
            points = exact_reliability(yk == 1, pk[:, 1]) if member.sum() >= 10 else []  # class 1: its risk column
            intervals = sampling_intervals(yk, pk, threshold, draws) if metrics is not None and draws else None
            # how far this group's risks run from its observed rate (a model calibrated overall can be
            # off in a group): for the groups that get metrics, from the same resampling
            ratio = (calibration_in_the_large(yk, pk[:, 1], draws)
                     if metrics is not None and draws and pk.shape[1] == 2 else None)
            out.append(GroupResult(spec.name, name, int(member.sum()), events, metrics, points, note, intervals,
                                   ratio))
    return out
