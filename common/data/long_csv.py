"""Reader for a generic long format any hospital can export, and for outcome tables.

Events: a CSV with the header ``stay_id,time_hours,variable,value`` (one observation a
row, any order of stays, rows of one stay in time order). Variables named in the
config's ``features.static`` are descriptors: their first row in a stay is the
descriptor, later rows are observations. Labels: a CSV with a header that includes the
configured id and label columns (``stay_id,label`` for exports, ``RecordID,...`` for
PhysioNet's ``Outcomes-*.txt``).

Every problem is a :class:`DataError` naming the file, the line and, where there is one,
the column; no message carries a value from the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from .records import DataError, ReadSummary, Stay, StayBuilder, csv_rows, natural_key, parse_number, stream_lines

EVENT_COLUMNS = ("stay_id", "time_hours", "variable", "value")


def _read_lines(path: Path, what: str) -> Iterator[str]:
    """The file's lines, read a chunk at a time (``records.stream_lines``)."""
    if not path.exists():
        raise DataError(str(path), f"{what} not found")
    if path.is_dir():
        raise DataError(str(path), f"{what} must be a CSV file, not a folder")
    return stream_lines(path, str(path))


def _header(rows, path: Path, what: str) -> list[str]:
    first = next(rows, None)
    if first is None:
        raise DataError(str(path), f"{what} is empty", line=1)
    return [h.strip() for h in first[1]]


def _looks_like_data(header: list[str]) -> bool:
    def number(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    return any(number(h) for h in header if h)


def _missing_columns(path: Path, header: list[str], wanted: list[str]) -> DataError:
    if _looks_like_data(header):  # a header-less file: its first line is a patient's data, never printed
        return DataError(str(path), f"the first line holds numbers, not column names: the file needs a header "
                                    f"naming {', '.join(repr(c) for c in wanted)}", line=1)
    missing = [c for c in wanted if c not in header]  # the header itself is never printed: it may be damaged data
    return DataError(str(path), f"header lacks column(s) {', '.join(repr(c) for c in missing)}", line=1)


def read_long_csv(path: Path, variables: list[str], static_names: list[str], summary: ReadSummary) -> list[Stay]:
    var_index = {name: i for i, name in enumerate(variables)}
    statics = set(static_names)
    rows = csv_rows(_read_lines(path, "events file"), str(path))
    header = _header(rows, path, "events file")
    if any(c not in header for c in EVENT_COLUMNS):
        raise _missing_columns(path, header, list(EVENT_COLUMNS))
    id_col, time_col, var_col, value_col = (header.index(name) for name in EVENT_COLUMNS)
    width = len(header)
    per_stay: dict[str, StayBuilder] = {}
    # The loop runs once per line (44 million at 100,000 stays): the current stay is kept
    # across its rows instead of looked up, and float() is called directly (it strips
    # whitespace itself, as parse_number does).
    current_id, stay, lines = None, None, 0
    for lineno, row in rows:
        if len(row) != width:
            if not row or all(not c.strip() for c in row):
                continue
            raise DataError(str(path), f"expected {width} fields, found {len(row)}", line=lineno)
        stay_id = row[id_col].strip()
        if not stay_id:
            if all(not c.strip() for c in row):
                continue
            raise DataError(str(path), "stay id is empty", line=lineno, column="stay_id")
        name = row[var_col].strip()
        if not name:
            raise DataError(str(path), "variable name is empty", line=lineno, column="variable")
        try:
            t = float(row[time_col])
        except ValueError:
            raise DataError(str(path), "time is not a number", line=lineno, column="time_hours") from None
        if not 0 <= t < math.inf:  # also false for nan
            raise DataError(str(path), "time must be a finite number of hours >= 0", line=lineno, column="time_hours")
        try:
            v = float(row[value_col])
        except ValueError:
            raise DataError(str(path), "value is not a number", line=lineno, column="value") from None
        if stay_id != current_id:
            stay = per_stay.get(stay_id)
            if stay is None:
                stay = per_stay[stay_id] = StayBuilder(var_index, summary)
            current_id = stay_id
        lines += 1
        if name in statics and name not in stay.static:
            stay.descriptor(name, v)
        else:
            stay.observation(name, t, v)
    summary.lines += lines
    summary.files += 1
    if not per_stay:
        raise DataError(str(path), "holds no observations after its header", line=2)
    return [per_stay[stay_id].build(stay_id) for stay_id in sorted(per_stay, key=natural_key)]


class Outcomes(dict):
    """``id -> label value``, and the column the labels were read from (for errors)."""

    label_column: str = ""


def read_outcomes(path: Path, id_column: str, label_column: str) -> Outcomes:
    """Read ``id -> label value`` from a CSV outcome table."""
    rows = csv_rows(_read_lines(path, "outcomes file"), str(path))
    header = _header(rows, path, "outcomes file")
    # A long-format export's labels.csv says stay_id,label, whatever the task calls them.
    id_column = id_column if id_column in header or "stay_id" not in header else "stay_id"
    label_column = label_column if label_column in header or "label" not in header else "label"
    if id_column not in header or label_column not in header:
        error = _missing_columns(path, header, [id_column, label_column])
        if (id_column, label_column) != ("stay_id", "label"):
            error = DataError(error.source, f"{error.problem} (or 'stay_id' and 'label', as a long export's labels "
                                            "file names them)", line=error.line)
        raise error
    id_col, label_col = header.index(id_column), header.index(label_column)
    out = Outcomes()
    out.label_column = label_column
    for lineno, row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(str(path), f"expected {len(header)} fields, found {len(row)}", line=lineno)
        stay_id = _canonical_id(row[id_col].strip())
        if not stay_id:
            raise DataError(str(path), "stay id is empty", line=lineno, column=id_column)
        try:
            value = parse_number(row[label_col])
        except ValueError:
            raise DataError(str(path), "label is not a number", line=lineno, column=label_column) from None
        if stay_id in out:  # '132539.0' and '132539' are one stay: two labels for it is an error
            raise DataError(str(path), "a stay id appears twice", line=lineno, column=id_column)
        out[stay_id] = value
    return out


def _canonical_id(stay_id: str) -> str:
    """'132539.0' and '132539' name the same stay."""
    try:
        f = float(stay_id)
    except ValueError:
        return stay_id
    return str(int(f)) if math.isfinite(f) and f.is_integer() else stay_id
