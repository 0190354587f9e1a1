"""The commands a hospital runs on its own patients with a run's model bundle: ``predict``,
``explain`` and ``monitor`` (``evaluate``: :mod:`fedgru.evaluate`). Everything they read stays on the machine they
run on; results and the legend of their numbers go to stdout (or the file asked for), notes
about the data to stderr."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from common.config import ConfigError
from common.data.records import DataError
from common.files import patient_output, to_json

NOT_SCORED = "no observation in the window, only descriptors: not scored"


def _notes(ds, bundle=None) -> None:
    """What reading the data set aside, on stderr (counts only); with ``bundle``, which
    charted variables its model reads and which of this export's it does not."""
    for note in ds.summary.notes() if ds.summary else []:
        print(f"note: {note}", file=sys.stderr)
    if bundle is not None:
        from client.bedside import variables_read

        print(f"note: {variables_read(ds, bundle)}", file=sys.stderr)


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
    from common.bundle import bundle_threshold

    return bundle_threshold(bundle.info)


def checked_output(out: str, flag: str) -> str:
    """An output path, checked before any data is read (a bad one failed with a traceback
    after all the scoring): "-" (stdout) as it is, else a file name that is not a folder,
    whose folder is made here."""
    if out == "-":
        return out
    path = Path(out)
    if not out.strip() or path.is_dir():
        raise ConfigError(f"{flag} {out!r}: give a file name to write to (it names a folder or nothing)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {out}: cannot make its folder ({exc.strerror or exc})") from None
    return out


@contextlib.contextmanager
def _written(out: str):
    """The CSV's stream: the file ``out``, or stdout for "-" (messages go to stderr). A file
    that cannot be written is a ConfigError naming it, not a traceback. The file holds
    patients' risks: readable by its owner only (0600, as the run folder's files), and
    written whole or not at all (common.files.patient_output)."""
    if out == "-":
        yield sys.stdout
        return
    try:
        with patient_output(out) as handle:
            yield handle
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write it ({exc.strerror or exc})") from None


def cmd_predict(args) -> int:
    import csv

    import numpy as np

    from common.bundle import Bundle
    from common.metrics import predicted_class

    out = checked_output(args.out, "--out")  # as a bad --threshold, refused before the data is read
    bundle = Bundle(args.model)
    classes = bundle.config.task.classes
    if len(classes) == 2:
        _threshold(args, bundle)
    ds = bundle.load(args.data, None, args.format)
    _notes(ds, bundle)
    probs = bundle.predict(ds)
    from client.bedside import observed_hours

    seen = observed_hours(ds, bundle.config.features)
    if args.hourly:
        from client.bedside import hourly_risks

        if len(classes) != 2:
            raise ConfigError("--hourly is for binary tasks")
        from common.bundle import monitor_readings
        from common.onset import monitor_flags

        risks = hourly_risks(bundle, ds)
        levels, latched = _monitor_levels(args, bundle, risks.shape[1])
        flagged = monitor_flags(risks, levels, latched)
        rows = 0
        with _written(out) as handle:
            writer = csv.writer(handle)
            # flagged_since: the hour the stay's flag (on at that row) was raised, so a kept flag says where it
            # came from when the hour's own risk is below its threshold
            writer.writerow(["stay_id", "hour", "risk", "flag_level", "flagged", "flagged_since"])
            for sid, row, flags, last in zip(ds.stay_ids, risks, flagged, seen):
                since = None
                for h, r in enumerate(row[:last]):  # no row for an hour after the stay's last observation
                    since = (since or h + 1) if flags[h] else None
                    # the risk and its threshold with the same digits: a row never reads "0.433048 >= 0.433, not flagged"
                    writer.writerow([sid, h + 1, f"{r:.6f}", f"{levels[h]:.6f}", int(flags[h]), since or ""])
                    rows += 1
        scored = seen > 0
        at_last = flagged[np.flatnonzero(scored), seen[scored] - 1]
        ever = [bool(f[:last].any()) for f, last in zip(flagged[scored], seen[scored])]
        print(f"wrote {rows} hourly risks ({int(scored.sum())} stays, each up to its last observed hour) to "
              f"{'stdout' if out == '-' else out}; {at_last.mean() if len(ever) else 0:.0%} of the stays flagged at "
              f"their last hour, {np.mean(ever) if ever else 0:.0%} at some hour" + ("; a flag stays on once raised" if latched else "")
              + f" (plain predict's decision flags the hour-{risks.shape[1]} risk at {_threshold(args, bundle):.3f} "
              "instead)", file=sys.stderr)
        if latched and (readings := monitor_readings(bundle.info, levels)):
            print(f"note: {readings[0].lower() + readings[1:]}", file=sys.stderr)  # flag levels with noise in them
        _stay_notes(seen, risks.shape[1], hourly=True)
        return 0
    with _written(out) as handle:
        writer = csv.writer(handle)
        if len(classes) == 2:
            flagged = predicted_class(probs, _threshold(args, bundle))  # the same rule as the metrics
            # risk: of classes[1], as --hourly writes it; left blank for a stay with no observation (the
            # descriptors alone, age and sex, are not a reading of this stay)
            writer.writerow(["stay_id", "risk", "flagged", "hours_observed"])
            for sid, p, flag, last in zip(ds.stay_ids, probs[:, 1], flagged, seen):
                writer.writerow([sid, f"{p:.6f}" if last else "", int(flag) if last else "", int(last)])
        else:
            writer.writerow(["stay_id", *(f"p_{c}" for c in classes), "predicted", "hours_observed"])
            for sid, row, last in zip(ds.stay_ids, probs, seen):
                writer.writerow([sid, *((f"{p:.6f}" for p in row) if last else ("" for _ in row)),
                                 classes[int(row.argmax())] if last else "", int(last)])
    of = f" (the risk of the outcome '{classes[1]}')" if len(classes) == 2 else ""
    hours = ds.X.shape[1]
    share = (f"; {flagged[seen > 0].mean() if (seen > 0).any() else 0:.0%} of the stays scored flagged at risk >= "
             f"{_threshold(args, bundle):.3f} (the hourly monitor, predict --hourly, flags by each hour's own level "
             f"and keeps a flag once raised: at hour {hours} it can differ)" if len(classes) == 2 else "")
    print(f"wrote {int((seen > 0).sum())} risk scores{of} to {'stdout' if out == '-' else out}{share}",
          file=sys.stderr)
    _stay_notes(seen, hours)
    return 0


