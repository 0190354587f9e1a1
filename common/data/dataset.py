"""Read, label and preprocess a data source into one cached :class:`Dataset`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import DataSection, ExperimentConfig, FeatureSection, TaskSection
from ..files import atomic_open, to_json
from ..paths import cache_dir, resolve
from ..typed import build
from .long_csv import read_long_csv, read_outcomes
from .physionet import read_physionet
from .preprocess import PreprocessSummary, to_tensors
from .records import DataError, ReadSummary, natural_key

# Bump when preprocessing output changes, so stale caches are not reused.
PREPROCESS_VERSION = 6


@dataclass
class DataSummary:
    """What reading and preprocessing one data source saw and set aside (counts only)."""

    data: str
    outcomes: str | None
    stays_read: int
    stays_used: int
    stays_without_outcome: int
    stays_with_missing_label: int
    outcomes_without_stay: int
    class_counts: dict[str, int]
    read: ReadSummary
    preprocess: PreprocessSummary

    def notes(self) -> list[str]:
        """What was set aside, in sentences (counts and names only, never a value)."""
        out = []
        if self.stays_without_outcome:
            out.append(f"{self.stays_without_outcome} of {self.stays_read} stays have no outcome in {self.outcomes} "
                       "and were left out")
        if self.stays_with_missing_label:
            out.append(f"{self.stays_with_missing_label} stays have a missing or non-finite label and were left out")
        if self.outcomes_without_stay:
            out.append(f"{self.outcomes_without_stay} outcome rows name no stay of {self.data}")
        for what, counts in (
            ("values written as nan or inf were set aside", self.read.non_finite),
            ("values outside the plausibility ranges became missing", self.preprocess.out_of_range),
        ):
            if sum(counts.values()):
                by = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                out.append(f"{sum(counts.values())} {what} ({by})")
        if self.preprocess.after_window:
            out.append(f"{self.preprocess.after_window} observations after the window were not used")
        return out


@dataclass
class Dataset:
    """Preprocessed stays of one data source (all hospitals, or one hospital)."""

    stay_ids: np.ndarray  # (N,) str
    X: np.ndarray  # (N, T, C) float32 time series channels
    S: np.ndarray  # (N, static_width) float32 descriptors
    y: np.ndarray  # (N,) int64 class index
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # raw descriptor values (NaN: unknown)
    summary: DataSummary | None = None
    fingerprint: str = ""  # sha256 of the source files' bytes

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        index = np.asarray(index, dtype=np.int64)
        return Dataset(
            stay_ids=self.stay_ids[index],
            X=self.X[index],
            S=self.S[index],
            y=self.y[index],
            groups={k: v[index] for k, v in self.groups.items()},
            summary=self.summary,
            fingerprint=self.fingerprint,
        )


def fingerprint_files(*paths: Path) -> str:
    """sha256 over the bytes (and relative names) of the given files or folders."""
    h = hashlib.sha256()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def label_classes(values: np.ndarray, task: TaskSection, source: str, ids: list[str], label_column: str = "") -> np.ndarray:
    """Map raw outcome values to class indices (bins, or the value itself). ``label_column``:
    the column the file named them in (a long export's 'label'), for the error."""
    if task.bins:
        return np.searchsorted(np.asarray(task.bins, dtype=np.float64), values, side="left").astype(np.int64)
    classes = np.rint(values).astype(np.int64)
    fractional = np.abs(values - classes) > 1e-9
    bad = fractional | (classes < 0) | (classes >= len(task.classes))
    if bad.any():
        first = ids[int(np.flatnonzero(bad)[0])]
        meaning = ", ".join(f"{k} = {name}" for k, name in enumerate(task.classes))
        raise DataError(
            source,
            f"{int(bad.sum())} label(s) are not a class index ({meaning}; first: stay {first})"
            + ("; a continuous outcome needs task.bins in the experiment config" if fractional.any() else ""),
            column=label_column or task.label_column,
        )
    return classes


def read_source(
    data_path: Path, outcomes_path: Path | None, data: DataSection, features: FeatureSection, task: TaskSection
) -> Dataset:
    """Read one data source without caching. Without outcomes every stay is kept and
    labelled -1 (for scoring new patients)."""
    variables = [v.name for v in features.variables]
    static_names = [s.name for s in features.static]
    read_summary = ReadSummary()
    if data.format == "physionet2012":
        stays = read_physionet(data_path, variables, read_summary)
    elif data.format == "long_csv":
        stays = read_long_csv(data_path, variables, static_names, read_summary)
    else:  # pragma: no cover - config validation forbids it
        raise DataError(str(data_path), f"unknown data format {data.format!r}")
    stays.sort(key=lambda s: natural_key(s.stay_id))  # folder and archive give one order

    no_outcome = missing_label = outcomes_without_stay = 0
    if outcomes_path is None:
        labelled, y = stays, np.full(len(stays), -1, dtype=np.int64)
        if data.max_stays > 0:
            labelled, y = labelled[: data.max_stays], y[: data.max_stays]
    else:
        outcomes = read_outcomes(outcomes_path, data.id_column, task.label_column)
        labelled, raw_labels = [], []
        missing_codes = set(task.missing_label)
        for stay in stays:
            value = outcomes.get(stay.stay_id)
            if value is None:
                no_outcome += 1
                continue
            if value in missing_codes or not np.isfinite(value):
                missing_label += 1
                continue
            labelled.append(stay)
            raw_labels.append(value)
        if data.max_stays > 0:
            labelled, raw_labels = labelled[: data.max_stays], raw_labels[: data.max_stays]
        if not labelled:
            raise DataError(
                str(outcomes_path),
                f"no stay of {data_path} has a usable '{task.label_column}' label "
                f"(check data.id_column='{data.id_column}' and the stay ids)",
            )
        ids = [s.stay_id for s in labelled]
        y = label_classes(np.asarray(raw_labels, dtype=np.float64), task, str(outcomes_path), ids,
                          getattr(outcomes, "label_column", ""))
        known = {s.stay_id for s in stays}
        outcomes_without_stay = sum(1 for k in outcomes if k not in known)
    pre = PreprocessSummary()
    X, S = to_tensors(labelled, features, pre)
    groups = {}
    for spec in features.static:  # raw descriptor values, for partitions and subgroups (NaN: unknown)
        groups[spec.name] = np.array([s.static.get(spec.name, np.nan) for s in labelled], dtype=np.float64)
    summary = DataSummary(
        data=str(data_path),
        outcomes=str(outcomes_path) if outcomes_path is not None else None,
        stays_read=len(stays),
        stays_used=len(labelled),
        stays_without_outcome=no_outcome,
        stays_with_missing_label=missing_label,
        outcomes_without_stay=outcomes_without_stay,
        class_counts={task.classes[k]: int((y == k).sum()) for k in range(len(task.classes))},
        read=read_summary,
        preprocess=pre,
    )
    return Dataset(stay_ids=np.array([s.stay_id for s in labelled]), X=X, S=S, y=y, groups=groups, summary=summary)


def read_export(
    data_path: Path, outcomes_path: Path, data_format: str, id_column: str, task: TaskSection, features: FeatureSection
) -> Dataset:
    """One export as a hospital defines it (its own files, format and columns; its own task
    and features), read whole and never cached here: a hospital keeps its tensors in its
    own folder (``client.export``)."""
    for p, what in ((data_path, "data"), (outcomes_path, "outcomes")):
        if not p.exists():
            raise DataError(str(p), f"{what} not found: check 'data' in the hospital's hospital.yaml")
    data = DataSection(format=data_format, path=str(data_path), outcomes=str(outcomes_path), id_column=id_column,
                       max_stays=0, cache=False)
    ds = read_source(data_path, outcomes_path, data, features, task)
    ds.fingerprint = fingerprint_files(data_path, outcomes_path)
    return ds


def load_dataset(
    cfg: ExperimentConfig,
    data_path: str | Path | None = None,
    outcomes_path: str | Path | None = None,
    data_format: str | None = None,
    id_column: str | None = None,
    require_labels: bool = True,
    label_column: str | None = None,
) -> Dataset:
    """Load (from cache when possible) the configured data source, or the one given.

    ``require_labels=False`` with no ``outcomes_path`` reads unlabelled stays;
    ``label_column`` names the outcomes column that holds the task's label when an export
    calls it something else.
    """
    changes = {}
    if data_format is not None:
        changes["format"] = data_format
    if id_column is not None:
        changes["id_column"] = id_column
    data = replace(cfg.data, **changes)
    if label_column:
        cfg = replace(cfg, task=replace(cfg.task, label_column=label_column))
    dpath = resolve(data_path if data_path is not None else data.path)
    if outcomes_path is None and require_labels:
        outcomes_path = data.outcomes
    opath = resolve(outcomes_path) if outcomes_path is not None else None
    given = {"data": data_path is not None, "outcomes": outcomes_path is not None and outcomes_path != data.outcomes}
    for p, what in ((dpath, "data"), (opath, "outcomes")):
        if p is not None and not p.exists():
            key = f"data.{'path' if what == 'data' else 'outcomes'}"
            raise DataError(str(p), f"{what} not found" if given[what] else (
                f"{what} not found. Set {key} in the config (or --set {key}=PATH on the command line) to where "
                "PhysioNet's files or your export live"))
    fingerprint = fingerprint_files(*(p for p in (dpath, opath) if p is not None))
    if not data.cache:
        ds = read_source(dpath, opath, data, cfg.features, cfg.task)
        ds.fingerprint = fingerprint
        return ds
    spec = json.dumps(
        {
            "v": PREPROCESS_VERSION,
            "fingerprint": fingerprint,
            "labelled": opath is not None,
            "data": {k: v for k, v in asdict(data).items() if k not in ("path", "outcomes", "cache")},
            "features": asdict(cfg.features),
            "task": asdict(cfg.task),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(spec.encode()).hexdigest()[:24]
    path = cache_dir() / f"dataset-{key}.npz"
    if path.is_file():
        try:
            ds = _load_npz(path, fingerprint)
        except (OSError, ValueError, KeyError):  # TypedDataError is a ValueError
            pass  # a damaged cache is rebuilt below
        else:
            # the same files read from another path (another checkout) share the entry: the
            # summary names the path this run read, not the one that filled the cache
            if ds.summary is not None:
                ds.summary.data, ds.summary.outcomes = str(dpath), (str(opath) if opath is not None else None)
            return ds
    ds = read_source(dpath, opath, data, cfg.features, cfg.task)
    ds.fingerprint = fingerprint
    _save_npz(ds, path)
    return ds


def _save_npz(ds: Dataset, path: Path) -> None:
    arrays = {
        "stay_ids": ds.stay_ids.astype(str),
        "X": ds.X,
        "S": ds.S,
        "y": ds.y,
        "summary": np.array(to_json(ds.summary, indent=None)),
    }
    for k, v in ds.groups.items():
        arrays[f"group:{k}"] = v
    with atomic_open(path) as handle:  # concurrent simulated hospitals read this cache
        np.savez(handle, **arrays)


def _load_npz(path: Path, fingerprint: str) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        groups = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("group:")}
        return Dataset(
            stay_ids=z["stay_ids"],
            X=z["X"],
            S=z["S"],
            y=z["y"],
            groups=groups,
            summary=build(DataSummary, json.loads(str(z["summary"])), str(path)),
            fingerprint=fingerprint,
        )
