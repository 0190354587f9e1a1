"""The coordinator's round loop.

1. Find the hospitals: ask every connected node which hospital it is and what it reads
   (``server.discovery``, bounded wait); the run reads data as they do.
2. Each round: send the global model to every hospital, wait (bounded) for replies,
   validate each reply (``server.validation``) and drop bad ones with a logged reason,
   aggregate the rest with the configured Flower strategy, evaluate the new model on
   every hospital's validation split, print one progress line and checkpoint.
3. At the end (``server.run_end``): validate the final model, choose its thresholds,
   evaluate on the test splits and write the run folder.

A round with fewer valid replies than ``strategy.min_hospitals`` keeps the previous
global model and is logged as skipped. What the run produces travels as the typed
records of ``server.records``.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from common import messages as M
from common.config import ExperimentConfig
from common.evaluation_noise import EvaluationNoise, calibrated_evaluation_noise
from common.ledger import Ledger
from common.messages import ReplyState, Split
from common.metrics import format_number, with_interval
from common.model import GRUClassifier, model_spec
from common.privacy import InfeasibleTarget
from common.signatures import PublicKey

from .averaging import ModelAverage
from .checkpoint import RunSnapshot
from .discovery import HospitalView, Roster, who_are_you
from .exchange import exchange, node_of  # noqa: F401 - node_of: the coordinator's pairing of replies, tested
from .outputs import RunRecorder
from .preflight import agree_plan
from .records import (
    Calibration,
    Dropped,
    Evaluation,
    HospitalRound,
    HospitalState,
    RoundRecord,
    Stopped,
    TrainPhase,
    TrainReport,
)
from .results import Reader
from .run_end import finish_run
from .secure_round import SecureRounds, scale_for
from .start_model import StartModel
from .strategies import Aggregator
from .validation import (
    Evaluations,
    ReplyRejected,
    check_identity,
    check_train_reply,
    expected_layout,
    read_evaluations,
    read_ledger,
)


class RepeatedLines:
    """With hundreds of hospitals one story repeats hundreds of times ("val: the split
    is empty"). The first ``shown`` lines of a kind are logged; the rest are counted and
    told in one line when the exchange ends (:meth:`flush`). Every hospital's own state
    still goes to metrics.json and the report."""

    def __init__(self, shown: int = 3):
        self.shown = shown
        self.counts: dict[tuple[int, str], int] = {}

    def log(self, level: int, kind: str, msg: str, *args) -> None:
        key = (level, kind)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] <= self.shown:
            log.log(level, msg, *args)

    def flush(self) -> None:
        for (level, kind), n in self.counts.items():
            if n > self.shown:
                log.log(level, "... and %d more hospitals: %s", n - self.shown, kind)
        self.counts.clear()

PROGRESS_LINES = 20  # about this many round lines on the console for a long run (every round up to 2x this)


def shows_round(server_round: int, rounds: int, noteworthy: bool = False) -> bool:
    """Whether a round gets its own console line: every round of a run of up to
    2 x PROGRESS_LINES rounds; in a longer one the first, the last, every k-th (about
    PROGRESS_LINES lines) and any round with news (a validation, a skip). The others
    are logged at DEBUG and their seconds folded into the next line."""
    every = 1 if rounds <= 2 * PROGRESS_LINES else math.ceil(rounds / PROGRESS_LINES)
    return noteworthy or server_round in (1, rounds) or server_round % every == 0
log = logging.getLogger("fedgru.server")


def initial_arrays(cfg: ExperimentConfig, start: StartModel | None = None) -> ArrayRecord:
    """The global model of round 1: the start bundle's weights, or ``model.init``'s."""
    torch.manual_seed(cfg.run.seed)
    model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    if start is not None:
        model.load_state_dict(start.weights, strict=True)
    return ArrayRecord(torch_state_dict=model.state_dict())


class Coordinator:
    def __init__(self, cfg: ExperimentConfig, grid: Grid, recorder: RunRecorder, run_id: str,
                 start: StartModel | None = None, roster: Roster | None = None,
                 hospital_keys: dict[str, PublicKey] | None = None):
        self.cfg = cfg
        # the admitted hospitals' public keys (run-config hospital-keys): secure rounds take
        # only round keys one of them signed (server.secagg.signature_problem)
        self.hospital_keys = hospital_keys or {}
        self.grid = grid
        self.recorder = recorder
        self.run_id = run_id
        self.roster = roster if roster is not None else Roster()
        self._aggregator: Aggregator | None = None
        self.hospital_dp_exhausted = False
        self.arrays = initial_arrays(cfg, start)  # a resumed run replaces them in restore()
        self.average = ModelAverage(cfg.strategy.average_decay)  # the final model (server.averaging)
        self.start_round = 1
        self.cfg_json = cfg.to_json()
        self.calibration: Calibration | None = None  # Platt scaling folded into the final model
        self._phase = TrainPhase()  # where drops and stops of the exchange in progress are noted
        self._lines = RepeatedLines()
        self.final_dropped: list[Dropped] = []
        self.trained_rounds = 0  # rounds whose replies moved the global model (none: nothing to evaluate)
        self.reader = Reader(cfg)
        self.not_started = ""  # why the run did not start (the preflight), if it did not
        # secure aggregation (server.secure_round): the rounds run its protocol instead
        self.secure = SecureRounds(self) if cfg.privacy.enabled and cfg.privacy.aggregation == "secure" else None

    # -- checkpoints -------------------------------------------------------------
    def snapshot(self, server_round: int) -> RunSnapshot:
        """Everything a restarted coordinator needs to continue after ``server_round``."""
        accountant = self.aggregator.accountant
        return RunSnapshot(
            run_id=self.run_id,
            round=server_round,
            config_json=self.cfg_json,
            arrays={k: v.numpy() for k, v in self.arrays.items()},
            strategy_state={**self.aggregator.state_dict(), **(self.secure.state_dict() if self.secure else {}),
                            **self.average.state_dict()},
            hospital_dp_state=accountant.state_dict() if accountant is not None else None,
            hospitals=[h.status() for h in self.hospitals.values()],
            rounds=list(self.recorder.rounds),
        )

    def restore(self, snapshot: RunSnapshot) -> None:
        """Continue a run from a checkpoint: next round, global model, strategy state,
        what each hospital has done. Hospitals must have been discovered first."""
        if self.simulated:
            raise RuntimeError(
                "a simulation cannot be resumed: simulated hospitals keep their ledgers in the run's "
                "memory, so their epsilon would restart from zero. Start the simulation again."
            )
        self.start_round = snapshot.round + 1
        self.arrays = ArrayRecord({k: Array(v) for k, v in snapshot.arrays.items()})
        state = dict(snapshot.strategy_state)
        self.average.load_state_dict(state)  # takes its own part out
        if self.secure is not None:
            self.secure.load_state_dict(state)  # takes its own part out
        self.aggregator.load_state_dict(state)
        if snapshot.hospital_dp_state is not None and self.aggregator.accountant is not None:
            self.aggregator.accountant.load_state_dict(snapshot.hospital_dp_state)
        by_name = {h.name: h for h in self.hospitals.values()}
        for saved in snapshot.hospitals:
            view = by_name.get(saved.name)
            if view is None:
                log.warning("%s took part before the restart but has not reconnected", saved.name)
                continue
            view.restore(saved, self.cfg.privacy.accountant)
        self.recorder.rounds = list(snapshot.rounds)
        self.trained_rounds = sum(not r.skipped for r in snapshot.rounds)
        log.info("resuming run %s at round %d of %d", self.run_id, self.start_round, self.cfg.run.rounds)

    @property
    def aggregator(self) -> Aggregator:
        """Built once the hospitals are known (hospital-level DP noise depends on their count)."""
        if self._aggregator is None:
            self._aggregator = Aggregator(self.cfg.strategy, self.cfg.hospital_dp, len(self.hospitals))
        return self._aggregator

    # -- messaging -------------------------------------------------------------
    def _config(self, server_round: int, evaluate: list[Split] = ()) -> ConfigRecord:
        return ConfigRecord({
            M.EXPERIMENT_JSON: self.cfg_json, M.RUN_ID: self.run_id, M.SERVER_ROUND: server_round,
            M.EVALUATE: " ".join(s.value for s in evaluate),
        })

    def _send(
        self, node_ids: list[int], message_type: str, content_fn, timeout: float | None = None
    ) -> list[tuple[int, Message]]:
        messages = [Message(content_fn(), dst_node_id=nid, message_type=message_type) for nid in node_ids]
        return self._exchange(messages, timeout)

    def _exchange(self, messages: list[Message], timeout: float | None = None) -> list[tuple[int, Message]]:
        return exchange(self.grid, messages, timeout or self.cfg.strategy.round_timeout_s)

    def _view(self, node_id: int) -> HospitalView:
        return self.hospitals.get(node_id) or HospitalView(f"node {node_id}", node_id)

    # -- discovery (server.discovery) ----------------------------------------------
    @property
    def hospitals(self) -> dict[int, HospitalView]:
        return self.roster.hospitals

    @hospitals.setter
    def hospitals(self, value: dict[int, HospitalView]) -> None:
        self.roster.hospitals = value

    @property
    def simulated(self) -> bool:
        return self.roster.simulated

    def rediscover(self) -> None:
        """Before a round: identify nodes that connected since (a hospital back from a
        crash, or a late one), and agree the run's plan with a hospital new to the run.
        Bounded and quick when nothing is new."""
        self.roster.rediscover(self.grid, partial(who_are_you, self.run_id), min(60.0, self.cfg.strategy.round_timeout_s))
        new = [v for v in self.hospitals.values() if v.active and v.noise_multiplier is None and v.rounds_trained == 0
               and self.cfg.privacy.enabled and self.recorder.preflight]
        if new:
            self.agree_plan(new)

    def agree_plan(self, views: list[HospitalView] | None = None) -> bool:
        """The preflight (server.preflight): the run's whole plan to every active hospital
        (or ``views``); those that refuse are asked nothing further. True when enough
        hospitals accepted for the run to go on."""
        views = [v for v in self.hospitals.values() if v.active] if views is None else views
        answers = agree_plan(self.grid, views, self.cfg, self.run_id, min(300.0, self.cfg.strategy.round_timeout_s),
                             keep_ledgers=not self.simulated)
        known = {a.hospital for a in answers}
        self.recorder.preflight = [a for a in self.recorder.preflight if a.hospital not in known] + answers
        return self.can_continue()

    # -- rounds ----------------------------------------------------------------
    def _accept(self, nid: int, reply: Message, context: str, ledger_optional: bool = False
                ) -> tuple[HospitalView, Ledger | None] | None:
        """Who sent a reply and the ledger it carries, or None (logged and dropped) when
        either is not acceptable. Stopped hospitals are noted here too. ``ledger_optional``:
        secure aggregation's key and unmask stages, which release nothing new, may come
        without a ledger copy (then the ledger is None)."""
        view = self._view(nid)
        try:
            if reply.has_error():
                raise ReplyRejected(f"the hospital reported an error ({reply.error.reason})")
            check_identity(reply, view.name)
            state = str(reply.content[M.STATUS].get(M.STATE, "")) if M.STATUS in reply.content.config_records else ""
            if state in (ReplyState.REFUSED, ReplyState.REFUSED_POLICY):
                reason = str(reply.content[M.STATUS].get(M.REASON, ""))[:500]
                view.state, view.reason = HospitalState.REFUSED, reason
                self._lines.log(logging.ERROR, f"{context}: refused ({state}): {reason}",
                                "%s: %s refuses (%s): %s", context, view.name, state, reason)
                self._phase.stopped.append(Stopped(view.name, view.state, reason))
                return None
            carried = M.STATUS in reply.content.config_records and reply.content[M.STATUS].get(M.LEDGER)
            ledger = read_ledger(reply, view.name) if carried or not ledger_optional else None
        except ReplyRejected as exc:
            self._lines.log(logging.WARNING, f"{context}: reply dropped: {exc}",
                            "%s: dropped the reply of %s (node %s): %s", context, view.name, nid, exc)
            self._phase.dropped.append(Dropped(view.name, nid, str(exc)))
            return None
        if ledger is not None:
            view.ledger = ledger
            view.epsilon = ledger.epsilon(Split.TRAIN, self.cfg.privacy.accountant)
        declined = str(reply.content[M.STATUS].get(M.NOT_EVALUATED, ""))
        if declined:
            declined = declined.replace("\n", "; ")[:500]
            self._lines.log(logging.WARNING, f"{context}: did not evaluate: {declined}",
                            "%s: %s did not evaluate: %s", context, view.name, declined)
        return view, ledger

    def _expected_evaluation_noise(self, hospital: str, ledger: Ledger) -> EvaluationNoise | None:
        """The noise each evaluation release of ``hospital`` must record: the run's calibration
        at the delta its accepted preflight answer stated, or, where the answer has none (a
        run folder from before it), at its ledger's. None only where nothing is checked this
        way: a comparison without DP, or secure aggregation (whose sums are checked in
        server.secure_evaluation). A delta that admits no calibration is the hospital's
        error: :class:`ReplyRejected`, so no hospital escapes the check by its delta."""
        if not (self.cfg.evaluation.dp and self.cfg.privacy.aggregation == "per_hospital"):
            return None
        answer = next((a for a in self.recorder.preflight if a.hospital == hospital and a.accepted), None)
        delta = answer.delta if answer is not None and 0 < answer.delta < 1 else ledger.delta
        try:
            return calibrated_evaluation_noise(self.cfg_json, delta)  # the JSON every message carries, made once
        except InfeasibleTarget:
            raise ReplyRejected(f"at its delta {delta:g} the run's evaluation budgets admit no noise calibration, so "
                                "no release of its can be checked") from None

    def _evaluations(self, view: HospitalView, nid: int, reply: Message, ledger: Ledger, server_round: int,
                     splits: list[Split], into: dict[str, Evaluations], threshold: float | None = None,
                     final: bool = False) -> None:
        """``final``: the final model's evaluation (run_end), whose releases carry the final
        share's noise; else a validation during training, with the progress releases'."""
        try:
            try:
                expected = self._expected_evaluation_noise(view.name, ledger)
                into[view.name] = read_evaluations(reply, self.cfg, ledger, self.run_id, server_round, splits, threshold,
                                                   expected, final)
            except ReplyRejected:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed array raises what numpy's reader raises
                raise ReplyRejected(f"an evaluation record cannot be read ({exc.__class__.__name__})") from None
        except ReplyRejected as exc:
            log.warning("round %d: dropped the evaluation of %s (node %s): %s", server_round, view.name, nid, exc)
            self._phase.dropped.append(Dropped(view.name, nid, f"evaluation: {exc}"))

    def train_round(self, server_round: int) -> TrainPhase:
        if self.secure is not None:
            declared = sum(a.declared_train for a in self.recorder.preflight if a.accepted)
            return self.secure.round(server_round, scale_for(self.cfg.privacy.max_grad_norm, declared))
        layout = expected_layout(self.arrays)
        nodes = sorted(nid for nid, h in self.hospitals.items() if h.active)
        phase = self._phase = TrainPhase()
        # the model after the previous round, validated only once some round has trained it
        splits = [Split.VAL] if server_round in self.cfg.validation_rounds() and self.trained_rounds else []
        try:
            messages = self.aggregator.messages(server_round, self.arrays, self._config(server_round, splits), nodes)
        except PrivacyBudgetExhausted as exc:
            log.info("round %d: hospital-level DP budget reached, ending the run (%s)", server_round, exc)
            self.hospital_dp_exhausted = True
            phase.skipped = True
            return phase
        messages = [self._with_own_noise(m) for m in messages]
        replies = self._exchange(messages)
        valid, answered, evaluations = [], set(), {}
        for nid, reply in replies:
            answered.add(nid)
            accepted = self._accept(nid, reply, f"round {server_round}")
            if accepted is None:
                continue
            view, ledger = accepted
            if splits:
                self._evaluations(view, nid, reply, ledger, server_round, splits, evaluations)
            state = str(reply.content[M.STATUS].get(M.STATE, ""))
            if state == ReplyState.BUDGET_EXHAUSTED:
                view.state = HospitalState.BUDGET_EXHAUSTED
                view.budget = float(reply.content[M.STATUS].get(M.BUDGET, view.budget))
                self._lines.log(logging.INFO, f"round {server_round}: stop training at the privacy budget",
                                "round %d: %s stops training: this round would pass its training budget (epsilon "
                                "%.3f spent of %.3f)", server_round, view.name, view.epsilon, view.budget)
                phase.stopped.append(Stopped(view.name, view.state, ""))
                continue
            try:
                n = check_train_reply(
                    reply, layout, self.arrays, self.cfg, ledger, self.run_id, server_round,
                    reject_empty=self.cfg.hospital_dp.enabled,
                )
            except ReplyRejected as exc:
                self._lines.log(logging.WARNING, f"round {server_round}: reply dropped: {exc}",
                                "round %d: dropped the reply of %s (node %s): %s", server_round, view.name, nid, exc)
                phase.dropped.append(Dropped(view.name, nid, str(exc)))
                continue
            metrics = reply.content[M.METRICS]
            phase.hospitals[view.name] = TrainReport(
                num_examples=n, steps=int(metrics[M.STEPS]), epsilon=float(metrics[M.EPSILON]),
                delta=float(metrics[M.DELTA]), budget=float(metrics[M.BUDGET]),
            )
            view.budget = float(metrics[M.BUDGET])
            view.rounds_trained += 1
            for key in [k for k in reply.content.array_records if k != M.ARRAYS]:
                del reply.content[key]  # read above; Flower's strategies average exactly one ArrayRecord
            valid.append(reply)
        phase.validation = {name: e for name, e in evaluations.items() if Split.VAL in e.summaries}
        for nid in nodes:
            if nid not in answered:
                name = self.hospitals[nid].name
                self._lines.log(logging.WARNING, f"round {server_round}: no reply within the timeout",
                                "round %d: no reply from %s within %.0f s", server_round, name,
                                self.cfg.strategy.round_timeout_s)
                phase.dropped.append(Dropped(name, nid, "no reply before the timeout"))
        self._lines.flush()
        if len(valid) < self.cfg.strategy.min_hospitals:
            log.warning(
                "round %d skipped: %d valid replies, strategy.min_hospitals is %d",
                server_round, len(valid), self.cfg.strategy.min_hospitals,
            )
            phase.skipped = True
            return phase
        new = self.aggregator.aggregate(server_round, valid)
        if new is None or not all(np.isfinite(a.numpy()).all() for a in new.values()):
            log.error("round %d: aggregation gave no finite model; keeping the previous one", server_round)
            phase.skipped = True
            return phase
        self.arrays = ArrayRecord({k: v for k, v in new.items()})
        self.trained_rounds += 1
        return phase

    def _with_own_noise(self, message: Message) -> Message:
        """The message with the noise its hospital accepted at the preflight. Flower's
        strategies give every message one shared RecordDict, so each gets its own copy."""
        noise = self.hospitals[message.metadata.dst_node_id].noise_multiplier
        if noise is None:
            return message
        content = RecordDict({**dict(message.content.items()),
                              M.CONFIG: ConfigRecord({**dict(message.content[M.CONFIG]), M.NOISE: float(noise)})})
        return Message(content, dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type,
                       group_id=message.metadata.group_id)

    def max_epsilon(self) -> float:
        return max((h.epsilon for h in self.hospitals.values()), default=0.0)

    def can_continue(self) -> bool:
        if self.hospital_dp_exhausted:
            return False
        return sum(h.active for h in self.hospitals.values()) >= self.cfg.strategy.min_hospitals

    def _validated(self, server_round: int, released: dict[str, Evaluations], progress: bool = False) -> Evaluation:
        """Metrics of the global model after ``server_round`` from its validation releases
        (server.results), written into that round's record."""
        summaries = {n: e.summaries[Split.VAL] for n, e in released.items() if Split.VAL in e.summaries}
        noise = {n: e.histogram_noise.get(Split.VAL, 0.0) for n, e in released.items()}
        result = self.reader.validation(summaries, noise, progress)
        for record in self.recorder.rounds:
            if record.round == server_round:
                record.pooled_val, record.pooled_val_interval = result.pooled, result.pooled_interval
                for name, m in result.hospitals.items():
                    if name in record.hospitals:
                        record.hospitals[name].val = m
        return result

    def _progress_auroc(self, val: Evaluation) -> str:
        """The round line's validation AUROC: with its interval, or why it has none; exact
        releases (a comparison run without DP) stand alone."""
        if val.pooled_interval is None and not val.pooled_note:
            return f"{format_number(val.pooled.auroc)} (exact)"
        return with_interval(val.pooled.auroc, val.pooled_interval, what=val.pooled_note)

    def run(self) -> None:
        rounds = self.cfg.run.rounds
        last = self.start_round - 1
        unshown: list[float] = []  # seconds of the rounds since the last round line
        for server_round in range(self.start_round, rounds + 1):
            if not self.can_continue():
                if self.not_started:
                    break  # finish() says why
                log.info(
                    "ending the run before round %d: fewer than %d hospitals can still train (%s)",
                    server_round, self.cfg.strategy.min_hospitals,
                    ", ".join(f"{h.name}: {h.state.value}" for h in self.hospitals.values()),
                )
                break
            t0 = time.perf_counter()
            if not self.simulated:
                self.rediscover()
            train = self.train_round(server_round)
            if self.hospital_dp_exhausted:
                break
            if not train.skipped:
                self.average.update(self.arrays, server_round)
            last = server_round
            val = self._validated(server_round - 1, train.validation, progress=True) if train.validation else None
            seconds = time.perf_counter() - t0
            self.recorder.add_round(self._round_record(server_round, seconds, train))
            eps = self.max_epsilon() if self.cfg.privacy.enabled else math.inf
            validated = (f" | val AUROC {self._progress_auroc(val)} (model after round {server_round - 1})"
                         if val and val.pooled else "")
            unshown.append(seconds)
            shown = shows_round(server_round, rounds, noteworthy=bool(val or train.skipped))
            pace = f"{seconds:.1f} s" if len(unshown) == 1 else f"{sum(unshown) / len(unshown):.1f} s/round"
            log.log(
                logging.INFO if shown else logging.DEBUG, "round %d/%d | max epsilon %s | %s%s%s",
                server_round, rounds, format_number(eps, 2), pace, validated, " | SKIPPED" if train.skipped else "",
            )
            if shown:
                unshown = []
            self.recorder.checkpoint(self.snapshot(server_round))
        self.finish(last)

    def finish(self, last_round: int) -> None:
        """The end of the run (``server.run_end``): the final releases and the results."""
        finish_run(self, last_round)

    def _round_record(self, server_round: int, seconds: float, train: TrainPhase) -> RoundRecord:
        epsilons = {h.name: h.epsilon for h in self.hospitals.values()}
        names = sorted(set(train.hospitals) | set(epsilons))
        return RoundRecord(
            round=server_round,
            seconds=round(seconds, 3),
            skipped=train.skipped,
            pooled_val=None,  # filled in when the model after this round is validated
            hospitals={n: HospitalRound(train.hospitals.get(n), None, epsilons.get(n)) for n in names},
            dropped=list(train.dropped),
        )
