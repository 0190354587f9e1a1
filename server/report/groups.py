"""The report's clinical parts read from the DP test release: whom the model fails (test
patients by group, with the calibration reading) and what the model leans on (the
inputs' mean contribution)."""

from __future__ import annotations

import math

from common.document import Image, Section, Table
from common.estimates import GROUP_READ_MARGIN, MIN_SIGNAL, Z_99
from common.intervals import (
    CALIBRATION_INTERVAL_COVERAGE,
    GROUP_INTERVAL_COVERAGE,
    GROUP_RATIO_COVERAGE,
    INTERVAL_LEVEL,
    band_coverage,
)
from common.metrics import with_interval
from common.reliability import calibration_lean, non_decreasing, ratio_text

from .plots import plot_reliability
from .run_folder import RunFolder
from .sections import coverage_words, evaluation_dp, is_secure


def subgroup_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None or not test.subgroups:
        return None
    central = run.baselines.get("central") if run.baselines else None
    exact = {(g.grouping, g.group): g for g in central.subgroups} if central else {}
    header = ["grouping", "group", "patients", "deaths", "AUROC", f"sensitivity at {test.threshold:.3f}",
              "calibration: observed / predicted"]
    if exact:
        header.append("central no-DP AUROC (exact)")
    least = getattr(test, "subgroup_least", None)
    # The DP noise's sd on one class's count in a group: an unread row shows the 99% range
    # (the metrics' nominal level) its noisy counts give, so a reader can tell a group that is
    # small from one that may be empty (a data set may leave "unknown" empty; the coordinator
    # cannot know that, and must not be told). A range, not the noisy count: a count below 0 is
    # an impossible number to show a clinician. (Run folders from before subgroup_count_sd
    # read a group at MIN_SIGNAL sds.)
    count_sd = getattr(test, "subgroup_count_sd", None) or (least / MIN_SIGNAL if least else None)
    rows = []
    for g in test.subgroups:
        m = g.metrics
        if m is None and count_sd is not None:
            patients = _count_range(g.patients, Z_99 * math.sqrt(2) * count_sd)  # two noisy sums
            deaths = _count_range(g.deaths, Z_99 * count_sd, most=patients[1] if patients else None)
            cells = [g.grouping, g.group, _range_text(patients), _range_text(deaths), g.note, "", ""]
        elif m is None:
            cells = [g.grouping, g.group, "", "", g.note, "", ""]
        else:
            observed = sum(p.observed * p.patients for p in g.calibration)
            predicted = sum(p.predicted * p.patients for p in g.calibration)
            ratio = f"{observed / predicted:.2f}" if predicted > 0 else "n/a"  # run folders from before its interval
            found = getattr(g, "observed_over_predicted", None)
            if found is not None:  # read from the DP release with its interval, as the pooled ratio is
                ratio = ratio_text(*found)  # a ratio, not a share: no "all of 0-1"; an end near 1 not shown as 1
            cells = [g.grouping, g.group, round(g.patients), round(g.deaths), _with(m.auroc, g, "auroc"),
                     _with(m.sensitivity, g, "sensitivity"), ratio]
        if exact:
            ref = exact.get((g.grouping, g.group))
            cells.append(ref.metrics.auroc if ref is not None and ref.metrics is not None else None)
        rows.append(cells)
    blocks: list = [
        Table(header, rows),
        "Pooled over hospitals from their test patients' score histograms per group, released with DP noise: "
        "patients and deaths are noisy counts (where a row is not read, the 99% range they give: a range that starts "
        "at 0 cannot tell a small group from an empty one), a read row's metrics are read as the pooled row's (the "
        f"run's estimator) and carry their intervals (nominal 99%; {GROUP_INTERVAL_COVERAGE}), and a group "
        "whose counts are too small for the noise says so instead of showing noise as a metric (each hospital can see its own groups exactly, and release nothing, "
        "with `fedgru evaluate --model model.pt --data EXPORT --outcomes OUTCOMES --subgroups`). Calibration is the observed death rate over the mean predicted "
        "risk (1: calibrated; below 1: risks too high for the group); a read row's carries its interval (nominal 99%; "
        f"{GROUP_RATIO_COVERAGE})."
        + (" The last column is the same model trained centrally without DP, scored exactly on the same "
           "patients: where it differs much more than elsewhere, DP or federation hurts that group more." if exact else ""),
    ]
    unread = [g for g in test.subgroups if g.metrics is None and g.note.startswith("too few")]
    if unread and least:
        blocks.append(group_size_words(run, least, len(unread) == len(test.subgroups)))
    overall = calibration_words(test.calibration_curve, bool(test.calibration), getattr(test, "calibration_ratio", None))
    if overall:
        blocks.append(overall)
    exact_ratio = getattr(test, "exact_calibration_ratio", None)
    if exact_ratio is not None:
        blocks.append(exact_calibration_words(exact_ratio, bool(test.calibration)))
    dp = evaluation_dp(run)
    # a DP reading made non-decreasing here too, for a run folder from before the run did it (a no-op since)
    shown = non_decreasing if dp else (lambda points: points)
    label = " (DP reading)" if dp else ""
    curves = {f"all test patients{label}": shown(test.calibration_curve)}
    by_group = [g for g in test.subgroups if g.metrics is not None and g.grouping == test.subgroups[0].grouping]
    curves.update({f"{g.group}{label}": shown(g.calibration) for g in by_group})
    exact_curve = getattr(test, "exact_calibration_curve", None)
    if plot_reliability(curves, run.path / "calibration.png", exact_curve):
        banded = any(p.low is not None for p in test.calibration_curve or [])
        bars = coverage_words(run, band_coverage) if banded else None
        blocks.append(Image(run.path / "calibration.png",
                            reliability_caption(dp, any(curves.values()), bool(exact_curve), bars)))
    return Section("Whom the model fails: test patients by group", blocks)


