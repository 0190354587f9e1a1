"""The in-memory form every reader produces, the error every reader raises, and the
pieces every reader shares: text that must be UTF-8, CSV rows that must be well formed,
and the way one stay's rows become a :class:`Stay`."""

from __future__ import annotations

import csv
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Unreadable input. The message names the file, line and column, never a value.

    Patient values must not reach logs or terminals, so readers only say *where*
    something is wrong and *what kind* of problem it is.
    """

    def __init__(self, source: str, problem: str, line: int | None = None, column: str | None = None):
        where = source
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {problem}")
        self.problem = problem
        self.source = source
        self.line = line
        self.column = column


def natural_key(stay_id: str) -> tuple:
    """Numeric ids sort as numbers, others after them as text."""
    return (0, int(stay_id), "") if stay_id.isdigit() else (1, 0, stay_id)


@dataclass
class Stay:
    """One ICU stay: its descriptors and its time-stamped observations.

    ``var``/``time``/``value`` are parallel arrays; ``var`` indexes the configured
    variable list, ``time`` is hours since admission. Order is file order, so for two
    observations in the same time bin the later line wins.
    """

    stay_id: str
    static: dict[str, float]
    time: np.ndarray  # float32 hours
    var: np.ndarray  # int16 index into the configured variables
    value: np.ndarray  # float32


@dataclass
class ReadSummary:
    """What a reader saw and what it set aside (counts only, no values)."""

    files: int = 0
    lines: int = 0
    stays_without_observations: int = 0
    unknown_parameters: dict[str, int] = field(default_factory=Counter)  # name -> count
    non_finite: dict[str, int] = field(default_factory=Counter)  # name -> values written nan or inf (set aside)


def decode_lines(raw: bytes, source: str) -> list[str]:
    """UTF-8 text (a byte-order mark allowed) as lines. A byte that is not UTF-8 (a
    Latin-1 export, say) is an error naming its line, not a traceback."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(source, "is not UTF-8 text; export the file as UTF-8", line=line) from None
    return text.splitlines()


CHUNK_BYTES = 1 << 24  # a large file is decoded and split this much at a time


def stream_lines(path: Path, source: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The lines of a UTF-8 file, exactly as :func:`decode_lines` gives them, without
    holding its whole text or a list of all its lines (a 100,000-stay long-format export
    is 1.2 GB of text in 44 million lines: a list of them took more memory than the
    stays). Each chunk ends just after a newline, so no line (nor a CR LF pair) is split
    between two, and splitting each chunk gives the same lines as splitting the whole; a
    byte that is not UTF-8 is the same error, naming the same line."""
    with open(path, "rb") as f:
        carry, lines_before, first = b"", 0, True
        while True:
            block = f.read(chunk_bytes)
            data = carry + block
            if not block:
                chunk, carry = data, b""
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no newline yet: read on
                    carry = data
                    continue
                chunk, carry = data[:cut], data[cut:]
            try:
                text = chunk.decode("utf-8-sig" if first else "utf-8")
            except UnicodeDecodeError as exc:
                line = lines_before + chunk[: exc.start].count(b"\n") + 1
                raise DataError(source, "is not UTF-8 text; export the file as UTF-8", line=line) from None
            first = False
            lines_before += chunk.count(b"\n")
            yield from text.splitlines()
            if not block:
                return


def csv_rows(lines: Iterable[str], source: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of CSV text; a malformed row (a stray quote, a field over
    the csv module's limit) is an error naming its line."""
    reader = csv.reader(lines, strict=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problem = "a field is too long" if "field larger" in str(exc) else "a quote is not closed or not escaped"
            raise DataError(source, f"is not well-formed CSV ({problem})", line=reader.line_num) from None
        yield reader.line_num, row


def parse_number(text: str) -> float:
    """A number as a file writes it; ValueError for anything else."""
    return float(text.strip())


class StayBuilder:
    """One stay's rows, in file order, becoming a :class:`Stay`. Values written as nan
    or inf are set aside and counted (never silently turned into "missing"), as are
    parameters the config does not use."""

    def __init__(self, var_index: dict[str, int], summary: ReadSummary):
        self.var_index, self.summary = var_index, summary
        self.static: dict[str, float] = {}
        # typed arrays, not lists: a list holds a float object per value (about 72 bytes an
        # observation against 18), and a long-format export keeps every stay open at once
        self.times = array("d")
        self.vars = array("i")
        self.values = array("d")

    def descriptor(self, name: str, value: float) -> None:
        if not math.isfinite(value):
            self.summary.non_finite[name] += 1
            return
        self.static[name] = value

    def observation(self, name: str, time: float, value: float) -> None:
        idx = self.var_index.get(name)
        if idx is None:
            self.summary.unknown_parameters[name] += 1
        elif not math.isfinite(value):
            self.summary.non_finite[name] += 1
        else:
            self.times.append(time)
            self.vars.append(idx)
            self.values.append(value)

    def build(self, stay_id: str) -> Stay:
        if not self.times:
            self.summary.stays_without_observations += 1
        return Stay(
            stay_id=stay_id,
            static=self.static,
            time=np.asarray(self.times, dtype=np.float32),
            var=np.asarray(self.vars, dtype=np.int16),
            value=np.asarray(self.values, dtype=np.float32),
        )
