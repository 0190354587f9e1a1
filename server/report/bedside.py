"""The report's "Before using these risks at the bedside": what the model's risk is and
where it cannot be trusted, in one place (a clinician's try found no statement of what
the number predicts, from what time, or when not to use it). Binary tasks only."""

from __future__ import annotations

import math

from common.document import Bullets, Section
from common.intervals import INTERVAL_LEVEL
from common.reliability import calibration_lean

from .groups import RECALIBRATION_CAVEAT
from .run_folder import RunFolder
from .sections import at_monitor_setting, flag_levels_words, hour_list, threshold_coverage_words


def bedside_section(run: RunFolder) -> Section | None:
    """What the risk means, its calibration, the stays it cannot score, what it does not
    read and whom it was not checked for; None without a binary task's test result."""
    cfg, test = run.config, run.metrics.test
    if cfg is None or not cfg.is_binary or test is None or test.threshold is None:
        return None
    classes, features = cfg.task.classes, cfg.features
    read = ", ".join(v.name for v in features.variables)
    static = ", ".join(s.name for s in features.static)
    items = [
        f"**What the risk is.** The model's probability of `{classes[1]}` (outcome `{cfg.task.label_column}`), "
        f"read after hour {features.window_hours:g} of the stay from the {len(features.variables)} charted "
        f"variables it reads ({read}) and the descriptors ({static}). A value of any other variable plays no "
        "part: `fedgru explain`, `monitor`, `predict` and `evaluate` name those an export charts.",
        _calibration_item(test),
        _flag_item(test, features.window_hours, monitor_spread_words(cfg, len(test.hospitals))),
        "**Stays it cannot score.** A stay with no charted value in the window (descriptors alone) gets no risk. "
        f"Plain `predict` reads every stay after hour {features.window_hours:g}, as the model was trained and "
        "validated: right for a finished stay. For a stay still in the ICU read its current hour with "
        "`predict --hourly` or `monitor`, whose rows end at its last observation.",
        _groups_item(test),
        "**Whose patients.** The model learnt from the federation's data (its hospitals' case mix, charting "
        "and outcomes). Before relying on it, score your own labelled stays with `fedgru evaluate` (exact, on "
        "your machine, nothing released), overall and with `--subgroups`. It is a research tool: its risks have "
        "not been validated prospectively.",
    ]
    return Section("Before using these risks at the bedside", [Bullets([item for item in items if item])])


# How far the monitor's share strays from its aim (a new user's run flagged 17% of set A where the console
# said 30%): simulations.utility --runs 5 --repeats 4 on the default of clipping norm 6, level 0.17, onset_share
# 0.5 and discrete Laplace onset noise (20 runs, 800 test stays each, 71e0b7b, 2026-12-07): 0.290 +- 0.029, 0.25 to
# 0.35, with the margin read without noise 0.307 +- 0.020. With Gaussian onset noise (20 runs, the same day)
# 0.292 +- 0.039, 0.22 to 0.36; at onset_share 0.2 0.300 +- 0.056; at norm 3 and level 0.12 (15 runs, 2026-12-05/06)
# it had been 0.22 to 0.45, mean 0.33.
MONITOR_SHARE_MEASURED = ("at the default's settings, on 20 runs, it flagged 0.25 to 0.35 of the test stays at some "
                          "hour (mean 0.29)")


def monitor_spread_words(cfg, hospitals: int) -> str:
    """How far the release's noise moved the monitor's share, where it was measured at
    this run's settings; else that it was not (a run aiming at 10% was told of a 30%
    aim's spread: a review)."""
    return (f"The release's noise moves that share: {MONITOR_SHARE_MEASURED}. " if at_monitor_setting(cfg, hospitals) else
            "How far the release's noise moves that share was measured only at the default's settings. ")


def _flag_item(test, window_hours: float, spread: str) -> str:
    """The decision and the monitor's levels, as the console's decision lines give them: the
    report said "see the decision lines above" and held none, and gave 0.120 after hour 48
    where the monitor flagged from 0.339 (a new user's try, 2026-12-06)."""
    text = f"**The flag.** `fedgru predict` flags a risk of {test.threshold:.3f} or more after hour {window_hours:g}. "
    hourly = hour_list(test)
    rule = monitor_rule(test)
    if rule is not None:
        text += (f"The hourly monitor (`predict --hourly`, `monitor`) flags a stay {rule[0]} and keeps the flag on "
                 f"{rule[1]}. {spread}")
    elif hourly:
        text += (f"The hourly monitor (`predict --hourly`, `monitor`) flags by each hour's own threshold, read from DP "
                 f"releases ({hourly}; in brackets, where given, each one's rough interval). ")
    return text + "The two can differ for a stay."


