"""Synthetic hospital exports of any size, made from set A, to measure cost only.

    python -m simulations.synthetic_export --stays 20000 --out DIR [--format physionet2012|long_csv|both]
                                           [--seed 0]

A real member of a consortium brings 10,000 to 100,000 ICU stays; set A has 4,000. To
measure how reading, caching and training grow with the stays (``simulations.
bench_data_scale``), this module writes an export of N stays by resampling set A's stays
with replacement under new record ids (``300001``, ``300002``, ...), each copy with its
times and values jittered, and its outcome row copied from the stay it was drawn from:

- **times**: every distinct observation time of the stay moves by a whole number of
  minutes in [-10, 10], then is kept within 00:01-48:00 and in the original order (a
  running maximum), so observations made together stay together and none leaves the
  48-hour record (a time of 00:00 stays 00:00: there the reader tells descriptors apart);
- **values**: multiplied by ``1 + 0.03 z`` (``z`` standard normal, cut at +-3), rounded to
  4 significant digits, kept within the parameter's range in set A; categorical and integer-scored ones (``MechVent``, ``GCS``) and ``-1``
  ("unknown") are copied unchanged, as are the descriptors (Age, Gender, Height,
  ICUType, Weight at 00:00), so units and ranges stay plausible.

The copies are near-duplicates of 4,000 real patients: they cost what real stays of the
same shape cost, and they say **nothing** about utility (a model trained on them learns
set A again). Never use them for an AUROC.

Two formats, as ``fedgru hospital init`` reads them: PhysioNet's (a ``.tar.gz`` of
``<RecordID>.txt`` files plus an ``Outcomes`` file with set A's columns) and the long CSV
(``stay_id,time_hours,variable,value`` plus ``stay_id,label``, the label being
``In-hospital_death``). The output is deterministic given the seed, byte for byte (the
archive's times and owners are fixed), and written one stay at a time: memory holds set
A's parsed stays and one copy, never the export.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.data.long_csv import read_outcomes
from common.data.physionet import DESCRIPTORS, iter_stay_files

FIRST_ID = 300001  # above set A's, B's and C's record ids (132539-163037), so no copy is mistaken for one
TIME_JITTER_MINUTES = 10
VALUE_JITTER = 0.03
UNCHANGED = frozenset({"MechVent", "GCS"})  # binary or integer-scored: noise would make them implausible
LAST_MINUTE = 48 * 60
OUTCOME_LABEL = "In-hospital_death"
FORMATS = ("physionet2012", "long_csv")


@dataclass(frozen=True)
class SourceStay:
    """One set A stay, parsed once: its descriptor lines and its observations in file order."""

    descriptors: tuple[tuple[str, str], ...]  # (name, value text) of the 00:00 descriptor lines, RecordID left out
    minutes: np.ndarray  # (n,) int32 minutes since admission
    names: np.ndarray  # (n,) int16 index into Source.names
    values: np.ndarray  # (n,) float64
    outcome: tuple[str, ...]  # the outcome row's cells after the record id


@dataclass(frozen=True)
class Source:
    """Set A (or any PhysioNet export with outcomes), held parsed in memory."""

    stays: list[SourceStay]
    names: list[str]  # parameter names, indexed by SourceStay.names
    unchanged: np.ndarray  # (len(names),) bool: values copied without noise
    low: np.ndarray  # (len(names),) the smallest value of each parameter in the source ...
    high: np.ndarray  # ... and the largest: a jittered value stays within them (FiO2 1.0 never becomes 1.03)
    outcome_header: tuple[str, ...]  # the outcome file's columns after the record id


@dataclass(frozen=True)
class SyntheticExport:
    """One written export, as ``fedgru hospital init`` is given it."""

    format: str  # physionet2012 | long_csv
    data: Path
    outcomes: Path
    stays: int
    deaths: int
    seed: int
    id_column: str  # the outcomes file's stay id column
    label_column: str  # ... and its label column


def load_source(data: Path, outcomes: Path) -> Source:
    """Parse a PhysioNet export (set A) into :class:`Source`; only stays with an outcome row."""
    header, rows = _outcome_rows(outcomes)
    names: dict[str, int] = {}
    stays = []
    for _, record, raw in iter_stay_files(data):
        if record not in rows:
            continue
        descriptors, minutes, index, values = [], [], [], []
        lines = raw.decode("utf-8-sig").splitlines()[1:]  # after the header
        for line in lines:
            if not line.strip():
                continue
            t_text, name, v_text = (p.strip() for p in line.split(","))
            hours, _, mins = t_text.partition(":")
            minute = int(hours) * 60 + int(mins)
            if minute == 0 and not minutes and name in DESCRIPTORS and all(name != d for d, _ in descriptors):
                if name != "RecordID":
                    descriptors.append((name, v_text))
                continue
            minutes.append(minute)
            index.append(names.setdefault(name, len(names)))
            values.append(float(v_text))
        stays.append(SourceStay(tuple(descriptors), np.asarray(minutes, dtype=np.int32),
                                np.asarray(index, dtype=np.int16), np.asarray(values, dtype=np.float64), rows[record]))
    if not stays:
        raise ValueError(f"{data}: no stay with an outcome in {outcomes}")
    name_list = sorted(names, key=names.get)
    unchanged = np.array([n in UNCHANGED for n in name_list], dtype=bool)
    low, high = np.full(len(name_list), np.inf), np.full(len(name_list), -np.inf)
    for stay in stays:
        np.minimum.at(low, stay.names, stay.values)
        np.maximum.at(high, stay.names, stay.values)
    return Source(stays, name_list, unchanged, low, high, header)


def _outcome_rows(outcomes: Path) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    lines = outcomes.read_text().splitlines()
    header = tuple(lines[0].split(","))
    rows = {}
    for line in lines[1:]:
        if line.strip():
            cells = line.split(",")
            rows[cells[0].strip()] = tuple(c.strip() for c in cells[1:])
    return header[1:], rows


@dataclass(frozen=True)
class Copy:
    """One synthetic stay: a resampled source stay under a new id, jittered."""

    record_id: int
    source: SourceStay
    minutes: np.ndarray
    values: np.ndarray


def copies(source: Source, n: int, seed: int) -> Iterator[Copy]:
    """The ``n`` synthetic stays, one at a time, the same for the same seed."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(source.stays), size=n)
    for i, pick in enumerate(picks):
        stay = source.stays[int(pick)]
        minutes = stay.minutes
        if minutes.size:
            distinct, inverse = np.unique(minutes, return_inverse=True)
            moved = distinct + rng.integers(-TIME_JITTER_MINUTES, TIME_JITTER_MINUTES + 1, size=distinct.size)
            moved = np.where(distinct == 0, 0, np.clip(moved, 1, LAST_MINUTE))
            moved = np.maximum.accumulate(moved)  # ordering kept; distinct is sorted, so 00:00 stays first
            minutes = moved[inverse].astype(np.int32)
        noise = 1.0 + VALUE_JITTER * np.clip(rng.standard_normal(stay.values.size), -3.0, 3.0)
        keep = source.unchanged[stay.names] | (stay.values == -1.0)
        jittered = np.clip(_significant(stay.values * noise), source.low[stay.names], source.high[stay.names])
        values = np.where(keep, stay.values, jittered)
        yield Copy(FIRST_ID + i, stay, minutes, values)


