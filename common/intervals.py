"""How far a metric read from a DP release may be from its patients' exact value.

:func:`metric_intervals` is a parametric bootstrap of the reading's error (Efron &
Tibshirani 1993, ch. 6 and 13): patients drawn from the classes' fitted distributions
(:mod:`common.estimates`), binned, noised as the hospitals noised them and read again;
the errors are also drawn at truths at the AUROC interval's ends (TRUTH_STEPS), since the
error depends on the truth. Post-processing of the release: no privacy cost. The
intervals are rough, so their coverage of the exact value is measured on fresh releases
of real models and printed (INTERVAL_COVERAGE and its neighbours), not assumed from the
nominal level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from .estimates import (
    MIN_SIGNAL,
    RowFit,
    binormal_counts,
    class_fits,
    fine_grid,
    fitted_auroc,
    for_metrics,
    grid_edges,
    observed_over_predicted,
    ranks_patients,
    without_fine,
)
from .metrics import ScoreSummary, noisy_total
from .reliability import CalibrationPoint, exact_reliability, reliability

# metric_intervals' nominal level for reports (the measurements below were made with the
# normal fit; the skew-normal's are in docs/dp-estimates.md). The intervals run short of it (the
# bootstrap's spread depends on the fitted parameters, which the noise moves, and real
# scores are not quite normal): on simulated binormal releases of the default's size
# nominal 99% held the exact AUROC in 85-92% of releases; on 100 fresh noise draws of 10
# real default models' test releases, 90-91%; on 184 fresh releases of 31 models of the
# utility protocol and of fedgru simulate, 92%, and with TRUTH_STEPS 96% (INTERVAL_COVERAGE).
# Reports print the measured coverage, not the nominal level alone.
INTERVAL_LEVEL = 0.99
# python -m simulations.estimator_study on the models of 20 protocol runs (7e579c5's, /tmp runs of 2026-12-06)
# and of 11 repeated `fedgru simulate` runs (6485b2d), 6 fresh test releases each with intervals (2026-12-06,
# the code of TRUTH_STEPS and tied_auroc): README "What a run reports about itself". From the fit alone
# (before both) the same releases held AUROC 169, AUPRC 156, sensitivity 167 of 184: 40 protocol runs' own
# releases had read 38 of 40, and the 10 simulate runs' 7 of 10, both the same shortfall by chance. Those
# 31 models were trained at clipping norm 3, the default until 2026-12-07; measured again on 20 models of the
# default at norm 6 (python -m simulations.estimator_study DIR --draws 6 --intervals 6 --estimators skewnormal on
# 20 protocol runs of 4cc54fb, 2026-12-07; one release of 120 had no interval): the printed text below.
INTERVAL_COVERAGE = ("measured on 119 fresh test releases of 20 default models (default settings, 800 test "
                     "patients, 4 hospitals, test epsilon 1), they held the exact value in: AUROC 116, AUPRC 117, "
                     "accuracy 117, sensitivity 115, specificity 116, F1 119, Brier 117, min(Se,PPV) 117 of 119 "
                     "(AUROC 97%, AUPRC 98%)")
# The same runs' per-hospital rows (python -m simulations.utility --rescore on those 20 runs' folders: 4 hospitals
# of 117-297 test stays each; a row has intervals only where its noise does not drown a class). The intervals are
# the ones those runs saved (the code of 4ae62e4, before the ranking rule of b3a5e28, which fired for none
# of 5 trained default models measured then); the exact values are scored anew.
# Fresh releases of each hospital's own test histogram (its own noise), 2 per hospital of the same 31 models as
# INTERVAL_COVERAGE, today's intervals (2026-12-06, a scratch script beside simulations.estimator_study, not kept).
HOSPITAL_INTERVAL_COVERAGE = ("on 248 fresh releases of one hospital's row (31 default models, 4 hospitals of "
                              "115-300 test stays, 2 releases each) 119 had intervals (medical 61 of 62, surgical "
                              "36, coronary_care 14, cardiac_surgery 8), and they held that hospital's exact value "
                              "in: AUROC 118, AUPRC 111, accuracy 116, sensitivity 115, specificity 118, F1 118, "
                              "Brier 119, min(Se,PPV) 116 of 119")
# The same measurement for secure aggregation's pooled sums (configs/secure.yaml, min_honest 2): python -m
# simulations.estimator_study on the 10 secure runs' models of 2026-12-03 (--draws 6 --intervals 6 --estimators
# skewnormal; the noise each hospital's Skellam share calibrates, 6.95 a cell), today's intervals and AUROC
# reading (2026-12-06). With the narrower intervals of before, 3 releases each had held AUROC 26, AUPRC 23 of 30.
SECURE_INTERVAL_COVERAGE = ("measured on 60 fresh test releases of 10 secure-aggregation models (configs/secure.yaml: "
                            "800 test patients, 4 hospitals, test epsilon 1, min_honest 2), they held the exact value "
                            "in: AUROC 58, AUPRC 58, accuracy 59, sensitivity 59, specificity 57, F1 59, Brier 59, "
                            "min(Se,PPV) 59 of 60")

# A read group row (common.subgroups.read_group: the skew-normal fit, deciding on its finer grid; its patients
# counted by its noisy total; its AUROC printed where its classes spread over half a pooled bin): python -m
# simulations.subgroup_study on 15 default models of 2026-12-06 (simulations.utility --runs 10 --folds 10:
# 400 test stays each; --runs 5: 800), --draws 2 --intervals 2 --noise-scales 0.1,0.05,0.03,0.015 --readings
# skewnormal. At the default's own noise no group of set A's test split is read. By scale, of the 400-stay runs'
# 260 rows and the 800-stay runs' 130: 22+54, 105+73, 138+94, 181+100 read. The AUROC's 584 include 164 rows
# the ranking rule withheld before it counted a group's spread in the pooled bins (163 held). Before that and
# the noisy total (41 models, 0.2-0.03 of the noise): AUROC 347 of 351, sensitivity 610, specificity 601 of 620.
GROUP_INTERVAL_COVERAGE = ("on 15 default models' test groups, released with 0.1 to 0.015 times the default's "
                           "noise (as in a federation of tens of thousands of stays), the 767 rows read held the "
                           "exact value in: AUROC 583 of 584 (the rows whose AUROC is printed), sensitivity 756 and "
                           "specificity 750 of 767")
# The same rows' calibration in the large (observed over predicted), from the same draws: it reads high where
# a group's counts barely stand above the noise (bias +0.16 at 0.1 of the noise on the 400-stay runs' groups,
# +0.02 at 0.015; the 800-stay runs' -0.02 to +0.06), and its interval held the exact ratio in 737 of 767.
# Since, each bootstrap draw counts its patients by its noisy total as the row does (counted_by_noisy_total):
# on the 800-stay runs' 324 intervals, same rows and seeds, held 310 against 307 (by scale 0.1 / 0.05 / 0.03 /
# 0.015: 55/56, 72/77, 89/91, 94/100, against 55, 73, 86, 93); AUROC, sensitivity, specificity unchanged.
GROUP_RATIO_COVERAGE = ("on the same rows it held the exact ratio in 737 of 767 (re-measured on 324 of them since "
                        "each bootstrap draw counts its patients as the row does: 310 against 307 before); the ratio "
                        "itself reads high where a group's counts barely stand above the noise: by 0.16 on average "
                        "in the smallest federations measured")

# The reliability diagram's bands (metric_intervals with_reliability: each point's error against the drawn
# patients' exact tenths, at the fit and at each truth tried, the widest bounds): python -m
# simulations.estimator_study on 20 protocol runs of the default at clipping norm 6 (4cc54fb, --draws 6
# --intervals 6 --estimators skewnormal, 2026-12-07; by tenth 92, 103, 114, 118, 115, 118, 116, 114, 118, 113 of
# 118). On the 5 models of clipping norm 3 (/tmp/s34/u5, --draws 4 --intervals 4) they had held 186 of 200, the
# lowest tenth 14 of 20. On synthetic binormal releases of the default's size
# (a scratch script beside tests/test_estimates.py's _release), bars from the fit's errors alone held 39 of 50
# and 69 of 80; with the truths' errors too, 233 of 250 (93%).
RELIABILITY_BAND_COVERAGE = ("measured on 118 fresh test releases of 20 default models, the bars held the exact "
                             "tenth's rate in 1121 of 1180 (95%), the lowest tenth's in 92 of 118 (78%)")


# The setting both coverage measurements ran at: test patients, hospitals, test epsilon
MEASURED_SETTING = (800, 4, 1.0)

# The monitor's hour thresholds', margin's and flag levels' intervals (server.threshold_intervals): python -m
# simulations.threshold_coverage RUNS --draws 6 (two halves of 10 runs, seeds 0 and 1) on 20 fresh default runs whose
# released model is the rounds' average (README "The released model is an average of the rounds' models", 9df0d59's
# models, 2026-12-07: simulations.utility --runs 5 --repeats 2 --hours 1,6,12,24,48 --no-baselines, twice), 6 fresh
# releases each; errors' sd over them 0.21-0.52 log-odds at the hours, 0.055-0.058 for the margin, 0.15-0.42 for the
# flag levels; mean widths 1.2-2.3, 0.28 and 1.1-1.8. (The 20 last-round models before, b761196's, code 4b24e1a:
# hours 111, 118, 118 and 104 of 120, margin 115, flag levels 120, 119, 120, 111 and 111; the 20 before those, with
# the margin's truth over the bundle's thresholds: hours 103, 120, 113 and 106, margin 114.) Where it was measured,
# and what the intervals held:
THRESHOLD_COVERAGE_SETTING = ("120 fresh validation releases of 20 default models (default settings, about 400 "
                              "validation stays, 4 hospitals)")
THRESHOLD_COVERAGE_HELD = ("each hour's interval held the exact threshold in 103 (after hour 1: 86%), 118 (hour 6: "
                           "98%), 118 (hour 12: 98%) and 104 (hour 24: 87%) of 120, the margin's the exact margin in "
                           "116 (97%), and the flag levels' (each hour's threshold moved up by the margin) the exact "
                           "level in 116 (after hour 1: 97%), 118 (hour 6: 98%), 119 (hour 12), 112 (hour 24: 93%) "
                           "and 112 (hour 48: 93%) of 120: below the nominal 99% at every hour and for the margin, "
                           "and for the flag levels at every hour but 12")
THRESHOLD_INTERVAL_COVERAGE = f"measured on {THRESHOLD_COVERAGE_SETTING}, {THRESHOLD_COVERAGE_HELD}"
# what the monitor page and predict --hourly say of them (a hospital holds the bundle, not the run's report)
THRESHOLD_COVERAGE_SHORT = "at the default's settings they held the exact value in 86% to 99% of 120 fresh releases"



def interval_coverage(aggregation: str, patients: int | None = None, hospitals: int | None = None,
                      test_epsilon: float | None = None) -> str:
    """The measured coverage of the intervals of a run with ``privacy.aggregation``; with
    this run's setting, a word where it is not the measured one (a deployed run of 2
    hospitals printed "800 test patients, 4 hospitals" as if they were its own)."""
    text = SECURE_INTERVAL_COVERAGE if aggregation == "secure" else INTERVAL_COVERAGE
    return text + _unmeasured_setting(patients, hospitals, test_epsilon)


def band_coverage(aggregation: str, patients: int | None = None, hospitals: int | None = None,
                  test_epsilon: float | None = None) -> str:
    """The reliability bars' measured coverage (RELIABILITY_BAND_COVERAGE), said only of
    the mode and setting it was measured at (per-hospital DP, MEASURED_SETTING)."""
    if aggregation == "secure":
        return "their coverage was measured only for per-hospital DP, not for secure aggregation's sums"
    return RELIABILITY_BAND_COVERAGE + _unmeasured_setting(patients, hospitals, test_epsilon)


def _unmeasured_setting(patients: int | None, hospitals: int | None, test_epsilon: float | None) -> str:
    """A word where this run's setting is not the measured one; nothing where it is or is unknown."""
    n, k, eps = MEASURED_SETTING
    if patients is None or hospitals is None or test_epsilon is None:
        return ""
    if abs(patients - n) > 0.1 * n or hospitals != k or abs(test_epsilon - eps) > 1e-9:
        return (f" (this run: {patients} test patients, {hospitals} hospitals, test epsilon {test_epsilon:g}; its "
                "coverage was not measured and may differ)")
    return ""


