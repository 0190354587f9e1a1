"""The run folder: checkpoints during the run, results and the report at the end.

    <run>/config.yaml      the resolved experiment config
    <run>/partition.json   simulated hospitals (hospital, stays, per-class counts, splits)
    <run>/checkpoint.pt    global model, strategy state and history after the last round
    <run>/metrics.json     per round and hospital: training and validation metrics; final test
    <run>/privacy.json     per hospital: epsilon, delta, accountant, DP history; non-DP releases
    <run>/model.pt         bundle to score new patients (see common.bundle)
    <run>/report.md        summary with plots (auroc.png, epsilon.png), and report.html

Everything written here comes as the typed records of ``server.records``; this module
knows nothing of the coordinator that makes them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import yaml

from common import messages as M
from common.bundle import save_bundle
from common.config import ExperimentConfig
from common.estimates import estimator_used
from common.files import atomic_write_text, json_safe, write_json
from common.intervals import INTERVAL_LEVEL
from common.ledger import Ledger
from common.messages import Mechanism, Split
from common.model import model_spec
from common.preflight import PreflightAnswer

from .checkpoint import RunSnapshot, save_checkpoint
from .records import (
    DPRound,
    GroupPrivacy,
    HospitalLevelPrivacy,
    HospitalPrivacy,
    HospitalStatus,
    NonDPRelease,
    Partition,
    RoundRecord,
    RunMetrics,
    RunPrivacy,
    StartRecord,
    TestResult,
)

log = logging.getLogger("fedgru.server")

TRAINING_GUARANTEE = (
    "example-level (epsilon, delta)-DP for each group of each hospital's patients (training, validation, "
    "test), over every release about that group recorded in the hospital's ledger (all rounds of this run, "
    "and earlier runs when the hospital keeps its ledger on disk)"
)


def make_run_dir(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = out_dir / stamp
    k = 1
    while candidate.exists():
        candidate = out_dir / f"{stamp}-{k}"
        k += 1
    candidate.mkdir(parents=True)
    return candidate


# The run's summary goes to the log (a ServerApp under `flwr run` or a deployment has no
# other way to the researcher); `fedgru simulate`, in the same process, prints it to stdout
# itself instead: results on stdout, progress on stderr.
SUMMARY_TO_LOG = True


class RunRecorder:
    def __init__(self, run_dir: Path, cfg: ExperimentConfig, run_id: str):
        self.run_dir = run_dir
        self.cfg = cfg
        self.run_id = run_id
        self.rounds: list[RoundRecord] = []
        self.estimator = estimator_used(cfg.evaluation.estimator, cfg.evaluation.dp)
        self.started = time.time()
        self.start: StartRecord | None = None  # set by the coordinator when model.init_from names a bundle
        self.preflight: list[PreflightAnswer] = []  # set by the coordinator once hospitals answer the plan
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            run_dir / "config.yaml",
            f"# resolved config of run {run_id} (from {cfg.source or 'the server'})\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        )

    def write_partition(self, partition: Partition) -> None:
        write_json(self.run_dir / "partition.json", partition)

    def _metrics(self, test: TestResult | None = None, wall: float | None = None, not_evaluated: str = "") -> RunMetrics:
        return RunMetrics(self.run_id, self.rounds, test, wall, self.estimator, self.start, self.preflight, not_evaluated)

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        write_json(self.run_dir / "metrics.json", self._metrics())

    def checkpoint(self, snapshot: RunSnapshot) -> None:
        save_checkpoint(snapshot, self.run_dir / "checkpoint.pt")

    def finish(
        self, test: TestResult | None, arrays: dict[str, np.ndarray] | None, hospitals: list[HospitalStatus],
        hospital_level: HospitalLevelPrivacy | None, not_evaluated: str = "",
    ) -> None:
        """The run's results. ``test`` None: no evaluation was made (``not_evaluated``
        says why); ``arrays`` None: no hospital trained, so no model bundle is written."""
        wall = round(time.time() - self.started, 1)
        write_json(self.run_dir / "metrics.json", self._metrics(test, wall, not_evaluated))
        write_json(self.run_dir / "privacy.json", run_privacy(self.cfg, self.run_id, hospitals, hospital_level))
        if arrays is not None:
            save_bundle(
                self.run_dir / "model.pt", arrays, model_spec(self.cfg), self.cfg,
                info=bundle_info(self.run_id, self.cfg.run.rounds, test),
            )
        from .report import write_report

        summary = write_report(self.run_dir)
        if SUMMARY_TO_LOG:
            for line in summary.splitlines():
                log.info("%s", line)


def bundle_info(run_id: str, rounds: int, test: TestResult | None) -> dict:
    """What a model bundle says of the run that made it: its test reading, its thresholds
    and, for its monitor, what the run read from DP releases with their intervals (the
    monitor page and predict --hourly say them: common.bundle.monitor_readings)."""
    return json_safe({"run_id": run_id, "rounds": rounds,
                      "test": test.pooled if test else None, "threshold": test.threshold if test else None,
                      "hour_thresholds": test.hour_thresholds if test else [],
                      "onset_margin": test.onset_margin if test else None,
                      "checkpoint_thresholds": test.checkpoint_thresholds if test else {},
                      "checkpoint_intervals": test.checkpoint_intervals if test else {},
                      "onset_margin_interval": test.onset_margin_interval if test else None,
                      "flag_level_intervals": test.flag_level_intervals if test else {},
                      "interval_level": INTERVAL_LEVEL,
                      "monitor_rate": test.monitor_rate if test else None,
                      "calibration": test.calibration if test else None})


def run_privacy(
    cfg: ExperimentConfig, run_id: str, hospitals: list[HospitalStatus], hospital_level: HospitalLevelPrivacy | None
) -> RunPrivacy:
    """Per hospital and group of patients: epsilon over its whole ledger (RDP and PRV);
    the training budget, this run's DP-SGD history, and the ledger itself; the releases
    outside DP."""
    entries = {}
    for h in sorted(hospitals, key=lambda h: h.name):
        budget = h.budget if h.budget is not None and math.isfinite(h.budget) else None
        entry = HospitalPrivacy(state=h.state, rounds_trained=h.rounds_trained, budget=budget, reason=h.reason)
        if h.ledger_json:
            ledger = Ledger.from_json(h.ledger_json, source=f"the ledger of {h.name}")
            for split in Split:
                noisy = ledger.noisy(split)
                if noisy:
                    eps = {name: ledger.epsilon(split, name) for name in ("rdp", "prv")}
                    secure = any(e.mechanism == Mechanism.SKELLAM for e in noisy)
                    entry.groups[split.value] = GroupPrivacy(
                        eps[cfg.privacy.accountant], eps["rdp"], eps["prv"], len(noisy), sum(e.run_id == run_id for e in noisy),
                        ledger.epsilon_alone(split) if secure else None,
                    )
            train = entry.groups.get(Split.TRAIN.value)
            this_run = [e for e in ledger.noisy(Split.TRAIN) if e.run_id == run_id]
            if train is not None:
                entry.epsilon, entry.epsilon_rdp, entry.epsilon_prv = train.epsilon, train.epsilon_rdp, train.epsilon_prv
                entry.epsilon_alone = train.epsilon_alone
                entry.remaining = budget - train.epsilon if budget is not None else None
            entry.delta, entry.accountant = ledger.delta, cfg.privacy.accountant
            entry.noise_multiplier = this_run[0].noise_multiplier if this_run else None
            entry.max_grad_norm = cfg.privacy.max_grad_norm if cfg.privacy.enabled else None
            entry.history = [DPRound(e.round, e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) for e in this_run]
            entry.earlier_runs = [r for r in ledger.runs() if r != run_id]
            entry.ledger = ledger.body()
        entries[h.name] = entry
    return RunPrivacy(
        run_id=run_id,
        dp_enabled=cfg.privacy.enabled,
        evaluation_dp=cfg.evaluation.dp,
        guarantee=TRAINING_GUARANTEE if cfg.privacy.enabled else "none: privacy.enabled is false",
        hospitals=entries,
        hospital_level=hospital_level,
        # every kind the protocol lets a hospital release, secure aggregation's keys included even in a run configured
        # without it: each message carries its own config, and key stages leave no ledger entry to tell them apart
        non_dp_releases=[NonDPRelease(r.field, r.when, r.reveals) for r in M.RELEASES if not r.dp],
    )
