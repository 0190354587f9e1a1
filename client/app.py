"""The hospital side: a Flower ClientApp.

- ``query``: says which hospital this node is (nothing about patients).
- ``train``: checks the privacy budget, writes the round's release into the ledger
  *before* training (a crash can only over-count), runs DP-SGD on the hospital's
  training split and replies with the new weights, the example count, the training
  loss and the hospital's cumulative epsilon over everything in its ledger. A round
  that would take the hospital past its budget is not trained: the reply says
  ``budget-exhausted``. A missing or corrupt ledger makes the hospital refuse.
- ``evaluate``: scores the global model on the hospital's validation or test split and
  replies with a score summary (``common.metrics.ScoreSummary``) and the metrics
  derived from it; the release is recorded in the ledger as non-DP.

The experiment config arrives with every message from the server; what is specific to
the hospital (its data, ledger, budget, device) comes from its node config
(``client.node``). Cross-round state (the calibrated noise multiplier, the optimizer
state, the last reply) lives in ``context.state`` and never leaves the hospital.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import messages as M
from common.config import ExperimentConfig
from common.ledger import LedgerEntry, LedgerError
from common.logs import attach_to_flower
from common.messages import Mechanism, NodeMode, ReplyState, Split
from common.metrics import ScoreSummary
from common.model import GRUClassifier, model_spec
from common.privacy import DPSGDEntry, calibrate_noise, steps_per_round
from common.training import (
    DPSettings,
    TensorData,
    predict_proba,
    resolve_device,
    secret_generator,
    train_local,
    training_for_round,
)

from .hospital import UNASSIGNED, HospitalData, LocalState, load_hospital, node_hospital_name
from .ledger_store import ContextLedgerStore, FileLedgerStore
from .node import NodeSettings

log = logging.getLogger("fedgru.client")

STATE_KEY = "fedgru-local-state"


def _experiment(msg: Message) -> ExperimentConfig:
    return ExperimentConfig.from_json(str(msg.content[M.CONFIG][M.EXPERIMENT_JSON]))


def _load_state(context: Context, run_id: str) -> LocalState:
    record = context.state.get(STATE_KEY)
    if record is None or str(record.get("run-id", "")) != run_id:
        return LocalState()
    return LocalState(noise_multiplier=float(record["sigma"]), optimizer=bytes(record.get("optimizer", b"")))


def _save_state(context: Context, run_id: str, state: LocalState) -> None:
    context.state[STATE_KEY] = ConfigRecord({"run-id": run_id, "sigma": state.noise_multiplier, "optimizer": state.optimizer})


def _store(cfg: ExperimentConfig, node: NodeSettings, hospital: HospitalData, context: Context):
    if node.deployed:
        if not node.ledger_path:
            raise LedgerError(
                "this hospital's node config has no ledger-path; a real hospital must keep a privacy "
                "ledger (create one with `fedgru ledger init` and pass ledger-path in --node-config)"
            )
        return FileLedgerStore(node.ledger_path)
    delta = cfg.privacy.delta_for(len(hospital.train))
    return ContextLedgerStore(context, hospital.name, delta, cfg.privacy.accountant)


def _status(hospital: str, state: ReplyState, **extra) -> ConfigRecord:
    return ConfigRecord({M.HOSPITAL: hospital, M.STATE: state.value, **extra})


def _device(cfg: ExperimentConfig, node: NodeSettings) -> torch.device:
    return resolve_device(node.device or cfg.training.device)


def _global_model(cfg: ExperimentConfig, msg: Message, device: torch.device) -> GRUClassifier:
    model = GRUClassifier(model_spec(cfg), gru_impl=cfg.model.gru_impl if cfg.privacy.enabled else "torch")
    model.load_state_dict(msg.content[M.ARRAYS].to_torch_state_dict(), strict=True)
    return model.to(device)


def _tensors(h: HospitalData, which: str, device: torch.device) -> TensorData:
    idx = h.split(which)
    return TensorData.from_numpy(h.dataset.X[idx], h.dataset.S[idx], h.dataset.y[idx], device)


def noise_multiplier_for_run(cfg: ExperimentConfig, sample_rate: float, steps: int, delta: float) -> float:
    """Fixed sigma, or sigma calibrated once for all ``run.rounds`` planned rounds."""
    if cfg.privacy.noise_multiplier > 0:
        return cfg.privacy.noise_multiplier
    return calibrate_noise(cfg.privacy.target_epsilon, delta, sample_rate, steps * cfg.run.rounds, cfg.privacy.accountant)


def query(msg: Message, context: Context) -> Message:
    cfg = _experiment(msg)
    name = node_hospital_name(cfg, context.node_config)
    mode = NodeMode.DEPLOYMENT if NodeSettings.from_node_config(context.node_config).deployed else NodeMode.SIMULATION
    status = _status(name, ReplyState.READY if name != UNASSIGNED else ReplyState.UNASSIGNED, **{M.MODE: mode.value})
    return Message(RecordDict({M.STATUS: status}), reply_to=msg)


class _Request:
    """What every handler needs: the experiment, the round, the hospital and its ledger."""

    def __init__(self, msg: Message, context: Context):
        attach_to_flower()
        self.cfg = _experiment(msg)
        self.run_id = str(msg.content[M.CONFIG][M.RUN_ID])
        self.server_round = int(msg.content[M.CONFIG][M.SERVER_ROUND])
        self.node = NodeSettings.from_node_config(context.node_config)
        self.hospital = load_hospital(self.cfg, context.node_config)
        self.refusal: str = ""
        try:
            self.store = _store(self.cfg, self.node, self.hospital, context)
            self.ledger = self.store.load(self.hospital.dataset.fingerprint)
        except LedgerError as exc:
            self.refusal = str(exc)

    def refuse(self, msg: Message, action: str) -> Message:
        log.error("%s refuses to %s: %s", self.hospital.name, action, self.refusal)
        status = _status(self.hospital.name, ReplyState.REFUSED, **{M.REASON: self.refusal})
        return Message(RecordDict({M.STATUS: status}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    req = _Request(msg, context)
    if req.refusal:
        return req.refuse(msg, "train")

    # The same round with the same global model again (a resumed server): resend the
    # release already made instead of making, and paying for, a new one.
    reply_key = f"{req.run_id}/{req.server_round}/{msg.content[M.ARRAYS].object_id}"
    cached = req.store.load_reply(reply_key)
    if cached is not None:
        log.info("%s round %d: resending the reply already released", req.hospital.name, req.server_round)
        return Message(_unpack_reply(cached), reply_to=msg)

    if req.cfg.training.threads > 0:
        torch.set_num_threads(req.cfg.training.threads)
    device = _device(req.cfg, req.node)
    data = _tensors(req.hospital, Split.TRAIN, device)
    state = _load_state(context, req.run_id)
    sample_rate, steps = steps_per_round(len(data), req.cfg.training.batch_size, req.cfg.training.local_epochs, req.cfg.training.sample_rate)
    dp = None
    budget = req.node.budget(req.cfg.privacy.budget_for(req.hospital.name))
    if req.cfg.privacy.enabled:
        if state.noise_multiplier <= 0:
            state.noise_multiplier = noise_multiplier_for_run(req.cfg, sample_rate, steps, req.ledger.delta)
        dp = DPSettings(state.noise_multiplier, req.cfg.privacy.max_grad_norm, sample_rate, req.cfg.privacy.clipping == "per_layer")
        planned = DPSGDEntry(req.server_round, dp.noise_multiplier, sample_rate, steps, dp.max_grad_norm, req.run_id)
        would_be = req.ledger.epsilon_with(planned)
        if would_be > budget:
            spent = req.ledger.epsilon()
            log.warning(
                "%s stops before round %d: epsilon would reach %.3f, budget %.3f (spent %.3f)",
                req.hospital.name, req.server_round, would_be, budget, spent,
            )
            status = _status(
                req.hospital.name, ReplyState.BUDGET_EXHAUSTED,
                **{M.EPSILON: spent, M.BUDGET: budget, M.DELTA: req.ledger.delta, M.LEDGER: req.ledger.to_json()},
            )
            return Message(RecordDict({M.STATUS: status}), reply_to=msg)
        # Write-ahead: the release is in the ledger before anything can leave.
        req.ledger.record(
            LedgerEntry(
                req.run_id, req.server_round, Mechanism.DP_SGD, "model weights after DP-SGD on the training split",
                noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps, max_grad_norm=dp.max_grad_norm,
            )
        )
        req.store.save(req.ledger)

    model = _global_model(req.cfg, msg, device)
    training = training_for_round(req.cfg, req.server_round)
    result = train_local(
        model, data, training, steps, dp,
        sample_generator=secret_generator(),
        noise_generator=secret_generator(device) if dp else None,
        optimizer_state=state.optimizer if req.cfg.training.keep_optimizer_state else None,
        proximal_mu=float(msg.content[M.CONFIG].get(M.PROXIMAL_MU, 0.0)),
    )
    req.ledger.record(
        LedgerEntry(req.run_id, req.server_round, Mechanism.NONE, "training example count and the round's mean training loss")
    )
    req.store.save(req.ledger)
    state.optimizer = result.optimizer_state if req.cfg.training.keep_optimizer_state else b""
    _save_state(context, req.run_id, state)
    eps = req.ledger.epsilon() if dp else -1.0
    log.info("%s round %d: %d steps, loss %.4f, epsilon %.3f", req.hospital.name, req.server_round, result.steps, result.mean_loss, eps)
    metrics = MetricRecord(
        {
            M.NUM_EXAMPLES: len(data),
            M.UNIT_WEIGHT: 1.0,
            M.TRAIN_LOSS: float(result.mean_loss),
            M.EPSILON: float(eps),
            M.DELTA: float(req.ledger.delta),
            M.BUDGET: float(budget),
            M.STEPS: int(result.steps),
        }
    )
    status = _status(req.hospital.name, ReplyState.TRAINED, **{M.LEDGER: req.ledger.to_json()})
    arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    content = RecordDict({M.ARRAYS: arrays, M.METRICS: metrics, M.STATUS: status})
    req.store.save_reply(reply_key, _pack_reply(content))
    return Message(content, reply_to=msg)


def _pack_reply(content: RecordDict) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "arrays": {k: torch.as_tensor(v.numpy()) for k, v in content[M.ARRAYS].items()},
            "metrics": dict(content[M.METRICS]),
            "status": dict(content[M.STATUS]),
        },
        buffer,
    )
    return buffer.getvalue()


def _unpack_reply(blob: bytes) -> RecordDict:
    data = torch.load(io.BytesIO(blob), weights_only=True)
    return RecordDict(
        {
            M.ARRAYS: ArrayRecord(torch_state_dict=data["arrays"]),
            M.METRICS: MetricRecord(data["metrics"]),
            M.STATUS: ConfigRecord(data["status"]),
        }
    )


def evaluate(msg: Message, context: Context) -> Message:
    req = _Request(msg, context)
    if req.refusal:
        return req.refuse(msg, "evaluate")
    split = Split(str(msg.content[M.CONFIG].get(M.SPLIT, Split.VAL.value)))
    device = _device(req.cfg, req.node)
    model = _global_model(req.cfg, msg, device)
    idx = req.hospital.split(split)
    probs = predict_proba(model, req.hospital.dataset.X[idx], req.hospital.dataset.S[idx])
    threshold = float(msg.content[M.CONFIG].get(M.THRESHOLD, 0.5))
    summary = ScoreSummary.from_predictions(req.hospital.dataset.y[idx], probs, req.cfg.evaluation.score_bins, threshold)
    req.ledger.record(
        LedgerEntry(
            req.run_id, req.server_round, Mechanism.NONE,
            f"score summary of the {split.value} split ({req.cfg.evaluation.score_bins} risk bins per class, "
            "confusion matrix, Brier sum, count)",
            split=split,
        )
    )
    req.store.save(req.ledger)
    # Metrics derived from the summary (undefined ones, e.g. AUROC without deaths, left out).
    derived = {k: float(v) for k, v in asdict(summary.metrics()).items() if np.isfinite(v)}
    derived[M.NUM_EXAMPLES] = int(len(idx))
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in summary.to_arrays().items()})
    status = _status(req.hospital.name, ReplyState.EVALUATED, **{M.SPLIT: split.value})
    return Message(
        RecordDict({M.EVALUATION: arrays, M.METRICS: MetricRecord(derived), M.STATUS: status}), reply_to=msg
    )


def build_client_app(mods: list | None = None) -> ClientApp:
    """The hospital ClientApp; ``mods`` wrap every handler (simulations inject faults so)."""
    client_app = ClientApp(mods=mods or [])
    client_app.query()(query)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = build_client_app()

