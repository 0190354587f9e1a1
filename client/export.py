"""A hospital's registered export: its stays, read by its own definition into its folder.

``fedgru hospital init`` and ``fedgru hospital data`` read the export once (it must load;
an error names the file, line and column), keep the preprocessed tensors inside the
hospital's folder (``cache/``, mode 0700), write its data definition
(``definition.yaml``) and, on the first registration or when asked, the counts it
declares (``hospital.yaml``). Every message then opens those tensors memory-mapped.
Nothing a message says changes which stays, values or labels are read: the files, their
format and columns, the task and the features are all the hospital's.

An export changed on disk since it was registered (new files, the same path) is not read
while messages are served: the registered tensors go on serving until the staff
register it again; the declared counts stay until they recount.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from common.data.dataset import Dataset, read_export
from common.data.store import load_dataset_folder, read_meta, save_dataset
from common.definition import DataDefinition
from common.messages import Split

from .folder import DataSource, DeclaredCounts, FolderError, HospitalFolder, split_of, write_definition, write_settings

log = logging.getLogger("fedgru.hospital")

TENSORS_VERSION = 1  # bump when the folder's tensors change meaning (with PREPROCESS_VERSION, below)


@dataclass
class Registration:
    """What registering an export found (for the staff's terminal; nothing leaves)."""

    stays: int
    counted: DeclaredCounts  # the real split sizes now
    declared: DeclaredCounts  # what the hospital declares (kept unless recounted)
    notes: list[str]


def export_label(fingerprint: str, key: bytes) -> str:
    """How the hospital's own ledger names a data export: HMAC-SHA256 of the export's
    sha256 under a key only the hospital holds (its copy sent to the coordinator leaves
    the label out: it changes with every patient added or removed)."""
    return hmac.new(key, fingerprint.encode(), hashlib.sha256).hexdigest()


def signature(*paths: Path) -> str:
    """Which export the paths hold now, cheaply (names, sizes, modification times)."""
    parts = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        parts.append(f"{path}:" + ";".join(f"{p.name},{p.stat().st_size},{p.stat().st_mtime_ns}" for p in files if p.exists()))
    return "|".join(parts)


def _definition_key(definition: DataDefinition, source: DataSource) -> str:
    from common.data.dataset import PREPROCESS_VERSION

    text = (f"{TENSORS_VERSION}/{PREPROCESS_VERSION}/{definition.tensors_json()}/{source.format}/{source.id_column}/"
            f"{source.label_column}")
    return hashlib.sha256(text.encode()).hexdigest()


def _paths(folder: HospitalFolder, source: DataSource) -> tuple[Path, Path]:
    return folder.resolve(source.path), folder.resolve(source.outcomes)


def read_source_export(folder: HospitalFolder, source: DataSource, definition: DataDefinition) -> Dataset:
    data, outcomes = _paths(folder, source)
    task = replace(definition.task, label_column=source.label_column or definition.task.label_column)
    return read_export(data, outcomes, source.format, source.id_column, task, definition.features)


def _store(folder: HospitalFolder, source: DataSource, definition: DataDefinition, ds: Dataset) -> None:
    meta = {"signature": signature(*_paths(folder, source)), "definition": _definition_key(definition, source),
            "export": export_label(ds.fingerprint, folder.secret("export"))}
    save_dataset(ds, folder.cache_path, meta)


def split_sizes(folder: HospitalFolder, stay_ids) -> DeclaredCounts:
    groups = split_of([str(s) for s in stay_ids], folder.secret("split"), folder.policy.split)
    return DeclaredCounts(*(sum(g == s for g in groups) for s in (Split.TRAIN, Split.VAL, Split.TEST)))


def register(folder: HospitalFolder, source: DataSource, definition: DataDefinition, recount: bool = False,
             ds: Dataset | None = None) -> Registration:
    """Read ``source`` by ``definition`` (the whole export must load; ``ds``: already
    read), keep its tensors in the folder, and make both the folder's; the declared
    counts are set when there are none yet or ``recount`` asks."""
    ds = ds if ds is not None else read_source_export(folder, source, definition)
    counted = split_sizes(folder, ds.stay_ids)
    if counted.train < 1:
        raise FolderError(f"{folder.path}: the export has no stay in the training split; a hospital needs at least one")
    settings = folder.settings
    declared = counted if recount or settings.declared is None else settings.declared
    _store(folder, source, definition, ds)
    write_definition(folder.path, definition)
    write_settings(folder.path, replace(settings, data=source, declared=declared))
    return Registration(len(ds), counted, declared, ds.summary.notes() if ds.summary else [])


@dataclass
class Stays:
    """A hospital's stays and their splits, as one message reads them."""

    dataset: Dataset
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    export: str  # the hospital's keyed label of the export (its own ledger keeps it)

    def split(self, which: Split) -> np.ndarray:
        return {Split.TRAIN: self.train, Split.VAL: self.val, Split.TEST: self.test}[which]


def load(folder: HospitalFolder) -> Stays:
    """The registered export's stays, from the folder's tensors (memory-mapped). Nothing
    is parsed while a message is served: a new export, or one whose files changed, is
    read only when the staff register it (``fedgru hospital data``), so whether a message
    is answered never depends on what one new stay's file holds. Until then the
    registered tensors keep serving, and the hospital's log says the export changed."""
    source, definition = folder.settings.data, folder.definition
    meta = read_meta(folder.cache_path)
    if meta is None or meta.get("definition") != _definition_key(definition, source):
        raise FolderError(f"{folder.path} holds no tensors of its registered export and definition: run "
                          f"`fedgru hospital data --hospital-dir {folder.path}`")
    if meta.get("signature") != signature(*_paths(folder, source)):
        log.warning("%s: the export on disk changed since it was registered; serving the registered stays until "
                    "`fedgru hospital data` registers it", folder.name)
    ds = load_dataset_folder(folder.cache_path)
    groups = np.array([s.value for s in split_of(list(ds.stay_ids.astype(str)), folder.secret("split"), folder.policy.split)])
    parts = [np.flatnonzero(groups == s.value) for s in (Split.TRAIN, Split.VAL, Split.TEST)]
    return Stays(ds, *parts, export=str(meta.get("export", "")))
