"""What the coordinator reads from the hospitals' evaluation releases: metrics with their
rough intervals, the decision threshold, the recalibration, and the test result.

Everything here is post-processing of what was released (no privacy cost): the pooled
validation releases give the threshold and the calibration; the test releases give the
metrics, each with a rough interval for the DP noise and the reading
(``common.intervals.metric_intervals``, whose coverage of the exact value is measured on
the protocol, not assumed), per-group metrics and the importance. A release whose counts
the noise drowns gets no number, and the result says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from common.config import ExperimentConfig
from common.estimates import (
    GROUP_READ_MARGIN,
    MIN_SIGNAL,
    estimator_used,
    for_metrics,
    observed_over_predicted,
    pairs_in_one_bin,
    ranks_patients,
)
from common.intervals import (
    INTERVAL_LEVEL,
    OBSERVED_OVER_PREDICTED,
    RELIABILITY_PREFIX,
    metric_intervals,
    reliability_bands,
)
from common.messages import Item, Mechanism, Split
from common.metrics import (
    METRIC_NAMES,
    Metrics,
    ScoreGrid,
    ScoreSummary,
    choose_threshold,
    logit,
    pooled,
    rate_at_risk,
    sigmoid,
    threshold_for_rate,
)
from common.reliability import CalibrationPoint, exact_reliability, reliability
from common.subgroups import GroupReading
from common.subgroups import results as subgroup_results

from .records import Calibration, Dropped, Evaluation, TestResult
from .secure_evaluation import SECURE_SUM
from .threshold_intervals import (
    RateDraws,
    ReadingInterval,
    ReleaseNoise,
    flag_level_errors,
    flag_level_interval,
    quantile_interval,
    rate_draws,
)
from .validation import Evaluations

log = logging.getLogger("fedgru.server")

PROGRESS_DRAWS = 100  # a validation line's interval: the console's, cheaper
TEST_DRAWS = 200
THRESHOLD_DRAWS = 200  # each hour threshold's and the margin's interval (about 1 s each at 400 validation stays)
# the clinical level's flag rate redrawn for them (two classes refit each time, 2-4 s for 100 at 400 stays)
RATE_DRAWS = 100


class HourlyRows(NamedTuple):
    """The pooled hourly validation releases: one one-row summary per checkpoint hour (every
    outcome together), and the noise's sd on each cell."""

    rows: list[ScoreSummary]
    noise_sd: float


class OnsetRelease(NamedTuple):
    """The pooled onset releases as one one-row summary, the hospitals' releases it sums,
    and the noise's sd on each cell."""

    row: ScoreSummary
    parts: list[Evaluations]
    noise_sd: float


# Each interval's bootstrap draws from its own stream of the run's seed (the metrics' use the seed itself), so the
# margin's draws do not repeat the hours'.
HOURS_STREAM, MARGIN_STREAM = 1, 2


