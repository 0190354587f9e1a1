"""What a hospital node is: its name, what it reads, what it declares, its policy, its
ledger store, and (only when a permitted request needs them) its stays.

A node is a real hospital when its node config names a ``hospital-dir`` (a folder made
by ``fedgru hospital init``: deployment), or a simulated one (``partition-id``, as
Flower's simulation sets it) that takes its share of the simulation's data. Either way
what it reads, what it declares and what it allows are its own: a deployed hospital's
come from its folder; a simulated hospital's from the simulation's config as it was
launched (the config bound to the ClientApp by ``fedgru simulate``, or Flower's run
config under ``flwr run``), never from a message. Loaded data is memoised per process.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import ConfigRecord, Context

from common.config import ExperimentConfig, config_from_run_config
from common.data.dataset import Dataset, load_dataset
from common.data.partition import HospitalSplit, make_partition
from common.definition import DEPLOYED_KEYS, SIMULATED_KEYS, DataDefinition, first_difference, reading_part
from common.messages import NodeMode, Split

from . import export as exports
from .folder import DeclaredCounts, HospitalFolder
from .ledger_store import ContextLedgerStore, FileLedgerStore
from .policy import Policy, PolicyRefusal

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
    export: str = ""  # the hospital's own ledger's label of the export these stays came from

    def split(self, which: Split) -> np.ndarray:
        return {Split.TRAIN: self.train, Split.VAL: self.val, Split.TEST: self.test}[which]


class Node:
    """One hospital node: who it is, what it reads, declares and allows, all without any
    patient data; its stays (:meth:`data`) only when a permitted request needs them.

    ``simulation``: the simulation's own config, when the ClientApp was built with it."""

    def __init__(self, context: Context, simulation: ExperimentConfig | None = None):
        self.context = context
        node_config = context.node_config
        self.folder: HospitalFolder | None = None
        self.simulation: ExperimentConfig | None = None
        if "hospital-dir" in node_config:
            self.mode = NodeMode.DEPLOYMENT
            self.folder = HospitalFolder(str(node_config["hospital-dir"]))
            self.name = self.folder.name
        elif "partition-id" in node_config:
            self.mode = NodeMode.SIMULATION
            self.simulation = simulation if simulation is not None else _launched_config(context)
            _, hospitals = _partitioned(self.simulation)
            pid = int(node_config["partition-id"])
            self.name = hospitals[pid].name if pid < len(hospitals) else UNASSIGNED
        else:
            raise NodeConfigError(
                "the SuperNode's --node-config needs hospital-dir (a folder made by `fedgru hospital init`)"
            )

    # -- what it reads and declares (no patient data) ------------------------------------
    @property
    def definition(self) -> DataDefinition:
        return self.folder.definition if self.folder else DataDefinition.of(self.simulation)

    def check_reads_as_defined(self, cfg: ExperimentConfig) -> None:
        """Refuse a config that would read other stays, values or labels than this
        hospital's own definition says, naming the first such key and nothing else."""
        if self.folder is not None:
            key = first_difference(reading_part(cfg.to_dict()), reading_part(self.definition.to_plain()), DEPLOYED_KEYS)
            if key is None and cfg.data.max_stays != 0:
                key = "data.max_stays"  # a deployed hospital reads its whole registered export
            where = "its own data definition (definition.yaml)"
        else:
            key = first_difference(cfg.to_dict(), self.simulation.to_dict(), SIMULATED_KEYS)
            where = "the simulation's own config"
        if key is not None:
            raise PolicyRefusal(key, f"differs from what this hospital reads: {where} decides it, not a message")

    @property
    def declared(self) -> DeclaredCounts:
        if self.folder is not None:
            return self.folder.declared
        return _simulated_counts(self.simulation.to_json(), self.name)

    @property
    def policy(self) -> Policy:
        if self.folder is not None:
            return self.folder.policy
        return Policy.for_simulation(self.simulation, self.name, self.declared.train)

    def signing_key(self):
        """A deployed hospital's own key, which signs its secure-aggregation round keys;
        None for a simulated one (the simulation's hospitals share one machine and no
        coordinator can stand between them)."""
        return self.folder.signing_key() if self.folder is not None else None

    @property
    def accountant(self) -> str:
        """The accountant the hospital's own ledger decides budgets with."""
        return "rdp" if self.folder is not None else self.simulation.privacy.accountant

    @property
    def device(self) -> str:
        return self.folder.settings.device if self.folder else self.simulation.training.device

    def store(self, policy: Policy) -> FileLedgerStore | ContextLedgerStore:
        if self.folder is not None:
            return FileLedgerStore(self.folder.ledger_file, self.folder.secret("ledger"))
        return ContextLedgerStore(self.context, self.name, policy.delta, self.simulation.privacy.accountant)

    # -- its stays ---------------------------------------------------------------------
    def data(self) -> HospitalData:
        if self.folder is not None:
            stays = exports.load(self.folder)
            return HospitalData(self.name, stays.dataset, stays.train, stays.val, stays.test, stays.export)
        if self.name == UNASSIGNED:
            raise NodeConfigError("this simulation node has no hospital assigned")
        ds, hospitals = _partitioned(self.simulation)
        h = next(h for h in hospitals if h.name == self.name)
        return HospitalData(self.name, ds, h.train, h.val, h.test,
                            exports.export_label(ds.fingerprint, self._export_key()))

    def _export_key(self) -> bytes:
        # A simulated hospital: a key of its own for the run, kept in its state.
        record = self.context.state.get(EXPORT_KEY)
        if record is None:
            record = self.context.state[EXPORT_KEY] = ConfigRecord({"key": secrets.token_bytes(32)})
        return bytes(record["key"])


_CACHE: dict[str, tuple[Dataset, list[HospitalSplit]]] = {}


def _launched_config(context: Context) -> ExperimentConfig:
    """A simulated hospital under ``flwr run``: the run config it was launched with."""
    return _config_of_run(json.dumps(dict(context.run_config), sort_keys=True, default=str))


@lru_cache(maxsize=8)
def _config_of_run(run_config_json: str) -> ExperimentConfig:
    return config_from_run_config(json.loads(run_config_json))


def _partitioned(cfg: ExperimentConfig) -> tuple[Dataset, list[HospitalSplit]]:
    """The simulation's data set and its simulated hospitals (depends on data settings only)."""
    d = cfg.to_dict()
    key = json.dumps([{k: d[k] for k in ("data", "task", "features", "split", "partition")}, d["run"]["seed"]],
                     sort_keys=True)
    if key not in _CACHE:
        while len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        ds = load_dataset(cfg)
        _CACHE[key] = (ds, make_partition(ds, cfg))
    return _CACHE[key]


@lru_cache(maxsize=256)
def _simulated_counts(cfg_json: str, name: str) -> DeclaredCounts:
    """A simulated hospital declares its share's split sizes: the simulation holds all the
    data on one machine, and its config, not a message, makes the shares."""
    _, hospitals = _partitioned(ExperimentConfig.from_json(cfg_json))
    h = next(h for h in hospitals if h.name == name)
    return DeclaredCounts(len(h.train), len(h.val), len(h.test))


def node_hospital_name(context: Context, simulation: ExperimentConfig | None = None) -> str:
    """The hospital a node is (used by simulation fault drills)."""
    return Node(context, simulation).name
