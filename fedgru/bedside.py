"""The commands a hospital runs on its own patients with a run's model bundle: ``evaluate``,
``predict``, ``explain`` and ``monitor``. Everything they read stays on the machine they
run on; results and the legend of their numbers go to stdout (or the file asked for), notes
about the data to stderr."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ConfigError
from common.data.records import DataError
from common.files import to_json
from common.metrics import Metrics
from common.subgroups import GroupResult

SUBGROUP_MIN_EVENTS = 10  # evaluate --subgroups: below this many events (or non-events) a group's AUROC is mostly chance
SAMPLING_DRAWS = 200  # evaluate: resamples of the stays behind each metric's 95% interval


@dataclass
class ExactEvaluation:
    """What ``evaluate`` measures on labelled stays, exactly (``--json`` prints it whole)."""

    data: str
    threshold: float | None  # the risk at or above which a stay is flagged (binary tasks)
    metrics: Metrics
    intervals: dict[str, list[float]]  # each metric's 95% interval over resamples of the stays
    interval: str  # how the intervals were made, in words
    subgroups: list[GroupResult] = field(default_factory=list)  # --subgroups: every group holding a stay


def cmd_evaluate(args) -> int:
    from common.bundle import Bundle
    from common.metrics import exact_metrics, format_metrics, sampling_intervals

    bundle = Bundle(args.model)
    ds = bundle.load(args.data, args.outcomes, args.format)
    _notes(ds)
    probs = bundle.predict(ds)
    threshold = _threshold(args, bundle)
    binary = probs.shape[1] == 2
    result = ExactEvaluation(
        str(args.data), threshold if binary else None, exact_metrics(ds.y, probs, threshold),
        sampling_intervals(ds.y, probs, threshold, SAMPLING_DRAWS),
        f"95% percentile bootstrap over {SAMPLING_DRAWS} resamples of the stays: how far another sample of such "
        "patients could read")
    if args.subgroups:
        from common.subgroups import exact_results

        result.subgroups = [g for g in exact_results(bundle.config, ds.y, probs, ds.groups, threshold,
                                                     min_events=SUBGROUP_MIN_EVENTS, draws=SAMPLING_DRAWS)
                            if g.patients]  # a group no stay of this export falls in is left out
    if args.json:  # one JSON object on stdout, and nothing else there
        print(to_json(result, indent=None))
        return 0
    positive = bundle.config.task.classes[-1]  # the outcome the risk is of ("died" for mortality)
    for g in result.subgroups:
        shown = format_metrics(g.metrics, g.intervals) if g.metrics is not None else g.note
        print(f"{g.grouping:>10s} {g.group:<16s} {int(g.patients):5d} stays, {int(g.deaths):4d} {positive}: {shown}")
    flagged = f"  (flagged at risk >= {threshold:.3f})" if binary else ""
    print(f"{args.data}: {format_metrics(result.metrics, result.intervals)}{flagged}")
    print(f"exact on these stays; in brackets each metric's {result.interval}")
    return 0


def _notes(ds) -> None:
    """What reading the data set aside, on stderr (counts only)."""
    for note in ds.summary.notes() if ds.summary else []:
        print(f"note: {note}", file=sys.stderr)


def _monitor_levels(args, bundle, hours: int):
    """The risk that raises a flag after each hour, and whether a flag stays on: --threshold
    at every hour (on and off), else the run's own (common.bundle.monitor_levels)."""
    import numpy as np

    from common.bundle import hour_thresholds, monitor_levels

    own = args.threshold is None
    thresholds = hour_thresholds(bundle.info, hours) if own else np.full(hours, _threshold(args, bundle))
    return monitor_levels(bundle.info, thresholds, own)


def _threshold(args, bundle) -> float:
    """--threshold, else the one the run chose and saved in the bundle, else 0.5."""
    if args.threshold is not None:
        if not 0 < args.threshold < 1:
            raise ConfigError("--threshold must be a risk strictly between 0 and 1")
        return float(args.threshold)
    return float(bundle.info.get("threshold", 0.5))


@contextlib.contextmanager
def _written(out: str):
    """The CSV's stream: the file ``out``, or stdout for "-" (messages go to stderr)."""
    if out == "-":
        yield sys.stdout
        return
    with open(out, "w", newline="") as handle:
        yield handle