def reliability_caption(dp: bool, read: bool, exact: bool, bands: str | None = None) -> str:
    """What the reliability diagram draws: a DP reading (with its noise and the PAV step
    said: a DP curve drawn alone looked exact to a new user, who read "observed 0.59 at
    predicted 0.33" off it), a run's exact counts, and a simulation's exact curve.
    ``bands``: the DP points carry bars (their intervals); the bars' measured coverage, in words."""
    caption = "Reliability diagram: observed rate against mean predicted risk in tenths of the test patients by risk"
    if read and dp:
        noise = (f"each point carries the noise, and its bar is its interval from the same bootstrap as the metrics' "
                 f"(nominal {INTERVAL_LEVEL:.0%}; {bands})" if bands else
                 "each point carries the noise (the ratio's interval above says how much)")
        caption += (". A DP reading is read from the noisy test releases (the run's estimator), not from exact counts: "
                    f"{noise}, and the points are made "
                    "to rise with the risk (pool-adjacent-violators, as the CORP reliability diagram), since a fit's "
                    "far tail can read a false rise at the lowest risks")
    elif read:
        caption += ", from the test releases' exact counts (this run added no DP noise to them)"
    if exact:
        caption += ("; the dashed black line is the same diagram from the simulation's exact scores, which a real "
                    "federation does not see" if read else
                    "; the dashed black line is the diagram from the simulation's exact scores, which a real "
                    "federation does not see (no curve could be read from the DP releases)")
    return caption


def _count_range(noisy: float, spread: float, most: float | None = None) -> tuple[float, float] | None:
    """The range of true counts a noisy count leaves: noisy ± spread, never below 0, and
    never above ``most`` (deaths: the patients' own upper end). None when no count fits:
    the noise drew the count more than ``spread`` below 0, and clipping that range to 0
    would print "0-0", which reads as a sure zero (a new user's report showed "0-0" deaths
    for a count the noise drew to -189 with sd 70)."""
    if noisy + spread < 0:
        return None
    low, high = max(0.0, noisy - spread), noisy + spread
    return (min(low, most), min(high, most)) if most is not None else (low, high)


def _range_text(bounds: tuple[float, float] | None) -> str:
    return "no count fits (the noise drew it below 0)" if bounds is None else f"{bounds[0]:.0f}-{bounds[1]:.0f}"