def auroc_interval(summary: ScoreSummary, noise_std: float, level: float = 0.95, draws: int = 200,
                   rng: np.random.Generator | None = None) -> tuple[float, float] | None:
    """The AUROC's interval of :func:`metric_intervals` (None where it has none)."""
    found = metric_intervals(summary, noise_std, None, level, draws, rng)
    return tuple(found["auroc"]) if found and "auroc" in found else None


INTERVAL_METRICS = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "brier", "event1_score")
RANKING_METRICS = ("auroc", "auprc")


OBSERVED_OVER_PREDICTED = "observed_over_predicted"  # metric_intervals(with_calibration=True): not a Metrics field
# Measured on synthetic default-sized releases (800 patients, 14% deaths, the default's grid and test noise, the
# skew-normal reading, 200 draws; 2026-12-06): held 58 of 60 with an exact ratio near 0.9 and 60 of 60 near 1.26;
# reading minus exact -0.019 (sd 0.066) and +0.020 (sd 0.114). Not yet measured on real runs.
CALIBRATION_INTERVAL_COVERAGE = ("on 20 default runs it held the exact ratio in 19, and on 120 synthetic releases of "
                                 "the default's size in 118")


RELIABILITY_PREFIX = "reliability_"  # metric_intervals' keys of the reliability points' bands
TENTHS = 10  # the reliability diagram's groups (common.reliability.reliability's default): bars only on full curves
MIN_BAND_DRAWS = 10  # draws a band's quantiles need at the least (a run with fewer draws gets no bars)