def decision_lines(test, binary: bool, level: float | None = None, dp: bool = True,
                   coverage: str | None = None) -> list[str]:
    """What the run decided for the bedside (binary tasks): the decision threshold and each
    checkpoint hour's, and the monitor's margin; results a bedside user keeps. ``level``:
    the config's clinical level, which no release moves (the hour thresholds are read from
    the validation releases whatever the rule: said, so they do not read as fixed settings);
    ``dp``: whether those releases carried DP noise (a comparison simulation's did not);
    ``coverage``: the thresholds' intervals' measured coverage, in words (sections.threshold_coverage_words;
    None: as for a run of no known settings)."""
    if test is None or test.threshold is None or not binary:
        return []
    source = "read from the DP validation releases" if dp else "read from the exact validation histograms (no DP)"
    how = {"level": "a configured level", "read": source,
           "fallback": "a fallback: the validation releases could not choose one, the run's log says why"}.get(
        getattr(test, "threshold_source", ""),
        "a configured level" if level is not None and math.isclose(test.threshold, level, rel_tol=1e-9) else source)
    hourly = hour_list(test)
    hourly = f"; each hour's, {source}: {hourly}" if hourly else ""
    lines = [f"decision threshold {test.threshold:.3f} ({how}){hourly} (risks on the final model's "
             f"{'calibrated' if test.calibration else 'own'} scale)"]
    rule = monitor_rule(test)
    if rule is not None:
        lines.append(f"monitor: a stay is flagged {rule[0]}, and stays flagged {rule[1]}")
    if getattr(test, "checkpoint_intervals", None) or getattr(test, "onset_margin_interval", None):
        lines.append(f"  intervals: nominal {INTERVAL_LEVEL:.0%} for the DP noise and the reading (not a range of "
                     f"patients' risks); {coverage or threshold_coverage_words(None, 0)}")
    return lines


def monitor_rule(test) -> tuple[str, str] | None:
    """When the hourly monitor raises its flag (with the risks that raise it, as predict
    --hourly's flag_level column prints them: a ward setting up an alert should not have to
    add a margin in log-odds itself) and how its margin was read; None without a margin."""
    if test.onset_margin is None:
        return None
    raised = flag_levels_words(test)
    interval = getattr(test, "onset_margin_interval", None)
    within = f" ({interval[0]:.2f} to {interval[1]:.2f})" if interval else ""
    return (f"from the first hour its risk passes that hour's threshold by {test.onset_margin:.2f}{within} in "
            f"log-odds{': ' + raised if raised else ''}",
            f"(the margin read from a DP release, aiming at {100 * test.monitor_rate:.0f}% of the validation stays "
            "flagged at some hour)")


def _calibration_item(test) -> str:
    """The calibration in the large: the DP reading with its interval, and in a simulation
    the exact ratio."""
    parts = []
    if test.calibration_ratio:
        ratio, low, high = test.calibration_ratio
        parts.append(f"read from the DP releases, the observed rate is {ratio:.2f} ({low:.2f}-{high:.2f}) times the "
                     "mean predicted risk")
    if test.exact_calibration_ratio is not None:
        parts.append(f"exact on the simulation's test patients, {test.exact_calibration_ratio:.2f} times")
    if not parts:
        return ("**Calibration.** Not read for this run: treat the risk as a ranking (higher means more likely), "
                "not as a percentage, until `fedgru evaluate` on your stays says how it is calibrated.")
    text = "; ".join(parts)
    remedy = ("read it as a ranking (this run already recalibrated on its pooled validation releases)"
              if test.calibration else f"read it as a ranking ({RECALIBRATION_CAVEAT})")
    if test.calibration_ratio:  # the DP reading's interval decides, by the rule the calibration section words
        lean = calibration_lean(*test.calibration_ratio[1:])
        if lean.way == "none":
            return "**Calibration.** " + text[0].upper() + text[1:] + ": the DP reading's interval holds 1."
        if lean.proven != "large":
            return ("**Calibration.** " + text[0].upper() + text[1:] + f": the risks may run {lean.way}, by "
                    f"{lean.size}; `fedgru evaluate` on a hospital's own stays measures it before anyone reads "
                    "the risk as a probability.")
    return ("**Calibration.** " + text[0].upper() + text[1:] + ". Where this is far from 1 the printed risk is "
            f"not the rate at which such patients have the outcome: {remedy}.")


def _groups_item(test) -> str:
    """Whether any group of patients could be checked from the DP releases."""
    groups = test.subgroups or []
    if not groups:
        return ""
    read = [g for g in groups if g.metrics is not None]
    if read:
        return (f"**Groups of patients.** {len(read)} of {len(groups)} groups could be read from the DP releases "
                "(\"Whom the model fails\"); the others were too small for the noise.")
    return ("**Groups of patients.** No group (sex, age, ICU type) could be read from the DP releases at this "
            "federation's size, so how the model does for any one group was not checked here: each hospital "
            "can check its own with `fedgru evaluate --subgroups`.")