def _stay_notes(seen, hours: int, hourly: bool = False) -> None:
    """On stderr: stays with no observation (not scored: a blank risk in plain predict's
    rows, no row at all in --hourly's, which has a row per observed hour) and stays whose
    last observation is before the window's end (counts only)."""
    empty, short = int((seen == 0).sum()), int(((seen > 0) & (seen < hours)).sum())
    if empty:
        print(f"note: {empty} stay(s) have no observation in the window, only descriptors: they are not scored "
              + ("(no rows: an hourly row is written for each observed hour only)" if hourly else "(blank risk)"),
              file=sys.stderr)
    if short:
        print(f"note: {short} stay(s) have their last observation before hour {hours}: plain predict reads them at "
              f"hour {hours}, as the model was trained and validated (a finished stay); for a stay still in the ICU "
              "read its current hour (predict --hourly, monitor)", file=sys.stderr)


def _one_stay(args):
    from common.bundle import Bundle

    args.stay = list(dict.fromkeys(args.stay))  # a stay named twice is shown once
    bundle = Bundle(args.model)
    ds = bundle.load(args.data, None, args.format)
    missing = [s for s in args.stay if s not in set(ds.stay_ids.astype(str))]
    if missing:
        raise DataError(str(args.data), f"holds no stay {missing[0]}")
    from client.bedside import variables_read

    print(f"note: {variables_read(ds, bundle)}", file=sys.stderr)
    return bundle, ds


def cmd_explain(args) -> int:
    from client.bedside import explain_stay, explanation_text, observed_hours, stay_index

    bundle, ds = _one_stay(args)
    seen = observed_hours(ds, bundle.config.features)
    for stay in args.stay:
        if not seen[stay_index(ds, stay)]:  # as predict and monitor: no risk from the descriptors alone
            print(json.dumps({"stay_id": stay, "risk": None, "note": NOT_SCORED}) if args.json
                  else f"stay {stay}: {NOT_SCORED}")
            continue
        e = explain_stay(bundle, ds, stay)
        print(to_json(e, indent=None) if args.json else explanation_text(e, args.top))
    return 0


def cmd_monitor(args) -> int:
    from client.bedside import monitor_page
    from common.bundle import Bundle

    out = Path(checked_output(args.out or f"monitor-{args.stay[0]}.html", "--out"))
    if args.threshold is not None:
        _threshold(args, Bundle(args.model))  # a bad --threshold (or --out) is refused before the data is read
    bundle, ds = _one_stay(args)
    print(monitor_page(bundle, ds, args.stay, out, *_monitor_levels(args, bundle, ds.X.shape[1])))
    print(f"wrote {out}")
    return 0