def _with(value: float, group, metric: str) -> str:
    """A read group's metric with its interval, as every DP reading prints
    (``with_interval``); bare only in run folders from before groups had intervals. A
    metric the intervals left out cannot be estimated: the AUROC of a row whose 5 bins
    cannot rank its patients (common.estimates.ranks_patients) printed a bare number."""
    if group.intervals is None:
        return f"{value:.3f}"
    what = ("no interval could be drawn for this row" if not group.intervals
            else "its bins cannot rank these patients" if metric in ("auroc", "auprc") else "")
    return with_interval(value, group.intervals.get(metric), what=what)


# What the report tells a reader whose risks run off: recalibrating on the pooled DP validation
# releases (Platt) was measured to make it worse at set A's size (2026-12-06, 5 runs: scales 0.26-3.22,
# Brier 0.117 against 0.100, the 0.12 level then flagging 27-100% of the stays; README), so it is not
# offered as the remedy.
RECALIBRATION_CAVEAT = ("recalibrating on the DP validation releases, `evaluation.calibrate`, made the risks worse "
                        "in a federation of 4,000 stays, as measured in the README")


def exact_calibration_words(ratio: float, recalibrated: bool = False) -> str:
    """A simulation's exact calibration in the large, in words a bedside reader can use."""
    text = (f"Exact on the same test patients (simulation only: a real federation does not see it), the observed "
            f"rate is {ratio:.2f} times the mean predicted risk")
    remedy = ("read them as a ranking: this run already recalibrated" if recalibrated
              else f"read them as a ranking; {RECALIBRATION_CAVEAT}")
    if ratio > 1.1:
        return text + (f": the risks run low, so a printed risk of 0.20 stands for about {min(0.2 * ratio, 1):.2f} "
                       f"on average ({remedy}).")
    if ratio < 1 / 1.1:
        return text + (f": the risks run high, so a printed risk of 0.20 stands for about {0.2 * ratio:.2f} on "
                       f"average ({remedy}).")
    return text + ": calibrated in the large, within a tenth."


def calibration_words(curve, recalibrated: bool, with_interval: list[float] | None = None) -> str:
    """One sentence on whether the final model's risks run high or low over all test
    patients (observed rate over mean predicted risk, both read from the DP releases),
    with the reading's interval (``with_interval``: [reading, low, high], from the same
    bootstrap as the metrics'); a run folder from before it has the noise band instead."""
    observed = sum(p.observed * p.patients for p in curve)
    predicted = sum(p.predicted * p.patients for p in curve)
    if not curve or not predicted > 0:
        return ""
    ratio = observed / predicted
    if with_interval is not None:
        ratio, low, high = with_interval
        read = (f"Over all test patients the observed rate is {ratio_text(ratio, low, high)} times the mean "
                f"predicted risk, as read from the DP releases (the interval as the metrics', nominal "
                f"{INTERVAL_LEVEL:.0%}; {CALIBRATION_INTERVAL_COVERAGE})")
        lean = calibration_lean(low, high)
        if lean.way == "none":
            return read + ": its interval holds 1, so no clear sign either way."
        if lean.proven == "slight":
            # a difference the interval proves, within a fifth either way: say its size and direction, not an alarm
            return (read + f": the observed rate is about {abs(ratio - 1):.0%} {lean.side} the mean predicted risk "
                    f"({lean.size}), so the risks run {lean.way} by a small but clear margin.")
        if lean.proven == "unsized":
            # it leaves out 1 but reaches a small difference: no alarm the releases cannot back
            return (read + f": the observed rate is {lean.size} {lean.side} the mean predicted risk, so the risks run "
                    f"{lean.way}, but these releases cannot tell a small difference from a large one. Measure it "
                    "on a hospital's own stays (`fedgru evaluate`, exact) before reading them as probabilities.")
    else:
        # The DP noise alone moves this reading: a model calibrated by construction read 0.83-1.30 (5-95%) over 40
        # default-sized releases (a review, 2026-12-06), so only a reading beyond that says anything.
        read = (f"Over all test patients the observed rate is {ratio:.2f} times the mean predicted risk, as read from "
                "the DP releases")
        if 0.75 <= ratio <= 1.33:
            return (read + ": within what their noise alone gives a calibrated model at the default's size "
                    "(about 0.83-1.30), so no clear sign either way.")
    way = "low (a risk understates" if ratio > 1 else "high (a risk overstates"
    return (read + f": the model's risks run {way} the chance of the outcome), so read them as a ranking and "
            "against the run's thresholds, not as probabilities"
            + (" (even after the recalibration above)." if recalibrated else
               f" ({RECALIBRATION_CAVEAT})."))


