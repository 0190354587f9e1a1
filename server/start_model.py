"""The model a run starts from when ``model.init_from`` names a model bundle.

DP-SGD at epsilon 1 keeps a good starting head but cannot travel far from a poor one
(docs/utility-levers.md, "Where DP-SGD starts"): a model trained on *public* data of the
same kind, or a consortium's earlier DP model, is the start that buys most. The start is
the coordinator's proposal like every global model: each hospital checks it as it
checks any round's model (client.policy), and nothing about the start is charged to a
hospital's ledger. What the start itself was trained on is the coordinator's
responsibility; the run records which file it was (path and sha256) so the report can say.

A start must read the same inputs in the same way (features: variables and their
reference values, window, bins, descriptors; the task's classes) and have the same
network (shape and the meaning of the GRU's units); only the training settings
(dropout, whether the GRU trains, how the head would have been initialised) may differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from common.bundle import Bundle
from common.config import ConfigError, ExperimentConfig
from common.data.records import DataError
from common.model import ModelSpec, carry_unit_kinds, model_spec
from common.paths import resolve

# ModelSpec fields that only steer training or the default start, not what a weight means.
TRAINING_ONLY = ("dropout", "zero_init_head", "train_gru")


@dataclass(frozen=True)
class StartModel:
    path: Path
    sha256: str  # of the bundle file's bytes, as read
    source_run: str  # run id the bundle records (a fedgru run's model.pt), "" if none
    weights: dict[str, torch.Tensor]


def load_start_model(cfg: ExperimentConfig) -> StartModel:
    """Read and check the bundle ``cfg.model.init_from`` names; a ConfigError says what
    differs (never a weight or patient value)."""
    path = resolve(cfg.model.init_from)
    where = f"model.init_from ({path})"
    try:
        bundle = Bundle(path)
    except DataError as exc:  # missing, or not a bundle: the message names the file
        raise ConfigError(f"model.init_from: {exc}") from None
    differs = _first_difference(bundle.config, bundle.spec, cfg)
    if differs:
        raise ConfigError(
            f"{where}: the bundle {differs}; a starting model must read the same inputs with the same network "
            "(train it with this config's features, task and model sections, or leave model.init_from empty)"
        )
    weights = {k: v.detach().clone() for k, v in bundle.model.state_dict().items()}
    return StartModel(path, bundle.sha256, str(bundle.info.get("run_id", "")), weights)


def _first_difference(theirs: ExperimentConfig, their_spec: ModelSpec, cfg: ExperimentConfig) -> str:
    if [v.name for v in theirs.features.variables] != [v.name for v in cfg.features.variables]:
        return (f"reads other variables ({len(theirs.features.variables)}: "
                f"{', '.join(v.name for v in theirs.features.variables[:4])}, ... against "
                f"{len(cfg.features.variables)} here; see features.select)")
    for f in dataclasses.fields(cfg.features):
        if f.name != "select" and getattr(theirs.features, f.name) != getattr(cfg.features, f.name):
            return f"has another features.{f.name}"
    if theirs.task.classes != cfg.task.classes:
        return f"predicts other classes ({', '.join(theirs.task.classes)})"
    for key in ("label_column", "bins"):
        if getattr(theirs.task, key) != getattr(cfg.task, key):
            return f"predicts another outcome (task.{key} {getattr(theirs.task, key)!r} against {getattr(cfg.task, key)!r} here)"
    ours = model_spec(cfg)
    for f in dataclasses.fields(ModelSpec):
        mine, other = _meaning(ours, f.name), _meaning(their_spec, f.name)
        if f.name not in TRAINING_ONLY and other != mine:
            return f"has another network: {f.name} {other!r} against {mine!r} here"
    return ""


def _meaning(spec: ModelSpec, name: str):
    """A spec field as it acts: ``carry_units: []`` reads the same units as their explicit list."""
    if name == "carry_units" and spec.init == "carry_forward" and not spec.carry_units:
        return carry_unit_kinds(spec.gru_hidden[0])
    return getattr(spec, name)
