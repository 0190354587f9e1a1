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
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from common import messages as M
from common.bundle import atomic_torch_save, save_bundle
from common.config import ExperimentConfig
from common.model import model_spec

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


def _clean(value):
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


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
            out["test"] = {"pooled": test["pooled"], "hospitals": test["hospitals"], "dropped": test["dropped"]}
            out["wall_seconds"] = round(time.time() - self.started, 1)
        return out

    def checkpoint(self, coord: Coordinator, server_round: int) -> None:
        state = {
            "run_id": self.run_id,
            "round": server_round,
            "arrays": {k: v.numpy().copy() for k, v in coord.arrays.items()},
            "strategy": coord.aggregator.state_dict(),
            "hospitals": {nid: {"name": h.name, "ledger": [e.to_dict() for e in h.ledger]} for nid, h in coord.hospitals.items()},
            "rounds": self.rounds,
            "config": self.cfg.to_dict(),
        }
        atomic_torch_save(state, self.run_dir / "checkpoint.pt")

    def privacy(self, coord: Coordinator) -> dict:
        cfg = self.cfg
        hospitals = {}
        for h in sorted(coord.hospitals.values(), key=lambda h: h.name):
            hospitals[h.name] = {
                "epsilon": h.epsilon if cfg.privacy.enabled else None,
                "delta": cfg.privacy.delta,
                "accountant": cfg.privacy.accountant,
                "rounds_trained": h.rounds_trained,
                "noise_multiplier": h.ledger[0].noise_multiplier if h.ledger else None,
                "max_grad_norm": cfg.privacy.max_grad_norm,
                "history": [
                    {k: e.to_dict()[k] for k in ("round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm")}
                    for e in h.ledger
                ],
            }
        return {
            "run_id": self.run_id,
            "dp_enabled": cfg.privacy.enabled,
            "guarantee": (
                "example-level (epsilon, delta)-DP for the patients in each hospital's training split, "
                "over all rounds of this run"
                if cfg.privacy.enabled
                else "none: privacy.enabled is false"
            ),
            "hospitals": hospitals,
            "non_dp_releases": [
                {"field": r.field, "when": r.when, "reveals": r.reveals} for r in M.RELEASES if not r.dp
            ],
        }

    def finish(self, coord: Coordinator, test: dict) -> None:
        write_json(self.run_dir / "metrics.json", self._metrics(test))
        write_json(self.run_dir / "privacy.json", self.privacy(coord))
        state = {k: v.numpy() for k, v in coord.arrays.items()}
        save_bundle(
            self.run_dir / "model.pt", state, model_spec(self.cfg), self.cfg,
            info={"run_id": self.run_id, "rounds": self.cfg.run.rounds, "test": test["pooled"]},
        )
        from common.report import write_report

        write_report(self.run_dir)
