"""What a hospital holds: its data split, and the state it keeps across rounds.

A node is a real hospital when its node config names a ``data-path`` (deployment), or
a simulated one (node config ``partition-id``, as Flower's simulation sets it) that
takes its share of the configured data set. Loaded data is memoised per process: a
simulation worker serves several simulated hospitals and must not re-read the files
for each message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from common.config import ExperimentConfig
from common.data.dataset import Dataset, load_dataset
from common.data.partition import HospitalSplit, make_partition, split_hospital
from common.messages import Split

UNASSIGNED = ""


@dataclass
class HospitalData:
    name: str
    dataset: Dataset  # the hospital's own stays (simulation: the whole set, indexed)
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def split(self, which: Split) -> np.ndarray:
        return {Split.TRAIN: self.train, Split.VAL: self.val, Split.TEST: self.test}[which]


def node_hospital_name(cfg: ExperimentConfig, node_config: dict) -> str:
    """The hospital this node is, or ``UNASSIGNED`` for a spare simulation node."""
    if "data-path" in node_config:
        return str(node_config.get("hospital") or "hospital")
    if "partition-id" in node_config:
        _, hospitals = _partitioned(cfg)
        pid = int(node_config["partition-id"])
        return hospitals[pid].name if pid < len(hospitals) else UNASSIGNED
    raise ValueError(
        "node config needs 'data-path' (and 'hospital') for a real hospital, "
        "or 'partition-id' for a simulated one"
    )


def load_hospital(cfg: ExperimentConfig, node_config: dict) -> HospitalData:
    name = node_hospital_name(cfg, node_config)
    if "data-path" in node_config:
        paths = (
            str(node_config["data-path"]),
            str(node_config.get("outcomes-path", "")) or None,
            str(node_config.get("data-format", "")) or None,
        )
        key = _key(cfg, ("data", "task", "features", "split"), extra=(name, *map(str, paths)))
        if key not in _CACHE:
            ds = load_dataset(cfg, data_path=paths[0], outcomes_path=paths[1], data_format=paths[2])
            h = split_hospital(name, np.arange(len(ds)), ds.y, cfg)
            _remember(key, (ds, [h]))
        ds, (h,) = _CACHE[key]
        return HospitalData(name, ds, h.train, h.val, h.test)
    if name == UNASSIGNED:
        raise ValueError("this simulation node has no hospital assigned")
    ds, hospitals = _partitioned(cfg)
    h = next(h for h in hospitals if h.name == name)
    return HospitalData(name, ds, h.train, h.val, h.test)


_CACHE: dict[str, tuple[Dataset, list[HospitalSplit]]] = {}


def _key(cfg: ExperimentConfig, sections: tuple[str, ...], extra: tuple = ()) -> str:
    d = cfg.to_dict()
    return json.dumps([{k: d[k] for k in sections}, d["run"]["seed"], list(extra)], sort_keys=True)


def _remember(key: str, value: tuple) -> None:
    while len(_CACHE) >= 4:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = value


def _partitioned(cfg: ExperimentConfig) -> tuple[Dataset, list[HospitalSplit]]:
    """The full data set and its simulated hospitals (depends on data settings only)."""
    key = _key(cfg, ("data", "task", "features", "split", "partition"))
    if key not in _CACHE:
        ds = load_dataset(cfg)
        _remember(key, (ds, make_partition(ds, cfg)))
    return _CACHE[key]


@dataclass
class LocalState:
    """Cross-round state a hospital keeps for one run (in Flower's context.state).

    ``noise_multiplier`` is fixed before the first round (calibrated once for the whole
    planned run when the config gives a target epsilon). The privacy history itself is
    the ledger's (``client.ledger_store``).
    """

    noise_multiplier: float = 0.0
    optimizer: bytes = b""
