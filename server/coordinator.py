"""The coordinator's round loop.

1. Find the hospitals: ask every connected node which hospital it is (bounded wait).
2. Each round: send the global model to every hospital, wait (bounded) for replies,
   validate each reply (``server.validation``) and drop bad ones with a logged reason,
   aggregate the rest with the configured Flower strategy, evaluate the new model on
   every hospital's validation split, print one progress line and checkpoint.
3. At the end: evaluate on the test splits and write the run folder.

A round with fewer valid replies than ``strategy.min_hospitals`` keeps the previous
global model and is logged as skipped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common import messages as M
from common.calibration import calibrate_risk, fit_logistic_calibration, fold_into_output_layer
from common.config import ExperimentConfig
from common.ledger import Ledger
from common.metrics import ScoreSummary, choose_threshold, format_metrics, pooled
from common.model import GRUClassifier, model_spec, output_layer_keys

from .outputs import RunRecorder
from .strategies import Aggregator
from .validation import ReplyRejected, check_eval_reply, check_train_reply, expected_layout, hospital_of

log = logging.getLogger("fedgru.server")


def node_of(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply is about: the one its instruction went to. An error the SuperLink
    writes itself (say, "node unavailable" for a crashed hospital) comes from the
    SuperLink's own id, so it is matched to its instruction by the id it answers."""
    answers = reply.metadata.reply_to_message_id
    return sent.get(answers, reply.metadata.src_node_id) if answers else reply.metadata.src_node_id


@dataclass
class HospitalView:
    """What the coordinator knows about one hospital (no patient data)."""

    name: str
    node_id: int
    ledger: Ledger | None = None  # the hospital's ledger as it last reported it
    epsilon: float = 0.0  # recomputed here from the ledger
    budget: float = math.inf
    rounds_trained: int = 0
    state: str = "active"  # active | budget-exhausted | refused
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state == "active"


def initial_arrays(cfg: ExperimentConfig) -> ArrayRecord:
    torch.manual_seed(cfg.run.seed)
    model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    return ArrayRecord(torch_state_dict=model.state_dict())


