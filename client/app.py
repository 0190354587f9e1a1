"""The hospital side: a Flower ClientApp.

- ``query``: says which hospital this node is (nothing about patients).
- ``train``: loads the global weights, runs DP-SGD on the hospital's training split,
  and replies with the new weights, the example count, the training loss and the
  hospital's cumulative epsilon for the run, computed from its whole DP-SGD history.
- ``evaluate``: scores the global model on the hospital's validation or test split and
  replies with a score summary (see ``common.metrics.ScoreSummary``) and the metrics
  derived from it.

The experiment config arrives with every message from the server; what is specific to
the hospital (its data, device) comes from the node config. Cross-round state (the DP
history, the calibrated noise multiplier, the optimizer state) lives in
``context.state`` and never leaves the hospital, except as the ledger that the privacy
report needs.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import messages as M
from common.config import ExperimentConfig
from common.metrics import ScoreSummary
from common.model import GRUClassifier, model_spec
from common.privacy import DPSGDEntry, calibrate_noise, epsilon, steps_per_round
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

log = logging.getLogger("fedgru.client")

STATE_KEY = "fedgru-local-state"


def _experiment(msg: Message) -> ExperimentConfig:
    return ExperimentConfig.from_json(str(msg.content[M.CONFIG][M.EXPERIMENT_JSON]))


def _load_state(context: Context, run_id: str) -> LocalState:
    record = context.state.get(STATE_KEY)
    if record is None or str(record.get("run-id", "")) != run_id:
        return LocalState()
    return LocalState.from_json(str(record["json"]), optimizer=bytes(record.get("optimizer", b"")))


def _save_state(context: Context, run_id: str, state: LocalState) -> None:
    context.state[STATE_KEY] = ConfigRecord({"run-id": run_id, "json": state.to_json(), "optimizer": state.optimizer})


def _device(cfg: ExperimentConfig, context: Context) -> torch.device:
    return resolve_device(str(context.node_config.get("device", cfg.training.device)))


def _global_model(cfg: ExperimentConfig, msg: Message, device: torch.device) -> GRUClassifier:
    model = GRUClassifier(model_spec(cfg), gru_impl=cfg.model.gru_impl if cfg.privacy.enabled else "torch")
    model.load_state_dict(msg.content[M.ARRAYS].to_torch_state_dict(), strict=True)
    return model.to(device)


def _tensors(h: HospitalData, which: str, device: torch.device) -> TensorData:
    idx = h.split(which)
    return TensorData.from_numpy(h.dataset.X[idx], h.dataset.S[idx], h.dataset.y[idx], device)


def noise_multiplier_for_run(cfg: ExperimentConfig, sample_rate: float, steps: int) -> float:
    """Fixed sigma, or sigma calibrated once for all ``run.rounds`` planned rounds."""
    if cfg.privacy.noise_multiplier > 0:
        return cfg.privacy.noise_multiplier
    return calibrate_noise(
        cfg.privacy.target_epsilon, cfg.privacy.delta, sample_rate, steps * cfg.run.rounds, cfg.privacy.accountant
    )


def query(msg: Message, context: Context) -> Message:
    cfg = _experiment(msg)
    name = node_hospital_name(cfg, context.node_config)
    mode = "deployment" if "data-path" in context.node_config else "simulation"
    status = ConfigRecord({M.HOSPITAL: name, M.STATE: "ready" if name != UNASSIGNED else "unassigned", M.MODE: mode})
    return Message(RecordDict({M.STATUS: status}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    cfg = _experiment(msg)
    run_id = str(msg.content[M.CONFIG][M.RUN_ID])
    server_round = int(msg.content[M.CONFIG][M.SERVER_ROUND])
    if cfg.training.threads > 0:
        torch.set_num_threads(cfg.training.threads)
    device = _device(cfg, context)
    hospital = load_hospital(cfg, context.node_config)
    data = _tensors(hospital, "train", device)
    state = _load_state(context, run_id)
    model = _global_model(cfg, msg, device)
    sample_rate, steps = steps_per_round(len(data), cfg.training.batch_size, cfg.training.local_epochs)
    dp = None
    if cfg.privacy.enabled:
        if state.noise_multiplier <= 0:
            state.noise_multiplier = noise_multiplier_for_run(cfg, sample_rate, steps)
        dp = DPSettings(state.noise_multiplier, cfg.privacy.max_grad_norm, sample_rate)
    mu = float(msg.content[M.CONFIG].get("proximal-mu", 0.0))
    training = replace(cfg.training, lr=scheduled_lr(cfg, server_round))
    result = train_local(
        model, data, training, steps, dp,
        sample_generator=secret_generator(),
        noise_generator=secret_generator(device) if dp else None,
        optimizer_state=state.optimizer if cfg.training.keep_optimizer_state else None,
        proximal_mu=mu,
    )
    if dp is not None:
        state.history.append(
            DPSGDEntry(server_round, dp.noise_multiplier, dp.sample_rate, result.steps, dp.max_grad_norm, run_id)
        )
    state.optimizer = result.optimizer_state if cfg.training.keep_optimizer_state else b""
    _save_state(context, run_id, state)
    eps = epsilon(state.history, cfg.privacy.delta, cfg.privacy.accountant) if dp else float("inf")
    log.info("%s round %d: %d steps, loss %.4f, epsilon %.3f", hospital.name, server_round, result.steps, result.mean_loss, eps)
    metrics = MetricRecord(
        {
            M.NUM_EXAMPLES: len(data),
            M.TRAIN_LOSS: float(result.mean_loss),
            M.EPSILON: float(eps) if dp else -1.0,
            M.DELTA: float(cfg.privacy.delta),
            M.STEPS: int(result.steps),
        }
    )
    status = ConfigRecord({M.HOSPITAL: hospital.name, M.STATE: "trained", M.LEDGER: state.to_json()})
    arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    return Message(RecordDict({M.ARRAYS: arrays, M.METRICS: metrics, M.STATUS: status}), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    cfg = _experiment(msg)
    split = str(msg.content[M.CONFIG].get(M.SPLIT, "val"))
    device = _device(cfg, context)
    hospital = load_hospital(cfg, context.node_config)
    model = _global_model(cfg, msg, device)
    idx = hospital.split(split)
    probs = predict_proba(model, hospital.dataset.X[idx], hospital.dataset.S[idx])
    summary = ScoreSummary.from_predictions(hospital.dataset.y[idx], probs, cfg.evaluation.score_bins)
    # Metrics derived from the summary (undefined ones, e.g. AUROC without deaths, left out).
    derived = {k: float(v) for k, v in summary.metrics().items() if np.isfinite(v)}
    derived[M.NUM_EXAMPLES] = int(len(idx))
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in summary.to_arrays().items()})
    status = ConfigRecord({M.HOSPITAL: hospital.name, M.SPLIT: split})
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
