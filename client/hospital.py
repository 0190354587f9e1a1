"""What a hospital node is: its name, its policy, its data split, its ledger store.

A node is a real hospital when its node config names a ``hospital-dir`` (a folder made
by ``fedgru hospital init``: deployment), or a simulated one (``partition-id``, as
Flower's simulation sets it) that takes its share of the configured data set. Loaded
data is memoised per process: a simulation worker serves several simulated hospitals,
and a hospital's long-running app serves every round, without re-reading the files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from common.config import ExperimentConfig
from common.data.dataset import Dataset, load_dataset
from common.data.partition import HospitalSplit, make_partition
from common.messages import NodeMode, Split

from .folder import HospitalFolder, split_of
from .ledger_store import ContextLedgerStore, FileLedgerStore
from .policy import Policy

UNASSIGNED = ""
EXPORT_KEY = "fedgru-export-key"  # a simulated hospital's export-label key, in context.state

log = logging.getLogger("fedgru.hospital")


class NodeConfigError(ValueError):
    """The SuperNode was started without what a hospital node needs."""


@dataclass
class HospitalData:
    name: str
    dataset: Dataset  # the hospital's own stays (simulation: the whole set, indexed)
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    export: str = ""  # the ledger's label of the export these stays came from (export_label)

    def split(self, which: Split) -> np.ndarray:
        return {Split.TRAIN: self.train, Split.VAL: self.val, Split.TEST: self.test}[which]


def export_label(fingerprint: str, key: bytes) -> str:
    """How the ledger names a data export: HMAC-SHA256 of the export's sha256 under a key
    only the hospital holds. The ledger travels with every reply, so an unkeyed hash
    would let the coordinator confirm a guess of the exact files by hashing them; the
    keyed label still tells the hospital's exports apart, and the hospital (with its
    key) can recompute which export a label names."""
    return hmac.new(key, fingerprint.encode(), hashlib.sha256).hexdigest()


class Node:
    """One hospital node: who it is and what it allows, read without any patient data;
    its data (:meth:`data`) only when a permitted request needs it."""

    def __init__(self, cfg: ExperimentConfig, context: Context):
        self.cfg = cfg
        self.context = context
        node_config = context.node_config
        self.folder: HospitalFolder | None = None
        if "hospital-dir" in node_config:
            self.mode = NodeMode.DEPLOYMENT
            self.folder = _folder(str(node_config["hospital-dir"]))
            self.name = self.folder.name
        elif "partition-id" in node_config:
            self.mode = NodeMode.SIMULATION
            _, hospitals = _partitioned(cfg)
            pid = int(node_config["partition-id"])
            self.name = hospitals[pid].name if pid < len(hospitals) else UNASSIGNED
        else:
            raise NodeConfigError(
                "the SuperNode's --node-config needs hospital-dir (a folder made by `fedgru hospital init`)"
            )

    @property
    def device(self) -> str:
        return self.folder.settings.device if self.folder else self.cfg.training.device

    def data(self) -> HospitalData:
        if self.folder is not None:
            data = _deployed_data(self.cfg, self.folder)
        elif self.name == UNASSIGNED:
            raise NodeConfigError("this simulation node has no hospital assigned")
        else:
            ds, hospitals = _partitioned(self.cfg)
            h = next(h for h in hospitals if h.name == self.name)
            data = HospitalData(self.name, ds, h.train, h.val, h.test)
        data.export = export_label(data.dataset.fingerprint, self._export_key())
        return data

    def _export_key(self) -> bytes:
        if self.folder is not None:
            return self.folder.secret("export")
        # A simulated hospital: a key of its own for the run, kept in its state.
        record = self.context.state.get(EXPORT_KEY)
        if record is None:
            record = self.context.state[EXPORT_KEY] = ConfigRecord({"key": secrets.token_bytes(32)})
        return bytes(record["key"])

    def policy(self, train_examples: int) -> Policy:
        if self.folder is not None:
            return self.folder.policy
        return Policy.for_simulation(self.cfg, self.name, train_examples)

    def store(self, policy: Policy) -> FileLedgerStore | ContextLedgerStore:
        if self.folder is not None:
            return FileLedgerStore(self.folder.ledger_file, self.folder.secret("ledger"))
        return ContextLedgerStore(self.context, self.name, policy.delta, self.cfg.privacy.accountant)


_FOLDERS: dict[str, HospitalFolder] = {}
_CACHE: dict[str, tuple[Dataset, list[HospitalSplit]]] = {}


def _folder(path: str) -> HospitalFolder:
    if path not in _FOLDERS:
        _FOLDERS[path] = HospitalFolder(path)
    return _FOLDERS[path]


def _key(cfg: ExperimentConfig, sections: tuple[str, ...], extra: tuple = ()) -> str:
    d = cfg.to_dict()
    return json.dumps([{k: d[k] for k in sections}, d["run"]["seed"], list(extra)], sort_keys=True)


def _remember(key: str, value: tuple) -> None:
    while len(_CACHE) >= 4:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = value


def _deployed_data(cfg: ExperimentConfig, folder: HospitalFolder) -> HospitalData:
    """The hospital's own stays, split by its secret (never by the run's config)."""
    src = folder.settings.data
    paths = (folder.resolve(src.path), folder.resolve(src.outcomes))
    key = _key(cfg, ("task", "features"), extra=(str(folder.path), src.format, *map(_signature, paths)))
    if key not in _CACHE:
        ds = load_dataset(
            cfg, data_path=paths[0], outcomes_path=paths[1], data_format=src.format,
            id_column=src.id_column or None, label_column=src.label_column or None,
        )
        for note in ds.summary.notes() if ds.summary else []:
            log.warning("%s data: %s", folder.name, note)  # the hospital's own log only
        groups = np.array([s.value for s in split_of(list(ds.stay_ids), folder.secret("split"), folder.policy.split)])
        parts = [np.flatnonzero(groups == s.value) for s in (Split.TRAIN, Split.VAL, Split.TEST)]
        _remember(key, (ds, [HospitalSplit(folder.name, *parts)]))
    ds, (h,) = _CACHE[key]
    return HospitalData(folder.name, ds, h.train, h.val, h.test)


def _signature(path: Path) -> str:
    """Which export a path holds now, cheaply (names, sizes, modification times): a new
    export is read again, the same one is not."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return f"{path}:" + ";".join(f"{p.name},{p.stat().st_size},{p.stat().st_mtime_ns}" for p in files if p.exists())


def _partitioned(cfg: ExperimentConfig) -> tuple[Dataset, list[HospitalSplit]]:
    """The full data set and its simulated hospitals (depends on data settings only)."""
    key = _key(cfg, ("data", "task", "features", "split", "partition"))
    if key not in _CACHE:
        ds = load_dataset(cfg)
        _remember(key, (ds, make_partition(ds, cfg)))
    return _CACHE[key]


def node_hospital_name(cfg: ExperimentConfig, context: Context) -> str:
    """The hospital a node is (used by simulation fault drills)."""
    return Node(cfg, context).name
