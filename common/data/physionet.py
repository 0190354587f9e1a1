"""Reader for the PhysioNet/CinC Challenge 2012 format.

Silva et al., "Predicting In-Hospital Mortality of ICU Patients: The PhysioNet/Computing
in Cardiology Challenge 2012", Computing in Cardiology 2012. Data: Open Data Commons
Attribution 1.0.

Each stay is a file ``<RecordID>.txt`` with lines ``Time,Parameter,Value``; ``Time`` is
``HH:MM`` since ICU admission. The first lines at ``00:00`` are descriptors (RecordID,
Age, Gender, Height, ICUType, Weight; ``-1`` = unknown). A descriptor name seen again
later (Weight, typically) is an ordinary observation. Input can be the folder of files
or the ``.tar.gz`` PhysioNet ships, unchanged.
"""

from __future__ import annotations

import math
import tarfile
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from .records import DataError, ReadSummary, Stay, StayBuilder, decode_lines

DESCRIPTORS = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")
HEADER = "Time,Parameter,Value"


def iter_stay_files(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Yield ``(source_name, record_name, raw_bytes)`` for every ``*.txt`` stay file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise DataError(str(path), "folder holds no <RecordID>.txt stay files")
        for p in files:
            yield str(p), p.stem, p.read_bytes()
        return
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    damaged = "is damaged or truncated (the archive ends early or fails its checks); copy or download it again"
    try:
        if not tarfile.is_tarfile(path):
            if path.name.endswith((".tar.gz", ".tgz", ".tar")):
                raise DataError(str(path), damaged)
            raise DataError(str(path), "unknown format: expected a folder of <RecordID>.txt files or a .tar.gz of them")
        found = False
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".txt"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - special members
                    continue
                found = True
                yield f"{path}!{member.name}", Path(member.name).stem, handle.read()
    except (EOFError, tarfile.TarError, zlib.error, OSError) as exc:
        raise DataError(str(path), damaged) from exc
    if not found:
        raise DataError(str(path), "archive holds no <RecordID>.txt stay files")


# PhysioNet 2012's records hold the first 48 hours of each ICU stay: a later time is not
# this format (an export with longer stays belongs in the long CSV format).
LAST_TIME_HOURS = 48.0


def parse_time(text: str) -> float:
    """``HH:MM`` -> hours (raises ValueError on anything else)."""
    hours, sep, minutes = text.partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        raise ValueError("bad time")
    m = int(minutes)
    if m >= 60:
        raise ValueError("bad time")
    return int(hours) + m / 60.0


# The distinct times of a PhysioNet record are few (at most 2,881 minutes in 48 hours) and
# each recurs on about fifteen lines: parsing each once saves a sixth of reading an export.
# A malformed time raises as before (exceptions are not cached).
_time_of = lru_cache(maxsize=4096)(parse_time)


def parse_stay(
    source: str,
    record_name: str,
    raw: bytes,
    var_index: dict[str, int],
    summary: ReadSummary,
) -> Stay:
    """Parse one stay file. ``var_index`` maps configured variable names to indices."""
    lines = decode_lines(raw, source)
    if not lines or not lines[0].strip():
        raise DataError(source, "is empty: a stay file needs the header and descriptor lines", line=1)
    if lines[0].strip() != HEADER:
        raise DataError(source, f"first line must be the header '{HEADER}'", line=1)
    stay = StayBuilder(var_index, summary)
    record_id: str | None = None
    record_line = 0
    # The loop runs once per line of every stay (about 440 a stay: 44 million lines for a
    # hospital of 100,000 stays), so it does each line's checks in as few calls as it can;
    # what it accepts, reads and reports is parse_stay's as ever (tests/test_readers.py
    # holds it to the straightforward version line by line).
    index_of = var_index.get
    times, variables, values = stay.times, stay.vars, stay.values
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        if len(parts) != 3:
            if not line.strip():  # a blank line (it holds no comma) is skipped
                continue
            raise DataError(source, f"expected 3 fields (Time,Parameter,Value), found {len(parts)}", line=lineno)
        t_text, name, v_text = parts[0].strip(), parts[1].strip(), parts[2].strip()
        try:
            t = _time_of(t_text)
        except ValueError:
            raise DataError(source, "time is not HH:MM", line=lineno, column="Time") from None
        if t > LAST_TIME_HOURS:
            raise DataError(source, "time is after 48:00, the end of a PhysioNet 2012 record (export longer stays "
                                    "in the long CSV format)", line=lineno, column="Time")
        if not name:
            raise DataError(source, "parameter name is empty", line=lineno, column="Parameter")
        try:
            v = float(v_text)  # parse_number's float of the stripped text
        except ValueError:
            raise DataError(source, "value is not a number", line=lineno, column="Value") from None
        # Descriptors: the first occurrence at 00:00. Later ones are observations.
        if t == 0.0:
            if name == "RecordID":
                if record_id is None:
                    record_id, record_line = v_text, lineno
                continue
            if name in DESCRIPTORS and name not in stay.static:
                stay.descriptor(name, v)
                continue
        index = index_of(name)
        if index is not None and math.isfinite(v):  # StayBuilder.observation's common case, without the call
            times.append(t)
            variables.append(index)
            values.append(v)
        else:  # an unused parameter or a nan/inf value: counted there
            stay.observation(name, t, v)
    summary.lines += len(lines) - 1
    summary.files += 1
    if record_id is not None and record_id != record_name:
        # Files are named after their RecordID; a mismatch means a mixed-up export.
        try:
            same = float(record_id) == float(record_name)
        except ValueError:
            same = False
        if not same:
            raise DataError(source, "RecordID does not match the file name", line=record_line, column="Value")
    return stay.build(record_name)


def read_physionet(path: Path, variables: list[str], summary: ReadSummary) -> list[Stay]:
    var_index = {name: i for i, name in enumerate(variables)}
    stays = [
        parse_stay(source, name, raw, var_index, summary)
        for source, name, raw in iter_stay_files(path)
    ]
    seen: set[str] = set()
    for stay in stays:
        if stay.stay_id in seen:  # a local error: the stay id stays at the hospital
            raise DataError(str(path), f"stay id {stay.stay_id} appears in two files")
        seen.add(stay.stay_id)
    return stays
