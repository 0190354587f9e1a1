"""``fedgru evaluate``: a run's model on a hospital's own labelled stays, exactly, with each
metric's sampling interval; with ``--subgroups`` a table of the groups of patients
(``evaluation.subgroups``), with ``--csv`` every metric of every group in a file a
spreadsheet opens. Nothing it reads or computes leaves the machine it runs on."""

from __future__ import annotations

import csv
import math
import sys
import unicodedata
from dataclasses import dataclass, field

from common.config import ConfigError
from common.files import to_json
from common.metrics import METRIC_NAMES, Metrics
from common.reliability import calibration_lean, ratio_text
from common.subgroups import GroupResult
from fedgru.bedside import _notes, _threshold, _written, checked_output

SUBGROUP_MIN_EVENTS = 10  # evaluate --subgroups: below this many events (or non-events) a group's AUROC is mostly chance
SAMPLING_DRAWS = 200  # evaluate: resamples of the stays behind each metric's 95% interval
# The table's columns: what a clinician weighs for a group (ranks, flags, calibration); the rest
# (AUPRC, accuracy, F1, Brier, min(Se,PPV)) is in --csv and --json, where a wide row costs nothing.
TABLE_METRICS = ("auroc", "sensitivity", "specificity")
ALL_STAYS = "all stays"
# The CSV's names of the metrics: METRIC_NAMES' words as column names (the JSON keeps the field names)
CSV_NAMES = {"auroc": "auroc", "auprc": "auprc", "accuracy": "accuracy", "sensitivity": "sensitivity",
             "specificity": "specificity", "f1": "f1", "brier": "brier", "event1_score": "min_se_ppv"}


@dataclass
class ExactEvaluation:
    """What ``evaluate`` measures on labelled stays, exactly (``--json`` prints it whole)."""

    data: str
    threshold: float | None  # the risk at or above which a stay is flagged (binary tasks)
    metrics: Metrics
    intervals: dict[str, list[float]]  # each metric's 95% interval over resamples of the stays
    interval: str  # how the intervals were made, in words
    subgroups: list[GroupResult] = field(default_factory=list)  # --subgroups: every group holding a stay
    # binary tasks: [observed rate over mean predicted risk, and its 95% interval over the same resamples]; named
    # as each group's (GroupResult.observed_over_predicted), whose ``calibration`` is its reliability curve
    observed_over_predicted: list[float] | None = None
    patients: int = 0
    deaths: int = 0  # stays of the task's last class ("died"), as each group's ``deaths``


