"""Typed, validated experiment configuration.

A run is described by YAML. ``configs/default.yaml`` is the one source of defaults: every
config file is read on top of it (a file sets only what differs; ``extends:`` chains
further files, paths relative to the file), and dotted overrides (``training.lr=0.5``)
come last. Each key has its type and meaning in :mod:`.sections`, and each section
checks its own values; unknown keys, wrong types and impossible values are reported
with the file and the dotted key before anything runs.

The same :class:`ExperimentConfig` travels from the server to every hospital inside
Flower messages (as JSON), so both sides agree on features, model and training
settings. What a hospital allows (its privacy budget, DP always on, which patients may
be evaluated) is the hospital's own policy, and what it reads (its task and features)
its own data definition, not this config's (``client.policy``, ``common.definition``).

- :mod:`.sections`: each section's keys, types, meaning and checks;
- :mod:`.experiment`: the whole config, the checks that span sections, its JSON form;
- :mod:`.loading`: YAML files, ``extends``, overrides, Flower's run config.
"""

from .experiment import MEANING_WHEN_ABSENT, ExperimentConfig, select_variables
from .loading import apply_override, config_from_run_config, load_config, parse_override_string
from .sections import (
    CARRY_UNITS,
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
    StaticSpec,
    StrategySection,
    SubgroupSpec,
    TaskSection,
    TrainingSection,
    VariableSpec,
    auto_delta,
)
from .yaml_tree import DEFAULT_CONFIG, deep_merge

__all__ = [
    "CARRY_UNITS", "DEFAULT_CONFIG", "MEANING_WHEN_ABSENT", "Check", "ConfigError", "DataSection", "EvaluationSection",
    "ExperimentConfig", "FeatureSection", "HospitalDPSection", "ModelSection", "PartitionSection", "PrivacySection",
    "RunSection", "SplitSection", "StaticSpec", "StrategySection", "SubgroupSpec", "TaskSection", "TrainingSection",
    "VariableSpec", "apply_override", "auto_delta", "config_from_run_config", "deep_merge", "load_config",
    "parse_override_string", "select_variables",
]