def metric_intervals(summary: ScoreSummary, noise_std: float, threshold_edge: int | None = None, level: float = 0.95,
                     draws: int = 200, rng: np.random.Generator | None = None, estimator: str = "binormal",
                     with_calibration: bool = False, decide_on_fine: bool = False,
                     fitted: ScoreSummary | None = None, spread_unit: float | None = None,
                     counted_by_noisy_total: bool = False,
                     with_reliability: bool = False) -> dict[str, tuple[float, float]] | None:
    """How far each metric read from a DP release (by ``estimator``, decisions at
    ``threshold_edge``) may be from the value its patients' exact scores give, read from
    the release alone: a parametric bootstrap (Efron & Tibshirani 1993, ch. 6 and 13) of
    the reading's error. In each draw, patients are drawn from the fitted normals (as many
    per class as the fit holds), their exact metrics computed at the same threshold, their
    scores binned on the release's grid, the release's noise added again (iid
    N(0, ``noise_std``^2) in every cell, as the hospitals added it), and the release read
    again. The draws' errors (reading - exact), taken off the real reading, give
    ``level``'s interval: it carries the fit's bias, the noise and how far a finite set
    of patients strays from a smooth distribution. Rough: its coverage of the exact value
    is measured (INTERVAL_COVERAGE), not assumed.

    It describes the error of the reading, for these patients; the metric on other
    patients differs by their sampling error on top. Post-processing of the release: no
    privacy cost. Binary tasks only; None when no normal fits either class (then no
    number should be shown for the release at all). AUROC and AUPRC get none where the
    bins cannot rank the patients (:func:`ranks_patients`): they cannot be estimated.
    ``with_calibration``: also the interval of :func:`observed_over_predicted` (key
    ``OBSERVED_OVER_PREDICTED``), from the same draws. ``decide_on_fine``: ``threshold_edge``
    is an edge of the fit's finer grid (``common.estimates.fine_grid``), and the decisions
    are read there, as ``common.subgroups.read_group`` reads a group's coarse row.
    ``fitted``: the release as the caller already read it (``for_metrics`` of the same
    estimator and noise), so that it is not fitted again. ``spread_unit``: as
    :func:`ranks_patients` counts the classes' spread. ``counted_by_noisy_total``: the
    release's ``n`` is its own noisy total (a group's row: ``SubgroupSummary.group``), not
    a count known apart from the noise, so each draw's is too: a fit held to an exact ``n``
    is held closer to the truth than the row's reading was, and the bootstrap's errors were
    too small (the group ratio's interval held 737 of 767, nominal 99%).
    ``with_reliability``: also each point of the reading's reliability diagram (made
    non-decreasing, as reported) gets the interval of its observed rate, keys
    ``reliability_key(k)`` (:func:`reliability_bands` attaches them to the points).

    The errors are also drawn where the truth would sit at each end of the AUROC's
    interval, and every metric's interval spans what those truths' errors give
    (TRUTH_STEPS: the error is not the same at every truth); the calibration ratio's comes
    from the fit's draws alone."""
    hist = summary.histogram
    if hist.shape[:2] != (2, 1) or noise_std <= 0 or not math.isfinite(noise_std):
        return None
    if decide_on_fine and estimator == "binned":
        raise ValueError("decide_on_fine reads a fit's finer grid: it needs a fitting estimator")
    # fitted once: the metrics, the in-bins AUROC, the calibration
    reading = fitted if fitted is not None else for_metrics(summary, estimator, True, noise_std)
    decision_grid = fine_grid(summary.grid)[0] if decide_on_fine else summary.grid
    at = decision_grid.edge_for_risk(0.5) if threshold_edge is None else threshold_edge
    read = _decided(reading, at, decide_on_fine)
    fits = class_fits(summary, estimator)
    # A class whose counts are not 3 noise sds above nothing over the bins is not told apart
    # from the noise: its fit can sit anywhere (AUROC 1.000 with an interval of 1.000-1.000
    # on 20 deaths), and the bootstrap, drawing from that fit, would only agree with it.
    least = MIN_SIGNAL * noise_std * math.sqrt(summary.grid.bins)
    if not math.isfinite(read.auroc) or any(f is None or f.mass < max(1.0, least) for f in fits):
        return None
    rng = rng or np.random.default_rng()
    # The binormal AUROC orders the patients within each bin as the normal shapes say; a
    # real model's scores need not (at near-zero noise a default model read 0.895 for an
    # exact 0.856). The same reading with ties inside the bins errs the other way, so the
    # AUROC's interval spans both readings' intervals.
    read_in_bins = without_fine(reading).metrics().auroc  # the AUROC does not depend on the edge
    try:
        curve = reliability(reading, monotone=True) if with_reliability else []
    except (ValueError, FloatingPointError):  # no diagram, no bars: the metrics' intervals go on without them
        curve = []
    # Bars only on a curve of full tenths: a coarse reading's points are whole bins of unequal size, and set
    # against equal-sized exact groups their errors would be partly a grouping mismatch (a review, 2026-12-07).
    curve = curve if len(curve) == TENTHS else []
    drawn = _reading_errors(fits, summary, noise_std, at, draws, rng, estimator, with_calibration, decide_on_fine,
                            counted_by_noisy_total, len(curve))
    out: dict[str, tuple[float, float]] = {}
    ranked = ranks_patients(summary, fits, spread_unit=spread_unit)
    _widen(out, drawn, read, read_in_bins, level, draws, ranked)
    tenth_sets = [drawn.tenths]  # the reliability points' errors at the fit, then at each truth tried
    if "auroc" in out:
        _over_plausible_truths(out, fits, summary, noise_std, at, read, read_in_bins, level, draws, rng, estimator,
                               ranked, decide_on_fine, counted_by_noisy_total, tenth_sets, len(curve))
    ratio = observed_over_predicted(reading) if with_calibration else math.nan
    if out and len(drawn.ratio) >= draws // 2 and math.isfinite(ratio):
        low, high = reading_bounds(ratio, drawn.ratio, level)
        out[OBSERVED_OVER_PREDICTED] = (max(0.0, min(low, ratio)), max(high, ratio))
    if out and len(drawn.tenths) >= max(MIN_BAND_DRAWS, draws // 2):
        for k, point in enumerate(curve):
            # as every metric's: the widest of the bounds that the fit's and each truth's errors give
            bounds = [reading_bounds(point.observed, [errors[k] for errors in found], level) for found in tenth_sets
                      if len(found) >= MIN_BAND_DRAWS]
            low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)  # the fit's set is always among them
            out[reliability_key(k)] = (max(0.0, min(low, point.observed)), min(1.0, max(high, point.observed)))
    return out or None