def cmd_evaluate(args) -> int:
    from common.bundle import Bundle
    from common.metrics import calibration_in_the_large, exact_metrics, format_metrics, sampling_intervals

    csv_out = _csv_target(args)  # a CSV that cannot be written is refused before the data is read
    bundle = Bundle(args.model)
    threshold = _threshold(args, bundle)  # a bad --threshold is refused before the data is read
    ds = bundle.load(args.data, args.outcomes, args.format)
    _notes(ds, bundle)
    _evaluated_stays_note(ds, bundle)
    probs = bundle.predict(ds)
    binary = probs.shape[1] == 2
    result = ExactEvaluation(
        str(args.data), threshold if binary else None, exact_metrics(ds.y, probs, threshold),
        sampling_intervals(ds.y, probs, threshold, SAMPLING_DRAWS),
        f"95% percentile bootstrap over {SAMPLING_DRAWS} resamples of the stays: how far another sample of such "
        "patients could read", patients=len(ds.y), deaths=int((ds.y == probs.shape[1] - 1).sum()))
    if binary:
        result.observed_over_predicted = calibration_in_the_large(ds.y, probs[:, 1], SAMPLING_DRAWS)
    if args.subgroups and not bundle.config.evaluation.subgroups:
        print("note: --subgroups: this model's config defines no groups of patients (evaluation.subgroups), so "
              "there is no table of groups", file=sys.stderr)
    if args.subgroups:
        from common.subgroups import exact_results

        result.subgroups = [g for g in exact_results(bundle.config, ds.y, probs, ds.groups, threshold,
                                                     min_events=SUBGROUP_MIN_EVENTS, draws=SAMPLING_DRAWS)
                            if g.patients]  # a group no stay of this export falls in is left out
    positive = bundle.config.task.classes[-1]  # the outcome the risk is of ("died" for mortality)
    if csv_out is not None:
        with _written(csv_out) as handle:
            write_csv(handle, result, positive)
        print(f"wrote {1 + len(result.subgroups)} rows of metrics to {'stdout' if csv_out == '-' else csv_out}",
              file=sys.stderr)
        if csv_out == "-":
            return 0
    if args.json:  # one JSON object on stdout, and nothing else there
        print(to_json(result, indent=None))
        return 0
    flagged = f"  (flagged at risk >= {threshold:.3f})" if binary else ""
    if result.subgroups:
        for line in subgroup_table(result, positive, bundle.config.task.classes[0]):
            print(line)
        others = [f"{METRIC_NAMES[k]} {_interval_text(getattr(result.metrics, k), result.intervals.get(k), 3)}"
                  for k in METRIC_NAMES if k not in TABLE_METRICS]
        lead = f"{ALL_STAYS}, also: "
        for start in range(0, len(others), 3):  # three a line: the table's width
            print((lead if start == 0 else " " * len(lead)) + "  ".join(others[start:start + 3]))
        if binary:
            print(f"flagged at risk >= {threshold:.3f} (sensitivity, specificity, accuracy, F1, min(Se,PPV))")
    else:
        print(f"{args.data}: {format_metrics(result.metrics, result.intervals)}{flagged}")
    if result.observed_over_predicted is not None:
        ratio, low, high = result.observed_over_predicted
        lean = calibration_lean(low, high)
        said = ("no clear sign either way" if lean.way == "none" else
                f"the risks run {lean.way}, the observed rate {lean.size} {lean.side} the mean predicted risk")
        print(f"calibration: the observed rate of '{positive}' is {ratio_text(ratio, low, high)} times the mean "
              f"predicted risk: {said} (1: calibrated in the large)")
    print(f"exact on these stays; in brackets each metric's {result.interval}")
    if any(g.observed_over_predicted is not None for g in result.subgroups):
        print(f"observed/predicted: a group's (or all stays') observed rate of '{positive}' over its mean predicted "
              "risk (1: calibrated in the large; above 1 its risks run low)")
    if result.subgroups:
        rest = ", ".join(METRIC_NAMES[k] for k in METRIC_NAMES if k not in TABLE_METRICS)
        where = f"in {csv_out}" if csv_out else "--csv FILE (a spreadsheet) or --json"
        print(f"every group's {rest} too: {where}")
    return 0


@dataclass(frozen=True)
class Row:
    """One line of the table and of the CSV: a group, or the whole export (grouping "all")."""

    grouping: str
    group: str
    stays: int
    deaths: int  # stays of the task's last class
    metrics: Metrics | None  # None: too few stays for stable metrics (``note`` says so)
    intervals: dict[str, list[float]]
    observed_over_predicted: list[float] | None
    note: str = ""


def rows(result: ExactEvaluation) -> list[Row]:
    """Each group as ``evaluate --subgroups`` found it, then the whole export (to compare
    each group against, as the table shows it)."""
    return [Row(g.grouping, g.group, int(g.patients), int(g.deaths), g.metrics, g.intervals or {},
                g.observed_over_predicted, g.note) for g in result.subgroups] + [
        Row("all", ALL_STAYS, result.patients, result.deaths, result.metrics, result.intervals,
            result.observed_over_predicted)]


def _csv_target(args) -> str | None:
    """--csv, checked before any data is read: stdout ('-', not beside --json), or a file
    whose folder can be made and which is not itself a folder."""
    out = getattr(args, "csv", None)
    if out == "-" and args.json:
        raise ConfigError("--json and --csv - both print on stdout: write the CSV to a file (--csv FILE)")
    return None if out is None else checked_output(out, "--csv")


def _interval_text(value: float | None, interval, digits: int) -> str:
    """"0.795 (0.769-0.819)" in a table cell; "-" where the value is undefined."""
    if value is None or not math.isfinite(value):
        return "-"
    if not interval:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({interval[0]:.{digits}f}-{interval[1]:.{digits}f})"