def group_size_words(run: RunFolder, least: float, none_read: bool) -> str:
    """What size of federation a group needs before its row is read: the least pooled
    count of deaths and of survivors in the group's test patients, and what that is in
    the whole federation at the config's test split."""
    cfg = run.config
    split = (1 / cfg.split.folds if cfg.split.folds else cfg.split.test) if cfg else None
    text = (("No group could be read at this run's size. " if none_read else "")
            + f"A group's row is read when its pooled test patients hold at least {least:.0f} deaths and "
            f"{least:.0f} survivors, as noisy counts: {MIN_SIGNAL:g} sds of the DP noise on a group's count"
            + (f", with {GROUP_READ_MARGIN:.2f} sds to spare (each count's one-sided 99.5% lower bound), since "
               f"{len(run.metrics.test.subgroups)} groups ask twice as many such questions of one release and at 2 "
               "sds alone noise read some group's row in 44% of default runs"
               if getattr(run.metrics.test, "subgroup_count_sd", None) else "")
            + " (at this run's noise and number of hospitals; the noise on a pooled count grows with the square "
            "root of the number of hospitals, and falls as evaluation.test_epsilon or evaluation.subgroup_share "
            "rise).")
    if split:
        text += (f" With {split:.0%} of each hospital's stays in its test split (the run's config; a deployed hospital's "
                 f"own policy.split decides its own), that is about {least / split:,.0f} deaths and as many survivors "
                 "of the group across the federation.")
    return text


MAX_IMPORTANCE_ROWS = 50  # every input of the default model (20) and of the 37-variable one (41)


def importance_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None or not test.importance:
        return None
    sd = test.importance_noise or 0.0

    def size(value: float) -> str | float:
        """A mean size is never below 0: the noise can take it there. With the noise's 99% interval, the
        report's level everywhere (the release is the exact mean plus Gaussian noise of a known sd, so value
        +- 2.576 sd holds it 99% of the time)."""
        if not sd:
            return value
        return f"{max(0.0, value):.3f} ({max(0.0, value - Z_99 * sd):.3f}-{max(0.0, value + Z_99 * sd):.3f})"

    rows = [[name, size(value)] for name, value in list(test.importance.items())[:MAX_IMPORTANCE_ROWS]]
    shown = (f"The {len(rows)} largest of the model's {len(test.importance)} inputs (all are in metrics.json). "
             if len(rows) < len(test.importance) else "")
    return Section("What the model leans on (test patients, DP)", [
        Table(["input", "mean |contribution| to the log-odds" + (" (99% interval for the DP noise)" if sd else "")], rows),
        shown +
        "For each test patient, the size of each variable's and descriptor's contribution to the log-odds of "
        "the risk (exact for the per-variable model, integrated gradients otherwise), clipped per patient and "
        + ("summed over the hospitals under secure aggregation, each adding its share of Skellam noise: a DP release "
           "about the test patients. " if is_secure(run) else
           "summed at each hospital with Gaussian noise, then pooled: a DP release about the test patients. ")
        + (f"The noise on each mean has a standard deviation of {test.importance_noise:.3f}: differences smaller "
           "than about twice that are not meaningful, and a mean the noise took below 0 shows as 0. "
           if test.importance_noise else "")
        + "Each contribution is measured against a normal patient in whom every input is recorded, so an input's "
          "size here includes what its absence tells the model: one often not recorded (a patient's height, say) "
          "can rank high for that alone. `fedgru explain` shows a stay's "
          "input as 'not observed' with its own contribution.",
    ])