@dataclass
class Reader:
    """Reads released summaries as the run's config says (estimator, DP or exact)."""

    cfg: ExperimentConfig

    def read(self, summary: ScoreSummary | None, estimator: str | None = None, *, noise_sd: float
             ) -> ScoreSummary | None:
        """Under DP, the counts of ``estimator`` (default ``evaluation.estimator``;
        common.estimates); exact ones as they are. ``noise_sd``: the release's noise on
        each cell (it chooses how the AUROC is read: common.estimates.reads_tied), asked
        of every caller so that no reading falls back on a default without it."""
        return for_metrics(summary, estimator or self.cfg.evaluation.estimator, self.cfg.evaluation.dp, noise_sd)

    def intervals(self, summary: ScoreSummary | None, noise_sd: float, edge: int | None, estimator: str | None = None,
                  draws: int = TEST_DRAWS, with_calibration: bool = False, decide_on_fine: bool = False,
                  fitted: ScoreSummary | None = None, spread_unit: float | None = None,
                  counted_by_noisy_total: bool = False, with_reliability: bool = False) -> dict[str, list[float]] | None:
        """Each metric's rough interval (a DP binary release), or None where none fits.
        ``fitted``: ``summary`` as already read by ``estimator`` (not fitted again);
        ``spread_unit``: as common.estimates.ranks_patients counts the classes' spread;
        ``counted_by_noisy_total``: a group's row, whose patients are its noisy total;
        ``with_reliability``: the reliability points' bands too (common.intervals.reliability_key)."""
        ev = self.cfg.evaluation
        if summary is None or not (ev.dp and self.cfg.is_binary) or not noise_sd > 0:
            return None
        try:
            found = metric_intervals(summary, noise_sd, edge, INTERVAL_LEVEL, draws,
                                     np.random.default_rng(self.cfg.run.seed), estimator or ev.estimator,
                                     with_calibration, decide_on_fine=decide_on_fine, fitted=fitted,
                                     spread_unit=spread_unit, counted_by_noisy_total=counted_by_noisy_total,
                                     with_reliability=with_reliability)
        except Exception:  # noqa: BLE001 - post-processing for the report; the run's results come first
            log.warning("an interval could not be computed", exc_info=True)
            return None
        return {m: [float(lo), float(hi)] for m, (lo, hi) in found.items()} if found else None

    def validation(self, summaries: dict[str, ScoreSummary], noise: dict[str, float], progress: bool) -> Evaluation:
        """Metrics of the global model from its validation summaries. ``progress``: a
        release during training, which only the console and the plot read: they carry
        the most noise (a small share of the validation budget each) and are read as
        clipped counts, biased towards 0.5 but bounded (a fitted normal on a noise-only
        histogram can land anywhere in [0, 1]); the pooled AUROC gets its interval, so a
        reading of 0.45 with an interval of 0.2-0.9 says it knows nothing."""
        estimator = "binned" if progress else None
        result = Evaluation(Split.VAL.value, hospitals={
            n: self.read(s, estimator, noise_sd=noise.get(n, 0.0) * s.sensitivity).metrics()
            for n, s in summaries.items() if n != SECURE_SUM})
        total = pooled(list(summaries.values()))
        noise_sd = pooled_noise(summaries, noise)
        read = self.read(total, estimator, noise_sd=noise_sd)
        result.pooled = read.metrics() if read is not None else None
        found = self.intervals(total, noise_sd, None, estimator, PROGRESS_DRAWS)
        result.pooled_interval = found.get("auroc") if found else None
        if (result.pooled is not None and result.pooled_interval is None and self.cfg.evaluation.dp and noise_sd > 0
                and self.cfg.is_binary):  # a multi-class reading has no intervals at all: nothing to explain
            result.pooled_note = ("the model's scores still spread less than a bin, so the bins cannot rank its "
                                  "patients" if found else "the DP noise drowns these counts")
        return result

    def readable(self, patients: int, cell_sd: float, cells: int) -> bool:
        """Whether a release of ``patients`` (its declared count), with noise of sd
        ``cell_sd`` on each of its ``cells``, holds more than noise: the patients stand
        MIN_SIGNAL sds of the noise on their total above nothing. Exact releases always."""
        return not self.cfg.evaluation.dp or not cell_sd > 0 or patients >= MIN_SIGNAL * cell_sd * math.sqrt(cells)

    def threshold(self, val: ScoreSummary | None, grid: ScoreGrid, calibration: Calibration | None,
                  readable: bool = True) -> float:
        """The risk (on the final model's own, uncalibrated scores) at or above which a
        patient is flagged: by the configured rule on the pooled validation releases
        (``auto``: the risk that flags ``flag_rate`` of them; ``event1``: the bin edge
        with the best event-1 score), or the configured risk (given on the calibrated
        scale)."""
        return self.threshold_and_source(val, grid, calibration, readable)[0]

    def threshold_and_source(self, val: ScoreSummary | None, grid: ScoreGrid, calibration: Calibration | None,
                             readable: bool = True) -> tuple[float, str]:
        """:meth:`threshold`, and where it came from: "read" (the rule, on the releases),
        "level" (the config's), "fallback" (0.5: the rule could read nothing), so the
        summary never calls a fallback a reading."""
        ev = self.cfg.evaluation
        if ev.threshold in ("auto", "event1") and self.cfg.num_classes == 2 and not readable:
            log.warning("the pooled validation releases hold too few patients for their noise to choose a threshold "
                        "from (a larger federation or evaluation.val_epsilon would): it stays 0.5")
        elif ev.threshold in ("auto", "event1") and self.cfg.num_classes == 2:
            if ev.threshold == "auto":
                chosen = threshold_for_rate(val, ev.flag_rate) if val is not None else None
            else:
                edge = choose_threshold(val) if val is not None else None
                chosen = grid.edge_risk(edge) if edge is not None else None
            if chosen is not None:
                return chosen, "read"
            log.warning("no pooled validation histogram to choose a threshold from: it stays 0.5")
        risk = 0.5 if ev.level is None else ev.level
        if calibration is not None:  # the calibrated threshold, back on the model's own scale
            # a small Platt slope sends it far out: hence the stable sigmoid
            risk = sigmoid((math.log(risk) - math.log1p(-risk) - calibration.shift) / calibration.scale)
        return risk, "fallback" if ev.level is None else "level"

    def calibrated_threshold(self, threshold: float, calibration: Calibration | None) -> float:
        """The run's threshold on the final model's scale once ``calibration`` is folded
        into it: a configured level as it is (it is given on that scale; taken to the
        uncalibrated scale and back, a small Platt slope clamped 0.12 into 0.20, or
        overflowed), a threshold read from the releases moved with the scores."""
        level = self.cfg.evaluation.level
        return level if level is not None and calibration is not None else _calibrated(threshold, calibration)

    def flag_rate(self, val: ScoreSummary | None, threshold: float) -> float | None:
        """The share of the pooled validation patients the run's threshold (on the
        model's own scale) flags: ``flag_rate`` under ``auto``, else read from ``val``
        (a fixed clinical risk level, or event-1's edge). None where nothing can be read."""
        if self.cfg.evaluation.threshold == "auto":
            return self.cfg.evaluation.flag_rate
        return rate_at_risk(val, threshold) if val is not None else None

    def _hourly_rows(self, validated: dict[str, Evaluations], grid: ScoreGrid) -> HourlyRows | None:
        """The pooled hourly validation releases; None where there are none or the noise
        drowns them (said once, by :meth:`hour_thresholds`)."""
        hours = self.cfg.checkpoint_hours
        parts = [e for e in validated.values() if e.hourly is not None and Split.VAL in e.summaries]
        if not hours or not parts or not self.cfg.is_binary:
            return None
        total = sum(e.hourly for e in parts)
        n = sum(e.summaries[Split.VAL].n for e in parts)
        sd = math.sqrt(sum((e.noise.get(Item.HOURLY_HISTOGRAMS, 0.0) * math.sqrt(len(hours))) ** 2 for e in parts))
        if not self.readable(n, sd, grid.bins):
            return None
        return HourlyRows([ScoreSummary(total[k][None, None, :], None, n, grid) for k in range(len(hours))], sd)

    def hour_thresholds(self, validated: dict[str, Evaluations], rate: float | None, grid: ScoreGrid,
                        calibration: Calibration | None) -> dict[int, float]:
        """Each checkpoint hour's threshold: the risk that flags ``rate`` of the validation
        patients after that hour (the share the run's own threshold flags at the window's
        end, :meth:`flag_rate`), read from their pooled hourly releases, so a flag means
        the same at every hour whatever the rule; calibrated as the run's threshold is; {}
        where the run has none to read."""
        if rate is None or not 0 < rate < 1 or not self.cfg.checkpoint_hours or not self.cfg.is_binary:
            return {}
        if not any(e.hourly is not None and Split.VAL in e.summaries for e in validated.values()):
            return {}
        hourly = self._hourly_rows(validated, grid)
        if hourly is None:  # there were releases: their noise drowned them
            log.warning("the hourly validation releases hold too few patients for their noise: every hour keeps "
                        "the run's one threshold")
            return {}
        out = {}
        for hour, row in zip(self.cfg.checkpoint_hours, hourly.rows):
            chosen = threshold_for_rate(self.read(row, noise_sd=hourly.noise_sd), rate)
            if chosen is None:
                continue  # this hour keeps the interpolation of its neighbours
            out[hour] = _calibrated(chosen, calibration)
        return out

    def hour_threshold_intervals(self, validated: dict[str, Evaluations], checkpoints: dict[int, float],
                                 rate: float | None, raw_val: ScoreSummary | None, val_sd: float, risk: float,
                                 grid: ScoreGrid) -> dict[int, ReadingInterval]:
        """Each checkpoint threshold's reading with its rough interval, in log-odds on the
        model's own scale (server.threshold_intervals, nominal INTERVAL_LEVEL; shown as
        risks by :func:`risk_interval`): the hourly releases' noise and, where the share
        aimed at is read from the pooled validation release ``raw_val`` (as released, with
        noise ``val_sd`` on each cell: a clinical level ``risk`` on the release's scale),
        that reading's too. {} for exact releases or where none can be drawn;
        post-processing for the report, so a failure is logged, not raised (the run's
        releases are made by then)."""
        hourly = self._hourly_rows(validated, grid) if checkpoints and rate is not None else None
        if hourly is None or not self.cfg.evaluation.dp or not hourly.noise_sd > 0:
            return {}
        try:
            return self._hour_intervals(hourly, checkpoints, rate, raw_val, val_sd, risk)
        except Exception:  # noqa: BLE001 - as Reader.intervals: the run's results come first
            log.warning("the hour thresholds' intervals could not be computed", exc_info=True)
            return {}

    def _hour_intervals(self, hourly: HourlyRows, checkpoints: dict[int, float], rate: float,
                        raw_val: ScoreSummary | None, val_sd: float, risk: float) -> dict[int, ReadingInterval]:
        rng = np.random.default_rng([self.cfg.run.seed, HOURS_STREAM])
        estimator = self.cfg.evaluation.estimator
        # ``auto`` aims every hour at flag_rate, a setting; a level's share (and event1's, whose own edge is read
        # from the same release: that choice is not redrawn) is a reading of ``raw_val``
        rates = (RateDraws.fixed(rate, 1) if self.cfg.evaluation.threshold == "auto" or raw_val is None
                 else rate_draws(raw_val, ReleaseNoise(val_sd), risk, RATE_DRAWS, rng, estimator))
        out = {}
        for hour, row in zip(self.cfg.checkpoint_hours, hourly.rows):
            if hour not in checkpoints:
                continue
            chosen = threshold_for_rate(self.read(row, noise_sd=hourly.noise_sd), rate)
            if chosen is None or not 0 < chosen < 1:
                continue
            found = quantile_interval(row, ReleaseNoise(hourly.noise_sd), float(logit(chosen)), rates,
                                      INTERVAL_LEVEL, THRESHOLD_DRAWS, rng, estimator)
            if found is not None:
                out[hour] = found
        return out

    def _onset_release(self, released: dict[str, Evaluations], grid: ScoreGrid) -> OnsetRelease | None:
        """The pooled onset releases; None where none came or the noise drowns them."""
        parts = [e for e in released.values() if e.onset is not None]
        if not parts or not self.cfg.monitors_onset:
            return None
        total = sum(e.onset for e in parts)
        n = sum(e.onset_n for e in parts)
        sd = math.sqrt(sum(e.noise.get(Item.ONSET_HISTOGRAM, 0.0) ** 2 for e in parts))
        if not self.readable(n, sd, grid.bins):
            return None
        return OnsetRelease(ScoreSummary(total[None, None, :], None, n, grid), parts, sd)

    def onset_margin(self, released: dict[str, Evaluations], grid: ScoreGrid) -> float | None:
        """The monitor's margin (``common.onset``), in log-odds: the excess over the hour
        thresholds that ``evaluation.monitor_rate`` of the validation stays reach at some
        hour, read from their pooled onset histograms (released with the test release);
        None where none came or the noise drowns them (each hour then flags alone)."""
        onset = self._onset_release(released, grid)
        if onset is None:
            if any(e.onset is not None for e in released.values()) and self.cfg.monitors_onset:
                log.warning("the onset releases hold too few patients for their noise: the monitor flags each hour by "
                            "its own threshold, on and off")
            return None
        # one count per stay; the reading takes only the noise's sd, as for a Gaussian: the default's discrete
        # Laplace noise, summed over the hospitals, is near it (README "The onset histogram's mechanism" measures the
        # result)
        chosen = threshold_for_rate(self.read(onset.row, noise_sd=onset.noise_sd), self.cfg.evaluation.monitor_rate)
        return None if chosen is None else float(logit(chosen))

    def margin_interval(self, released: dict[str, Evaluations], grid: ScoreGrid, margin: float | None
                        ) -> ReadingInterval | None:
        """The margin's reading with its rough interval in log-odds (server.threshold_intervals,
        nominal INTERVAL_LEVEL): the onset releases' noise redrawn as each hospital drew it
        (discrete Laplace or Gaussian). None for exact releases or where none can be drawn;
        a failure is logged, not raised, as :meth:`hour_threshold_intervals`'."""
        onset = self._onset_release(released, grid) if margin is not None and self.cfg.evaluation.dp else None
        if onset is None or not onset.noise_sd > 0:
            return None
        laplace = [e.noise.get(Item.ONSET_HISTOGRAM, 0.0) for e in onset.parts if e.onset_mechanism == Mechanism.LAPLACE]
        gaussian = [e.noise.get(Item.ONSET_HISTOGRAM, 0.0) for e in onset.parts if e.onset_mechanism != Mechanism.LAPLACE]
        noise = ReleaseNoise(gaussian_sd=math.sqrt(sum(sd**2 for sd in gaussian)), laplace_sds=tuple(laplace))
        try:
            return quantile_interval(onset.row, noise, margin, RateDraws.fixed(self.cfg.evaluation.monitor_rate, 1),
                                     INTERVAL_LEVEL, THRESHOLD_DRAWS,
                                     np.random.default_rng([self.cfg.run.seed, MARGIN_STREAM]),
                                     self.cfg.evaluation.estimator)
        except Exception:  # noqa: BLE001 - as Reader.intervals: the run's results come first
            log.warning("the margin's interval could not be computed", exc_info=True)
            return None

    def test_result(self, released: dict[str, Evaluations], threshold: float, grid: ScoreGrid,
                    calibration: Calibration | None, dropped: list[Dropped]) -> TestResult:
        """The test releases read: pooled and per-hospital metrics at the threshold (an
        edge of ``grid``, the release's anchored grid), each with its intervals; a row the
        noise drowns has none, and the report says it cannot be estimated."""
        at = grid.edge_for_risk(threshold)
        parts = {n: e.summaries[Split.TEST] for n, e in released.items() if Split.TEST in e.summaries}
        noise = {n: e.histogram_noise.get(Split.TEST, 0.0) for n, e in released.items()}
        total = pooled(list(parts.values()))
        rows = {"pooled": (total, pooled_noise(parts, noise))}
        rows.update({n: (s, noise[n] * s.sensitivity) for n, s in parts.items() if n != SECURE_SUM})
        read = self.read(total, noise_sd=rows["pooled"][1])
        result = TestResult(
            pooled=read.metrics(at) if read is not None else None,
            hospitals={n: self.read(s, noise_sd=rows[n][1]).metrics(at) for n, s in parts.items() if n != SECURE_SUM},
            dropped=dropped, threshold=threshold, calibration=calibration,
        )
        bands: dict[str, list[float]] = {}  # the pooled reliability points' (common.intervals.reliability_key)
        for row, (summary, sd) in rows.items():
            pooled_read = row == "pooled" and read is not None
            found = self.intervals(summary, sd, at, with_calibration=pooled_read,
                                   with_reliability=pooled_read and self.cfg.is_binary,
                                   fitted=read if pooled_read else None)  # the bars' curve is the one shown
            if found:
                bands.update({k: found.pop(k) for k in [k for k in found if k.startswith(RELIABILITY_PREFIX)]})
            ratio = (found or {}).pop(OBSERVED_OVER_PREDICTED, None)
            if ratio is not None:  # the pooled calibration in the large, with its interval from the same draws
                result.calibration_ratio = [observed_over_predicted(read), *ratio]
            if found:
                result.intervals[row] = found
        for n, (_, sd) in rows.items():
            if n != "pooled" and self.cfg.evaluation.dp and self.cfg.is_binary and sd > 0:
                # what the report calls "cannot be estimated" is no number in metrics.json either (null): a script
                # read a drowned hospital row's AUROC as 0.9999999999998956
                found = result.intervals.get(n) or {}
                result.hospitals[n] = replace(result.hospitals[n], **{k: math.nan for k in METRIC_NAMES if k not in found})
        result.auroc_interval = result.intervals.get("pooled", {}).get("auroc")
        if "pooled" in result.intervals and not ranks_patients(total, estimator=self.cfg.evaluation.estimator):
            log.warning("the pooled test histogram cannot rank its patients: the model's scores spread less than a "
                        "bin of evaluation.logit_range (%.0f%% of the pairs of a patient with the outcome and one "
                        "without fall into the same bin), as a barely trained model's do, so its AUROC and AUPRC "
                        "cannot be estimated", 100 * (pairs_in_one_bin(total) or 0))
        if read is not None and self.cfg.is_binary:
            result.calibration_curve = reliability_bands(reliability(read, monotone=self.cfg.evaluation.dp), bands)
        groups = [e for e in released.values() if e.subgroups is not None]
        if groups:
            total_groups = groups[0].subgroups
            for e in groups[1:]:
                total_groups = total_groups + e.subgroups
            sd = math.sqrt(sum((e.noise[Item.SUBGROUP_HISTOGRAMS] * e.subgroups.sensitivity) ** 2 for e in groups))
            result.subgroup_count_sd = sd * math.sqrt(total_groups.grid.bins)
            result.subgroup_least = (MIN_SIGNAL + GROUP_READ_MARGIN) * result.subgroup_count_sd if sd > 0 else 0.0
            estimator = estimator_used(self.cfg.evaluation.estimator, self.cfg.evaluation.dp)  # exact: binned
            dp = self.cfg.evaluation.dp and sd > 0

            def intervals_of(summary: ScoreSummary, read: GroupReading) -> dict[str, list[float]] | None:
                # of the reading printed (common.subgroups.read_group: a fit deciding on its finer grid)
                found = self.intervals(summary, sd, read.edge, estimator, decide_on_fine=estimator != "binned",
                                       with_calibration=True, fitted=read.counts,
                                       # a fit on its 5 coarse bins ranks patients whose scores spread over
                                       # a pooled bin (common.estimates.MIN_RANKING_SD: measured for fits)
                                       spread_unit=grid.width if estimator != "binned" else None,
                                       counted_by_noisy_total=True)  # common.subgroups.SubgroupSummary.group
                # a DP row with none gets {}: the report then says "cannot be estimated", not a bare number
                return found if found is not None or not dp else {}

            result.subgroups = subgroup_results(self.cfg, total_groups, threshold, estimator, sd,
                                                min_count=result.subgroup_least, intervals_of=intervals_of)
        important = [(n, e) for n, e in released.items() if e.importance is not None and n in parts]
        if important:
            patients = sum(parts[n].n for n, _ in important)
            mean = sum(e.importance for _, e in important) / max(patients, 1)
            names = [v.name for v in self.cfg.features.variables] + [f"{d.name} (descriptor)" for d in self.cfg.features.static]
            result.importance = dict(sorted(zip(names, map(float, mean)), key=lambda kv: -kv[1]))
            result.importance_noise = math.sqrt(sum(e.noise[Item.IMPORTANCE] ** 2 for _, e in important)) / max(patients, 1)
        return result


