"""The in-memory form every reader produces, and the error every reader raises."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