def reliability_key(k: int) -> str:
    """metric_intervals' key of the ``k``-th reliability point's band (not a Metrics field)."""
    return f"{RELIABILITY_PREFIX}{k}"


def reliability_bands(points: list[CalibrationPoint], found: dict) -> list[CalibrationPoint]:
    """``points`` (the same reading's diagram) with the bands ``found`` holds for them
    (metric_intervals with_reliability), which are taken out of ``found``; a point keeps
    no band where none was drawn."""
    bands = [found.pop(reliability_key(k), None) for k in range(len(points))]
    for k in [key for key in found if key.startswith(RELIABILITY_PREFIX)]:  # a curve of another length: not these points
        found.pop(k)
    return [replace(p, low=float(b[0]), high=float(b[1])) if b is not None else p for p, b in zip(points, bands)]


def _decided(read: ScoreSummary, at: int, on_fine: bool):
    """``read``'s metrics deciding at edge ``at`` of its own bins or (``on_fine``) of its
    fit's finer grid (a fit always gives one: ``common.estimates.binormal_counts``)."""
    return (read.fine if on_fine else read).metrics(at)


@dataclass
class _Errors:
    """A parametric bootstrap's errors (reading - exact) of every metric, of the AUROC
    read with ties inside the bins, and of the calibration ratio."""

    metrics: dict[str, list[float]]
    in_bins: list[float]
    ratio: list[float]
    tenths: list[list[float]] = field(default_factory=list)  # per draw, each reliability point's error (draws whose curves match)


