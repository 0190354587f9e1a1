"""The run folder: checkpoints during the run, results and the report at the end.

    <run>/config.yaml      the resolved experiment config
    <run>/partition.json   simulated hospitals (hospital, stays, per-class counts, splits)
    <run>/checkpoint.pt    global model, strategy state and history after the last round
    <run>/metrics.json     per round and hospital: training and validation metrics; final test
    <run>/privacy.json     per hospital: epsilon, delta, accountant, DP history; non-DP releases
    <run>/model.pt         bundle to score new patients (see common.bundle)
    <run>/report.md        summary with plots (auroc.png, epsilon.png)
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from common import messages as M
from common.bundle import save_bundle
from common.config import ExperimentConfig
from common.files import atomic_torch_save, write_json
from common.model import model_spec

CHECKPOINT_FORMAT = "fedgru-checkpoint/1"

log = logging.getLogger("fedgru.server")

if TYPE_CHECKING:
    from .coordinator import Coordinator


def make_run_dir(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = out_dir / stamp
    k = 1
    while candidate.exists():
        candidate = out_dir / f"{stamp}-{k}"
        k += 1
    candidate.mkdir(parents=True)
    return candidate


class RunRecorder:
    def __init__(self, run_dir: Path, cfg: ExperimentConfig, run_id: str):
        self.run_dir = run_dir
        self.cfg = cfg
        self.run_id = run_id
        self.rounds: list[dict] = []
        self.started = time.time()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(
            f"# resolved config of run {run_id} (from {cfg.source or 'the server'})\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        )

    def write_partition(self, rows: list[dict], scheme: str, data_summary: dict | None) -> None:
        write_json(self.run_dir / "partition.json", {"scheme": scheme, "hospitals": rows, "data_summary": data_summary})

    def add_round(self, server_round: int, seconds: float, train: dict, val: dict, epsilons: dict[str, float]) -> None:
        names = sorted(set(train.get("hospitals", {})) | set(val.get("hospitals", {})) | set(epsilons))
        self.rounds.append(
            {
                "round": server_round,
                "seconds": round(seconds, 3),
                "skipped": bool(train.get("skipped")),
                "pooled_val": val.get("pooled", {}),
                "hospitals": {
                    n: {
                        "train": train.get("hospitals", {}).get(n),
                        "val": val.get("hospitals", {}).get(n),
                        "epsilon": epsilons.get(n),
                    }
                    for n in names
                },
                "dropped": train.get("dropped", []) + val.get("dropped", []),
            }
        )
        write_json(self.run_dir / "metrics.json", self._metrics())

    def _metrics(self, test: dict | None = None) -> dict:
        out = {"run_id": self.run_id, "rounds": self.rounds}
        if test is not None:
            out["test"] = {"pooled": test["pooled"], "hospitals": test["hospitals"], "dropped": test["dropped"],
                           "threshold": test.get("threshold", 0.5), "calibration": test.get("calibration")}
            out["wall_seconds"] = round(time.time() - self.started, 1)
        return out

    def checkpoint(self, coord: Coordinator, server_round: int) -> None:
        """Everything a restarted coordinator needs to continue after this round."""
        tensors = lambda d: {k: torch.as_tensor(np.asarray(v)).clone() for k, v in d.items()}  # noqa: E731
        state = {
            "format": CHECKPOINT_FORMAT,
            "run_id": self.run_id,
            "round": server_round,
            "arrays": tensors({k: v.numpy() for k, v in coord.arrays.items()}),
            "strategy": {name: tensors(value) for name, value in coord.aggregator.state_dict().items()},
            "hospital_dp": json.dumps(coord.aggregator.accountant.state_dict()) if coord.aggregator.accountant else "",
            "hospitals": [
                {"name": h.name, "state": h.state, "reason": h.reason, "rounds_trained": h.rounds_trained,
                 "budget": h.budget if math.isfinite(h.budget) else -1.0, "ledger": h.ledger.to_json() if h.ledger else ""}
                for h in coord.hospitals.values()
            ],
            "rounds": json.dumps(self.rounds),
            "config": self.cfg.to_json(),
        }
        atomic_torch_save(state, self.run_dir / "checkpoint.pt")

    def privacy(self, coord: Coordinator) -> dict:
        """Per hospital: epsilon over its whole ledger (RDP and PRV), budget, this run's
        DP-SGD history, and the ledger itself."""
        cfg = self.cfg
        hospitals = {}
        for h in sorted(coord.hospitals.values(), key=lambda h: h.name):
            ledger = h.ledger
            entry = {"state": h.state, "rounds_trained": h.rounds_trained, "budget": h.budget if math.isfinite(h.budget) else None}
            if h.reason:
                entry["reason"] = h.reason
            if ledger is not None:
                eps = {name: ledger.epsilon(name) for name in ("rdp", "prv")} if cfg.privacy.enabled else {}
                this_run = [e for e in ledger.dp_history() if e.run_id == self.run_id]
                entry.update(
                    {
                        "epsilon": eps.get(cfg.privacy.accountant),
                        "epsilon_rdp": eps.get("rdp"),
                        "epsilon_prv": eps.get("prv"),
                        "delta": ledger.delta,
                        "accountant": cfg.privacy.accountant,
                        "remaining": (h.budget - eps[cfg.privacy.accountant]) if eps and math.isfinite(h.budget) else None,
                        "noise_multiplier": this_run[0].noise_multiplier if this_run else None,
                        "max_grad_norm": cfg.privacy.max_grad_norm,
                        "history": [
                            {"round": e.round, "noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate,
                             "steps": e.steps, "max_grad_norm": e.max_grad_norm}
                            for e in this_run
                        ],
                        "earlier_runs": [r for r in ledger.runs() if r != self.run_id],
                        "data_fingerprint": ledger.fingerprint,
                        "ledger": json.loads(ledger.to_json()),
                    }
                )
            hospitals[h.name] = entry
        return {
            "run_id": self.run_id,
            "dp_enabled": cfg.privacy.enabled,
            "guarantee": (
                "example-level (epsilon, delta)-DP for the patients in each hospital's training split, "
                "over every release recorded in the hospital's ledger (all rounds of this run, and earlier "
                "runs on the same data when the hospital keeps its ledger on disk)"
                if cfg.privacy.enabled
                else "none: privacy.enabled is false"
            ),
            "hospitals": hospitals,
            "hospital_level": self._hospital_level(coord),
            "non_dp_releases": [
                {"field": r.field, "when": r.when, "reveals": r.reveals} for r in M.RELEASES if not r.dp
            ],
        }

    def _hospital_level(self, coord: Coordinator) -> dict | None:
        hd = self.cfg.hospital_dp
        if not hd.enabled:
            return None
        spent = coord.aggregator.hospital_privacy() or {}
        return {
            **spent,
            "noise_multiplier": hd.noise_multiplier,
            "clipping_norm": hd.clipping_norm,
            "max_epsilon": hd.max_epsilon or None,
            "accountant": "Flower RdpAccountant (no sampling amplification)",
            "guarantee": (
                "hospital-level (epsilon, delta)-DP: whether any one hospital took part changes the "
                "released global models only within this bound. It holds against everyone who sees the "
                "global models, but not against the coordinator, which sees each hospital's clipped update."
            ),
        }

    def finish(self, coord: Coordinator, test: dict) -> None:
        write_json(self.run_dir / "metrics.json", self._metrics(test))
        write_json(self.run_dir / "privacy.json", self.privacy(coord))
        state = {k: v.numpy() for k, v in coord.arrays.items()}
        save_bundle(
            self.run_dir / "model.pt", state, model_spec(self.cfg), self.cfg,
            info={"run_id": self.run_id, "rounds": self.cfg.run.rounds, "test": test["pooled"],
                  "threshold": test.get("threshold", 0.5), "calibration": test.get("calibration")},
        )
        from common.report import write_report

        for line in write_report(self.run_dir).splitlines():
            log.info("%s", line)


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedgru checkpoint ({CHECKPOINT_FORMAT})")
    return state