def _significant(x: np.ndarray, digits: int = 4) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits (at most 6 decimals), as a lab writes it."""
    magnitude = np.floor(np.log10(np.maximum(np.abs(x), 1e-12)))
    decimals = np.clip(digits - 1 - magnitude, 0, 6)
    scale = 10.0 ** decimals
    return np.round(x * scale) / scale


def _value_text(values: np.ndarray) -> list[str]:
    # Whole numbers without ".0" (as PhysioNet writes them), others with their decimals only.
    return [str(int(v)) if v == int(v) else f"{v:.6f}".rstrip("0") for v in values.tolist()]


def physionet_text(c: Copy, names: list[str]) -> bytes:
    lines = ["Time,Parameter,Value", f"00:00,RecordID,{c.record_id}"]
    lines += [f"00:00,{name},{value}" for name, value in c.source.descriptors]
    hhmm = [f"{m // 60:02d}:{m % 60:02d}" for m in c.minutes.tolist()]
    lines += [f"{t},{names[k]},{v}" for t, k, v in zip(hhmm, c.source.names.tolist(), _value_text(c.values))]
    return ("\n".join(lines) + "\n").encode()


def long_csv_text(c: Copy, names: list[str]) -> str:
    sid = c.record_id
    lines = [f"{sid},0,{name},{value}" for name, value in c.source.descriptors]
    hours = [f"{m / 60:.6f}".rstrip("0").rstrip(".") for m in c.minutes.tolist()]
    lines += [f"{sid},{h},{names[k]},{v}" for h, k, v in zip(hours, c.source.names.tolist(), _value_text(c.values))]
    return "\n".join(lines) + "\n" if lines else ""


def write_export(source: Source, n: int, out: Path, data_format: str, seed: int = 0) -> SyntheticExport:
    """Write ``n`` synthetic stays in ``data_format`` under ``out`` (created); see the module."""
    if data_format not in FORMATS:
        raise ValueError(f"unknown format {data_format!r}: one of {', '.join(FORMATS)}")
    if n < 1:
        raise ValueError("an export needs at least one stay")
    out.mkdir(parents=True, exist_ok=True)
    _record(out, n, data_format, seed).unlink(missing_ok=True)  # written again only once the export is whole
    deaths = 0
    label_at = source.outcome_header.index(OUTCOME_LABEL)
    if data_format == "physionet2012":
        data, outcomes = out / f"synthetic-{n}.tar.gz", out / f"Outcomes-synthetic-{n}.txt"
        with open(data, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar, \
                open(outcomes, "w") as table:
            table.write(",".join(("RecordID", *source.outcome_header)) + "\n")
            for c in copies(source, n, seed):
                body = physionet_text(c, source.names)
                info = tarfile.TarInfo(f"synthetic/{c.record_id}.txt")
                info.size, info.mtime, info.mode = len(body), 0, 0o644
                tar.addfile(info, io.BytesIO(body))
                table.write(",".join((str(c.record_id), *c.source.outcome)) + "\n")
                deaths += c.source.outcome[label_at] == "1"
        id_column, label_column = "RecordID", OUTCOME_LABEL
    else:
        data, outcomes = out / f"synthetic-{n}.csv", out / f"labels-synthetic-{n}.csv"
        with open(data, "w") as events, open(outcomes, "w") as labels:
            events.write("stay_id,time_hours,variable,value\n")
            labels.write("stay_id,label\n")
            for c in copies(source, n, seed):
                events.write(long_csv_text(c, source.names))
                labels.write(f"{c.record_id},{c.source.outcome[label_at]}\n")
                deaths += c.source.outcome[label_at] == "1"
        id_column, label_column = "stay_id", "label"
    export = SyntheticExport(data_format, data, outcomes, n, int(deaths), seed, id_column, label_column)
    _record(out, export).write_text(json.dumps({**asdict(export), "data": str(data), "outcomes": str(outcomes)}))
    return export


def _record(out: Path, n: int | SyntheticExport, data_format: str = "", seed: int = 0) -> Path:
    if isinstance(n, SyntheticExport):
        n, data_format, seed = n.stays, n.format, n.seed
    return out / f".synthetic-{data_format}-{n}-{seed}.json"


def existing_export(out: Path, n: int, data_format: str, seed: int = 0) -> SyntheticExport | None:
    """The export :func:`write_export` finished writing under ``out`` with these settings
    (the same bytes it would write again), or None."""
    try:
        plain = json.loads(_record(out, n, data_format, seed).read_text())
    except (OSError, ValueError):
        return None
    export = SyntheticExport(**{**plain, "data": Path(plain["data"]), "outcomes": Path(plain["outcomes"])})
    return export if export.data.is_file() and export.outcomes.is_file() else None


def outcome_count(export: SyntheticExport) -> int:
    """How many outcome rows the export's outcomes file holds (read by the project's reader)."""
    return len(read_outcomes(export.outcomes, export.id_column, export.label_column))


def main(argv: list[str] | None = None) -> int:
    from common.config import load_config
    from common.paths import resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stays", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="physionet2012")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config()
    source = load_source(resolve(cfg.data.path), resolve(cfg.data.outcomes))
    for fmt in FORMATS if args.format == "both" else (args.format,):
        export = write_export(source, args.stays, args.out, fmt, args.seed)
        print(f"{export.format}: {export.stays} stays ({export.deaths} deaths) in {export.data}, outcomes {export.outcomes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