def _reading_errors(fits: list[RowFit], summary: ScoreSummary, noise_std: float, at: int, draws: int,
                    rng: np.random.Generator, estimator: str, with_calibration: bool, on_fine: bool = False,
                    counted_by_noisy_total: bool = False, tenths: int = 0) -> _Errors:
    """``draws`` releases drawn from ``fits`` (patients, their bins, the release's noise),
    each read again: the reading's errors against those patients' exact metrics.
    ``tenths`` > 0: also each point's error of the drawn reading's reliability diagram
    (non-decreasing, as reported) against the drawn patients' exact tenths by risk, in
    the draws whose two curves both have that many points."""
    from .metrics import exact_metrics

    hist = summary.histogram
    inner = grid_edges(summary.grid)[1:-1]  # the end bins are open-ended
    risk = (fine_grid(summary.grid)[0] if on_fine else summary.grid).edge_risk(at)
    errors: dict[str, list[float]] = {m: [] for m in INTERVAL_METRICS}
    in_bins: list[float] = []
    ratio_errors: list[float] = []
    tenth_errors: list[list[float]] = []
    for _ in range(draws):
        logits = [f.sample(rng) for f in fits]
        y = np.r_[np.zeros(len(logits[0])), np.ones(len(logits[1]))].astype(np.int64)
        p = 1 / (1 + np.exp(-np.r_[logits[0], logits[1]]))
        exact = exact_metrics(y, np.stack([1 - p, p], axis=1), risk)
        counts = np.stack([np.bincount(np.searchsorted(inner, z, side="right"), minlength=summary.grid.bins)
                           for z in logits]).astype(np.float64)[:, None, :]
        released = counts + rng.normal(0.0, noise_std, hist.shape)
        n = noisy_total(released) if counted_by_noisy_total else len(y)
        noisy = ScoreSummary(released, None, n, summary.grid)
        # A skew-normal refit starts from the fit the release was drawn from (one start, not
        # the reading's two or three): about 2.6 times faster. On 70 synthetic releases (a
        # review, 2026-12-05) the warm intervals were 2-5% narrower than cold ones and held
        # as often (AUROC 62 against 63, specificity 68 against 68 of 70).
        fitted = read_redrawn(noisy, estimator, dict(enumerate(fits)), noise_std)
        value = _decided(fitted, at, on_fine)
        for m in INTERVAL_METRICS:
            e, v = getattr(exact, m), getattr(value, m)
            if math.isfinite(e) and math.isfinite(v):
                errors[m].append(v - e)
        binned = without_fine(fitted).metrics().auroc
        if math.isfinite(exact.auroc) and math.isfinite(binned):
            in_bins.append(binned - exact.auroc)
        if with_calibration:
            error = observed_over_predicted(fitted) - y.mean() / p.mean()
            if math.isfinite(error):
                ratio_errors.append(error)
        if tenths:
            try:
                read_points, exact_points = reliability(fitted, monotone=True), exact_reliability(y == 1, p, tenths)
            except (ValueError, FloatingPointError):  # a draw the diagram cannot be made of: the bars go without it
                read_points = []
            if len(read_points) == len(exact_points) == tenths:
                tenth_errors.append([r.observed - e.observed for r, e in zip(read_points, exact_points)])
    return _Errors(errors, in_bins, ratio_errors, tenth_errors)