def cmd_predict(args) -> int:
    import csv

    from common.bundle import Bundle
    from common.metrics import predicted_class

    bundle = Bundle(args.model)
    ds = bundle.load(args.data, None, args.format)
    _notes(ds)
    probs = bundle.predict(ds)
    classes = bundle.config.task.classes
    out = args.out
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    if args.hourly:
        from client.bedside import hourly_risks

        if len(classes) != 2:
            raise ConfigError("--hourly is for binary tasks")
        from common.onset import monitor_flags

        risks = hourly_risks(bundle, ds)
        levels, latched = _monitor_levels(args, bundle, risks.shape[1])
        flagged = monitor_flags(risks, levels, latched)
        with _written(out) as handle:
            writer = csv.writer(handle)
            # flagged_since: the hour the stay's flag (on at that row) was raised, so a kept flag says where it
            # came from when the hour's own risk is below its threshold
            writer.writerow(["stay_id", "hour", "risk", "threshold", "flagged", "flagged_since"])
            for sid, row, flags in zip(ds.stay_ids, risks, flagged):
                since = None
                for h, r in enumerate(row):
                    since = (since or h + 1) if flags[h] else None
                    writer.writerow([sid, h + 1, f"{r:.6f}", f"{levels[h]:.3f}", int(flags[h]), since or ""])
        print(f"wrote {risks.size} hourly risks ({len(ds.stay_ids)} stays x {risks.shape[1]} hours) to {'stdout' if out == '-' else out}; "
              f"{flagged[:, -1].mean():.0%} of stays flagged at hour {risks.shape[1]}, {flagged.any(axis=1).mean():.0%} "
              "at some hour" + ("; a flag stays on once raised" if latched else "")
              + f" (plain predict's decision flags the hour-48 risk at {_threshold(args, bundle):.3f} instead)",
              file=sys.stderr)
        return 0
    with _written(out) as handle:
        writer = csv.writer(handle)
        if len(classes) == 2:
            flagged = predicted_class(probs, _threshold(args, bundle))  # the same rule as the metrics
            writer.writerow(["stay_id", "risk", "flagged"])  # risk: of classes[1], as --hourly writes it
            for sid, p, flag in zip(ds.stay_ids, probs[:, 1], flagged):
                writer.writerow([sid, f"{p:.6f}", int(flag)])
        else:
            writer.writerow(["stay_id", *(f"p_{c}" for c in classes), "predicted"])
            for sid, row in zip(ds.stay_ids, probs):
                writer.writerow([sid, *(f"{p:.6f}" for p in row), classes[int(row.argmax())]])
    of = f" (the risk of {classes[1]})" if len(classes) == 2 else ""
    share = (f"; {flagged.mean():.0%} of stays flagged at risk >= {_threshold(args, bundle):.3f} (the hourly "
             "monitor, predict --hourly, flags by each hour's own level and keeps a flag once raised: at hour 48 "
             "it can differ)" if len(classes) == 2 else "")
    print(f"wrote {len(ds.stay_ids)} risk scores{of} to {'stdout' if out == '-' else out}{share}", file=sys.stderr)
    return 0


def _one_stay(args):
    from common.bundle import Bundle

    args.stay = list(dict.fromkeys(args.stay))  # a stay named twice is shown once
    bundle = Bundle(args.model)
    ds = bundle.load(args.data, None, args.format)
    missing = [s for s in args.stay if s not in set(ds.stay_ids.astype(str))]
    if missing:
        raise DataError(str(args.data), f"holds no stay {missing[0]}")
    return bundle, ds


def cmd_explain(args) -> int:
    from client.bedside import explain_stay, explanation_text

    bundle, ds = _one_stay(args)
    for stay in args.stay:
        e = explain_stay(bundle, ds, stay)
        print(to_json(e, indent=None) if args.json else explanation_text(e, args.top))
    return 0


def cmd_monitor(args) -> int:
    from client.bedside import monitor_page

    bundle, ds = _one_stay(args)
    out = Path(args.out) if args.out else Path(f"monitor-{args.stay[0]}.html")
    print(monitor_page(bundle, ds, args.stay, out, *_monitor_levels(args, bundle, ds.X.shape[1])))
    print(f"wrote {out}")
    return 0
