"""Checkpoints: everything a restarted coordinator needs to continue a run.

A :class:`RunSnapshot` is taken after every round and written atomically to
``<run>/checkpoint.pt``. This module only saves and restores snapshots; what goes into
one is the coordinator's business. The file loads with ``torch.load(weights_only=True)``:
tensors for the weights and strategy state, JSON text for everything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import atomic_torch_save

from .records import HospitalStatus, RoundRecord, from_plain, to_plain

CHECKPOINT_FORMAT = "fedgru-checkpoint/2"


@dataclass
class RunSnapshot:
    run_id: str
    round: int  # the last round completed
    config_json: str  # the whole ExperimentConfig: a resumed run is the same run
    arrays: dict[str, np.ndarray]  # the global model
    strategy_state: dict[str, dict[str, np.ndarray]]  # e.g. FedAdam's moments
    hospital_dp_state: dict[str, Any] | None  # Flower's hospital-level accountant, when on
    hospitals: list[HospitalStatus]
    rounds: list[RoundRecord]


def save_checkpoint(snapshot: RunSnapshot, path: Path) -> None:
    tensors = lambda d: {k: torch.as_tensor(np.asarray(v)).clone() for k, v in d.items()}  # noqa: E731
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "run_id": snapshot.run_id,
            "round": snapshot.round,
            "config": snapshot.config_json,
            "arrays": tensors(snapshot.arrays),
            "strategy": {name: tensors(state) for name, state in snapshot.strategy_state.items()},
            "hospital_dp": json.dumps(snapshot.hospital_dp_state) if snapshot.hospital_dp_state is not None else "",
            "hospitals": json.dumps(to_plain(snapshot.hospitals)),
            "rounds": json.dumps(to_plain(snapshot.rounds)),
        },
        path,
    )


def load_checkpoint(path: Path) -> RunSnapshot:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedgru checkpoint ({CHECKPOINT_FORMAT})")
    numpy = lambda d: {k: v.numpy() for k, v in d.items()}  # noqa: E731
    return RunSnapshot(
        run_id=str(state["run_id"]),
        round=int(state["round"]),
        config_json=str(state["config"]),
        arrays=numpy(state["arrays"]),
        strategy_state={name: numpy(d) for name, d in state["strategy"].items()},
        hospital_dp_state=json.loads(state["hospital_dp"]) if state["hospital_dp"] else None,
        hospitals=[from_plain(HospitalStatus, h, str(path)) for h in json.loads(state["hospitals"])],
        rounds=[from_plain(RoundRecord, r, str(path)) for r in json.loads(state["rounds"])],
    )
