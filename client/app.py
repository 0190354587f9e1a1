"""The hospital side: a Flower ClientApp.

- ``query``: says which hospital this node is and what it reads (its data definition:
  settings, nothing about patients).
- ``train``: the request is checked (``client.request``: its config reads data as the
  hospital defines it, its model and weights, the policy, all before any data); then,
  with the ledger locked, the budget of every group of patients the reply will be about
  and the run's per-run counts; only then are patient data read, the model scored on the
  validation split when the server asks (a noisy score histogram: one message per round
  carries both) and trained with DP-SGD on the training split. The releases are recorded
  in the ledger and the ledger saved before the reply can leave, so a failure anywhere
  before that charges nothing, and nothing is released that the ledger does not hold. The
  reply carries the new weights, the declared training count and the training patients'
  epsilon over everything in the ledger. A round that would pass the budget is not
  trained: the reply says ``budget-exhausted``.
- ``evaluate``: the final model's noisy score histograms of the requested splits.

Every value a reply carries outside its DP releases is a function of the message, the
hospital's policy, its definition, its declared counts and its ledger, so two hospitals
whose data differ by one patient answer alike (tests/test_neighbouring.py). Refusals are
replies (``client.replies``). Cross-round state (the optimizer state) lives in
``context.state`` and never leaves the hospital.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import messages as M
from common.config import ExperimentConfig
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Mechanism, NodeMode, ReplyState
from common.model import GRUClassifier
from common.privacy import NoisyRelease, epsilon, steps_per_round
from common.secagg import STAGE as SECAGG_STAGE
from common.training import (
    Canaries,
    DPSettings,
    TensorData,
    resolve_device,
    secret_generator,
    train_local,
    training_for_round,
)

from .canary import CanaryAudit
from .evaluation import global_model, plan_evaluations, score
from .hospital import UNASSIGNED, Node
from .preflight import answer_plan
from .replies import AfterReading, answer, pack, refusing, status, unpack
from .request import Request, experiment_of
from .secure import answer_secure
from .secure_evaluation import answer_secure_evaluation

log = logging.getLogger("fedgru.client")

STATE_KEY = "fedgru-local-state"


@dataclass
class LocalState:
    """Cross-round state a hospital keeps for one run (in Flower's context.state)."""

    run_id: str = ""
    optimizer: bytes = b""

    @classmethod
    def load(cls, context: Context, run_id: str) -> LocalState:
        record = context.state.get(STATE_KEY)
        if record is None or str(record.get("run-id", "")) != run_id:
            return cls(run_id)
        return cls(run_id, bytes(record.get("optimizer", b"")))

    def save(self, context: Context) -> None:
        context.state[STATE_KEY] = ConfigRecord({"run-id": self.run_id, "optimizer": self.optimizer})


def _reply(req: Request, state: ReplyState, ledger: Ledger, content: dict | None = None, **extra) -> Message:
    return answer(req.msg, req.node.name, state, ledger, content, **extra)


def answer_query(msg: Message, context: Context, simulation: ExperimentConfig | None = None) -> Message:
    """Who this hospital is and what it reads; or, with the run's plan (a preflight), its
    answer to the plan (client.preflight)."""
    node = Node(context, simulation)
    if node.name == UNASSIGNED:
        return Message(RecordDict({M.STATUS: status("", ReplyState.UNASSIGNED, **{M.MODE: node.mode.value})}),
                       reply_to=msg)
    if M.PREFLIGHT in msg.content.config_records.get(M.CONFIG, {}):
        answer = answer_plan(experiment_of(msg), node)
        run = str(msg.content[M.CONFIG].get(M.RUN_ID, "?"))
        log.log(logging.INFO if answer.accepted else logging.ERROR, "%s %s the plan of run %r%s", node.name,
                "accepts" if answer.accepted else "refuses", run,
                f": {answer.reason}" if answer.reason else f" (noise multiplier {answer.noise_multiplier:.3g}, "
                f"set by {answer.noise_set_by})")
        return Message(RecordDict({M.STATUS: ConfigRecord({**answer.to_status(), M.MODE: node.mode.value})}),
                       reply_to=msg)
    return Message(RecordDict({M.STATUS: status(node.name, ReplyState.READY, **{
        M.MODE: node.mode.value, M.DEFINITION: node.definition.to_json()})}), reply_to=msg)


def _training_entries(req: Request, ledger: Ledger, budget: float) -> tuple[list[LedgerEntry], tuple[float, float] | None]:
    """The round's training releases if it fits the budget; else none, and (spent, would be)."""
    plan, declared = req.training, req.declared.train
    if plan is None:  # a comparison simulation without DP: outside the guarantee, never unrecorded
        weights = LedgerEntry(req.run_id, req.server_round, Mechanism.NONE, "model weights trained WITHOUT DP on the "
                              "training split", item=Item.WEIGHTS, examples=declared)
    else:
        # one round's cost by the hospital's own ledger (its accountant and delta), not the
        # message's choice of accountant (PRV reads about 20% lower than RDP)
        req.policy.check_round_cost(epsilon([NoisyRelease(req.server_round, plan.noise_multiplier, plan.sample_rate,
                                                          plan.steps, 1.0)], ledger.delta, ledger.accountant))
        weights = LedgerEntry(req.run_id, req.server_round, Mechanism.DP_SGD, "model weights after DP-SGD on the "
                              "training split", item=Item.WEIGHTS, noise_multiplier=plan.noise_multiplier,
                              sample_rate=plan.sample_rate, steps=plan.steps, max_grad_norm=plan.max_grad_norm,
                              examples=declared)
        would_be = ledger.epsilon_with([weights])
        if would_be > budget:
            return [], (ledger.epsilon(), would_be)
    size = LedgerEntry(req.run_id, req.server_round, Mechanism.NONE, "the training split's size (declared)",
                       item=Item.SPLIT_SIZE, examples=declared)
    for entry in (weights, size):  # an entry the ledger would refuse is refused now, before any data is read
        entry.check(f"{req.node.name}'s planned ledger entry")
    return [weights, size], None


def answer_train(msg: Message, context: Context, audit: CanaryAudit | None = None,
                 simulation: ExperimentConfig | None = None) -> Message:
    if SECAGG_STAGE in msg.content.config_records.get(M.CONFIG, {}):
        return answer_secure(msg, context, simulation, audit)  # a stage of secure aggregation (client.secure)
    req = Request(msg, context, simulation)
    cfg = req.cfg
    # The same round with the same global model again (a resumed server): resend the
    # release already made instead of making, and paying for, a new one.
    reply_key = f"{req.run_id}/{req.server_round}/train/{msg.content[M.ARRAYS].object_id}/{' '.join(s.value for s in req.splits)}"
    cached = req.store.load_reply(req.run_id, reply_key)
    if cached is not None:
        log.info("%s round %d: resending the reply already released", req.node.name, req.server_round)
        return Message(unpack(cached), reply_to=msg)

    budget = req.policy.training_budget(cfg, req.node.name)
    declined_text: dict = {}
    with req.store.transaction() as ledger:
        # everything decided before any patient data is read ...
        evaluations, declined = plan_evaluations(req, ledger)
        training, exhausted = _training_entries(req, ledger, budget)
        declined_text = {M.NOT_EVALUATED: "\n".join(declined)} if declined else {}
        content: dict = {}
        state = None
        if evaluations or exhausted is None:
            # ... then the data, read only for releases that will be made
            if exhausted is None:
                log.info("%s round %d: training", req.node.name, req.server_round)
            data = req.node.data()
            try:
                device = resolve_device(req.node.device)
                model = global_model(req, device)
                content = score(req, data, model, evaluations)
                if exhausted is None:
                    state = _train(req, context, model, data, device, audit)
                    content[M.ARRAYS] = ArrayRecord(
                        torch_state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
            except Exception as exc:  # noqa: BLE001 - nothing is recorded, nothing leaves
                raise AfterReading() from exc
            for entry in [r.entry for r in evaluations] + training:
                ledger.record(replace(entry, data=data.export))  # the hospital's own ledger names the export
        # the ledger is saved as this block ends: before any reply can leave
    if state is not None:
        # Kept only now that the round is recorded: state from a round that was not (a failure
        # above) would carry its gradients, unpaid for, into the next round.
        state.save(context)
    if exhausted is not None:
        spent, would_be = exhausted
        log.warning("%s stops before round %d: epsilon would reach %.3f, budget %.3f (spent %.3f)",
                    req.node.name, req.server_round, would_be, budget, spent)
        return _reply(req, ReplyState.BUDGET_EXHAUSTED, ledger, content,
                      **{M.EPSILON: spent, M.BUDGET: budget, M.DELTA: ledger.delta, **declined_text})
    eps = ledger.epsilon() if req.training else -1.0
    steps = req.training.steps if req.training else steps_per_round(
        req.declared.train, cfg.training.batch_size, cfg.training.local_epochs, cfg.training.sample_rate)[1]
    log.info("%s round %d: %d steps, epsilon %.3f", req.node.name, req.server_round, steps, eps)
    content[M.METRICS] = MetricRecord({
        M.NUM_EXAMPLES: req.declared.train, M.UNIT_WEIGHT: 1.0, M.EPSILON: float(eps),
        M.DELTA: float(ledger.delta), M.BUDGET: float(budget), M.STEPS: int(steps),
    })
    reply = _reply(req, ReplyState.TRAINED, ledger, content, **declined_text)
    req.store.save_reply(req.run_id, reply_key, pack(reply.content))
    return reply


def _train(req: Request, context: Context, model: GRUClassifier, data, device: torch.device,
           audit: CanaryAudit | None) -> LocalState:
    """One round of local training on the training split (DP-SGD unless the simulation
    compares without it); the loss stays in this hospital's log. Returns the optimizer
    state to keep, which the caller saves once the round is recorded."""
    cfg, plan = req.cfg, req.training
    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    canaries = None
    if audit is not None and audit.hospital == req.node.name and req.node.mode == NodeMode.SIMULATION:
        canaries = Canaries(torch.as_tensor(audit.included, dtype=torch.bool), audit.tamper)
    if plan is not None:
        dp = DPSettings(plan.noise_multiplier, plan.max_grad_norm, plan.sample_rate, plan.per_layer,
                        expected_batch_size=plan.expected_batch, micro_batch=plan.micro_batch)
        steps = plan.steps
    else:
        dp, steps = None, steps_per_round(req.declared.train, cfg.training.batch_size, cfg.training.local_epochs,
                                          cfg.training.sample_rate)[1]
    state = LocalState.load(context, req.run_id)
    idx = data.train
    result = train_local(
        model, TensorData.from_numpy(data.dataset.X[idx], data.dataset.S[idx], data.dataset.y[idx], device),
        training_for_round(cfg, req.server_round), steps, dp,
        sample_generator=secret_generator(),
        noise_generator=secret_generator(device) if dp else None,
        optimizer_state=state.optimizer if cfg.training.keep_optimizer_state else None,
        proximal_mu=req.proximal_mu,
        canaries=canaries,
    )
    if canaries is not None:
        np.save(Path(audit.out_dir) / f"round-{req.server_round:04d}.npy", result.canary_coordinates)
    state.optimizer = result.optimizer_state if cfg.training.keep_optimizer_state else b""
    log.info("%s round %d: loss %.4f (kept here)", req.node.name, req.server_round, result.mean_loss)
    return state


def answer_evaluate(msg: Message, context: Context, simulation: ExperimentConfig | None = None) -> Message:
    if SECAGG_STAGE in msg.content.config_records.get(M.CONFIG, {}):
        return answer_secure_evaluation(msg, context, simulation)  # a stage of a secure evaluation
    req = Request(msg, context, simulation)
    content: dict = {}
    with req.store.transaction() as ledger:
        evaluations, declined = plan_evaluations(req, ledger)
        if evaluations:
            data = req.node.data()
            try:
                content = score(req, data, global_model(req, resolve_device(req.node.device)), evaluations)
            except Exception as exc:  # noqa: BLE001 - nothing is recorded, nothing leaves
                raise AfterReading() from exc
            for release in evaluations:
                ledger.record(replace(release.entry, data=data.export))
            # the hospital's own log names every release, as it does each training round's
            splits = sorted({r.entry.split for r in evaluations}, key=lambda s: s.value)
            log.info("%s round %d: evaluation released: %s; epsilon now %s", req.node.name, req.server_round,
                     ", ".join(f"{r.entry.split.value} {r.entry.item.value}" for r in evaluations),
                     ", ".join(f"{s.value} {ledger.epsilon(s):.3f}" for s in splits))
    not_evaluated = {M.NOT_EVALUATED: "\n".join(declined)} if declined else {}
    return _reply(req, ReplyState.EVALUATED, ledger, content, **not_evaluated)


def handlers(audit: CanaryAudit | None = None, simulation: ExperimentConfig | None = None
             ) -> dict[str, Callable[[Message, Context], Message]]:
    """The three handlers, each answering every failure with a reply (``client.replies``).
    ``simulation``: the simulation's own config, which defines every simulated hospital
    (what it reads, declares and allows; without it a simulated hospital reads Flower's
    run config); ``audit`` puts a privacy audit's canaries into one simulated hospital."""

    def name_of(msg: Message, context: Context) -> str:
        return Node(context, simulation).name

    return {
        "query": refusing(partial(answer_query, simulation=simulation), name_of, "query"),
        "train": refusing(partial(answer_train, audit=audit, simulation=simulation), name_of, "train"),
        "evaluate": refusing(partial(answer_evaluate, simulation=simulation), name_of, "evaluate"),
    }


def build_client_app(mods: list | None = None, audit: CanaryAudit | None = None,
                     simulation: ExperimentConfig | None = None) -> ClientApp:
    """The hospital ClientApp (:func:`handlers`); ``mods`` wrap every handler (simulations
    inject faults so)."""
    client_app = ClientApp(mods=mods or [])
    answer = handlers(audit, simulation)
    client_app.query()(answer["query"])
    client_app.train()(answer["train"])
    client_app.evaluate()(answer["evaluate"])
    return client_app


# A deployed hospital's handlers, as its SuperNode calls them (tests call them too).
_DEPLOYED = handlers()
query, train, evaluate = _DEPLOYED["query"], _DEPLOYED["train"], _DEPLOYED["evaluate"]
app = build_client_app()