def _calibrated(risk: float, calibration: Calibration | None) -> float:
    """A risk on the model's own scale moved by ``calibration`` (None: as it is)."""
    if calibration is None:
        return risk
    from .calibration import calibrate_risk  # it brings torch: imported only when a calibration is folded in

    return calibrate_risk(risk, calibration.scale, calibration.shift)


def risk_interval(reading: ReadingInterval, calibration: Calibration | None) -> list[float]:
    """A threshold's interval read on the model's own scale, as risks on the scale it is
    shown on (calibrated as the threshold is)."""
    return sorted(_calibrated(sigmoid(z), calibration) for z in (reading.low, reading.high))


def flag_level_intervals(hours: list[float], read: list[int], checkpoints: dict[int, ReadingInterval],
                         margin: ReadingInterval | None, last_is_setting: bool, calibration: Calibration | None
                         ) -> dict[str, list[float]]:
    """The monitor's flag levels' rough intervals, as risks, by hour: at each checkpoint hour
    and, where the last hour's threshold is a setting (a clinical level, or the fallback
    0.5), at the last hour. ``hours``: every hour's threshold, as shown; ``read``: the
    checkpoint hours whose thresholds were read; ``checkpoints``: their readings
    (:meth:`Reader.hour_threshold_intervals`). {} without the margin's interval, or where a
    read hour has none (server.threshold_intervals.flag_level_errors says what is drawn);
    post-processing, so a failure is logged, not raised."""
    if margin is None or not hours:
        return {}
    try:
        scale = calibration.scale if calibration is not None else 1.0
        errors = flag_level_errors(len(hours), read, {h: r.errors for h, r in checkpoints.items()}, margin.errors,
                                   last_is_setting, scale)
        out = {}
        for hour, drawn in sorted(errors.items()):
            found = flag_level_interval(float(logit(hours[hour - 1])) + margin.estimate, drawn, INTERVAL_LEVEL)
            if found is not None:
                out[str(hour)] = [sigmoid(found.low), sigmoid(found.high)]
        return out
    except Exception:  # noqa: BLE001 - as Reader.intervals: the run's results come first
        log.warning("the flag levels' intervals could not be computed", exc_info=True)
        return {}


