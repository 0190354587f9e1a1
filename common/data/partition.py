"""Simulation partitions (which stays each simulated hospital holds) and the seeded,
stratified train/validation/test split inside each hospital.

Partitioners live in a registry, so a new scheme is a function and a decorator:

>>> @register_partitioner("by_age")
... def _by_age(ds, section, seed): ...
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..config import ExperimentConfig, PartitionSection, SplitSection
from .dataset import Dataset

Partitioner = Callable[[Dataset, PartitionSection, int, ExperimentConfig], list[tuple[str, np.ndarray]]]
PARTITIONERS: dict[str, Partitioner] = {}

# PhysioNet 2012 ICUType codes.
ICU_TYPE_NAMES = {"1": "coronary_care", "2": "cardiac_surgery", "3": "medical", "4": "surgical"}


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    def decorator(fn: Partitioner) -> Partitioner:
        PARTITIONERS[name] = fn
        return fn

    return decorator


@dataclass
class HospitalSplit:
    """One hospital's stays, as row indices into the full dataset."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def all(self) -> np.ndarray:
        return np.sort(np.concatenate([self.train, self.val, self.test]))


def _rng(*parts: int | str) -> np.random.Generator:
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return np.random.default_rng(np.random.SeedSequence(words))


def _label_key(value: float) -> str:
    return f"{value:g}"


@register_partitioner("column")
def partition_by_column(ds: Dataset, section: PartitionSection, seed: int, cfg: ExperimentConfig):
    spec = next((s for s in cfg.features.static if s.name == section.column), None)
    if spec is None or spec.kind != "categorical" or section.column not in ds.groups:
        raise ValueError(
            f"partition.column '{section.column}' is not a categorical entry of features.static"
        )
    values = ds.groups[section.column]
    out = []
    for category in spec.categories:
        key = _label_key(category)
        name = section.names.get(key, f"{section.column}_{key}")
        out.append((name, np.flatnonzero(values == category)))
    return out


@register_partitioner("icu_type")
def partition_by_icu_type(ds: Dataset, section: PartitionSection, seed: int, cfg: ExperimentConfig):
    names = {**ICU_TYPE_NAMES, **section.names}
    as_column = replace(section, scheme="column", column="ICUType", names=names)
    return partition_by_column(ds, as_column, seed, cfg)


@register_partitioner("iid")
def partition_iid(ds: Dataset, section: PartitionSection, seed: int, cfg: ExperimentConfig):
    rng = _rng(seed, "iid")
    buckets: list[list[int]] = [[] for _ in range(section.num_hospitals)]
    offset = 0
    for k in np.unique(ds.y):
        members = rng.permutation(np.flatnonzero(ds.y == k))
        for j, idx in enumerate(members):  # deal like cards: sizes differ by at most 1
            buckets[(offset + j) % section.num_hospitals].append(int(idx))
        offset += len(members)
    return [(f"hospital_{i}", np.sort(np.array(b, dtype=np.int64))) for i, b in enumerate(buckets)]


