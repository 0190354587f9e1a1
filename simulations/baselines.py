"""Baselines that show what federation buys, on the same splits as the federated run.

- ``central``: the same model trained on all hospitals' training splits pooled, no DP
  (what one would get if the data could be shared).
- ``central-dp``: the same, with DP-SGD at the same per-patient epsilon.
- ``local``: every hospital trains alone on its own split with DP-SGD at the same
  epsilon; each is scored on its own test split, and the pooled metrics use each
  hospital's own model for its own patients.

All train for ``run.rounds x training.local_epochs`` passes over their data with the
config's optimizer settings, so the compute matches the federated run, and each releases
what the federation releases: the exponential average of its models after each round
(``strategy.average_decay``, server.averaging), so that a federation's utility is compared
with a reference post-processed alike.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.config import ExperimentConfig
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.files import write_json
from common.metrics import exact_metrics
from common.model import GRUClassifier, model_spec
from common.privacy import NoisyRelease, calibrate_noise, epsilon, steps_per_round
from common.subgroups import exact_results
from common.training import DPSettings, TensorData, predict_proba, resolve_device, train_local, training_for_round
from server.averaging import ModelAverage
from server.records import BaselineResult, load_records

KINDS = ("central", "central-dp", "local")


def _train(cfg: ExperimentConfig, X, S, y, dp_epsilon: float | None, seed: int,
           average: ModelAverage | None = None) -> tuple[GRUClassifier, float]:
    """Train on (X, S, y) for rounds x local_epochs passes; returns the model, holding the
    average of its models after each round (``average``; default: the config's decay, as
    the coordinator keeps it), and the epsilon spent."""
    device = resolve_device(cfg.training.device)
    torch.manual_seed(seed)
    model = GRUClassifier(model_spec(cfg), cfg.model.gru_impl if dp_epsilon else "torch").to(device)
    data = TensorData.from_numpy(X, S, y, device)
    q, steps = steps_per_round(len(data), cfg.training.batch_size, cfg.training.local_epochs, cfg.training.sample_rate)
    rounds = cfg.run.rounds
    dp, history = None, []
    delta = cfg.privacy.delta_for(len(data))  # the same rule the hospitals use
    if dp_epsilon:
        sigma = calibrate_noise(dp_epsilon, delta, q, steps * rounds, cfg.privacy.accountant)
        dp = DPSettings(sigma, cfg.privacy.max_grad_norm, q, cfg.privacy.clipping == "per_layer")
    # A baseline is a local experiment: reproducible is fine. Batches are drawn on the CPU;
    # the noise is drawn where the gradients are (torch.normal needs a generator there).
    batches = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1) if dp else None
    state = None
    average = average if average is not None else ModelAverage(cfg.strategy.average_decay)
    for r in range(1, rounds + 1):
        out = train_local(model, data, training_for_round(cfg, r), steps, dp, batches, noise, optimizer_state=state)
        state = out.optimizer_state if cfg.training.keep_optimizer_state else None
        average.update(_arrays(model), r)
        if dp:
            history.append(NoisyRelease(r, dp.noise_multiplier, q, out.steps, dp.max_grad_norm))
    last = _arrays(model)
    released = average.final(last)
    if released is not last:  # post-processing of the models trained: the epsilon is the same
        model.load_state_dict(released.to_torch_state_dict())
    eps = epsilon(history, delta, cfg.privacy.accountant) if dp else math.inf
    return model, eps


def _arrays(model: GRUClassifier) -> ArrayRecord:
    """The model's weights as the coordinator holds a global model (a copy, on the CPU)."""
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})


def train_baseline_models(cfg: ExperimentConfig, kind: str, target_epsilon: float | None = None,
                          seed: int | None = None) -> dict[str, GRUClassifier]:
    """The model each simulated hospital would use under a baseline: one central model
    for all, or each hospital's own (with ``_epsilon`` spent recorded on each model)."""
    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
    seed = cfg.run.seed if seed is None else seed
    eps_target = target_epsilon if target_epsilon is not None else cfg.privacy.target_epsilon
    if kind != "central" and not eps_target:
        raise ValueError("a DP baseline needs a target epsilon (--epsilon or privacy.target_epsilon)")
    ds = load_dataset(cfg)
    hospitals = make_partition(ds, cfg)
    if kind in ("central", "central-dp"):
        train = np.concatenate([h.train for h in hospitals])
        model, eps = _train(cfg, ds.X[train], ds.S[train], ds.y[train], eps_target if kind == "central-dp" else None, seed)
        model.spent = {"all": eps} if kind == "central-dp" else {}
        return {h.name: model for h in hospitals}
    models = {}
    for h in hospitals:
        models[h.name], eps = _train(cfg, ds.X[h.train], ds.S[h.train], ds.y[h.train], eps_target, seed)
        models[h.name].spent = {h.name: eps}
    return models


def run_baseline(
    cfg: ExperimentConfig, kind: str, out: Path | None = None, target_epsilon: float | None = None, seed: int | None = None
) -> BaselineResult:
    start = time.perf_counter()
    models = train_baseline_models(cfg, kind, target_epsilon, seed)
    ds = load_dataset(cfg)
    per, ys, ps, spent, tests = {}, [], [], {}, []
    for h in make_partition(ds, cfg):  # each hospital's test patients, scored by the model it would use
        p = predict_proba(models[h.name], ds.X[h.test], ds.S[h.test])
        per[h.name] = exact_metrics(ds.y[h.test], p)
        ys.append(ds.y[h.test])
        ps.append(p)
        tests.append(h.test)
        spent.update(models[h.name].spent)
    test = np.concatenate(tests)
    raw = {k: v[test] for k, v in ds.groups.items()}
    subgroups = exact_results(cfg, np.concatenate(ys), np.concatenate(ps), raw, 0.5) if cfg.is_binary else []
    result = BaselineResult(
        kind=kind, seed=cfg.run.seed if seed is None else seed, rounds=cfg.run.rounds,
        local_epochs=cfg.training.local_epochs, epsilon=spent,
        pooled=exact_metrics(np.concatenate(ys), np.concatenate(ps)), hospitals=per,
        seconds=round(time.perf_counter() - start, 1), subgroups=subgroups,
    )
    if out is not None:
        existing = load_records(out, BaselineResult) or {}
        existing[kind] = result
        write_json(out, existing)
    return result
