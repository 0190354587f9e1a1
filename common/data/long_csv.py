"""Reader for a generic long format any hospital can export, and for outcome tables.

Events: a CSV with the header ``stay_id,time_hours,variable,value`` (one observation a
row, any order of stays, rows of one stay in time order). Variables named in the
config's ``features.static`` are descriptors: their first row in a stay is the
descriptor, later rows are observations. Labels: a CSV with a header that includes the
configured id and label columns (``stay_id,label`` for exports, ``RecordID,...`` for
PhysioNet's ``Outcomes-*.txt``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from .records import DataError, ReadSummary, Stay, natural_key

EVENT_COLUMNS = ("stay_id", "time_hours", "variable", "value")


def _open_text(path: Path, what: str) -> io.TextIOWrapper:
    if not path.exists():
        raise DataError(str(path), f"{what} not found")
    if path.is_dir():
        raise DataError(str(path), f"{what} must be a CSV file, not a folder")
    return open(path, newline="", encoding="utf-8-sig")


def read_long_csv(
    path: Path, variables: list[str], static_names: list[str], summary: ReadSummary
) -> list[Stay]:
    var_index = {name: i for i, name in enumerate(variables)}
    statics = set(static_names)
    per_stay: dict[str, tuple[dict[str, float], list[float], list[int], list[float]]] = {}
    with _open_text(path, "events file") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(str(path), "is empty")
        header = [h.strip() for h in header]
        missing = [c for c in EVENT_COLUMNS if c not in header]
        if missing:
            raise DataError(
                str(path), f"header lacks column(s) {', '.join(missing)}; expected {','.join(EVENT_COLUMNS)}", line=1
            )
        col = {name: header.index(name) for name in EVENT_COLUMNS}
        width = len(header)
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != width:
                raise DataError(str(path), f"expected {width} fields, found {len(row)}", line=lineno)
            stay_id = row[col["stay_id"]].strip()
            if not stay_id:
                raise DataError(str(path), "stay id is empty", line=lineno, column="stay_id")
            name = row[col["variable"]].strip()
            if not name:
                raise DataError(str(path), "variable name is empty", line=lineno, column="variable")
            try:
                t = float(row[col["time_hours"]])
            except ValueError:
                raise DataError(str(path), "time is not a number", line=lineno, column="time_hours") from None
            if not math.isfinite(t) or t < 0:
                raise DataError(str(path), "time must be a finite number of hours >= 0", line=lineno, column="time_hours")
            try:
                v = float(row[col["value"]])
            except ValueError:
                raise DataError(str(path), "value is not a number", line=lineno, column="value") from None
            static, times, idxs, vals = per_stay.setdefault(stay_id, ({}, [], [], []))
            summary.lines += 1
            if name in statics and name not in static:
                static[name] = v
                continue
            idx = var_index.get(name)
            if idx is None:
                summary.unknown_parameters[name] += 1
                continue
            times.append(t)
            idxs.append(idx)
            vals.append(v)
    summary.files += 1
    if not per_stay:
        raise DataError(str(path), "holds no observations")
    stays = []
    for stay_id in sorted(per_stay, key=natural_key):
        static, times, idxs, vals = per_stay[stay_id]
        if not times:
            summary.stays_without_observations += 1
        stays.append(
            Stay(
                stay_id=stay_id,
                static=static,
                time=np.asarray(times, dtype=np.float32),
                var=np.asarray(idxs, dtype=np.int16),
                value=np.asarray(vals, dtype=np.float32),
            )
        )
    return stays


def read_outcomes(path: Path, id_column: str, label_column: str) -> dict[str, float]:
    """Read ``id -> label value`` from a CSV outcome table."""
    out: dict[str, float] = {}
    with _open_text(path, "outcomes file") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(str(path), "is empty")
        header = [h.strip() for h in header]
        for name in (id_column, label_column):
            if name not in header:
                raise DataError(
                    str(path), f"header has no column '{name}' (columns: {', '.join(header)})", line=1
                )
        id_col, label_col = header.index(id_column), header.index(label_column)
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(str(path), f"expected {len(header)} fields, found {len(row)}", line=lineno)
            stay_id = row[id_col].strip()
            try:
                value = float(row[label_col])
            except ValueError:
                raise DataError(str(path), "label is not a number", line=lineno, column=label_column) from None
            if stay_id in out:
                raise DataError(str(path), "stay id appears twice", line=lineno, column=id_column)
            out[_canonical_id(stay_id)] = value
    return out


def _canonical_id(stay_id: str) -> str:
    """'132539.0' and '132539' name the same stay."""
    try:
        f = float(stay_id)
    except ValueError:
        return stay_id
    return str(int(f)) if f.is_integer() else stay_id