class Coordinator:
    def __init__(self, cfg: ExperimentConfig, grid: Grid, recorder: RunRecorder, run_id: str):
        self.cfg = cfg
        self.grid = grid
        self.recorder = recorder
        self.run_id = run_id
        self.simulated = False
        self._modes: set[str] = set()
        self._not_hospitals: set[int] = set()
        self._aggregator: Aggregator | None = None
        self.hospital_dp_exhausted = False
        self.hospitals: dict[int, HospitalView] = {}
        self.arrays = initial_arrays(cfg)
        self.start_round = 1
        self.cfg_json = cfg.to_json()
        self.last_val: ScoreSummary | None = None  # pooled validation summary of the current model
        self.threshold = 0.5  # binary decision threshold used for the test split
        self.calibration: dict | None = None  # Platt scaling folded into the final model

    def restore(self, state: dict) -> None:
        """Continue a run from a checkpoint: next round, global model, strategy state,
        what each hospital has done. Hospitals must have been discovered first."""
        if self.simulated:
            raise RuntimeError(
                "a simulation cannot be resumed: simulated hospitals keep their ledgers in the run's "
                "memory, so their epsilon would restart from zero. Start the simulation again."
            )
        self.start_round = int(state["round"]) + 1
        self.arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state["arrays"].items()})
        self.aggregator.load_state_dict({name: {k: v.numpy() for k, v in d.items()} for name, d in state["strategy"].items()})
        if state.get("hospital_dp") and self.aggregator.accountant is not None:
            self.aggregator.accountant.load_state_dict(json.loads(state["hospital_dp"]))
        by_name = {h.name: h for h in self.hospitals.values()}
        for saved in state["hospitals"]:
            view = by_name.get(saved["name"])
            if view is None:
                log.warning("%s took part before the restart but has not reconnected", saved["name"])
                continue
            view.state, view.reason, view.rounds_trained = saved["state"], saved["reason"], int(saved["rounds_trained"])
            view.budget = float(saved["budget"]) if saved["budget"] >= 0 else math.inf
            if saved["ledger"]:
                view.ledger = Ledger.from_json(saved["ledger"], source=f"the checkpointed ledger of {view.name}")
                view.epsilon = view.ledger.epsilon(self.cfg.privacy.accountant)
        self.recorder.rounds = json.loads(state["rounds"])
        log.info("resuming run %s at round %d of %d", self.run_id, self.start_round, self.cfg.run.rounds)

    @property
    def aggregator(self) -> Aggregator:
        """Built once the hospitals are known (hospital-level DP noise depends on their count)."""
        if self._aggregator is None:
            self._aggregator = Aggregator(self.cfg.strategy, self.cfg.hospital_dp, len(self.hospitals))
        return self._aggregator

    # -- messaging -------------------------------------------------------------
    def _config(self, server_round: int, **extra) -> ConfigRecord:
        return ConfigRecord(
            {M.EXPERIMENT_JSON: self.cfg_json, M.RUN_ID: self.run_id, M.SERVER_ROUND: server_round, **extra}
        )

    def _send(
        self, node_ids: list[int], message_type: str, content_fn, timeout: float | None = None
    ) -> list[tuple[int, Message]]:
        messages = [Message(content_fn(), dst_node_id=nid, message_type=message_type) for nid in node_ids]
        return self._exchange(messages, timeout)

    def _exchange(self, messages: list[Message], timeout: float | None = None) -> list[tuple[int, Message]]:
        """Send, wait, and pair every reply with the node it is about."""
        if not messages:
            return []
        replies = list(self.grid.send_and_receive(messages, timeout=timeout or self.cfg.strategy.round_timeout_s))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return [(node_of(reply, sent), reply) for reply in replies]

    # -- discovery -------------------------------------------------------------
    def _identify(self, node_ids: list[int], timeout: float) -> set[int]:
        """Ask nodes which hospital they are; map new ones, remap a hospital that came
        back on another node. Returns the nodes that answered."""
        answered: set[int] = set()
        replies = self._send(node_ids, MessageType.QUERY, lambda: RecordDict({M.CONFIG: self._config(0)}), timeout)
        for nid, reply in replies:
            if reply.has_error():
                log.warning("node %s could not say which hospital it is: %s", nid, reply.error.reason)
                continue
            answered.add(nid)
            status = reply.content[M.STATUS]
            name = str(status.get(M.HOSPITAL, ""))
            if str(status.get(M.STATE)) != "ready" or not name:
                self._not_hospitals.add(nid)
                continue
            self._modes.add(str(status.get(M.MODE, "")))
            previous = next((old for old, h in self.hospitals.items() if h.name == name), None)
            if previous is None:
                self.hospitals[nid] = HospitalView(name, nid)
            elif previous != nid:
                if previous in self._connected:
                    log.warning("two nodes claim hospital %r; keeping the first", name)
                    continue
                view = self.hospitals.pop(previous)
                view.node_id = nid
                self.hospitals[nid] = view
                log.info("%s rejoined (node %s)", name, nid)
        return answered

    @property
    def _connected(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def discover(self, wait_s: float | None = None) -> None:
        """Ask every connected node which hospital it is.

        Stops when all connected nodes have answered and at least
        ``strategy.min_hospitals`` are hospitals, or after ``wait_s`` seconds.
        """
        wait_s = self.cfg.strategy.discovery_timeout_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        answered: set[int] = set()
        while True:
            pending = [n for n in self._connected if n not in answered]
            answered |= self._identify(pending, timeout=max(1.0, deadline - time.monotonic()))
            everyone = self._connected <= answered
            if (everyone and len(self.hospitals) >= self.cfg.strategy.min_hospitals) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        self.simulated = bool(self.hospitals) and self._modes == {"simulation"}
        names = ", ".join(sorted(h.name for h in self.hospitals.values())) or "none"
        log.info("hospitals: %s", names)
        if len(self.hospitals) < self.cfg.strategy.min_hospitals:
            raise RuntimeError(
                f"only {len(self.hospitals)} hospital(s) answered within {wait_s:.0f} s; "
                f"strategy.min_hospitals is {self.cfg.strategy.min_hospitals}"
            )

    def rediscover(self) -> None:
        """Before a round: identify nodes that connected since (a hospital back from a
        crash, or a late one). Bounded and quick when nothing is new."""
        new = [n for n in self._connected if n not in self.hospitals and n not in self._not_hospitals]
        if new:
            self._identify(new, timeout=min(60.0, self.cfg.strategy.round_timeout_s))

    # -- rounds ----------------------------------------------------------------
    def train_round(self, server_round: int) -> dict:
        layout = expected_layout(self.arrays)
        nodes = sorted(nid for nid, h in self.hospitals.items() if h.active)
        try:
            messages = self.aggregator.messages(server_round, self.arrays, self._config(server_round), nodes)
        except PrivacyBudgetExhausted as exc:
            log.info("round %d: hospital-level DP budget reached, ending the run (%s)", server_round, exc)
            self.hospital_dp_exhausted = True
            return {"hospitals": {}, "dropped": [], "stopped": [], "skipped": True}
        replies = self._exchange(messages)
        valid, record = [], {"hospitals": {}, "dropped": [], "stopped": []}
        answered = set()
        for nid, reply in replies:
            answered.add(nid)
            view = self.hospitals.get(nid) or HospitalView(f"node {nid}", nid)
            name = hospital_of(reply, view.name)
            if self._stopped(reply, view, server_round, record):
                continue
            try:
                check_train_reply(
                    reply, layout, self.cfg.strategy.max_examples,
                    current=self.arrays if self.cfg.hospital_dp.enabled else None,
                )
            except ReplyRejected as exc:
                log.warning("round %d: dropped the reply of %s: %s", server_round, name, exc)
                record["dropped"].append({"hospital": name, "reason": str(exc)})
                continue
            metrics = dict(reply.content[M.METRICS])
            record["hospitals"][name] = {k: _num(v) for k, v in metrics.items()}
            self._note_ledger(view, reply)
            view.budget = float(metrics.get(M.BUDGET, math.inf))
            view.rounds_trained += 1
            valid.append(reply)
        for nid in nodes:
            if nid not in answered:
                name = self.hospitals[nid].name
                log.warning("round %d: no reply from %s within %.0f s", server_round, name, self.cfg.strategy.round_timeout_s)
                record["dropped"].append({"hospital": name, "reason": "no reply before the timeout"})
        if len(valid) < self.cfg.strategy.min_hospitals:
            log.warning(
                "round %d skipped: %d valid replies, strategy.min_hospitals is %d",
                server_round, len(valid), self.cfg.strategy.min_hospitals,
            )
            record["skipped"] = True
            return record
        new = self.aggregator.aggregate(server_round, valid)
        if new is None or not all(np.isfinite(a.numpy()).all() for a in new.values()):
            log.error("round %d: aggregation gave no finite model; keeping the previous one", server_round)
            record["skipped"] = True
            return record
        self.arrays = ArrayRecord({k: v for k, v in new.items()})
        record["skipped"] = False
        return record

    def _stopped(self, reply: Message, view: HospitalView, server_round: int, record: dict) -> bool:
        """A hospital at its budget, or refusing, answers with a status only: a normal outcome."""
        if reply.has_error() or M.STATUS not in reply.content.config_records:
            return False
        status = reply.content[M.STATUS]
        state = str(status.get(M.STATE, ""))
        if state == "budget-exhausted":
            self._note_ledger(view, reply)
            view.state, view.budget = state, float(status.get(M.BUDGET, view.budget))
            log.info(
                "round %d: %s has reached its privacy budget (epsilon %.3f of %.3f) and stops training",
                server_round, view.name, view.epsilon, view.budget,
            )
        elif state == "refused":
            view.state, view.reason = state, str(status.get(M.REASON, ""))
            log.error("round %d: %s refuses to train: %s", server_round, view.name, view.reason)
        else:
            return False
        record["stopped"].append({"hospital": view.name, "state": state, "reason": view.reason})
        return True

    def _note_ledger(self, view: HospitalView, reply: Message) -> None:
        """Keep the hospital's ledger; epsilon is recomputed here from it."""
        text = reply.content[M.STATUS].get(M.LEDGER)
        if text:
            view.ledger = Ledger.from_json(str(text), source=f"the ledger {view.name} sent")
            view.epsilon = view.ledger.epsilon(self.cfg.privacy.accountant)

    def evaluate(self, server_round: int, split: str, threshold: float = 0.5) -> dict:
        nodes = sorted(self.hospitals)
        extra = {M.SPLIT: split, M.THRESHOLD: float(threshold)}
        replies = self._send(
            nodes, MessageType.EVALUATE,
            lambda: RecordDict({M.ARRAYS: self.arrays, M.CONFIG: self._config(server_round, **extra)}),
        )
        summaries, per_hospital, dropped = [], {}, []
        for nid, reply in replies:
            name = hospital_of(reply, self.hospitals.get(nid, HospitalView(f"node {nid}", nid)).name)
            try:
                summary = check_eval_reply(reply, self.cfg.num_classes, self.cfg.evaluation.score_bins, self.cfg.strategy.max_examples)
            except ReplyRejected as exc:
                log.warning("round %d: dropped the %s evaluation of %s: %s", server_round, split, name, exc)
                dropped.append({"hospital": name, "reason": str(exc)})
                continue
            summaries.append(summary)
            per_hospital[name] = summary.metrics()
        total = pooled(summaries)
        return {
            "pooled": total.metrics() if total is not None else {},
            "hospitals": per_hospital,
            "dropped": dropped,
            "summary": total,
        }

    def fixed_threshold(self) -> float:
        """The configured decision threshold; 0.5 until an "auto" one is chosen."""
        t = self.cfg.evaluation.threshold
        return 0.5 if t == "auto" else float(t)

    def _final_validation(self, server_round: int) -> ScoreSummary | None:
        """The final model's pooled validation summary (evaluated now if the last round
        did not: a resumed run, or every_round off)."""
        if self.last_val is None:
            self.last_val = self.evaluate(server_round, "val").get("summary")
        return self.last_val

    def recalibrate(self, server_round: int) -> dict | None:
        """Platt scaling fitted on the pooled validation histograms, folded into the
        global model's output layer (common.calibration). None when off or not possible."""
        if not self.cfg.evaluation.calibrate or self.cfg.num_classes != 2:
            return None
        summary = self._final_validation(server_round)
        fit = fit_logistic_calibration(summary) if summary is not None else None
        if fit is None:
            log.warning("no usable pooled validation histogram: the risks are left uncalibrated")
            return None
        scale, shift = fit
        weight_key, bias_key = output_layer_keys(model_spec(self.cfg))
        state = fold_into_output_layer(self.arrays.to_torch_state_dict(), weight_key, bias_key, scale, shift)
        self.arrays = ArrayRecord(torch_state_dict=state)
        log.info("risk recalibrated on pooled validation: logit -> %.3f x logit %+.3f", scale, shift)
        return {"scale": scale, "shift": shift}

    def decision_threshold(self, server_round: int) -> float:
        """The threshold for the test split and the bundle: the configured one, or the
        best event-1 threshold on the final model's pooled validation histograms (carried
        through the recalibration, which keeps every patient's rank)."""
        if self.cfg.evaluation.threshold != "auto" or self.cfg.num_classes != 2:
            return self.fixed_threshold()
        summary = self._final_validation(server_round)
        chosen = choose_threshold(summary) if summary is not None else None
        if chosen is None:
            log.warning("no pooled validation histogram with both outcomes: decision threshold stays 0.5")
            return 0.5
        if self.calibration:
            chosen = calibrate_risk(chosen, self.calibration["scale"], self.calibration["shift"])
        log.info("decision threshold %.3f: the best event-1 score on the pooled validation split", chosen)
        return chosen

    def max_epsilon(self) -> float:
        return max((h.epsilon for h in self.hospitals.values()), default=0.0)

    def can_continue(self) -> bool:
        if self.hospital_dp_exhausted:
            return False
        return sum(h.active for h in self.hospitals.values()) >= self.cfg.strategy.min_hospitals

    def run(self) -> None:
        rounds = self.cfg.run.rounds
        for server_round in range(self.start_round, rounds + 1):
            if not self.can_continue():
                log.info(
                    "ending the run before round %d: fewer than %d hospitals can still train (%s)",
                    server_round, self.cfg.strategy.min_hospitals,
                    ", ".join(f"{h.name}: {h.state}" for h in self.hospitals.values()),
                )
                break
            t0 = time.perf_counter()
            if not self.simulated:
                self.rediscover()
            train = self.train_round(server_round)
            if self.hospital_dp_exhausted:
                break
            val = (
                self.evaluate(server_round, "val", self.fixed_threshold())
                if self.cfg.evaluation.every_round
                else {"pooled": {}, "hospitals": {}}
            )
            self.last_val = val.get("summary")
            seconds = time.perf_counter() - t0
            auroc = val["pooled"].get("auroc", float("nan"))
            eps = self.max_epsilon() if self.cfg.privacy.enabled else float("inf")
            log.info(
                "round %d/%d | pooled val AUROC %s | max epsilon %s | %.1f s%s",
                server_round, rounds, _fmt(auroc), _fmt(eps, 2), seconds,
                " | SKIPPED" if train.get("skipped") else "",
            )
            self.recorder.add_round(
                server_round, seconds, train, val, {h.name: h.epsilon for h in self.hospitals.values()}
            )
            self.recorder.checkpoint(self, server_round)
        self.calibration = self.recalibrate(rounds)
        self.threshold = self.decision_threshold(rounds)
        test = self.evaluate(rounds, "test", self.threshold)
        test["threshold"] = self.threshold
        test["calibration"] = self.calibration
        log.info("final pooled test: %s", format_metrics(test["pooled"]) if test["pooled"] else "no replies")
        self.recorder.finish(self, test)


def _num(v):
    return float(v) if isinstance(v, (int, float)) else v


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"