def _shown_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: a wide character (CJK) two, a combining mark
    none. Padding by ``len`` shifted a row whose group or class name holds either."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _left(text: str, width: int) -> str:
    return text + " " * max(0, width - _shown_width(text))


def _right(text: str, width: int) -> str:
    return " " * max(0, width - _shown_width(text)) + text


def subgroup_table(result: ExactEvaluation, positive: str, negative: str) -> list[str]:
    """The groups as one aligned table, a row each and the whole export last: AUROC,
    sensitivity and specificity with their intervals, and the group's calibration in the
    large. A group too small for stable metrics says so across the metric columns (the
    CSV and the JSON keep the note whole). Fits 120 columns for the default's groups."""
    named = [(r.group if r.grouping == "all" else f"{r.grouping} {r.group}", r) for r in rows(result)]
    label = max(_shown_width(name) for name, _ in named)
    stays = max(5, len(str(result.patients)))
    count = max(_shown_width(positive), 4)
    cell = len("0.000 (0.000-0.000)")
    header = (f"{_left('group', label)}  {'stays':>{stays}} {_right(positive, count)}  "
              + "  ".join(f"{METRIC_NAMES[k]:<{cell}}" for k in TABLE_METRICS) + "  observed/predicted")
    lines = [header]
    for name, r in named:
        head = f"{_left(name, label)}  {r.stays:>{stays}d} {r.deaths:>{count}d}  "
        if r.metrics is None:
            lines.append(head + f"too few: under {SUBGROUP_MIN_EVENTS} stays labelled {positive} or under {SUBGROUP_MIN_EVENTS} {negative}")
            continue
        cells = [f"{_interval_text(getattr(r.metrics, k), r.intervals.get(k), 3):<{cell}}" for k in TABLE_METRICS]
        ratio = r.observed_over_predicted
        calibration = ratio_text(*ratio) if ratio else "-"
        lines.append(head + "  ".join(cells) + "  " + calibration)
    return lines


def write_csv(handle, result: ExactEvaluation, positive: str) -> None:
    """One row per group and one for the whole export (grouping "all"): counts, every
    metric with its 95% interval (``<metric>_low``, ``<metric>_high``; names as
    CSV_NAMES), the group's observed over predicted rate, the risk its decisions flag at,
    and the note of a group too small for metrics. Blank where a value is undefined."""

    def number(value: float | None) -> str:
        return f"{value:.6f}" if value is not None and math.isfinite(value) else ""

    writer = csv.writer(handle)
    metric_columns = [c for k in METRIC_NAMES for c in (CSV_NAMES[k], f"{CSV_NAMES[k]}_low", f"{CSV_NAMES[k]}_high")]
    writer.writerow(["grouping", "group", "stays", positive, *metric_columns, "observed_over_predicted",
                     "observed_over_predicted_low", "observed_over_predicted_high", "flagged_at_risk", "note"])
    threshold = number(result.threshold)
    for r in rows(result):
        values = []
        for key in METRIC_NAMES:
            value = getattr(r.metrics, key) if r.metrics else None
            low, high = r.intervals.get(key) or (None, None)
            if not number(value):  # an undefined value has no interval either
                low = high = None
            values += [number(value), number(low), number(high)]
        ratio = r.observed_over_predicted or (None,) * 3
        writer.writerow([r.grouping, r.group, r.stays, r.deaths, *values, *(number(v) for v in ratio), threshold, r.note])


def _evaluated_stays_note(ds, bundle) -> None:
    """On stderr: stays with no observation are in evaluate's metrics, as in the
    federation's own evaluation (predict and monitor leave them unscored)."""
    from client.bedside import observed_hours

    empty = int((observed_hours(ds, bundle.config.features) == 0).sum())
    if empty:
        print(f"note: {empty} stay(s) have no observation in the window: they are scored from their descriptors "
              "in these metrics, as the federation's own evaluation scores them (predict and monitor leave them "
              "unscored)", file=sys.stderr)