def every_hour(checkpoints: dict[int, float], threshold: float, steps: int) -> list[float]:
    """A threshold for each hour 1..``steps``: the checkpoints' and, at the last hour, the
    run's own, joined in logit; before the first checkpoint, the first checkpoint's."""
    points = sorted({**checkpoints, steps: threshold}.items())
    hours = np.array([h for h, _ in points], dtype=np.float64)
    logits = np.array([math.log(t) - math.log1p(-t) for _, t in points])
    at = np.interp(np.arange(1, steps + 1, dtype=np.float64), hours, logits)
    return [float(1 / (1 + math.exp(-z))) for z in at]


def pooled_noise(summaries: dict[str, ScoreSummary], noise: dict[str, float]) -> float:
    """The noise sd on each cell of the pooled sum: sqrt(sum of each release's (noise
    multiplier x sensitivity)^2), from the multipliers their ledgers record."""
    return math.sqrt(sum((noise.get(n, 0.0) * s.sensitivity) ** 2 for n, s in summaries.items()))


@dataclass
class ExactTest:
    """A simulation's final model scored exactly on its test patients: what a real
    federation never sees, shown beside the DP readings (labelled as exact)."""

    pooled: Metrics
    hospitals: dict[str, Metrics]
    calibration_ratio: float | None  # binary: the observed rate of the outcome over the mean predicted risk
    calibration_curve: list[CalibrationPoint]  # binary: the reliability diagram's points, by tenths of the patients