def read_redrawn(noisy: ScoreSummary, estimator: str, starts: dict[int, RowFit], noise_sd: float) -> ScoreSummary:
    """A bootstrap's drawn release read as the run read its own: by ``estimator``, a
    skew-normal refit warm from ``starts`` (the fits the release was drawn from, by row;
    see _reading_errors for why warm). Shared with server.threshold_intervals."""
    if estimator == "skewnormal":
        return binormal_counts(noisy, estimator, starts=starts, noise_sd=noise_sd)
    return for_metrics(noisy, estimator, True, noise_sd)


def _widen(out: dict[str, tuple[float, float]], drawn: _Errors, read, read_in_bins: float, level: float, draws: int,
           ranked: bool) -> None:
    """Each metric's interval in ``out`` widened to hold the reading less ``drawn``'s
    errors' central ``level`` quantiles (the AUROC's also those of its in-bins reading)."""
    for m, errs in drawn.metrics.items():
        if m in RANKING_METRICS and not ranked:
            continue  # no interval, so no number: the bins cannot rank these patients
        estimate = getattr(read, m)
        if len(errs) < draws // 2 or not math.isfinite(estimate):
            continue
        low, high = reading_bounds(estimate, errs, level)
        if m == "auroc" and len(drawn.in_bins) >= draws // 2 and math.isfinite(read_in_bins):
            other = reading_bounds(read_in_bins, drawn.in_bins, level)
            low, high = min(low, other[0]), max(high, other[1])
        # An interval corrected for the reading's bias can leave the reading outside it
        # ("AUPRC 0.437 (0.458-0.644)"): it is widened to hold the number it stands beside.
        top = math.inf if m == "brier" else 1.0
        low, high = max(0.0, min(low, estimate)), min(top, max(high, estimate))
        if m in out:
            low, high = min(low, out[m][0]), max(high, out[m][1])
        out[m] = (low, high)


