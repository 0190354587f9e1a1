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
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import messages as M
from common.config import ExperimentConfig
from common.ledger import DP_SGD, NO_DP, LedgerEntry, LedgerError
from common.logs import attach_to_flower
from common.metrics import ScoreSummary
from common.model import GRUClassifier, model_spec
from common.privacy import DPSGDEntry, calibrate_noise, steps_per_round
from common.training import (
    DPSettings,
    TensorData,
    predict_proba,
    resolve_device,
    scheduled_lr,
    secret_generator,
    train_local,
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


def _status(hospital: str, state: str, **extra) -> ConfigRecord:
    return ConfigRecord({M.HOSPITAL: hospital, M.STATE: state, **extra})


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
    mode = "deployment" if NodeSettings.from_node_config(context.node_config).deployed else "simulation"
    status = _status(name, "ready" if name != UNASSIGNED else "unassigned", **{M.MODE: mode})
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
        status = _status(self.hospital.name, "refused", **{M.REASON: self.refusal})
        return Message(RecordDict({M.STATUS: status}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    req = _Request(msg, context)
    if req.refusal:
        return req.refuse(msg, "train")
    cfg, run_id, server_round, node, hospital = req.cfg, req.run_id, req.server_round, req.node, req.hospital
    store, ledger = req.store, req.ledger

    # The same round with the same global model again (a resumed server): resend the
    # release already made instead of making, and paying for, a new one.
    reply_key = f"{run_id}/{server_round}/{msg.content[M.ARRAYS].object_id}"
    cached = store.load_reply(reply_key)
    if cached is not None:
        log.info("%s round %d: resending the reply already released", hospital.name, server_round)
        return Message(_unpack_reply(cached), reply_to=msg)

    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    device = _device(cfg, node)
    data = _tensors(hospital, "train", device)
    state = _load_state(context, run_id)
    sample_rate, steps = steps_per_round(len(data), cfg.training.batch_size, cfg.training.local_epochs, cfg.training.sample_rate)
    dp = None
    budget = node.budget(cfg.privacy.budget_for(hospital.name))
    if cfg.privacy.enabled:
        if state.noise_multiplier <= 0:
            state.noise_multiplier = noise_multiplier_for_run(cfg, sample_rate, steps, ledger.delta)
        dp = DPSettings(state.noise_multiplier, cfg.privacy.max_grad_norm, sample_rate, cfg.privacy.clipping == "per_layer")
        planned = DPSGDEntry(server_round, dp.noise_multiplier, sample_rate, steps, dp.max_grad_norm, run_id)
        would_be = ledger.epsilon_with(planned)
        if would_be > budget:
            spent = ledger.epsilon()
            log.warning(
                "%s stops before round %d: epsilon would reach %.3f, budget %.3f (spent %.3f)",
                hospital.name, server_round, would_be, budget, spent,
            )
            status = _status(
                hospital.name, "budget-exhausted",
                **{M.EPSILON: spent, M.BUDGET: budget, M.DELTA: ledger.delta, M.LEDGER: ledger.to_json()},
            )
            return Message(RecordDict({M.STATUS: status}), reply_to=msg)
        # Write-ahead: the release is in the ledger before anything can leave.
        ledger.record(
            LedgerEntry(
                run_id, server_round, DP_SGD, "model weights after DP-SGD on the training split",
                noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate, steps=steps, max_grad_norm=dp.max_grad_norm,
            )
        )
        store.save(ledger)

    model = _global_model(cfg, msg, device)
    training = replace(cfg.training, lr=scheduled_lr(cfg, server_round))
    result = train_local(
        model, data, training, steps, dp,
        sample_generator=secret_generator(),
        noise_generator=secret_generator(device) if dp else None,
        optimizer_state=state.optimizer if cfg.training.keep_optimizer_state else None,
        proximal_mu=float(msg.content[M.CONFIG].get("proximal-mu", 0.0)),
    )
    ledger.record(
        LedgerEntry(run_id, server_round, NO_DP, "training example count and the round's mean training loss")
    )
    store.save(ledger)
    state.optimizer = result.optimizer_state if cfg.training.keep_optimizer_state else b""
    _save_state(context, run_id, state)
    eps = ledger.epsilon() if dp else -1.0
    log.info("%s round %d: %d steps, loss %.4f, epsilon %.3f", hospital.name, server_round, result.steps, result.mean_loss, eps)
    metrics = MetricRecord(
        {
            M.NUM_EXAMPLES: len(data),
            M.UNIT_WEIGHT: 1.0,
            M.TRAIN_LOSS: float(result.mean_loss),
            M.EPSILON: float(eps),
            M.DELTA: float(ledger.delta),
            M.BUDGET: float(budget),
            M.STEPS: int(result.steps),
        }
    )
    status = _status(hospital.name, "trained", **{M.LEDGER: ledger.to_json()})
    arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    content = RecordDict({M.ARRAYS: arrays, M.METRICS: metrics, M.STATUS: status})
    store.save_reply(reply_key, _pack_reply(content))
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
    cfg, run_id, server_round, node, hospital = req.cfg, req.run_id, req.server_round, req.node, req.hospital
    store, ledger = req.store, req.ledger
    split = str(msg.content[M.CONFIG].get(M.SPLIT, "val"))
    device = _device(cfg, node)
    model = _global_model(cfg, msg, device)
    idx = hospital.split(split)
    probs = predict_proba(model, hospital.dataset.X[idx], hospital.dataset.S[idx])
    threshold = float(msg.content[M.CONFIG].get(M.THRESHOLD, 0.5))
    summary = ScoreSummary.from_predictions(hospital.dataset.y[idx], probs, cfg.evaluation.score_bins, threshold)
    ledger.record(
        LedgerEntry(
            run_id, server_round, NO_DP,
            f"score summary of the {split} split ({cfg.evaluation.score_bins} risk bins per class, "
            "confusion matrix, Brier sum, count)",
            split=split,
        )
    )
    store.save(ledger)
    # Metrics derived from the summary (undefined ones, e.g. AUROC without deaths, left out).
    derived = {k: float(v) for k, v in summary.metrics().items() if np.isfinite(v)}
    derived[M.NUM_EXAMPLES] = int(len(idx))
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in summary.to_arrays().items()})
    status = _status(hospital.name, "evaluated", **{M.SPLIT: split})
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