@register_partitioner("dirichlet")
def partition_dirichlet(ds: Dataset, section: PartitionSection, seed: int, cfg: ExperimentConfig):
    """Label skew (Hsu et al. 2019, arXiv:1909.06335): class k's stays are shared out in
    proportions drawn from Dirichlet(alpha). So that no hospital is left empty, each is
    first dealt a few stays at random (10, or fewer when there are many hospitals: at
    most half of all stays are dealt); the skew comes from the rest."""
    rng = _rng(seed, "dirichlet")
    n = section.num_hospitals
    if len(ds) < n:
        raise ValueError(f"dirichlet partition: {len(ds)} stays cannot make {n} hospitals")
    dealt_each = max(1, min(10, len(ds) // (2 * n)))
    order = rng.permutation(len(ds))
    buckets: list[list[int]] = [list(map(int, order[i * dealt_each : (i + 1) * dealt_each])) for i in range(n)]
    rest = order[n * dealt_each :]
    for k in np.unique(ds.y):
        members = rest[ds.y[rest] == k]
        shares = rng.dirichlet(np.full(n, section.alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for i, part in enumerate(np.split(members, cuts)):
            buckets[i].extend(int(x) for x in part)
    return [(f"hospital_{i}", np.sort(np.array(b, dtype=np.int64))) for i, b in enumerate(buckets)]


def stratified_split(indices: np.ndarray, y: np.ndarray, split: SplitSection, rng: np.random.Generator):
    """Split ``indices`` into train/val/test with each class in the configured shares."""
    train, val, test = [], [], []
    for k in np.unique(y[indices]):
        members = rng.permutation(indices[y[indices] == k])
        n = len(members)
        n_val = int(round(n * split.val))
        n_test = int(round(n * split.test))
        n_train = max(n - n_val - n_test, 0)
        train.append(members[:n_train])
        val.append(members[n_train : n_train + n_val])
        test.append(members[n_train + n_val :])
    cat = lambda parts: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(val), cat(test)


def make_partition(ds: Dataset, cfg: ExperimentConfig) -> list[HospitalSplit]:
    """The simulated hospitals with their seeded, stratified splits."""
    scheme = cfg.partition.scheme
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(sorted(PARTITIONERS))}")
    parts = PARTITIONERS[scheme](ds, cfg.partition, cfg.run.seed, cfg)
    return [split_hospital(name, idx, ds.y, cfg) for name, idx in parts]


def split_hospital(name: str, indices: np.ndarray, y: np.ndarray, cfg: ExperimentConfig) -> HospitalSplit:
    """A hospital's own split; the seed depends on the hospital's name only (never on
    the fold, so the folds of one seed partition the hospital's stays)."""
    rng = _rng(cfg.run.seed, cfg.split.seed, "split", name)
    indices = np.asarray(indices, dtype=np.int64)
    if cfg.split.folds:
        test = fold_of(indices, y, cfg.split.folds, cfg.split.fold, rng)
        rest = np.setdiff1d(indices, test)
        val_share = cfg.split.val / (cfg.split.train + cfg.split.val)
        within = replace(cfg.split, train=1 - val_share, val=val_share, test=0.0)
        train, val, _ = stratified_split(rest, y, within, _rng(cfg.run.seed, cfg.split.seed, "fold", cfg.split.fold, name))
    else:
        train, val, test = stratified_split(indices, y, cfg.split, rng)
    train = training_subsample(train, y, cfg.split.train_fraction, _rng(cfg.run.seed, cfg.split.seed, "subsample", name))
    return HospitalSplit(name=name, train=train, val=val, test=test)


def training_subsample(train: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``fraction`` of each class of ``train`` (at least one stay of a class that has any).

    Each class is put in one seeded order and its first stays are kept, so with the same
    seed a smaller fraction is a subset of a larger one: a curve over fractions adds stays
    to the same hospitals instead of drawing new ones."""
    if fraction >= 1:
        return train
    kept = []
    for k in np.unique(y[train]):
        members = rng.permutation(train[y[train] == k])
        kept.append(members[: max(1, int(round(len(members) * fraction)))])
    return np.sort(np.concatenate(kept)).astype(np.int64) if kept else train


def fold_of(indices: np.ndarray, y: np.ndarray, folds: int, fold: int, rng: np.random.Generator) -> np.ndarray:
    """Fold ``fold`` of ``folds`` folds stratified by label: each class's stays are
    shuffled once and dealt round-robin, so the folds are disjoint and cover everyone."""
    chosen = []
    for k in np.unique(y[indices]):
        members = rng.permutation(indices[y[indices] == k])
        chosen.append(members[fold::folds])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


@dataclass
class HospitalRow:
    """One simulated hospital: stays, per-class counts and split sizes (no patient data)."""

    hospital: str
    stays: int
    classes: dict[str, int]  # class name -> stays
    train: int
    val: int
    test: int

    def cells(self) -> list[str | int]:
        return [self.hospital, self.stays, *self.classes.values(), self.train, self.val, self.test]


def partition_table(ds: Dataset, hospitals: list[HospitalSplit], classes: list[str]) -> list[HospitalRow]:
    """One row per hospital, for printing and for the run folder."""
    return [
        HospitalRow(
            h.name, int(len(h.all)), {c: int((ds.y[h.all] == k).sum()) for k, c in enumerate(classes)},
            int(len(h.train)), int(len(h.val)), int(len(h.test)),
        )
        for h in hospitals
    ]


def format_table(rows: list[HospitalRow], max_rows: int = 12) -> str:
    """The hospitals table; past ``max_rows`` hospitals, the first ones, a count of the
    rest, and the totals (the run folder's partition.json keeps every row)."""
    if not rows:
        return "(no hospitals)"
    header = ["hospital", "stays", *rows[0].classes, "train", "val", "test"]
    body = [r.cells() for r in rows]
    total = ["total", *(sum(r[i] for r in body) for i in range(1, len(header)))]
    if len(body) > max_rows:
        shown = max_rows - 2
        body = body[:shown] + [[f"... {len(body) - shown} more", *([""] * (len(header) - 1))]]
    body.append(total)
    width = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, width)))
        for row in [header, *body]
    )