# The reading's error is not the same at every truth: drawn from a fit that reads low (a
# release whose noise spread the deaths' counts), readings err upwards, while a model of
# the exact AUROC 0.82 is read low, with a long tail down. An interval from the errors at
# the fit alone held the exact AUROC in 105 of 118 fresh releases of 20 protocol models
# (89%, for a 99% interval; AUPRC 82%): below a reading of 0.59 it stopped at 0.75 for an
# exact 0.82. So the errors are also drawn where the truth would sit at each end of the
# AUROC's interval (the outcome class's fit moved until the pair's AUROC is that end),
# up to TRUTH_STEPS times while an end moves, and every metric's interval spans what
# each of those truths' errors give: a test of each end (the interval holds a truth whose
# own errors could give this reading), not an exact inversion. Measured in the README.
TRUTH_STEPS = 3
TRUTH_SHARE = 0.5  # draws per truth tried, as a share of the fit's (rough 99% quantiles; the widening only widens)


def _over_plausible_truths(out: dict[str, tuple[float, float]], fits: list[RowFit], summary: ScoreSummary,
                           noise_std: float, at: int, read, read_in_bins: float, level: float, fit_draws: int,
                           rng: np.random.Generator, estimator: str, ranked: bool, on_fine: bool = False,
                           counted_by_noisy_total: bool = False, tenth_sets: list | None = None,
                           tenths: int = 0) -> None:
    """Widens ``out`` with the errors of truths at the AUROC interval's ends (see TRUTH_STEPS);
    ``tenths`` > 0: each truth's reliability errors are added to ``tenth_sets``."""
    for end in (0, 1):
        for _ in range(TRUTH_STEPS):
            target = out["auroc"][end]
            truth = _moved_to_auroc(fits, min(max(target, 0.5), 0.999), grid_edges(fine_grid(summary.grid)[0]))
            if truth is None:
                break
            draws = max(20, int(TRUTH_SHARE * fit_draws))
            drawn = _reading_errors(truth, summary, noise_std, at, draws, rng, estimator, False, on_fine,
                                    counted_by_noisy_total, tenths)
            _widen(out, drawn, read, read_in_bins, level, draws, ranked)
            if tenth_sets is not None and tenths:
                tenth_sets.append(drawn.tenths)
            if abs(out["auroc"][end] - target) < 0.01:
                break


def _moved_to_auroc(fits: list[RowFit], target: float, edges: np.ndarray) -> list[RowFit] | None:
    """The fits with the outcome class's location moved so their AUROC is ``target``
    (bisection: the AUROC rises with the location); None where no move within the grid's
    span reaches it."""
    span = float(edges[-1] - edges[0])
    low, high = -span, span
    at = [replace(fits[1], loc=fits[1].loc + move) for move in (low, high)]
    if not fitted_auroc([fits[0], at[0]], edges) <= target <= fitted_auroc([fits[0], at[1]], edges):
        return None
    for _ in range(30):
        middle = (low + high) / 2
        if fitted_auroc([fits[0], replace(fits[1], loc=fits[1].loc + middle)], edges) < target:
            low = middle
        else:
            high = middle
    return [fits[0], replace(fits[1], loc=fits[1].loc + (low + high) / 2)]


def reading_bounds(estimate: float, errors: list[float], level: float) -> tuple[float, float]:
    """The reading ``estimate`` less the errors' central ``level`` quantiles (a basic
    bootstrap interval; server.threshold_intervals reads its thresholds' so too)."""
    low, high = np.quantile(errors, [(1 - level) / 2, (1 + level) / 2])
    return estimate - float(high), estimate - float(low)
