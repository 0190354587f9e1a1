"""The whole experiment config: its sections, the checks that span them, and how it
travels (as JSON, inside every Flower message the coordinator sends).

``features.select`` is applied to the plain tree before the types are built
(:func:`select_variables`), so a config that travels as JSON, already cut, reads back
the same.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..typed import TypedDataError, build
from .sections import (
    Check,
    ConfigError,
    DataSection,
    EvaluationSection,
    FeatureSection,
    HospitalDPSection,
    ModelSection,
    PartitionSection,
    PrivacySection,
    RunSection,
    SplitSection,
    StrategySection,
    TaskSection,
    TrainingSection,
)
from .yaml_tree import DEFAULT_CONFIG, deep_merge, read_yaml


@dataclass
class ExperimentConfig:
    run: RunSection
    data: DataSection
    task: TaskSection
    features: FeatureSection
    split: SplitSection
    partition: PartitionSection
    model: ModelSection
    training: TrainingSection
    privacy: PrivacySection
    hospital_dp: HospitalDPSection
    strategy: StrategySection
    evaluation: EvaluationSection
    source: str = ""  # file the config was loaded from (informational, not a setting)

    @property
    def num_classes(self) -> int:
        return len(self.task.classes)

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2

    @property
    def monitors_onset(self) -> bool:
        """Whether the test release brings the validation stays' onset histogram, from
        which the hourly monitor's margin is read (a binary task with monitor_rate)."""
        return self.is_binary and self.evaluation.monitor_rate > 0 and self.evaluation.onset_share > 0

    @property
    def checkpoint_hours(self) -> list[int]:
        """The hours of ``evaluation.hourly_checkpoints`` that fall before the window's last
        step (a binary task's; the last step's threshold is the run's own): a shorter
        window is a change of ``features.window_hours`` alone."""
        if not self.is_binary:
            return []
        steps = round(self.features.window_hours / self.features.bin_hours)
        return [h for h in self.evaluation.hourly_checkpoints if h < steps]

    def validation_rounds(self) -> list[int]:
        """Rounds whose training message also asks for a validation histogram of the model
        it carries (the global model after the previous round); the final model's comes after."""
        every = self.evaluation.validate_every
        return [r for r in range(2, self.run.rounds + 1) if every > 0 and (r - 1) % every == 0]

    def planned_evaluations(self) -> dict[str, int]:
        """Score histograms a run plans per split (values of messages.Split): validation
        during the run and of the final model, test once."""
        return {"val": len(self.validation_rounds()) + 1, "test": 1}

    def validate(self, origin: str) -> None:
        """Each section checks itself; then the checks that span sections. No number may be
        NaN or infinite (JSON's ``Infinity`` reads as a float: a message can carry one)."""
        _check_finite(self, origin)
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(Check(origin, f.name))
        check = Check(origin, "model")
        check(
            not (self.privacy.enabled and self.model.gru_impl == "torch"),
            "gru_impl", "'torch' (nn.GRU) has no per-example gradients; use 'fast' or 'opacus' with DP",
        )
        check(
            self.model.init != "carry_forward" or self.features.observed_mask,
            "init", "carry_forward reads the observed-mask channel: set features.observed_mask true",
        )
        Check(origin, "hospital_dp")(
            not (self.hospital_dp.enabled and self.strategy.name in ("fedadam", "fedavgm")),
            "", "needs plain weighted averaging (fedavg or fedprox), not a server optimizer",
        )
        secure = Check(origin, "privacy")
        if self.privacy.aggregation == "secure":
            secure(self.privacy.enabled, "aggregation", "'secure' adds distributed DP noise: set privacy.enabled true")
            secure(not self.hospital_dp.enabled, "aggregation", "'secure' and hospital_dp cannot be combined (the "
                   "coordinator never sees one hospital's update to clip it)")
            secure(self.privacy.clipping == "flat", "aggregation", "'secure' clips each patient's whole gradient: set "
                   "privacy.clipping flat")
            secure(0 <= self.training.sample_rate <= 1, "aggregation", "'secure' samples training.sample_rate of the "
                   "patients each round (0: all): set it in [0, 1]")
        statics = {sp.name: sp for sp in self.features.static}
        for i, group in enumerate(self.evaluation.subgroups):
            spec = statics.get(group.column)
            Check(origin, f"evaluation.subgroups[{i}]")(spec is not None, "column", "must name a descriptor in features.static")
            Check(origin, f"evaluation.subgroups[{i}]")(
                spec.kind == "categorical" or (bool(group.bands) and sorted(group.bands) == group.bands),
                "bands", "must list increasing cut points for a continuous descriptor",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>", fill_defaults: bool = False) -> ExperimentConfig:
        """A config from plain data. ``fill_defaults`` reads it over default.yaml (a model
        bundle saved before a key existed); without it every key must be present (a
        message from the server, which always sends the whole config)."""
        if fill_defaults:
            data = deep_merge(read_yaml(DEFAULT_CONFIG), _with_old_meanings(data))
        return _typed(data, origin)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_dict(json.loads(text), origin="<message>")


def _check_finite(value: Any, origin: str, dotted: str = "") -> None:
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), origin, f"{dotted}.{f.name}" if dotted else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, origin, f"{dotted}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, origin, f"{dotted}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{origin}: '{dotted}' must be a finite number")


# Keys added after bundles, checkpoints and run folders were first written whose default
# today is not what their absence meant then: a saved config without such a key keeps
# the old meaning, so an old model still reads the inputs it was trained on.
MEANING_WHEN_ABSENT: dict[tuple[str, str], Any] = {
    ("features", "select"): [],  # before the key existed the model read every variable of the table
    ("model", "init"): "random",  # before carry_forward existed every model started at random ...
    ("model", "train_gru"): True,  # ... and trained its GRU
}


def _with_old_meanings(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    for (section, key), meaning in MEANING_WHEN_ABSENT.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section] = {**data[section], key: copy.deepcopy(meaning)}
    return data


def select_variables(tree: dict[str, Any], origin: str) -> dict[str, Any]:
    """The tree with ``features.variables`` cut down to the names in ``features.select``
    (kept in the table's order; an empty list keeps all). A name the table lacks is an
    error naming it. Cutting the plain tree, before the types are built, means a config
    that travels as JSON (already cut, ``select`` kept) reads back the same."""
    features = tree.get("features")
    select = features.get("select") if isinstance(features, dict) else None
    variables = features.get("variables") if isinstance(features, dict) else None
    if not select or not isinstance(select, list) or not isinstance(variables, list):
        return tree  # nothing to cut, or a type error that build() reports with its key
    known = [v.get("name") for v in variables if isinstance(v, dict)]
    unknown = [str(n) for n in select if n not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [str(k) for k in known], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{origin}: 'features.select' names {', '.join(unknown)}, not in features.variables{hint}")
    dupes = sorted({str(n) for n in select if select.count(n) > 1})
    if dupes:
        raise ConfigError(f"{origin}: 'features.select' lists {', '.join(dupes)} more than once")
    cut = dict(features, variables=[v for v in variables if isinstance(v, dict) and v.get("name") in select])
    return dict(tree, features=cut)


def _typed(tree: dict[str, Any], origin: str) -> ExperimentConfig:
    tree = select_variables(tree, origin)
    try:
        cfg = build(ExperimentConfig, tree, origin)
    except TypedDataError as exc:
        raise ConfigError(str(exc)) from None
    cfg.validate(origin)
    return cfg

