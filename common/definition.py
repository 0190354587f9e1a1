"""What a hospital reads: its data definition.

The task (which outcome column, which classes, which outcome values mean "unknown") and
the features (the variable table, the selection, the window and its bins, the
descriptors) decide which stays a hospital reads, which of their values and which
labels. They are the hospital's, not the coordinator's: a deployed hospital fixes them
in its own folder (``definition.yaml``, written by ``fedgru hospital init`` and changed
only by ``fedgru hospital data``); a simulated hospital takes them from the simulation's
own config, as launched, never from a message. Every message carries the whole
experiment config, and a hospital refuses one that differs from its definition at any
of these keys, naming the key (:func:`first_difference`), before it reads a patient
file. The coordinator learns each hospital's definition when it asks who the hospital
is, and builds the run's model to match, so an honest run never meets the refusal.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .config import Check, ConfigError, ExperimentConfig, FeatureSection, TaskSection, select_variables
from .typed import TypedDataError, build

# The config keys a deployed hospital's definition fixes (its own source details, such as
# the files, their format and column names, live beside it in hospital.yaml).
DEPLOYED_KEYS = ("task", "features")
# A simulated hospital is a share of the simulation's data: what it reads also depends on
# where that data is, how it is shared out and split, and the seed of both.
SIMULATED_KEYS = (
    "data.format", "data.path", "data.outcomes", "data.id_column", "data.max_stays",
    "task", "features", "split", "partition", "run.seed",
)


# Keys of a variable or descriptor that change how results are shown, never which stays,
# values or labels are read, nor any input the model sees: the explanations' reference
# value, the unit a value prints in, a category's name. Two definitions that differ only
# there read alike, so no hospital is refused or left out for them (a definition written
# before ``normal`` or ``normal_uncharted`` existed loads with its default there and still
# reads as a newer one does).
PRESENTATION_KEYS = frozenset({"normal", "normal_uncharted", "unit", "labels"})


@dataclass
class DataDefinition:
    """The task and the features one hospital reads its stays by."""

    task: TaskSection
    features: FeatureSection

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> DataDefinition:
        return cls(task=dataclasses.replace(cfg.task), features=dataclasses.replace(cfg.features))

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_plain(), sort_keys=True)

    def tensors_json(self) -> str:
        """What a hospital's preprocessed tensors depend on, for their cache's key: the
        definition less ``normal`` and ``normal_uncharted``, which change no input. Dropped
        rather than kept, so the key of a folder registered before they existed is unchanged
        and its tensors stay valid (``unit`` and ``labels`` stay in: older keys hold them)."""
        return json.dumps(_without_presentation(self.to_plain(), ("normal", "normal_uncharted")), sort_keys=True)

    def reading_json(self) -> str:
        """What decides how the data are read: the definition less its presentation keys."""
        return json.dumps(reading_part(self.to_plain()), sort_keys=True)

    @classmethod
    def from_plain(cls, data: Any, origin: str) -> DataDefinition:
        """A definition from plain data (a hospital's file, a hospital's answer), every
        key and value checked as a config's would be."""
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: a data definition must be a mapping with 'task' and 'features'")
        try:
            definition = build(cls, select_variables(data, origin), origin)
        except TypedDataError as exc:
            raise ConfigError(str(exc)) from None
        definition.task.validate(Check(origin, "task"))
        definition.features.validate(Check(origin, "features"))
        return definition

    @classmethod
    def from_json(cls, text: str, origin: str) -> DataDefinition:
        try:
            return cls.from_plain(json.loads(text), origin)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{origin}: the data definition is not valid JSON") from None

    def apply_to(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` reading its data by this definition."""
        return dataclasses.replace(cfg, task=dataclasses.replace(self.task), features=dataclasses.replace(self.features))

    def difference(self, cfg: ExperimentConfig) -> str | None:
        """The first key (dotted) at which ``cfg`` reads data otherwise, or None (presentation
        keys do not count: ``PRESENTATION_KEYS``)."""
        return first_difference(reading_part({"task": dataclasses.asdict(cfg.task),
                                              "features": dataclasses.asdict(cfg.features)}),
                                reading_part(self.to_plain()))


def reading_part(tree: Any) -> Any:
    """A plain config or definition tree less its presentation keys: what comparisons of how
    data are read look at."""
    return _without_presentation(tree)


def _without_presentation(tree: Any, keys=PRESENTATION_KEYS) -> Any:
    if isinstance(tree, dict):
        return {k: _without_presentation(v, keys) for k, v in tree.items() if k not in keys}
    if isinstance(tree, list):
        return [_without_presentation(v, keys) for v in tree]
    return tree


def first_difference(theirs: Any, ours: Any, keys: tuple[str, ...] | None = None, path: str = "") -> str | None:
    """The dotted path (``features.variables[3].center``) of the first place where two
    plain trees differ, looking only under ``keys`` (dotted prefixes) when given; None
    when they agree there. Only the path is returned, never a value."""
    if keys is not None:
        for key in keys:
            found = first_difference(_at(theirs, key), _at(ours, key), None, key)
            if found:
                return found
        return None
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for key in sorted(set(theirs) | set(ours), key=str):
            child = f"{path}.{key}" if path else str(key)
            if key not in theirs or key not in ours:
                return child
            found = first_difference(theirs[key], ours[key], None, child)
            if found:
                return found
        return None
    if isinstance(theirs, list) and isinstance(ours, list):
        if len(theirs) != len(ours):
            return path
        for i, (a, b) in enumerate(zip(theirs, ours)):
            found = first_difference(a, b, None, f"{path}[{i}]")
            if found:
                return found
        return None
    same = type(theirs) is type(ours) and theirs == ours
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (theirs, ours))
    return None if same or (numbers and float(theirs) == float(ours)) else path


_MISSING = object()


def _at(tree: Any, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node