def exact_metrics_of(cfg: ExperimentConfig, arrays: dict[str, np.ndarray], threshold: float) -> ExactTest | None:
    """A simulation's final model scored exactly on its simulated hospitals' test patients
    (pooled, and per hospital), and (binary tasks) the pooled calibration: the observed
    rate of the outcome over the mean predicted risk, and by tenths of the patients."""
    import torch

    from common.data.dataset import load_dataset
    from common.data.partition import make_partition
    from common.metrics import exact_metrics
    from common.model import GRUClassifier, model_spec
    from common.training import predict_proba

    model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}, strict=True)
    ds = load_dataset(cfg)
    ys, ps, per = [], [], {}
    for h in make_partition(ds, cfg):
        p = predict_proba(model, ds.X[h.test], ds.S[h.test])
        per[h.name] = exact_metrics(ds.y[h.test], p, threshold)
        ys.append(ds.y[h.test])
        ps.append(p)
    if not ys:
        return None
    y, p = np.concatenate(ys), np.concatenate(ps)
    binary = p.shape[1] == 2
    ratio = float((y == 1).mean() / p[:, 1].mean()) if binary and p[:, 1].mean() > 0 else None
    return ExactTest(exact_metrics(y, p, threshold), per, ratio, exact_reliability(y == 1, p[:, 1]) if binary else [])
